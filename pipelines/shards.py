"""img2dataset webdataset shards on any fsspec URL: listing, reading one shard as a stream, and a Ray Dataset.

A shard ``NNNNN.tar`` holds, per sample, ``<key>.jpg`` (or png/webp), ``<key>.txt`` (the raw caption) and
``<key>.json`` (img2dataset's metadata: url, key, status, sizes). Next to it lie ``NNNNN.parquet`` and
``NNNNN_stats.json``. The shard is the unit of work everywhere: a Ray read task, a training stream's unit,
a CapFilt join. A shard's *name* is its file name without ``.tar`` (``"00000"``); it is what the CapFilt
Parquet's ``shard`` column holds.

Images stay encoded here: decoding belongs to the stage that needs pixels, where a corrupt image is a
per-row status rather than a failed read.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import storage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class NotCommittedError(FileNotFoundError):
    """A stage output read before its stage committed it."""


@dataclass
class ShardSample:
    """One sample of a shard, image still encoded."""

    key: str
    image: bytes | None
    text: str
    meta: dict


def shard_name(url: str) -> str:
    """``.../ingest/web/00012.tar`` -> ``"00012"``; also accepts a bare name, with or without ``.tar``."""
    base = posixpath.basename(url.rstrip("/"))
    return base[:-4] if base.endswith(".tar") else base


def list_shards(url: str, *, allow_uncommitted: bool = False, **storage_options: Any) -> list[str]:
    """The ``*.tar`` shards of an ingest directory, sorted by name.

    Raises NotCommittedError while the ingest stage has not committed the directory, because a shard that
    is still being written would be read half; ``allow_uncommitted`` is for tests and for salvaging data.
    """
    fs, path = storage.filesystem(url, **storage_options)
    if not fs.isdir(path):
        raise FileNotFoundError(f"no shard directory at {url}")
    if not allow_uncommitted and not fs.exists(storage.join(path, storage.MARKER)):
        raise NotCommittedError(f"{url} is not committed (no {storage.MARKER}); the ingest stage has not finished it")
    tars = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    # Spelled like the URL given (a plain path stays plain, ``memory://x`` is not rewritten ``memory:///x``).
    return [storage.join(url, posixpath.basename(p)) for p in tars]


def _beside(tar_path: str, suffix: str) -> str:
    """``.../00012.tar`` -> ``.../00012<suffix>``: img2dataset's files next to a shard."""
    return (tar_path[:-4] if tar_path.endswith(".tar") else tar_path) + suffix


def shard_size(shard_url: str, **storage_options: Any) -> int:
    """Number of successful samples in a shard: from img2dataset's ``_stats.json`` when present (cheap on
    object stores), else by scanning the tar's member names."""
    fs, path = storage.filesystem(shard_url, **storage_options)
    stats = _beside(path, "_stats.json")
    if fs.exists(stats):
        with fs.open(stats, "r") as f:
            successes = json.load(f).get("successes")
        if isinstance(successes, int):
            return successes
    keys = set()
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            stem, _, ext = posixpath.basename(member.name).partition(".")
            if ext.lower() in IMAGE_EXTS:
                keys.add(stem)
    return len(keys)


def iter_shard(shard_url: str, keys: set[str] | None = None, **storage_options: Any) -> Iterator[ShardSample]:
    """Stream the samples of one shard in file order, reading it once front to back (no seeks, so it costs
    one GET on an object store and memory for one sample at a time).

    ``keys`` restricts the output to those keys; the others' bytes are skipped, not kept. A sample without
    an image member is yielded with ``image=None``. A truncated or broken tar raises tarfile.ReadError
    after the whole samples read so far were yielded (a tar without its end-of-archive blocks counts as cut); the
    caller decides whether that is fatal.
    """
    current: dict[str, Any] = {}
    current_key: str | None = None

    def flush() -> ShardSample | None:
        if current_key is None or (keys is not None and current_key not in keys):
            return None
        image = next((current[e] for e in IMAGE_EXTS if e in current), None)
        text = current.get("txt", b"").decode("utf-8", errors="replace")
        meta = {}
        if "json" in current:
            try:
                meta = json.loads(current["json"])
            except ValueError:
                meta = {}
        return ShardSample(key=current_key, image=image, text=text, meta=meta)

    with storage.open_url(shard_url, "rb", **storage_options) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            stem, _, ext = base.partition(".")
            if stem != current_key:
                sample = flush()
                if sample is not None:
                    yield sample
                current, current_key = {}, stem
            if keys is not None and stem not in keys:
                continue  # tarfile skips the unread data when advancing
            data = tar.extractfile(member)
            current[ext.lower()] = data.read() if data is not None else b""
        # Before yielding the last sample: a cut may have taken some of its members.
        _require_end_of_archive(tar, shard_url)
        sample = flush()
        if sample is not None:
            yield sample


