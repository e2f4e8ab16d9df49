"""The whole flow, embedded: `capfilt bootstrap` on the tiny config, in-process Prefect, local Ray.

One run of the flow is shared by the module: its layout, a rerun that skips every stage, and a rerun of
CapFilt killed half-way that must end with the Parquet of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
CAPFILT = str(Path(sys.executable).parent / "capfilt")
TINY = str(REPO / "flows/configs/tiny.yaml")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def _bootstrap(root: Path, env: dict[str, str], *extra: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [CAPFILT, "bootstrap", "--config", TINY, "--root", str(root), *extra],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    return time.perf_counter() - t0, proc


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("bootstrap")
    env = _env(base / "prefect-home")
    seconds, proc = _bootstrap(base / "run", env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return {"root": base / "run", "env": env, "seconds": seconds, "stdout": proc.stdout, "stderr": proc.stderr}


def _capfilt_tables(capfilt: Path) -> dict[str, object]:
    return {p.name: pq.read_table(p) for p in sorted(capfilt.glob("part-*.parquet"))}


def test_bootstrap_commits_every_stage_in_the_documented_layout(flow_run):
    root = flow_run["root"]
    committed = [
        "world",
        "ingest/web",
        "tokenizer",
        "round=1/pretrain",
        "round=1/captioner",
        "round=1/filter",
        "round=1/capfilt",
        "round=1/dataset",
        "round=2/pretrain",
        "round=1/eval",
        "round=2/eval",
    ]
    for stage in committed:
        assert (root / stage / "_COMMITTED").exists(), f"{stage} is not committed"
    for job in ("round=1/pretrain", "round=1/captioner", "round=1/filter", "round=2/pretrain"):
        assert (root / job / "model" / "model.safetensors").exists()
        rows = [json.loads(line) for line in (root / job / "metrics.jsonl").read_text().splitlines()]
        assert rows and {"step", "epoch", "loss"} <= set(rows[0])
    parts = _capfilt_tables(root / "round=1/capfilt")
    assert len(parts) == 3  # the tiny world's 300 images in 3 shards, one unit each
    assert sum(t.num_rows for t in parts.values()) == 600  # one web + one synthetic text per image
    dataset = json.loads((root / "round=1/dataset/summary.json").read_text())
    assert dataset["web"]["total"] == 300 and dataset["human"]["pairs"] == 180
    assert (root / "round=1/dataset/manifest.json").exists()
    for k in (1, 2):
        metrics = json.loads((root / f"round={k}/eval/metrics.json").read_text())
        assert {"retrieval_r1", "cider", "caption_attribute_accuracy"} <= set(metrics)
        assert metrics["images"] == 40
    html = (root / "round=1/eval/report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id="kept-share"' in html
    out = flow_run["stdout"]
    for line in (
        "images ingested: 300 of 300",
        "filter vs ground truth",
        "precision",
        "recall",
        "round 1:",
        "round 2:",
        "duckdb -c",
        "CapFilt Parquet:",
        "round=1/eval/report.html",
    ):
        assert line in out, f"the closing summary lacks {line!r}:\n{out}"
    # The in-process Prefect server makes no outbound call (its telemetry is off; this machine has no internet).
    assert "prefect.server.services.telemetry" not in flow_run["stderr"] + out, flow_run["stderr"][-4000:]


def test_a_rerun_skips_every_committed_stage(flow_run):
    marker = flow_run["root"] / "round=1/capfilt/_COMMITTED"
    before = marker.stat().st_mtime_ns
    seconds, proc = _bootstrap(flow_run["root"], flow_run["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert seconds < 0.35 * flow_run["seconds"], (
        f"rerun took {seconds:.0f}s against {flow_run['seconds']:.0f}s: committed stages were not skipped"
    )
    assert marker.stat().st_mtime_ns == before
    assert "images ingested: 300 of 300" in proc.stdout


def test_capfilt_killed_half_way_and_rerun_ends_with_the_uninterrupted_parquet(flow_run, tmp_path):
    root = flow_run["root"]
    capfilt = root / "round=1/capfilt"
    reference = _capfilt_tables(capfilt)
    # Forget round 1's CapFilt and dataset (round 2's models stay committed, so the rerun stops after CapFilt).
    shutil.rmtree(capfilt)
    shutil.rmtree(root / "round=1/dataset")
    # Ray batches of 4 images spread the three units' commits out in time, so the kill lands between the first
    # and the last; captions and scores do not depend on the batch size (fixed model shapes).
    small_batches = ["--set", "capfilt.captioner_pool.batch_size=4"]
    proc = subprocess.Popen(
        [CAPFILT, "bootstrap", "--config", TINY, "--root", str(root), *small_batches],
        env=flow_run["env"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.log", "wb"),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (capfilt / "_done").is_dir() and any((capfilt / "_done").iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the flow ended before CapFilt committed a unit:\n" + (tmp_path / "killed.log").read_text()[-3000:]
        )
        os.killpg(proc.pid, signal.SIGKILL)  # the flow, its Prefect server, its Ray: the whole process group
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (capfilt / "_COMMITTED").exists(), "CapFilt committed before the kill: nothing was interrupted"
    done_before = {p.name for p in (capfilt / "_done").iterdir()}
    assert 1 <= len(done_before) < 3

    _, rerun = _bootstrap(root, flow_run["env"], *small_batches)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert (capfilt / "_COMMITTED").exists()
    after = _capfilt_tables(capfilt)
    assert sorted(after) == sorted(reference)
    for name, table in reference.items():
        assert after[name].equals(table), f"{name} differs from the uninterrupted run"
    assert not list(capfilt.glob("_tmp/*")), "a half-written unit was left behind"


def _set(path: str, value):
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for k in parents:
            node = node[k]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit,field",
    [
        (_set("train.pretrain.batch_size", "lots"), "train.pretrain.batch_size"),  # wrong type
        (_set("capfilt.itm_treshold", 0.3), "capfilt.itm_treshold"),  # unknown key (a typo)
        (lambda d: d.pop("world"), "ingest.url_list"),  # missing field: real data needs a URL list
    ],
)
def test_a_bad_config_fails_fast_naming_the_field(tmp_path, edit, field):
    import yaml

    data = yaml.safe_load(Path(TINY).read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [CAPFILT, "bootstrap", "--config", str(bad), "--root", str(tmp_path / "run")],
        env=_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert field in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one clear message, no traceback
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "run").exists(), "work started before the config was checked"


def test_an_unwritable_root_fails_fast(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [CAPFILT, "bootstrap", "--config", TINY, "--root", str(blocker / "run")],
        env=_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and str(blocker / "run") in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
