"""The same ingestion with the run root (and a URL list) on ``s3://``, against SeaweedFS on loopback."""

from __future__ import annotations

import csv
import io
import json
import signal
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow.parquet as pq
import pytest
from integration_helpers import TINY, capfilt, read_shards
from PIL import Image

from pipelines import storage
from pipelines.config import load_config
from pipelines.ingest import run_ingest
from pipelines.world import serve_directory, world_files

pytestmark = pytest.mark.integration

SMALL_WORLD = [
    "--set",
    "world.n_web=120",
    "--set",
    "world.n_human=6",
    "--set",
    "world.n_test=4",
    "--set",
    "ingest.shard_size=50",
]


def _listing(url: str) -> dict[str, str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p: str(fs.info(p).get("ETag") or fs.info(p).get("LastModified")) for p in fs.find(path)}


def test_synth_and_ingest_with_the_root_on_s3(s3_server, s3_root):
    proc, synth_s = capfilt("synth", "--config", TINY, "--root", s3_root, *SMALL_WORLD, env=s3_server.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    world = storage.RunRoot(s3_root).world()
    assert storage.is_committed(world)
    with fsspec.open(world_files(world)["web"], "rb") as f:
        web = pq.read_table(f).to_pylist()
    caption_of = {w["url"].removeprefix("{base}/"): w["caption"] for w in web}

    proc, ingest_s = capfilt("ingest", "--config", TINY, "--root", s3_root, *SMALL_WORLD, env=s3_server.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = storage.RunRoot(s3_root).ingest("web")
    assert storage.is_committed(out)
    samples, rows = read_shards(out)
    landed = {json.loads(s["json"])["url"].split("/", 3)[3]: s for s in samples.values()}
    assert set(landed) == set(caption_of)
    for path, files in landed.items():
        assert files["txt"] == caption_of[path].encode("utf-8")
        with Image.open(io.BytesIO(files["jpg"])) as im:
            assert im.size == (64, 64)
    assert len(rows) == 120 and all(r["status"] == "success" for r in rows)
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["total"] == 120 and manifest["success_rate"] == 1.0 and manifest["n_shards"] == 3
    print(f"\ns3: synth {synth_s:.1f}s, ingest {ingest_s:.1f}s, this run {manifest['this_run']}")

    before = _listing(s3_root)
    proc, _ = capfilt("ingest", "--config", TINY, "--root", s3_root, *SMALL_WORLD, env=s3_server.env)
    assert proc.returncode == 0 and "already committed" in proc.stderr
    assert _listing(s3_root) == before


def test_url_list_on_s3(s3_server, s3_root, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (50, 70), (10, 200, 30)).save(buf, format="JPEG")
    for i in range(5):
        (site / f"{i}.jpg").write_bytes(buf.getvalue())
    list_url = f"{s3_root}/lists/urls.csv"
    with serve_directory(str(site)) as base:
        rows = [(f"{base}/{i}.jpg", f"caption {i} ✓\n{'x' * i}") for i in range(6)]  # 5.jpg does not exist
        text = io.StringIO()
        csv.writer(text).writerows([("url", "caption"), *rows])
        with fsspec.open(list_url, "w", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())
        # In-process and off the main thread, as a Prefect task runs it; the caller's SIGINT handler survives.
        cfg = load_config(TINY, [f"ingest.url_list={list_url}", "ingest.input_format=csv", "ingest.source=mylist"])
        handler = signal.getsignal(signal.SIGINT)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(run_ingest, cfg, s3_root).result(timeout=300)
        assert signal.getsignal(signal.SIGINT) is handler
    out = storage.RunRoot(s3_root).ingest("mylist")
    samples, parquet_rows = read_shards(out)
    assert sorted(s["txt"] for s in samples.values()) == sorted(c.encode() for _, c in rows[:5])
    assert {r["url"]: r["status"] for r in parquet_rows}[rows[5][0]] == "failed_to_download"
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["successes"] == 5 and manifest["total"] == 6
