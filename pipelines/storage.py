"""The run root on any fsspec URL: stage paths and the commit protocol.

A stage writes into its directory and commits by writing ``_COMMITTED`` (a small JSON) last. Readers and
reruns trust a directory only once that marker exists, so a crash never leaves a visible half result. This
works the same on a local disk and on object stores (where renames are not atomic).
"""
from __future__ import annotations

import json
import os
import posixpath
import time
from typing import Any

import fsspec
from fsspec.core import url_to_fs

MARKER = "_COMMITTED"


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else posixpath.join(root, *parts)


def absolute(url: str) -> str:
    """A local path made absolute (relative to the current directory); any URL with a scheme unchanged. Paths
    that travel to Ray Train workers must be absolute: a worker runs in a directory of its own."""
    return url if "://" in url else os.path.abspath(url)


def filesystem(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(url, **storage_options)


def is_committed(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(join(path, MARKER))


def read_commit(url: str) -> dict:
    fs, path = filesystem(url)
    with fs.open(join(path, MARKER), "r") as f:
        return json.load(f)


def commit(url: str, info: dict | None = None) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)
    payload = {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
    with fs.open(join(path, MARKER), "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def write_json(url: str, obj: Any) -> None:
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


class RunRoot:
    """Names every path of DESIGN.md's layout under one root URL."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else root

    def world(self) -> str:
        return join(self.root, "world")

    def ingest(self, source: str = "web") -> str:
        return join(self.root, "ingest", source)

    def round(self, k: int, stage: str) -> str:
        return join(self.root, f"round={k}", stage)


def check_root_writable(root: str) -> None:
    """Fail fast, before any cluster work, when the run root cannot be written (bad bucket, no credentials)."""
    fs, path = filesystem(root)
    probe = join(path, f".capfilt-probe-{time.time_ns()}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any failure here means the root is unusable; say which and why
        raise PermissionError(f"run root {root} is not writable: {type(err).__name__}: {err}") from None
