"""``capfilt synth`` then ``capfilt ingest`` through a real loopback HTTP server and img2dataset."""

from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import io
import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from integration_helpers import TINY, capfilt, ingest, read_shards
from PIL import Image

from pipelines import storage
from pipelines.shards import iter_shard, list_shards
from pipelines.world import serve_directory, serve_world, world_files

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


def _url_path(url: str) -> str:
    """``http://127.0.0.1:PORT/web/000001.jpg`` -> ``web/000001.jpg`` (the truth's ``path``)."""
    return url.split("/", 3)[3]


def test_synth_then_ingest_lands_exactly_the_reachable_images(tmp_path):
    root = str(tmp_path / "run")
    proc, _ = capfilt("synth", "--config", TINY, "--root", root, *SMALL_WORLD)
    assert proc.returncode == 0, proc.stderr
    world = storage.RunRoot(root).world()
    web = pq.read_table(world_files(world)["web"]).to_pylist()
    assert len(web) == 120
    # Two images vanish from the "web" before ingestion: their URLs must fail, the rest land.
    gone = {"web/000007.jpg", "web/000063.jpg"}
    for p in gone:
        (Path(world) / "images" / p).unlink()
    caption_of = {w["url"].removeprefix("{base}/"): w["caption"] for w in web}

    proc, seconds = capfilt("ingest", "--config", TINY, "--root", root, *SMALL_WORLD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = storage.RunRoot(root).ingest("web")
    assert storage.is_committed(out)
    names = sorted(p.name for p in Path(out).iterdir())
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert {"00000.parquet", "00000_stats.json", "manifest.json", "_COMMITTED"} <= set(names)

    samples, rows = read_shards(out)
    landed = {}
    for key, files in samples.items():
        meta = json.loads(files["json"])
        assert meta["key"] == key and meta["status"] == "success"
        landed[_url_path(meta["url"])] = files
    assert set(landed) == set(caption_of) - gone
    for path, files in landed.items():
        assert files["txt"] == caption_of[path].encode("utf-8")
        with Image.open(io.BytesIO(files["jpg"])) as im:
            assert im.size == (64, 64)
    assert len(rows) == 120
    failed = [r for r in rows if r["status"] != "success"]
    assert {_url_path(r["url"]) for r in failed} == gone
    assert all(r["status"] == "failed_to_download" and "404" in r["error_message"] for r in failed)
    assert all(r["caption"] == caption_of[_url_path(r["url"])] for r in rows)

    # Every shard in key order (the list's order), not img2dataset's download-completion order, so that two ingests
    # of one list stream the same samples in the same order.
    for shard in list_shards(out):
        keys = [s.key for s in iter_shard(shard)]
        assert keys == sorted(keys)
        listed = pq.read_table(shard[:-4] + ".parquet").column("key").to_pylist()  # failures too
        assert listed == sorted(listed) and set(keys) <= set(listed)

    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert isinstance(manifest["this_run"]["shards_sorted"], int)
    assert manifest["total"] == 120 and manifest["successes"] == 118 and manifest["n_shards"] == 3
    assert manifest["success_rate"] == pytest.approx(118 / 120)
    assert manifest["failures_by_status"] == {"failed_to_download": 2, "failed_to_resize": 0}
    assert sum(manifest["failures_by_error"].values()) == 2
    assert [s["count"] for s in manifest["shards"]] == [50, 50, 20]
    print(f"\ningest of 120 URLs: {seconds:.1f}s wall (CLI), this run {manifest['this_run']}")

    # A rerun of a committed ingest (and of the committed world) changes nothing.
    before = {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")}
    proc, seconds = capfilt("ingest", "--config", TINY, "--root", root, *SMALL_WORLD)
    assert proc.returncode == 0 and "already committed" in proc.stderr
    proc, _ = capfilt("synth", "--config", TINY, "--root", root, *SMALL_WORLD)
    assert proc.returncode == 0 and "already committed" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")} == before
    print(f"committed rerun: {seconds:.1f}s")

    # A crash that left shard 1 unfinished and nothing committed: the rerun redoes shard 1 only.
    for name in ("_COMMITTED", "manifest.json", "00001_stats.json", "00001.tar"):
        (Path(out) / name).unlink()
    (Path(out) / "00001.parquet").write_bytes(b"half a file")
    kept = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    proc, _ = capfilt("ingest", "--config", TINY, "--root", root, *SMALL_WORLD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert storage.is_committed(out)
    redone = json.loads((Path(out) / "manifest.json").read_text())
    assert redone["this_run"]["shards"] == 1 and redone["this_run"]["samples"] == 50
    assert {k: v for k, v in redone.items() if k != "this_run"} == {
        k: v for k, v in manifest.items() if k != "this_run"
    }
    assert all((Path(out) / n).stat().st_mtime_ns == t for n, t in kept.items() if not n.startswith("00001"))
    assert read_shards(out)[0].keys() == samples.keys()


def test_ingest_without_a_world_or_list_is_a_clear_error(tmp_path):
    proc, _ = capfilt("ingest", "--config", TINY, "--root", str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert "capfilt synth" in proc.stderr and "Traceback" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


NASTY_CAPTIONS = {
    "emoji": "a red square 🟥🎉 with 👩🏽‍🚀 and é ñ 中文",
    "control": "tab\there bell\x07 escape\x1b[31m nul\x00 cr\r lf\n crlf\r\n vt\x0b ff\x0c del\x7f",
    "long": ("0123456789" * 1000),
    "typed": "007",
    "null_word": "NA",
    "empty": "",
    "spaces": "  leading and trailing  ",
    "quotes": "she said \"hi\", then; left, 'ok'",
}


def test_bad_input_is_recorded_and_good_images_keep_their_captions_byte_for_byte(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    good = _jpeg((40, 30))
    for name in NASTY_CAPTIONS:
        (site / f"{name}.jpg").write_bytes(good)
    (site / "corrupt.jpg").write_bytes(good[:300] + bytes(range(256)) * 4)
    (site / "zero.jpg").write_bytes(b"")
    (site / "page.jpg").write_bytes(b"<!doctype html><html><body><h1>Not an image</h1></body></html>")
    (site / "pixel.jpg").write_bytes(_jpeg((1, 1)))
    refused = f"http://127.0.0.1:{_free_port()}/nothing-listens.jpg"

    with serve_directory(str(site)) as base:
        rows = [(f"{base}/{name}.jpg", cap) for name, cap in NASTY_CAPTIONS.items()]
        bad = {
            f"{base}/missing.jpg": ("failed_to_download", "404"),
            refused: ("failed_to_download", "refused"),
            f"{base}/corrupt.jpg": ("failed_to_resize", "decod"),
            f"{base}/zero.jpg": ("failed_to_resize", ""),
            f"{base}/page.jpg": ("failed_to_resize", "decod"),
            f"{base}/pixel.jpg": ("failed_to_resize", "too small"),
        }
        rows += [(u, f"bad {i} ✗\t") for i, u in enumerate(bad)]
        list_path = tmp_path / "urls.csv"
        with open(list_path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["link", "text"])
            w.writerows(rows)
        root = str(tmp_path / "run")
        proc, seconds = ingest(
            root,
            f"ingest.url_list={list_path}",
            "ingest.input_format=csv",
            "ingest.url_col=link",
            "ingest.caption_col=text",
            "ingest.source=userlist",
            "ingest.shard_size=8",
            "ingest.timeout=5",
        )
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = storage.RunRoot(root).ingest("userlist")
    assert storage.is_committed(out)
    samples, parquet_rows = read_shards(out)
    caption_of = dict(rows)
    landed = {json.loads(s["json"])["url"]: s for s in samples.values()}
    assert set(landed) == {u for u, _ in rows[: len(NASTY_CAPTIONS)]}
    for url, files in landed.items():
        assert files["txt"] == caption_of[url].encode("utf-8"), url
        assert "jpg" in files
    # Every URL has exactly one recorded row; every bad one a failure status and message.
    assert sorted(r["url"] for r in parquet_rows) == sorted(caption_of)
    by_url = {r["url"]: r for r in parquet_rows}
    for url, (status, message) in bad.items():
        assert by_url[url]["status"] == status, (url, by_url[url])
        assert message.lower() in by_url[url]["error_message"].lower(), (url, by_url[url]["error_message"])
    for r in parquet_rows:
        assert r["caption"] == caption_of[r["url"]]
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["total"] == len(rows) and manifest["successes"] == len(NASTY_CAPTIONS)
    assert manifest["failures_by_status"] == {"failed_to_download": 2, "failed_to_resize": 4}
    print(f"\nbad-input ingest: {seconds:.1f}s; failures by error: {manifest['failures_by_error']}")


def test_world_server_serves_images_only_on_loopback(tmp_path):
    from pipelines.config import WorldConfig
    from pipelines.world import generate_world

    world = str(tmp_path / "world")
    generate_world(WorldConfig(n_web=3, n_human=1, n_test=1), 0, world)
    with serve_world(world) as base:
        assert base.startswith("http://127.0.0.1:")
        body = urllib.request.urlopen(f"{base}/web/000001.jpg", timeout=5).read()
        assert body == (Path(world) / "images" / "web" / "000001.jpg").read_bytes()
        for bad in ("/web/999999.jpg", "/../truth/web.parquet", "/%2e%2e/web.parquet", "/", "/web"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + bad, timeout=5)
            assert err.value.code == 404, bad
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{base}/web/000001.jpg", timeout=2)  # stopped with the context


def test_url_list_formats_read_the_same_exact_strings(tmp_path):
    """CSV, TSV, JSONL, Parquet and TXT lists normalise to the same url/caption strings."""
    import pyarrow as pa

    from pipelines.config import IngestConfig
    from pipelines.ingest import IngestError, prepare_url_list

    rows = [(f"http://127.0.0.1:9/{i}.jpg", c) for i, c in enumerate(NASTY_CAPTIONS.values())]
    with open(tmp_path / "l.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("u", "c"), *rows])
    with open(tmp_path / "l.tsv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([("u", "c"), *rows])
    with open(tmp_path / "l.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"u": u, "c": c, "extra": 1}) + "\n" for u, c in rows)
    pq.write_table(
        pa.table({"u": [u for u, _ in rows], "c": [c for _, c in rows], "x": list(range(len(rows)))}),
        tmp_path / "l.parquet",
    )
    (tmp_path / "l.txt").write_text("".join(u + "\n" for u, _ in rows))
    for fmt in ("csv", "tsv", "jsonl", "parquet"):
        folder = tmp_path / f"out-{fmt}"
        folder.mkdir()
        ic = IngestConfig(url_list=str(tmp_path / f"l.{fmt}"), input_format=fmt, url_col="u", caption_col="c")
        prepared = prepare_url_list(ic, str(folder))
        table = pq.read_table(folder / "00000.parquet")
        assert table.column_names == ["url", "caption"] and prepared.rows == len(rows)
        assert list(zip(table["url"].to_pylist(), table["caption"].to_pylist())) == rows, fmt
    folder = tmp_path / "out-txt"
    folder.mkdir()
    prepared = prepare_url_list(IngestConfig(url_list=str(tmp_path / "l.txt"), input_format="txt"), str(folder))
    assert pq.read_table(folder / "00000.parquet")["url"].to_pylist() == [u for u, _ in rows]
    assert not prepared.has_caption
    with pytest.raises(IngestError, match="ingest.url_col"):
        prepare_url_list(
            IngestConfig(url_list=str(tmp_path / "l.csv"), input_format="csv", url_col="nope", caption_col="c"),
            str(folder),
        )
    with pytest.raises(IngestError, match="does not exist"):
        prepare_url_list(IngestConfig(url_list=str(tmp_path / "none.csv"), input_format="csv"), str(folder))
    # A directory of lists: every file, in name order.
    (tmp_path / "many").mkdir()
    for k in range(3):
        pq.write_table(
            pa.table({"url": [f"http://x/{k}-{i}" for i in range(k + 1)], "caption": ["c"] * (k + 1)}),
            tmp_path / "many" / f"part-{k}.parquet",
        )
    folder = tmp_path / "out-many"
    folder.mkdir()
    prepared = prepare_url_list(IngestConfig(url_list=str(tmp_path / "many")), str(folder))
    assert prepared.rows_per_file == [1, 2, 3] and prepared.expected_shards(2) == [0, 1, 2, 3]
    assert os.listdir(folder) and sorted(os.listdir(folder)) == ["00000.parquet", "00001.parquet", "00002.parquet"]


# ------------------------------------------------------------------------------------------------ Ray and retries


class _SiteHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; ``flaky-*`` files answer 503 to their first request; with ``kill`` armed, the first
    request for ``die.jpg`` SIGKILLs the process that sent it (a Ray worker running a shard task)."""

    state: dict = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.rsplit("/", 1)[-1]
        with self.state["lock"]:
            seen = self.state["seen"].setdefault(name, 0)
            self.state["seen"][name] += 1
            kill = name == "die.jpg" and self.state.get("kill")
            if kill:
                self.state["kill"] = False
        if name.startswith("flaky-") and seen == 0:
            self.send_error(503, "Service Unavailable")
            return
        if kill:
            import psutil  # Ray's own copy, importable once ray is

            port = self.server.server_address[1]
            conn = next(
                c
                for c in psutil.net_connections("tcp")
                if c.laddr.port == self.client_address[1] and c.raddr and c.raddr.port == port
            )
            assert conn.pid != os.getpid()
            os.kill(conn.pid, signal.SIGKILL)
            self.state["killed"] = conn.pid
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        """No access log: the test's output stays the test's."""


@contextlib.contextmanager
def _site(folder: Path) -> Iterator[tuple[str, dict]]:
    state = {"lock": threading.Lock(), "seen": {}}
    handler = type("H", (_SiteHandler,), {"state": state})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _photo_list(tmp_path: Path, names: list[str]) -> tuple[Path, Path]:
    site = tmp_path / "site"
    site.mkdir()
    for i, name in enumerate(names):
        if not name.startswith("gone"):
            (site / name).write_bytes(_jpeg((30 + 3 * i, 20 + 2 * i), (7 * i % 256, 40, 200 - 5 * i)))
    return site, tmp_path / "urls.csv"


def _write_list(path: Path, base: str, names: list[str]) -> list[tuple[str, str]]:
    rows = [(f"{base}/{n}", f"caption {i} of {n} ✓") for i, n in enumerate(names)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("url", "caption"), *rows])
    return rows


def test_ray_shards_equal_the_processes_and_resume_and_a_killed_task_is_retried(ray_session, tmp_path):
    from pipelines.config import load_config
    from pipelines.ingest import run_ingest

    names = [f"{i:02d}.jpg" for i in range(20)] + ["die.jpg", "gone.jpg"]
    site, list_path = _photo_list(tmp_path, names)
    (site / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    names.append("corrupt.jpg")

    def ingest_with(root: str, distributor: str) -> dict:
        overrides = [
            f"ingest.url_list={list_path}",
            "ingest.input_format=csv",
            "ingest.shard_size=8",
            f"ingest.distributor={distributor}",
        ]
        return run_ingest(load_config(TINY, overrides), root)

    with _site(site) as (base, state):
        _write_list(list_path, base, names)
        by_processes = ingest_with(str(tmp_path / "mp"), "multiprocessing")
        state["kill"] = True
        by_ray = ingest_with(str(tmp_path / "ray"), "ray")
        assert state.get("killed"), "the shard task was not killed"
        assert state["seen"]["die.jpg"] == 3  # once by the processes, twice by Ray: the killed task was retried
        mp_out, ray_out = (storage.RunRoot(str(tmp_path / r)).ingest("web") for r in ("mp", "ray"))
        # Same shards, statuses, keys, order, captions, image bytes and metadata as the processes' ingest.
        assert (
            by_ray["this_run"]["distributor"] == "ray" and by_processes["this_run"]["distributor"] == "multiprocessing"
        )
        strip = ("this_run",)
        assert {k: v for k, v in by_ray.items() if k not in strip} == {
            k: v for k, v in by_processes.items() if k not in strip
        }
        assert by_ray["n_shards"] == 3 and by_ray["successes"] == 21 and by_ray["failed"] == 2
        assert read_shards(ray_out) == read_shards(mp_out)
        for shard in list_shards(ray_out):
            assert [s.key for s in iter_shard(shard)] == [s.key for s in iter_shard(shard.replace("/ray/", "/mp/"))]

        # A rerun after a crash that lost shard 1 redoes shard 1 only.
        kept = {p.name: p.stat().st_mtime_ns for p in Path(ray_out).iterdir() if not p.name.startswith("00001")}
        for name in ("_COMMITTED", "manifest.json", "00001_stats.json", "00001.tar", "00001.parquet"):
            (Path(ray_out) / name).unlink()
        redone = ingest_with(str(tmp_path / "ray"), "ray")
    assert redone["this_run"]["shards"] == 1 and redone["this_run"]["samples"] == 8
    assert {k: v for k, v in redone.items() if k not in strip} == {k: v for k, v in by_ray.items() if k not in strip}
    assert all((Path(ray_out) / n).stat().st_mtime_ns == t for n, t in kept.items() if not n.startswith(("_", "m")))
    assert read_shards(ray_out) == read_shards(mp_out)
    assert not (Path(ray_out) / "_tmp").exists()


def test_retry_failed_downloads_only_transient_failures_into_new_shards(ray_session, tmp_path):
    """The ingest and the empty second retry run in this process on the session's Ray (warm workers); the retry
    that downloads is the ``capfilt ingest --retry-failed`` command, as a user runs it."""
    from pipelines.config import load_config
    from pipelines.ingest import run_ingest

    names = [
        "a.jpg",
        "flaky-1.jpg",
        "b.jpg",
        "gone-1.jpg",
        "flaky-2.jpg",
        "c.jpg",
        "d.jpg",
        "gone-2.jpg",
        "flaky-3.jpg",
    ]
    site, list_path = _photo_list(tmp_path, names)
    root = str(tmp_path / "run")
    overrides = (f"ingest.url_list={list_path}", "ingest.input_format=csv", "ingest.shard_size=4")
    cfg = load_config(TINY, list(overrides))
    with _site(site) as (base, state):
        rows = _write_list(list_path, base, names)
        first = run_ingest(cfg, root)
        out = storage.RunRoot(root).ingest("web")
        assert first["successes"] == 4 and first["failures_by_error"] == {
            "HTTP Error 503: Service Unavailable": 3,
            "HTTP Error 404: File not found": 2,
        }
        original = {r["url"]: r for r in read_shards(out)[1]}
        proc, seconds = ingest(root, *overrides, flags=("--retry-failed",))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert storage.is_committed(out)
        # The 503s were asked twice, the 404s once: only transient failures are retried.
        assert {n: c for n, c in state["seen"].items() if n.startswith(("flaky", "gone"))} == {
            "flaky-1.jpg": 2,
            "flaky-2.jpg": 2,
            "flaky-3.jpg": 2,
            "gone-1.jpg": 1,
            "gone-2.jpg": 1,
        }
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        assert [s["shard"] for s in manifest["shards"]] == ["00000", "00001", "00002", "00003"]
        assert manifest["total"] == 9 and manifest["successes"] == 7 and manifest["failed"] == 2
        assert manifest["success_rate"] == pytest.approx(7 / 9)
        assert manifest["failures_by_status"] == {"failed_to_download": 2, "failed_to_resize": 0}
        assert manifest["failures_by_error"] == {"HTTP Error 404: File not found": 2}
        (retry,) = manifest["retries"]
        assert retry["from_shards"] == ["00000", "00001", "00002"] and retry["shards"] == ["00003"]
        assert retry["urls"] == 3 and retry["recovered"] == 3
        assert retry["retried_errors"] == {"HTTP Error 503: Service Unavailable": 3}
        samples, parquet_rows = read_shards(out)
        new = [r for r in parquet_rows if r["key"].startswith("00003")]
        assert sorted(r["url"] for r in new) == sorted(u for u, _ in rows if "flaky" in u)
        for r in new:  # each new row names the row it retries, and keeps its caption byte for byte
            assert r["status"] == "success" and r["retry_of"] == original[r["url"]]["key"]
            assert r["caption"] == dict(rows)[r["url"]] and samples[r["key"]]["txt"] == r["caption"].encode()
        assert [s.key for s in iter_shard(str(Path(out) / "00003.tar"))] == sorted(r["key"] for r in new)
        print(f"\nretry of 3 transient failures: {seconds:.1f}s")

        # Nothing transient is left: a second retry changes nothing.
        before = {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()}
        assert run_ingest(cfg, root, retry_failed=True) == manifest
        assert {p.name: p.stat().st_mtime_ns for p in Path(out).iterdir()} == before
