"""The multi-node scenario of ``test_multinode.py``, run inside a private network namespace (``unshare -n``).

    unshare -n python tests/e2e/multinode_scenario.py RESULT.json WORKDIR

Everything runs in the namespace: SeaweedFS S3, a Prefect server and process worker, and a Ray cluster of a
head (no CPUs) and two worker nodes of one CPU each (``infra/local_cluster.py``), token auth on. Then:

1. **End to end.** ``capfilt deploy``, and ``prefect deployment run capfilt/bootstrap`` of a tiny config into an
   ``s3://`` root; Ray's state API says on which nodes every task and actor ran, the dashboard's job API lists the
   flow's driver, the Prefect server when the fine-tunes ran, and DuckDB reads the CapFilt Parquet through S3.
2. **Faults**, each a stage rerun into a fresh root that holds copies of the stage's inputs from (1): worker node
   1 is SIGKILLed mid-stage (mid-ingest: a first shard published; mid-caption-filter: a first batch of rows staged;
   mid-pretrain: a first checkpoint registered) and a fresh node brought up at its address; the stage must finish,
   by itself or with one rerun.

The scenario only records (exit codes, placement, the outputs in comparable form, timings, log tails) into
RESULT.json; the test asserts. Everything it started is stopped when it ends, on SIGTERM too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from infra import local_s3  # noqa: E402 - after the repository is on the path
from infra.local_cluster import LocalCluster, in_private_netns, kill_tree, loopback_up  # noqa: E402

BIN = Path(sys.executable).parent
TINY = REPO / "flows" / "configs" / "tiny.yaml"
PRETRAIN_STEPS = 12
FINETUNE_STEPS = 4
TRAIN_JOBS = {"round=1/pretrain": PRETRAIN_STEPS, "round=1/captioner": FINETUNE_STEPS, "round=1/filter": FINETUNE_STEPS}
WEB_IMAGES = 120


def multinode_config() -> dict:
    """tiny.yaml cut down: 120 web images in 6 shards of 20 (ingest tasks on both nodes, and a kill lands between
    the first shard and the last), training jobs of a few steps (placement and restarts are tested here, not
    learning), the fine-tunes small enough to run side by side, and two captioner actors beside the filter's (1.5
    CPUs of actors: no one-CPU node holds them all)."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    cfg["name"] = "multinode"
    cfg["world"]["n_web"] = WEB_IMAGES
    cfg["ingest"]["shard_size"] = WEB_IMAGES // 6
    cfg["train"]["pretrain"].update(max_steps=PRETRAIN_STEPS, checkpoint_every_steps=3)
    for job in ("captioner", "filter"):  # 2 workers of half a CPU: the two fine-tunes fit the cluster side by side
        cfg["train"][job].update(max_steps=FINETUNE_STEPS, cpus_per_worker=0.5)
    cfg["capfilt"]["captioner_pool"]["actors"] = 2
    return cfg


