"""Every URL operation of capfilt: paths, filesystems, atomic publishing, local copies and the commit protocol.

Stages call this module, never fsspec directly, so one place decides how a URL is opened (with which storage
options), how a file becomes visible all at once, and what a committed directory is.

**Publishing.** ``publish_bytes``/``publish_text``/``write_json`` make a file appear whole or not at all: on a
local disk a hidden temporary file in the same directory is fsynced and renamed over the target; on an object
store one PUT, which is visible only once complete.

**Commit protocol.** A stage writes into its directory and commits by writing ``_COMMITTED`` (a small JSON)
last. Readers and reruns trust a directory only once that marker exists, so a crash never leaves a visible
half result. This works the same on a local disk and on object stores (where renames are not atomic).

**Storage options.** Every function takes fsspec's keyword arguments for the filesystem (``key``, ``secret``,
``client_kwargs``...); without them fsspec's environment (``AWS_ENDPOINT_URL``, ``FSSPEC_S3_*``) decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

MARKER = "_COMMITTED"
FileSystem = fsspec.AbstractFileSystem


# -------------------------------------------------------------------------------------------------- paths
def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else posixpath.join(root, *parts)


def absolute(url: str) -> str:
    """A local path made absolute (relative to the current directory); any URL with a scheme unchanged. Paths
    that travel to Ray workers must be absolute: a worker runs in a directory of its own."""
    return url if "://" in url else os.path.abspath(url)


def basename(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


# -------------------------------------------------------------------------------------------- filesystems
def filesystem(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it."""
    return url_to_fs(url, **storage_options)


def is_local(url: str) -> bool:
    """Whether ``url`` is on this machine's filesystem (a plain path or ``file://``)."""
    fs, _ = filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def open_url(url: str, mode: str = "rb", **storage_options: Any) -> IO:
    """A file object on any URL (a context manager)."""
    return fsspec.open(url, mode, **storage_options)


def exists(url: str, **storage_options: Any) -> bool:
    fs, path = filesystem(url, **storage_options)
    return fs.exists(path)


def list_files(url: str, suffix: str = "", **storage_options: Any) -> list[str]:
    """Sorted URLs of the files directly under the directory ``url`` whose names end in ``suffix``; hidden
    (``.``) and private (``_``) names are skipped, as Parquet readers skip them. The listing is fresh (fsspec's
    cached listings of object stores miss what other processes wrote)."""
    fs, path = filesystem(url, **storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
    return [join(url, n) for n in names if n.endswith(suffix) and not n.startswith((".", "_"))]


def read_json(url: str, **storage_options: Any) -> Any:
    with open_url(url, "r", **storage_options) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- publishing
def publish_bytes(url: str, data: bytes, **storage_options: Any) -> None:
    """Write ``data`` to ``url`` so that a reader sees the old file or the whole new one, never a part."""
    fs, path = filesystem(url, **storage_options)
    if not is_local(url):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_text(url: str, text: str, **storage_options: Any) -> None:
    publish_bytes(url, text.encode("utf-8"), **storage_options)


def write_json(url: str, obj: Any, **storage_options: Any) -> None:
    """Publish ``obj`` as indented, key-sorted JSON."""
    publish_text(url, json.dumps(obj, indent=2, sort_keys=True), **storage_options)


# ------------------------------------------------------------------------------------ local copies, upload
@contextlib.contextmanager
def local_copy(url: str, **storage_options: Any) -> Iterator[str]:
    """A local path with the contents of ``url`` (a file or a directory): the URL itself when it is local,
    else a temporary download, removed afterwards."""
    fs, path = filesystem(url, **storage_options)
    if is_local(url):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="capfilt-copy-") as tmp:
        if fs.isdir(path):
            for remote in fs.find(path):
                local = os.path.join(tmp, posixpath.relpath(remote, path))
                os.makedirs(os.path.dirname(local), exist_ok=True)
                fs.get_file(remote, local)
            yield tmp
        else:
            local = os.path.join(tmp, posixpath.basename(path))
            fs.get_file(path, local)
            yield local


def upload_dir(local_dir: str, url: str, **storage_options: Any) -> None:
    """Copy a local directory's files to ``url`` (a directory on any filesystem), overwriting."""
    fs, path = filesystem(url, **storage_options)
    fs.makedirs(path, exist_ok=True)
    for base, _, files in os.walk(local_dir):
        for name in files:
            local = os.path.join(base, name)
            remote = posixpath.join(path, os.path.relpath(local, local_dir).replace(os.sep, "/"))
            fs.makedirs(posixpath.dirname(remote), exist_ok=True)
            fs.put_file(local, remote)


def remove(url: str, **storage_options: Any) -> None:
    """Remove a file or a directory tree if it exists."""
    fs, path = filesystem(url, **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------------------------------ commit markers
def is_committed(url: str, **storage_options: Any) -> bool:
    return exists(join(url, MARKER), **storage_options)


def read_commit(url: str, **storage_options: Any) -> dict:
    return read_json(join(url, MARKER), **storage_options)


def commit(url: str, info: dict | None = None, **storage_options: Any) -> None:
    """Mark the directory ``url`` complete; ``info`` (JSON) is stored in the marker."""
    fs, path = filesystem(url, **storage_options)
    fs.makedirs(path, exist_ok=True)
    payload = {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
    write_json(join(url, MARKER), payload, **storage_options)


# -------------------------------------------------------------------------------------------- the run root
class RunRoot:
    """Names every path of the run-root layout (docs/DESIGN.md) under one root URL."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if "://" in root else root

    def world(self) -> str:
        return join(self.root, "world")

    def ingest(self, source: str = "web") -> str:
        return join(self.root, "ingest", source)

    def round(self, k: int, stage: str) -> str:
        return join(self.root, f"round={k}", stage)


def check_root_writable(root: str, **storage_options: Any) -> None:
    """Fail fast, before any cluster work, when the run root cannot be written (bad bucket, no credentials)."""
    fs, path = filesystem(root, **storage_options)
    probe = join(path, f".capfilt-probe-{time.time_ns()}")
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "w") as f:
            f.write("ok")
        fs.rm(probe)
    except Exception as err:  # noqa: BLE001 - any failure here means the root is unusable; say which and why
        raise PermissionError(f"run root {root} is not writable: {type(err).__name__}: {err}") from None
