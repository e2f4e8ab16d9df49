"""The flow as users run it: a Prefect server, a Ray head and a process worker, all on loopback.

`capfilt deploy` registers deployment `bootstrap`; `prefect deployment run capfilt/bootstrap` runs the tiny config
from an `s3://` URL into an `s3://` root on SeaweedFS through the worker, whose flow run joins the Ray head
(`RAY_ADDRESS`, token auth). The run must reach Completed, the Ray dashboard's job API must list the flow's
driver, and DuckDB must read the CapFilt Parquet through S3. Everything started is stopped by pid.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, headers: dict | None = None) -> bytes:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{proc.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout}s:\n{proc.log_path.read_text()[-3000:]}")


def test_prefect_deployment_run_on_a_ray_head_into_s3(s3_server, short_tmp, spawn, ports, tmp_path):
    import s3fs

    api_port, gcs_port, dash_port, client_port = ports(4)
    token = secrets.token_hex(16)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_", "AWS_"))}
    prefect_env = {
        **base,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    ray_env = {
        **base,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # Ray's workers run in the cluster's environment, not the driver's: like a real cluster's nodes (instance
    # role, secret), the head carries its own storage credentials.
    head_env = {**ray_env, **s3_server.env}

    server = spawn(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
        prefect_env,
    )
    head = spawn(
        "ray-head",
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash_port),
            "--ray-client-server-port",
            str(client_port),
            "--num-cpus",
            "4",  # room for both fine-tunes at once
            "--temp-dir",
            str(short_tmp),
            "--disable-usage-stats",
        ],
        head_env,
    )
    _wait_http(f"http://127.0.0.1:{api_port}/api/health", server, 180)
    auth = {"Authorization": f"Bearer {token}"}
    _wait_http(f"http://127.0.0.1:{dash_port}/api/version", head, 180, auth)

    deployed = subprocess.run(
        [str(BIN / "capfilt"), "deploy", "--pool", "capfilt-e2e"],
        env=prefect_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert "capfilt/bootstrap" in deployed.stdout

    worker_env = {
        **prefect_env,
        **ray_env,
        **s3_server.env,
        "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    spawn(
        "prefect-worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", "capfilt-e2e", "--type", "process"],
        worker_env,
        cwd=REPO,
    )

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server.endpoint,
        key=s3_server.env["AWS_ACCESS_KEY_ID"],
        secret=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )
    prefix = f"{s3_server.bucket}/e2e-{token[:8]}"
    fs.pipe(f"{prefix}/config/tiny.yaml", (REPO / "flows/configs/tiny.yaml").read_bytes())
    root = f"s3://{prefix}/run"
    t0 = time.time()
    run = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "capfilt/bootstrap",
            "-p",
            f"config=s3://{prefix}/config/tiny.yaml",
            "-p",
            f"root={root}",
            "--watch",
            "--watch-interval",
            "5",
            "--watch-timeout",
            "1200",
        ],
        env=prefect_env,
        capture_output=True,
        text=True,
        timeout=1300,
    )
    worker_log = (tmp_path / "prefect-worker.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + "\nworker:\n" + worker_log[-6000:]
    assert "Completed" in run.stdout + run.stderr
    print(f"deployment run completed in {time.time() - t0:.0f} s")

    for stage in (
        "ingest/web",
        "round=1/pretrain",
        "round=1/captioner",
        "round=1/filter",
        "round=1/capfilt",
        "round=1/dataset",
        "round=2/pretrain",
        "round=1/eval",
        "round=2/eval",
    ):
        assert fs.exists(f"{prefix}/run/{stage}/_COMMITTED"), f"{stage} is not committed on S3"
    assert fs.cat(f"{prefix}/run/round=1/eval/report.html").startswith(b"<!DOCTYPE html>")

    # The head has room for both fine-tunes (4 CPUs, 2 per job), so the flow ran them side by side.
    req = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/api/task_runs/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        task_runs = {t["name"]: t for t in json.loads(r.read())}
    cap, fil = task_runs["finetune captioner round 1"], task_runs["finetune filter round 1"]
    assert cap["state_type"] == fil["state_type"] == "COMPLETED"
    assert cap["start_time"] < fil["end_time"] and fil["start_time"] < cap["end_time"], (cap, fil)

    # The Ray dashboard lists the flow run's driver (it joined the head through RAY_ADDRESS).
    jobs = json.loads(_wait_http(f"http://127.0.0.1:{dash_port}/api/jobs/", head, 30, auth))
    drivers = [j for j in jobs if j.get("type") == "DRIVER"]
    assert drivers, jobs
    assert any(j.get("status") == "SUCCEEDED" for j in drivers), [
        (j.get("status"), j.get("entrypoint")) for j in drivers
    ]

    # DuckDB reads the Parquet through S3 (s3fs registered as DuckDB's filesystem: no extension download).
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(fs)
    rows = con.execute(
        f"SELECT source, count(*) FROM read_parquet('s3://{prefix}/run/round=1/capfilt/*.parquet') "
        "GROUP BY source ORDER BY source"
    ).fetchall()
    assert rows == [("synthetic", 300), ("web", 300)], rows
