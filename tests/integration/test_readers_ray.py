"""Readers against real services: Ray Data's webdataset reader on a local Ray, and the readers on s3://
(SeaweedFS on loopback, from tests/conftest.py)."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # the shard writers of the unit tests

from data_helpers import key_of, write_shards  # noqa: E402

from pipelines.data import ShardStream, list_shards, read_shards_ray  # noqa: E402
from pipelines.shards import RAY_COLUMNS  # noqa: E402

pytestmark = pytest.mark.integration


def _refresh_ray_auth_config() -> None:
    """Ray reads RAY_AUTH_MODE/RAY_AUTH_TOKEN once, when first imported: if another test imported it before
    this fixture changed them, make it read them again (Ray's own test helper)."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:
        return
    reset_auth_token_state()


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray on 2 CPUs, loopback only, with token auth and a throwaway token (nothing written to ~/.ray)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # someone else's session: use it
        yield
        return
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ``import ray``, which reads them
    import ray

    _refresh_ray_auth_config()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _refresh_ray_auth_config()


def test_ray_dataset_from_shards_has_the_right_rows(tmp_path, ray_local):
    url = str(tmp_path / "ingest" / "web")
    bad = key_of(1, 2)
    truth = write_shards(url, [4, 3, 2], corrupt={bad})
    ds = read_shards_ray(list_shards(url))
    rows = ds.take_all()
    assert len(rows) == len(truth)
    assert all(set(r) == set(RAY_COLUMNS) for r in rows)
    got = {r["key"]: r for r in rows}
    assert set(got) == set(truth)
    for key, t in truth.items():
        r = got[key]
        assert (r["shard"], r["url"], r["text"], r["image"]) == (t["shard"], t["url"], t["text"], t["image"])
    assert got[bad]["image"] == truth[bad]["image"]  # still encoded: decoding, and failing, happen downstream


def test_readers_on_s3(s3_root, s3_server, ray_local):
    url = f"{s3_root}/ingest/web"
    truth = write_shards(url, [3, 2], corrupt={key_of(0, 1)})
    shards = list_shards(url)
    assert shards == [f"{url}/00000.tar", f"{url}/00001.tar"]

    stream = ShardStream(shards, shuffle_buffer=2)
    assert sorted(s.key for s in stream) == sorted(set(truth) - {key_of(0, 1)})
    assert stream.stats()["corrupt"] == 1

    # Ray's workers do not share this process's environment: the S3 settings travel as storage options.
    opts = {
        "endpoint_url": s3_server.endpoint,
        "key": s3_server.env["AWS_ACCESS_KEY_ID"],
        "secret": s3_server.env["AWS_SECRET_ACCESS_KEY"],
    }
    rows = read_shards_ray(shards, storage_options=opts).take_all()
    assert {(r["key"], r["shard"], r["text"], r["image"]) for r in rows} == {
        (k, t["shard"], t["text"], t["image"]) for k, t in truth.items()
    }