def _require_end_of_archive(tar: tarfile.TarFile, shard_url: str) -> None:
    """tarfile ends quietly when the file stops at or inside a member's header, so a shard cut there would pass
    for a whole one. A whole tar ends with zero blocks where the next header would be: require them (positions
    are uncompressed bytes). Call after the last member was read."""
    stream = tar.fileobj
    while stream.read(1 << 16):
        pass
    if stream.pos < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"{shard_url} ends after {stream.pos} bytes without the end-of-archive blocks: the shard is truncated"
        )


def sort_shard(shard_url: str, **storage_options: Any) -> bool:
    """Put a shard's samples in key order, in place; returns whether it had to be rewritten.

    img2dataset writes a shard's samples in the order their downloads finish (its threads), so two ingests of
    the same list give the same samples in different orders, and a training stream that reads them gives
    different models. Its keys follow the input list (shard id, then row), so key order is the list's order.
    The shard is read once into memory (one shard: ``shard_size`` encoded samples); one already in order is
    not written. The sorted tar is written beside it (``.tar.sorting``) and moved over it, so a crash leaves
    the old shard whole; each member keeps its header (name, mode, mtime), each sample its members' order.
    Next to it, ``NNNNN.parquet`` (img2dataset's per-URL rows, failures included) gets the same order.
    """
    fs, path = storage.filesystem(shard_url, **storage_options)
    samples: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    order: list[str] = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            stem = posixpath.basename(member.name).partition(".")[0]
            if stem not in samples:
                samples[stem] = []
                order.append(stem)
            elif order[-1] != stem:
                order.append(stem)  # a sample's members apart: not in order
            samples[stem].append((member, data.read() if data is not None else b""))
        _require_end_of_archive(tar, shard_url)
    rewritten = order != sorted(samples)
    if rewritten:
        tmp = path + ".sorting"
        with fs.open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|") as out:
            for stem in sorted(samples):
                for member, data in samples[stem]:
                    out.addfile(member, io.BytesIO(data) if member.isfile() else None)
        fs.mv(tmp, path)
    table_path = _beside(path, ".parquet")
    if fs.exists(table_path):
        import pyarrow.parquet as pq

        with fs.open(table_path, "rb") as f:
            table = pq.read_table(f)
        ordered = table.sort_by("key") if "key" in table.column_names else table
        if not ordered.equals(table):
            tmp = table_path + ".sorting"
            with fs.open(tmp, "wb") as f:
                pq.write_table(ordered, f)
            fs.mv(tmp, table_path)
    return rewritten


# ---------------------------------------------------------------------------------------------- Ray Data

RAY_COLUMNS = ("key", "shard", "url", "text", "image")


def _to_rows(batch: dict) -> dict:
    """Ray's raw webdataset columns -> our row contract (key, shard, url, text, image bytes)."""
    n = len(batch["__key__"])
    images = [None] * n
    for ext in IMAGE_EXTS:
        if ext in batch:
            images = [img if img is not None else cur for img, cur in zip(batch[ext], images)]
    metas = []
    for raw in batch.get("json", [None] * n):
        try:
            metas.append(json.loads(raw) if raw is not None else {})
        except ValueError:
            metas.append({})
    texts = batch.get("txt", [None] * n)
    return {
        "key": [str(k).rsplit("/", 1)[-1] for k in batch["__key__"]],
        "shard": [shard_name(u) for u in batch["__url__"]],
        "url": [m.get("url") for m in metas],
        "text": [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else (t or "") for t in texts],
        "image": [bytes(i) if i is not None else None for i in images],
    }


def read_shards_ray(
    shard_urls: Sequence[str], *, storage_options: dict | None = None, override_num_blocks: int | None = None
) -> ray.data.Dataset:
    """Shards -> a Ray Dataset of rows ``key, shard, url, text, image`` (encoded bytes; None if missing).

    Built on ``ray.data.read_webdataset`` with decoding off; one read task per shard keeps the shard the
    unit of work. Non-local URLs go through the same fsspec filesystem (and storage options) as every
    other stage, wrapped for pyarrow.
    """
    import pyarrow.fs as pafs

    from .ray_runtime import configure_environment

    configure_environment()  # before the first ``import ray``: ray.data starts a local Ray when none runs
    import ray.data

    if not shard_urls:
        raise ValueError("read_shards_ray: no shards given")
    fs, _ = storage.filesystem(shard_urls[0], **(storage_options or {}))
    paths = [storage.filesystem(u, **(storage_options or {}))[1] for u in shard_urls]
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    filesystem = None if local else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    ds = ray.data.read_webdataset(
        paths,
        filesystem=filesystem,
        decoder=None,
        override_num_blocks=override_num_blocks or len(paths),
    )
    return ds.map_batches(_to_rows, batch_format="numpy", zero_copy_batch=True)
