"""A multi-node Ray cluster on one machine: a head and N worker nodes inside a private network namespace.

Try capfilt on several Ray nodes without a cloud account (Linux; root, or a user allowed unprivileged user
namespaces)::

    python infra/local_cluster.py --workers 2 -- capfilt bootstrap --config flows/configs/tiny.yaml --root /tmp/mn

runs the command inside a new network namespace (``unshare -n``; ``-rn`` when not root) whose only interface is
its own loopback, with a head on 127.0.0.2 (no CPUs: work goes to the workers; the dashboard and state API on
127.0.0.2:8265) and worker nodes on 127.0.0.3, 127.0.0.4, ... joined to it, token auth on, and ``RAY_ADDRESS``
pointing the command at the head. Every node runs as its own ``ray start --block`` in its own process group;
when the command ends the cluster is stopped. Ray's agents listen on all interfaces, which in the namespace is
its loopback only: nothing is reachable from outside. A local run root is shared by all nodes (one disk); an
``s3://`` root needs an S3 endpoint inside the namespace too.

``LocalCluster`` is the same cluster for tests (``tests/e2e/test_multinode.py``): ``start`` waits until every
node is alive (a worker whose raylet misses Ray's fixed 30 s to register on a loaded machine is started again),
``kill_node(i)`` SIGKILLs worker node i's process group (a lost machine) and ``restart_node(i)`` brings a fresh
node up at the same address.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HEAD_IP = "127.0.0.2"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
_MIB = 1024 * 1024
# The head declares a lost node dead after 3 failed health checks 1 s apart (Ray's defaults: 5, 3 s apart), so
# that the tasks and actors of a killed node move elsewhere sooner.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def in_private_netns() -> bool:
    """True when this process's network namespace has no interface but the loopback."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def private_netns_argv(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace (a user namespace too when not root)."""
    return ["unshare", "-n" if os.geteuid() == 0 else "-rn", *argv]