class Scenario:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.timings: dict[str, float] = {}
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_", "AWS_"))}
        self.s3: local_s3.LocalS3 | None = None
        self.cluster: LocalCluster | None = None

    # ------------------------------------------------------------------------------------------------------
    # Processes

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log_path = log
        self.procs.append(proc)
        return proc

    def run(self, name: str, cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.Popen:
        proc = self.spawn(name, cmd, env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree([proc], grace=5)
        return proc

    def stop(self) -> None:
        kill_tree(self.procs, grace=10)
        if self.cluster is not None:
            self.cluster.stop()
        if self.s3 is not None:
            local_s3.stop(self.s3)

    def timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        print(f"[scenario] {name}: {self.timings[name]} s", flush=True)

    # ------------------------------------------------------------------------------------------------------
    # Services

    def start_services(self) -> None:
        t0 = time.time()
        self.s3 = local_s3.start(self.workdir / "s3")
        self.fs = _s3fs(self.s3)
        api_port = local_s3.free_ports(1)[0]
        self.prefect_env = {
            **self.base,
            "PREFECT_HOME": str(self.workdir / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{api_port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        server = self.spawn(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
            self.prefect_env,
        )
        # Like a real cluster's machines, the nodes carry their own storage credentials.
        self.cluster = LocalCluster(self.workdir / "cluster", env={**self.base, **self.s3.env})
        self.cluster.start()
        self.timed("ray cluster up", t0)
        self.driver_env = {**self.base, **self.s3.env, **self.cluster.ray_env}
        _wait_http(f"http://127.0.0.1:{api_port}/api/health", server, 300)
        self.timed("services up", t0)

    # ------------------------------------------------------------------------------------------------------
    # 1. End to end through the Prefect deployment

    def end_to_end(self) -> dict:
        t0 = time.time()
        bucket = self.s3.bucket
        import yaml

        self.fs.pipe(f"{bucket}/config/multinode.yaml", yaml.safe_dump(multinode_config()).encode())
        self.config = f"s3://{bucket}/config/multinode.yaml"
        self.e2e_root = f"s3://{bucket}/e2e"
        deployed = self.run("deploy", [str(BIN / "capfilt"), "deploy", "--pool", "capfilt-mn"], self.prefect_env, 300)
        if deployed.returncode != 0:
            return {"deployed": False, "log": _tail(deployed)}
        self.spawn(
            "prefect-worker",
            [str(BIN / "prefect"), "worker", "start", "--pool", "capfilt-mn", "--type", "process"],
            {**self.prefect_env, **self.driver_env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
        )
        self.timed("deployed", t0)
        run = self.run(
            "deployment-run",
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "capfilt/bootstrap",
                "-p",
                f"config={self.config}",
                "-p",
                f"root={self.e2e_root}",
                "--watch",
                "--watch-interval",
                "2",
                "--watch-timeout",
                "1200",
            ],
            self.prefect_env,
            1300,
        )
        self.timed("end-to-end flow run", t0)
        stages = [
            "ingest/web",
            "round=1/pretrain",
            "round=1/captioner",
            "round=1/filter",
            "round=1/capfilt",
            "round=1/dataset",
            "round=2/pretrain",
            "round=1/eval",
            "round=2/eval",
        ]
        report = f"{_path(self.e2e_root)}/round=1/eval/report.html"
        return {
            "deployed": True,
            "returncode": run.returncode,
            "log": _tail(run) + "\n--- prefect worker:\n" + _tail_path(self.logs / "prefect-worker.log", 8000),
            "committed": {s: self.fs.exists(f"{_path(self.e2e_root)}/{s}/_COMMITTED") for s in stages},
            "report_head": self.fs.cat(report)[:15].decode() if self.fs.exists(report) else None,
            "finetunes": self.task_runs(["finetune captioner round 1", "finetune filter round 1"]),
            "ray_jobs": [
                {k: j.get(k) for k in ("type", "status", "entrypoint")} for j in self.cluster.get("/api/jobs/")
            ],
            "duckdb_rows_by_source": self.duckdb_rows(f"{self.e2e_root}/round=1/capfilt/*.parquet"),
            "jobs": {job: self.job_outputs(job) for job in TRAIN_JOBS},
            "placement": self.placement(),
            "workers": {n.ip: n.node_id for n in self.cluster.nodes[1:]},
        }

    def job_outputs(self, job: str) -> dict:
        """What a training job left on S3: its last logged step, its model, evaluation, Ray Train checkpoints and
        TensorBoard events."""
        jd = f"{_path(self.e2e_root)}/{job}"
        metrics = f"{jd}/metrics.jsonl"
        rows = [json.loads(x) for x in self.fs.cat(metrics).decode().splitlines() if x] if self._exists(metrics) else []
        return {
            "last_step": max((r["step"] for r in rows if r.get("kind") == "train"), default=None),
            "model": self._exists(f"{jd}/model/model.safetensors"),
            "eval": self._exists(f"{jd}/eval.json"),
            "checkpoints": len(self._glob(f"{jd}/ray_train/step_*/state.pt")),
            "tensorboard": len(self._glob(f"{jd}/tensorboard/events.out.tfevents.*")),
        }

    def task_runs(self, names: list[str]) -> dict[str, dict]:
        """The Prefect server's record of these task runs: state and start/end times."""
        import urllib.request

        req = urllib.request.Request(
            f"{self.prefect_env['PREFECT_API_URL']}/task_runs/filter",
            data=b"{}",
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            runs = {t["name"]: t for t in json.loads(r.read())}
        return {n: {k: runs[n][k] for k in ("state_type", "start_time", "end_time")} for n in names if n in runs}

    def duckdb_rows(self, pattern: str) -> list[list]:
        """DuckDB reads the Parquet through S3 (s3fs registered as its filesystem: no extension download)."""
        import duckdb

        con = duckdb.connect()
        con.register_filesystem(self.fs)
        rows = con.execute(f"SELECT source, count(*) FROM read_parquet('{pattern}') GROUP BY source ORDER BY source")
        return [list(r) for r in rows.fetchall()]

    def placement(self) -> dict:
        """From Ray's state API: the IPs of the nodes each task (by name) and actor (by class) ran on."""
        ips = {
            n["node_id"]: n["node_ip"]
            for n in self.cluster.get("/api/v0/nodes?limit=10000")["data"]["result"]["result"]
        }
        tasks = self.cluster.get("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
        actors = self.cluster.get("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]

        def where(rows: list[dict], key: Callable[[dict], str]) -> dict[str, list[str]]:
            found: dict[str, set[str]] = {}
            for r in rows:
                if r.get("node_id"):
                    found.setdefault(key(r), set()).add(ips.get(r["node_id"], r["node_id"]))
            return {k: sorted(v) for k, v in sorted(found.items())}

        return {"tasks": where(tasks, lambda r: r["name"]), "actors": where(actors, lambda r: r["class_name"])}

    # ------------------------------------------------------------------------------------------------------
    # 2. Faults

    def with_node_loss(self, name: str, args: list[str], root: str, started: Callable[[], bool]) -> dict:
        """Run ``capfilt ARGS --root ROOT``; once ``started()`` holds, SIGKILL worker node 1 and bring up a fresh
        one at its address; rerun once if the stage failed."""
        t0 = time.time()
        cmd = [str(BIN / "capfilt"), *args, "--config", self.config, "--root", root]
        proc = self.spawn(name, cmd, self.driver_env)
        deadline = time.time() + 600
        while proc.poll() is None and not started() and time.time() < deadline:
            time.sleep(0.2)
        killed_mid_stage = proc.poll() is None
        self.cluster.kill_node(1)
        killed_at = round(time.time() - t0, 1)
        self.cluster.restart_node(1)
        try:
            first = proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            kill_tree([proc], grace=5)
            first = proc.returncode
        record = {"killed_mid_stage": killed_mid_stage, "killed_at_s": killed_at, "first_returncode": first}
        final = first
        if first != 0:
            rerun = self.run(f"{name}-rerun", cmd, self.driver_env, 600)
            final = rerun.returncode
        record.update(reruns=int(first != 0), returncode=final, log=_tail(proc, 6000))
        self.timed(f"{name} with a node lost", t0)
        return record

    def copy_inputs(self, root: str, parts: list[str]) -> None:
        for part in parts:
            self.fs.copy(f"{_path(self.e2e_root)}/{part}", f"{_path(root)}/{part}", recursive=True)

    def ingest_fault(self) -> dict:
        root = f"s3://{self.s3.bucket}/fault-ingest"
        self.copy_inputs(root, ["world"])
        out = f"{_path(root)}/ingest/web"
        record = self.with_node_loss(
            "ingest",
            ["ingest"],
            root,
            lambda: bool(self._glob(f"{out}/*_stats.json")) and not self._exists(f"{out}/_COMMITTED"),
        )
        record["shards"] = shard_digest(self.fs, out)
        record["reference"] = shard_digest(self.fs, f"{_path(self.e2e_root)}/ingest/web")
        return record

    def caption_filter_fault(self) -> dict:
        root = f"s3://{self.s3.bucket}/fault-capfilt"
        self.copy_inputs(root, ["world", "ingest", "tokenizer", "round=1/captioner", "round=1/filter"])
        out = f"{_path(root)}/round=1/capfilt"
        record = self.with_node_loss(
            "caption-filter",
            ["caption-filter", "--round", "1"],
            root,
            # rows staged by a filter actor (pipelines/capfilt/fragments.py) or a unit done: the stage is under way
            lambda: (
                bool(self._glob(f"{out}/_staging/*/*.parquet") or self._glob(f"{out}/_done/*.json"))
                and not self._exists(f"{out}/_COMMITTED")
            ),
        )
        record["rows"] = capfilt_rows(self.fs, out)
        record["reference"] = capfilt_rows(self.fs, f"{_path(self.e2e_root)}/round=1/capfilt")
        return record

    def pretrain_fault(self) -> dict:
        root = f"s3://{self.s3.bucket}/fault-pretrain"
        self.copy_inputs(root, ["world", "ingest", "tokenizer"])
        out = f"{_path(root)}/round=1/pretrain"
        record = self.with_node_loss(
            "pretrain",
            ["pretrain", "--round", "1"],
            root,
            lambda: self._checkpointed(f"{out}/ray_train") and not self._exists(f"{out}/_COMMITTED"),
        )
        for key, job in (("job", out), ("reference", f"{_path(self.e2e_root)}/round=1/pretrain")):
            evaluation = json.loads(self.fs.cat(f"{job}/eval.json")) if self._exists(f"{job}/eval.json") else {}
            record[key] = {k: evaluation.get(k) for k in ("final_step", "resumed_from_step")}
        return record

    def _checkpointed(self, run: str) -> bool:
        """Whether Ray Train's controller has registered a checkpoint of the run (its state.pt files are written
        before all ranks have reported it; a restart goes back to the registered one)."""
        snapshot = f"{run}/checkpoint_manager_snapshot.json"
        if not self._exists(snapshot):
            return False
        return json.loads(self.fs.cat(snapshot)).get("latest_checkpoint_result") is not None

    def _glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()
        return self.fs.glob(pattern)

    def _exists(self, path: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(path)


# ----------------------------------------------------------------------------------------------------------
# Outputs in comparable form


def shard_digest(fs, folder: str) -> dict[str, dict]:
    """Per shard: its (key, status) rows and a digest of each image and caption of its tar (the samples' JSON
    and the Parquet's URLs hold the image server's port, which differs between ingests)."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    shards = {}
    for path in sorted(fs.glob(f"{folder}/*.parquet")):
        name = path.rsplit("/", 1)[1].removesuffix(".parquet")
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "status"])
        with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{folder}/{name}.tar"))) as tar:
            files = {
                m.name: hashlib.sha1(tar.extractfile(m).read()).hexdigest()
                for m in tar.getmembers()
                if m.name.endswith((".jpg", ".txt"))
            }
        shards[name] = {"rows": sorted(zip(table["key"].to_pylist(), table["status"].to_pylist())), "files": files}
    return shards


def capfilt_rows(fs, folder: str) -> dict:
    """The stage's Parquet files by name and all their rows, each as sorted-key JSON, in file order."""
    import pyarrow.parquet as pq

    fs.invalidate_cache()
    files, rows = [], []
    for path in sorted(fs.glob(f"{folder}/part-*.parquet")):
        files.append(path.rsplit("/", 1)[1])
        with fs.open(path, "rb") as f:
            rows += [json.dumps(r, sort_keys=True, default=str) for r in pq.read_table(f).to_pylist()]
    return {"files": files, "rows": rows}


# ----------------------------------------------------------------------------------------------------------


def _s3fs(s3: local_s3.LocalS3):
    import s3fs

    return s3fs.S3FileSystem(
        endpoint_url=s3.endpoint,
        key=s3.env["AWS_ACCESS_KEY_ID"],
        secret=s3.env["AWS_SECRET_ACCESS_KEY"],
        skip_instance_cache=True,
    )


def _path(url: str) -> str:
    return url.removeprefix("s3://")


def _tail_path(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _tail(proc: subprocess.Popen, chars: int = 4000) -> str:
    return _tail_path(proc.log_path, chars)


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{_tail(proc)}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{_tail(proc)}")


def main(result_path: str, workdir: str) -> int:
    if not in_private_netns():
        raise SystemExit("run me in a private network namespace: unshare -n python ...")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the test's timeout: stop everything on the way out
    loopback_up()
    scenario = Scenario(Path(workdir))
    result: dict = {}
    t0 = time.time()
    try:
        scenario.start_services()
        result["e2e"] = scenario.end_to_end()
        if result["e2e"].get("returncode") == 0:
            result["faults"] = {
                "ingest": scenario.ingest_fault(),
                "caption-filter": scenario.caption_filter_fault(),
                "pretrain": scenario.pretrain_fault(),
            }
    except BaseException:
        result["error"] = traceback.format_exc()
        raise
    finally:
        scenario.timed("scenario", t0)
        result["timings"] = scenario.timings
        if scenario.cluster is not None:
            result["nodes"] = "\n".join(scenario.cluster.tail(n, 1500) for n in scenario.cluster.nodes)
        Path(result_path).write_text(json.dumps(result, indent=1))
        scenario.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
