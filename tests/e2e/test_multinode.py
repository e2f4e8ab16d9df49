"""Multi-node: the tiny bootstrap through the Prefect deployment (``capfilt deploy``, a Prefect server and process
worker, an ``s3://`` root on SeaweedFS) on a three-node Ray cluster with token auth, then a worker node lost
mid-ingest, mid-caption-filter and mid-pretrain.

The cluster (``infra/local_cluster.py``: a head with no CPUs and two one-CPU worker nodes on 127.0.0.2-4), SeaweedFS
and the Prefect server must share a network namespace of their own, which pytest is not in: one scenario
(``multinode_scenario.py``) runs all of it under ``unshare -n`` (``-rn`` when not root) and records what happened;
the tests below assert on that record. Each fault's stage must end, by itself or with one rerun, with the output of
the undisturbed end-to-end run: the same shards and statuses, the same CapFilt rows (none twice), the same final
step after Ray Train restored its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from infra.local_cluster import private_netns_argv

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
WORKERS = ["127.0.0.3", "127.0.0.4"]
TIMEOUT_S = 1800

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def record(request):
    # Ray's socket paths must fit in 107 bytes: a short directory under /tmp, not pytest's tmp_path.
    workdir = Path(tempfile.mkdtemp(prefix="cf-mn-", dir="/tmp"))
    result = workdir / "result.json"
    cmd = private_netns_argv([sys.executable, str(SCENARIO), str(result), str(workdir)])
    t0 = time.time()
    with open(workdir / "scenario.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the scenario stops what it started, then writes its record
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    output = (workdir / "scenario.log").read_text(errors="replace")
    data = json.loads(result.read_text()) if result.exists() else {}
    failed = request.session.testsfailed
    assert proc.returncode == 0 and "error" not in data, (
        f"the scenario failed (exit {proc.returncode}, {time.time() - t0:.0f} s; its logs are in {workdir}):\n"
        f"{data.get('error', '')}\n{output[-6000:]}\n{data.get('nodes', '')}"
    )
    print(f"multi-node scenario: {time.time() - t0:.0f} s; {data['timings']}")
    yield data
    if request.session.testsfailed == failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"the multi-node scenario's logs and S3 data are kept in {workdir}")


def test_the_bootstrap_runs_through_the_deployment_on_three_nodes(record):
    e2e = record["e2e"]
    assert e2e["deployed"], e2e["log"]
    assert e2e["returncode"] == 0, e2e["log"]
    assert all(e2e["committed"].values()), e2e["committed"]
    assert e2e["report_head"] == "<!DOCTYPE html>", e2e["report_head"]
    # The Ray dashboard's job API lists the flow run's driver (it joined the cluster through RAY_ADDRESS).
    drivers = [j for j in e2e["ray_jobs"] if j["type"] == "DRIVER"]
    assert any(j["status"] == "SUCCEEDED" for j in drivers), e2e["ray_jobs"]
    # DuckDB reads the CapFilt Parquet through S3: one web and one synthetic text per image.
    assert e2e["duckdb_rows_by_source"] == [["synthetic", 120], ["web", 120]]


def test_training_jobs_keep_checkpoints_events_and_models_on_s3(record):
    from multinode_scenario import TRAIN_JOBS

    jobs = record["e2e"]["jobs"]
    for job, steps in TRAIN_JOBS.items():
        out = jobs[job]
        assert out["last_step"] == steps, (job, out)
        assert out["model"] and out["eval"], (job, out)
        assert out["checkpoints"] >= 1, f"{job}: no Ray Train checkpoint on S3: {out}"
        assert out["tensorboard"] >= 1, f"{job}: no TensorBoard events on S3: {out}"


def test_the_two_fine_tunes_run_side_by_side_when_the_cluster_holds_both(record):
    runs = record["e2e"]["finetunes"]
    cap, fil = runs["finetune captioner round 1"], runs["finetune filter round 1"]
    assert cap["state_type"] == fil["state_type"] == "COMPLETED"
    assert cap["start_time"] < fil["end_time"] and fil["start_time"] < cap["end_time"], (cap, fil)


def _workers(placement: dict[str, list[str]], match) -> set[str]:
    return {ip for name, ips in placement.items() if match(name) for ip in ips}


def test_ingest_training_and_capfilt_spread_over_both_worker_nodes(record):
    placement = record["e2e"]["placement"]
    ingest = _workers(placement["tasks"], lambda name: name == "ingest-shard")
    train = _workers(placement["actors"], lambda name: name == "RayTrainWorker")
    capfilt = _workers(placement["actors"], lambda name: "CaptionActor" in name or "ScoreActor" in name)
    assert ingest == set(WORKERS), placement["tasks"]
    assert train == set(WORKERS), placement["actors"]
    assert capfilt == set(WORKERS), placement["actors"]


def _finished(record: dict, stage: str) -> dict:
    assert "faults" in record, "the end-to-end run failed, so no fault was tried:\n" + record["e2e"]["log"]
    fault = record["faults"][stage]
    assert fault["killed_mid_stage"], "the stage ended before the node was killed:\n" + fault["log"]
    assert fault["returncode"] == 0 and fault["reruns"] <= 1, fault["log"]
    return fault


def test_ingest_loses_a_node_and_ends_with_the_undisturbed_shards(record):
    fault = _finished(record, "ingest")
    assert fault["shards"] == fault["reference"]
    assert len(fault["reference"]) == 6


def test_caption_filter_loses_a_node_and_ends_with_the_undisturbed_rows(record):
    fault = _finished(record, "caption-filter")
    rows, reference = fault["rows"], fault["reference"]
    assert rows["files"] == reference["files"]
    duplicated = [row for row, n in Counter(rows["rows"]).items() if n > 1]
    assert not duplicated, duplicated[:3]
    assert len(reference["rows"]) == 240  # one web and one synthetic text for each of the 120 images
    assert sorted(rows["rows"]) == sorted(reference["rows"])


def test_pretrain_loses_a_node_and_resumes_from_its_last_checkpoint(record):
    fault = _finished(record, "pretrain")
    assert fault["job"]["final_step"] == fault["reference"]["final_step"] == 12
    assert fault["job"]["resumed_from_step"], f"pretrain started over instead of restoring a checkpoint: {fault}"
