"""Ingestion throughput on a local multi-node Ray cluster: 1 worker node vs 2.

For each number of worker nodes N (``--nodes``, default 1,2) a fresh :class:`infra.local_cluster.LocalCluster`
starts inside a private network namespace (the script re-executes itself under ``unshare -n``, ``-rn`` when not
root, like ``tests/e2e/multinode_scenario.py``): a head on 127.0.0.2 with no CPUs and N worker nodes on 127.0.0.3,
127.0.0.4, ... of ``--cpus-per-worker`` logical CPUs each (1 by default, the project's convention). The world (tiny
images, ``--n-web`` web images) is synthesized once; each run gets a fresh root holding a copy of it, and
``capfilt ingest --config C --root R`` runs as a subprocess with the cluster's ``RAY_ADDRESS`` (and token), as the
flow would: distributor ``auto`` -> one Ray task ``ingest-shard`` per shard, the world's images served over HTTP by
the driver on the address Ray knows its node by. Ray's state API then says on which node each shard task ran.

Printed, one row per N: shards, images, successes, the wall seconds of the ``capfilt ingest`` process (start-up,
``ray.init``, serving, every shard, commit; the cluster is already up), images/s over that wall time, the
seconds of the download phase alone (the manifest's ``this_run.seconds``: Ray workers started cold, each first
task importing img2dataset, as in the flow) and images/s over it, the span from the first shard task's start to the
last one's end (Ray's state API; without the workers' process start), and per node IP the ``ingest-shard`` tasks
that finished there with the sum of their run times. Every node, the world's server and the
driver run on this one machine and share its cores: the ratio between rows is what this machine gives, not what
N separate machines would. The load average at the end of each run is printed too.

    .venv/bin/python benchmarks/bench_ingest_cluster.py [--n-web 3000] [--shard-size 250] [--nodes 1,2]
        [--cpus-per-worker 1] [--threads 16] [--window 0] [--s3] [--keep]

``--window``: ``ingest.max_concurrent_shards`` (0: twice the cluster's CPUs, so that each node has its next shard
queued when one ends). ``--s3``: run roots on a SeaweedFS S3 server inside the namespace (``infra/local_s3.py``;
the nodes get its credentials in their environment) instead of the local disk. ``--keep``: keep the work
directory (logs, roots) under /tmp. Everything started (nodes, S3, the ingest process) is stopped on exit, on an
error or SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra import local_s3  # noqa: E402 - after the repository is on the path
from infra.local_cluster import (  # noqa: E402
    LocalCluster,
    in_private_netns,
    kill_tree,
    loopback_up,
    private_netns_argv,
)

BIN = Path(sys.executable).parent
TINY = REPO / "flows" / "configs" / "tiny.yaml"
INGEST_TIMEOUT_S = 900


def bench_config(args: argparse.Namespace, nodes: int) -> dict:
    """tiny.yaml with ``--n-web`` web images in shards of ``--shard-size``, ``--threads`` download threads per
    shard and a window of shard tasks that keeps every node busy."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    cfg["name"] = "bench-ingest-cluster"
    cfg["world"]["n_web"] = args.n_web
    window = args.window or max(1, int(2 * nodes * args.cpus_per_worker))
    cfg["ingest"].update(
        shard_size=args.shard_size, threads=args.threads, distributor="auto", max_concurrent_shards=window
    )
    return cfg


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        self.storage_env: dict[str, str] = {}
        self.s3: local_s3.LocalS3 | None = None
        self.cluster: LocalCluster | None = None
        self.procs: list[subprocess.Popen] = []

    def stop(self) -> None:
        kill_tree(self.procs, grace=5)
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.s3 is not None:
            local_s3.stop(self.s3)
            self.s3 = None

    def run(self, name: str, cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree([proc], grace=5)
        self.procs.remove(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        return proc

    def write_config(self, nodes: int) -> Path:
        import yaml

        path = self.workdir / f"config-{nodes}.yaml"
        path.write_text(yaml.safe_dump(bench_config(self.args, nodes)))
        return path

    def synth(self) -> Path:
        """The world, once, on the local disk (copied into each run's root)."""
        t0 = time.time()
        world_root = self.workdir / "world-root"
        self.run(
            "synth",
            [str(BIN / "capfilt"), "synth", "--config", str(self.write_config(1)), "--root", str(world_root)],
            self.base,
            900,
        )
        print(f"synth: {self.args.n_web} web images in {time.time() - t0:.1f}s", flush=True)
        return world_root / "world"

    def fresh_root(self, world: Path, nodes: int) -> str:
        if self.s3 is None:
            root = self.workdir / f"run-{nodes}"
            shutil.copytree(world, root / "world")
            return str(root)
        from pipelines import storage

        root = f"s3://{self.s3.bucket}/run-{nodes}"
        os.environ.update(self.s3.env)
        storage.upload_dir(str(world), f"{root}/world")
        return root

    def ingest(self, world: Path, nodes: int) -> dict:
        args = self.args
        t0 = time.time()
        self.cluster = LocalCluster(
            self.workdir / f"c{nodes}",
            workers=nodes,
            cpus_per_worker=args.cpus_per_worker,
            env={**self.base, **self.storage_env},
        )
        self.cluster.start()
        print(f"{nodes} worker node(s) up in {time.time() - t0:.1f}s", flush=True)
        root = self.fresh_root(world, nodes)
        config = self.write_config(nodes)
        env = {**self.base, **self.storage_env, **self.cluster.ray_env}
        t0 = time.time()
        self.run(
            f"ingest-{nodes}",
            [str(BIN / "capfilt"), "ingest", "--config", str(config), "--root", root],
            env,
            INGEST_TIMEOUT_S,
        )
        wall = time.time() - t0
        load = os.getloadavg()
        manifest = self.manifest(root)
        placement, span = self.placement()
        self.cluster.stop()
        self.cluster = None
        row = {
            "nodes": nodes,
            "shards": manifest["n_shards"],
            "images": manifest["total"],
            "successes": manifest["successes"],
            "wall_s": wall,
            "download_s": manifest["this_run"]["seconds"],
            "span_s": span,
            "placement": placement,
            "load": load,
        }
        print(f"{nodes} worker node(s): {json.dumps(row)}", flush=True)
        return row

    def manifest(self, root: str) -> dict:
        if self.s3 is None:
            return json.loads((Path(root) / "ingest" / "web" / "manifest.json").read_text())
        from pipelines import storage

        return storage.read_json(f"{root}/ingest/web/manifest.json")

    def placement(self) -> tuple[dict[str, dict], float]:
        """Per node IP, from Ray's state API: the ``ingest-shard`` tasks that finished there, the sum of their run
        times, and the attempts that did not finish (failed, or lost with a node); and the span from the first
        task's start to the last one's end, all nodes together."""
        ips = {
            n["node_id"]: n["node_ip"]
            for n in self.cluster.get("/api/v0/nodes?limit=10000")["data"]["result"]["result"]
        }
        tasks = self.cluster.get("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
        out: dict[str, dict] = {}
        times: list[int] = []
        for t in tasks:
            if t.get("name") != "ingest-shard" or not t.get("node_id"):
                continue
            node = out.setdefault(ips.get(t["node_id"], t["node_id"]), {"tasks": 0, "task_s": 0.0, "other": 0})
            if t.get("state") == "FINISHED":
                node["tasks"] += 1
                if t.get("start_time_ms") and t.get("end_time_ms"):
                    node["task_s"] += (t["end_time_ms"] - t["start_time_ms"]) / 1000
                    times += [t["start_time_ms"], t["end_time_ms"]]
            else:
                node["other"] += 1
        return dict(sorted(out.items())), (max(times) - min(times)) / 1000 if times else float("nan")


def table(rows: list[dict]) -> str:
    lines = [
        f"{'nodes':>5} {'shards':>6} {'images':>6} {'success':>7} {'wall s':>7} {'img/s':>6} "
        f"{'dl s':>6} {'img/s dl':>8} {'span s':>6} {'load1':>5}  ingest-shard tasks per node (sum of task seconds)"
    ]
    for r in rows:
        per_node = ", ".join(
            f"{ip}: {p['tasks']} ({p['task_s']:.0f}s)" + (f" +{p['other']} unfinished" if p["other"] else "")
            for ip, p in r["placement"].items()
        )
        lines.append(
            f"{r['nodes']:>5} {r['shards']:>6} {r['images']:>6} {r['successes']:>7} {r['wall_s']:>7.1f} "
            f"{r['images'] / r['wall_s']:>6.0f} {r['download_s']:>6.1f} {r['images'] / r['download_s']:>8.0f} "
            f"{r['span_s']:>6.1f} {r['load'][0]:>5.2f}  {per_node}"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-web", type=int, default=3000, help="web images of the world (default 3000)")
    ap.add_argument("--shard-size", type=int, default=250, help="images per shard (default 250)")
    ap.add_argument("--nodes", default="1,2", help="worker node counts to run, comma separated (default 1,2)")
    ap.add_argument("--cpus-per-worker", type=float, default=1, help="logical CPUs per worker node (default 1)")
    ap.add_argument("--threads", type=int, default=16, help="download threads per shard task (default 16)")
    ap.add_argument("--window", type=int, default=0, help="max_concurrent_shards (default 0: 2 x cluster CPUs)")
    ap.add_argument("--s3", action="store_true", help="run roots on a SeaweedFS S3 server in the namespace")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, roots)")
    args = ap.parse_args()
    if not in_private_netns():
        os.execvp("unshare", private_netns_argv([sys.executable, os.path.abspath(__file__), *sys.argv[1:]]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop everything on the way out
    loopback_up()
    # Ray's socket paths must fit in 107 bytes: a short directory under /tmp.
    workdir = Path(tempfile.mkdtemp(prefix="cf-bic-", dir="/tmp"))
    bench = Bench(args, workdir)
    rows = []
    t0 = time.time()
    try:
        if args.s3:
            bench.s3 = local_s3.start(workdir / "s3")
            bench.storage_env = dict(bench.s3.env)
        world = bench.synth()
        for nodes in (int(n) for n in args.nodes.split(",")):
            rows.append(bench.ingest(world, nodes))
    finally:
        bench.stop()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\ncapfilt ingest, Ray distributor on a local cluster: head 0 CPUs, {args.cpus_per_worker:g} CPU(s) per "
        f"worker node, {args.threads} threads per shard, {os.cpu_count()} cores on this machine, "
        f"storage {'S3 (SeaweedFS)' if args.s3 else 'local disk'}; script {time.time() - t0:.0f}s"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