def loopback_up() -> None:
    """A new namespace's loopback starts down; 127.0.0.0/8 is all on it once up."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"


@dataclass
class Node:
    """One ``ray start --block`` process (the leader of its own process group) and where it logs."""

    index: int  # 0: the head; 1..N: worker nodes
    ip: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    starts: int = 0
    node_id: str | None = None  # Ray's id of the node this process runs, once alive


@dataclass
class LocalCluster:
    """A head (``--num-cpus 0``) on 127.0.0.2 and ``workers`` worker nodes on 127.0.0.3, ...; call inside a
    private network namespace. ``env`` is the environment every node starts with (e.g. storage credentials: a
    real cluster's nodes carry their own); ``ray_env`` is what a driver needs to join the cluster."""

    workdir: Path
    workers: int = 2
    cpus_per_worker: float = 1
    object_store_mib: int = 100
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    nodes: list[Node] = field(init=False)
    lost: set[str] = field(init=False, default_factory=set)  # ids of the nodes killed

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.nodes = [Node(i, f"127.0.0.{2 + i}") for i in range(self.workers + 1)]

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{GCS_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HEAD_IP}:{DASHBOARD_PORT}"

    @property
    def ray_env(self) -> dict[str, str]:
        """Ray's settings shared by nodes and drivers: the head's address (a Ray worker that looks up its cluster,
        as Ray Train's placement group cleaner does, would otherwise find every Ray on this machine), token auth,
        several nodes on one machine, no telemetry."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    # ------------------------------------------------------------------------------------------------------
    # Nodes

    def _command(self, node: Node) -> list[str]:
        # Agents listen on all interfaces, which all nodes share here: each node gets its own block of ports.
        base = 20000 + 1000 * node.index
        cmd = [
            _ray_bin(),
            "start",
            "--block",
            "--node-ip-address",
            node.ip,
            "--node-manager-port",
            str(base),
            "--object-manager-port",
            str(base + 1),
            "--metrics-export-port",
            str(base + 2),
            "--dashboard-agent-listen-port",
            str(base + 3),
            "--dashboard-agent-grpc-port",
            str(base + 4),
            "--runtime-env-agent-port",
            str(base + 5),
            "--min-worker-port",
            str(base + 100),
            "--max-worker-port",
            str(base + 999),
            "--object-store-memory",
            str(self.object_store_mib * _MIB),
            # Each node its own temp dir: nodes started at once in one session dir race for its socket names.
            "--temp-dir",
            str(self.workdir / f"ray{node.index}"),
            "--disable-usage-stats",
        ]
        if node.index == 0:
            return cmd + [
                "--head",
                "--port",
                str(GCS_PORT),
                "--num-cpus",
                "0",
                "--dashboard-host",
                HEAD_IP,
                "--dashboard-port",
                str(DASHBOARD_PORT),
                "--ray-client-server-port",
                str(CLIENT_PORT),
            ]
        return cmd + ["--address", self.address, "--num-cpus", f"{self.cpus_per_worker:g}"]

    def _spawn(self, node: Node) -> None:
        node.starts += 1
        node.log = self.workdir / f"node{node.index}-{node.starts}.log"
        with open(node.log, "wb") as log:
            node.proc = subprocess.Popen(
                self._command(node),
                env={**self.env, **self.ray_env, **(HEALTH_CHECKS if node.index == 0 else {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill_node takes the node and all it started
            )

    def start(self, timeout: float = 300) -> None:
        """The head, then every worker node; returns when all are alive."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spawn(self.nodes[0])
        self.wait_alive(self.nodes[:1], timeout)
        for node in self.nodes[1:]:
            self._spawn(node)
        self.wait_alive(self.nodes[1:], timeout)

    def wait_alive(self, nodes: list[Node], timeout: float = 300) -> None:
        """Until each of ``nodes`` is an alive node of the cluster, and record its node id. A worker whose ``ray
        start`` gave up (its raylet missed the fixed 30 s Ray allows to register, on a loaded machine) is started
        again."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in nodes:
                if node.proc.poll() is not None:
                    if node.index == 0:
                        raise RuntimeError(f"the Ray head exited with {node.proc.returncode}:\n{self.tail(node)}")
                    self._spawn(node)
            try:
                alive = self.alive_nodes()
            except OSError:  # the head's dashboard is not up yet
                alive = {}
            for node in nodes:
                # A killed node stays ALIVE until the head's health checks give up on it: a new id is the new node.
                fresh = [i for i, ip in alive.items() if ip == node.ip and i not in self.lost]
                node.node_id = fresh[0] if fresh else None
            if all(n.node_id for n in nodes):
                return
            time.sleep(1)
        raise TimeoutError(
            f"Ray nodes {[n.ip for n in nodes]} not alive after {timeout:.0f}s:\n"
            + "\n".join(self.tail(n) for n in nodes)
        )

    def kill_node(self, i: int) -> None:
        """SIGKILL worker node i as a lost machine: the process group of its ``ray start`` (raylet, agents) and
        the Ray workers the raylet started (each in a process group of its own)."""
        node = self.nodes[i]
        kill_tree([node.proc], grace=0)
        self.lost.add(node.node_id)
        node.node_id = None

    def restart_node(self, i: int, timeout: float = 300) -> None:
        """A fresh worker node i (a new node id) at the same address, once the head has marked the lost node dead
        (as a replacement machine comes after the failure is noticed); returns once it is alive. Seen once when it
        did not wait: the new node registered while the head still held the lost one alive, got no work, and Ray
        Train's next worker group waited for its CPU until the stage timed out."""
        node = self.nodes[i]
        deadline = time.time() + timeout
        while self.lost & set(self.alive_nodes()):
            if time.time() > deadline:
                raise TimeoutError(f"the head still holds lost node(s) {self.lost & set(self.alive_nodes())} alive")
            time.sleep(0.5)
        self._spawn(node)
        self.wait_alive([node], max(deadline - time.time(), 30))

    def stop(self) -> None:
        """Every node at once: 10 s to stop its processes, then what is left is killed."""
        kill_tree([n.proc for n in self.nodes if n.proc is not None], grace=10)

    # ------------------------------------------------------------------------------------------------------
    # State

    def get(self, path: str) -> object:
        """A GET on the head's dashboard (state API and jobs), with the cluster's token."""
        request = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> dict[str, str]:
        """Node id -> IP of the nodes the head holds alive."""
        nodes = self.get("/api/v0/nodes?limit=1000")["data"]["result"]["result"]
        return {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}

    def tail(self, node: Node, chars: int = 3000) -> str:
        text = node.log.read_text(errors="replace") if node.log and node.log.exists() else ""
        return f"--- node {node.index} ({node.ip}), start {node.starts}:\n{text[-chars:]}"


def kill_tree(procs: list[subprocess.Popen], grace: float) -> None:
    """Stop processes started with ``start_new_session=True``, their process groups and every descendant (also
    those in groups of their own, as Ray's workers are), all at once: SIGTERM and ``grace`` seconds to exit, then
    SIGKILL."""
    groups = [p.pid for p in procs if p.poll() is None]
    tree = [pid for leader in groups for pid in (leader, *_descendants(leader))]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)) if grace > 0 else ((signal.SIGKILL, 10),):
        for pid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while True:
            for p in procs:
                p.poll()  # reap our own children
            if not any(_running(pid) for pid in tree) or time.time() > deadline:
                break
            time.sleep(0.1)
        if not any(_running(pid) for pid in tree):
            break
    for p in procs:
        p.wait()


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, pgrp, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where PID 1 reaps nothing, as in some containers)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="logical CPUs per worker node (default 1)")
    parser.add_argument("--object-store-mib", type=int, default=100, help="object store per node (default 100)")
    parser.add_argument("--workdir", default=None, help="logs and Ray's temp dir (default: a new /tmp/capfilt-mn-*)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] run against the cluster")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if not in_private_netns():
        os.execvp("unshare", private_netns_argv([sys.executable, os.path.abspath(__file__), *sys.argv[1:]]))
    loopback_up()
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="capfilt-mn-", dir="/tmp"))
    cluster = LocalCluster(workdir, args.workers, args.cpus_per_worker, args.object_store_mib)
    try:
        cluster.start()
        print(
            f"Ray cluster at {cluster.address}: head {HEAD_IP}, workers "
            f"{', '.join(n.ip for n in cluster.nodes[1:])}; logs in {workdir}",
            file=sys.stderr,
        )
        return subprocess.run(command, env={**os.environ, **cluster.ray_env}).returncode
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
