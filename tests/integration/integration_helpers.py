"""Helpers for integration tests: run the real ``capfilt`` command, read shards back."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "flows" / "configs" / "tiny.yaml")
CAPFILT = str(Path(sys.executable).parent / "capfilt")


def capfilt(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> tuple[subprocess.CompletedProcess, float]:
    """Run the installed console script, as a user would; returns the process and its wall time."""
    t0 = time.time()
    proc = subprocess.run(
        [CAPFILT, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})}
    )
    return proc, time.time() - t0


def ingest(
    root: str, *overrides: str, flags: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    """``capfilt ingest --config tiny.yaml --root ROOT [FLAGS] --set KEY=VALUE ...``, as a user would run it."""
    sets = [a for o in overrides for a in ("--set", o)]
    return capfilt("ingest", "--config", TINY, "--root", root, *flags, *sets, env=env)


def read_shards(folder: str) -> tuple[dict[str, dict[str, bytes]], list[dict]]:
    """All samples of the ``*.tar`` shards (key -> {extension: bytes}) and all rows of their Parquet files."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache()
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(fs.glob(path.rstrip("/") + "/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(tar_path))) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    rows: list[dict] = []
    for pq_path in sorted(fs.glob(path.rstrip("/") + "/*.parquet")):
        with fs.open(pq_path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return samples, rows
