"""A round's bootstrapped dataset: the human set plus the texts CapFilt kept, streamed for the next round.

The manifest
------------
``<root>/round=<k>/dataset/manifest.json``, written by the ``assemble`` stage with ``write_manifest`` (which
then commits the directory with ``storage.commit``)::

    {
      "format": "capfilt.dataset",
      "version": 1,
      "round": 0,
      "human": {"annotations": "../../world/human_train.json", "image_root": "../../world/images"},
      "shards": "../../ingest/web",
      "capfilt": "../capfilt",
      "counts": {"human_pairs": 1500, "web": 1800, "synthetic": 2600}
    }

- ``human``: a COCO-Karpathy annotation file and the root its ``image`` paths are relative to; null for a
  run without a human set.
- ``shards``: the ingest directory holding the images (``NNNNN.tar``) the CapFilt rows refer to.
- ``capfilt``: the CapFilt Parquet, a file or a directory of ``*.parquet`` files (other files, such as the
  commit marker, are ignored). Only rows with ``keep = true`` are read; columns used: ``key``, ``shard``,
  ``text``, ``source``. ``shard`` holds the shard's name (``"00012"``; ``"00012.tar"`` or a full URL are
  accepted too).
- ``counts``: informational (what assemble counted); readers do not rely on it.
- ``keep`` (only when assemble applied a keep rule of its own, the config's ``assemble:`` section): the rule
  (``rule``, ``description``, the ``config`` it came from), the CapFilt Parquet it was applied to (``capfilt``,
  a location as above) and that run's ``capfilt_fingerprint``, and the counts by source (kept, total, dropped by
  reason). ``capfilt`` above then names the rows that rule kept, written by assemble under ``kept/`` (one file per
  CapFilt file: ``shard``, ``key``, ``source``, ``candidate``, ``text`` and ``keep``, always true), so the stream
  reads them as it reads CapFilt's own. Without ``keep``, the stream reads CapFilt's ``keep`` column.
- Every location is a URL (``s3://b/run/ingest/web``, ``/data/run/...``) or a path relative to the
  manifest's directory; ``write_manifest`` writes relative paths when it can, so a run root can be copied
  or moved as a whole.

The join is shard-local: the driver reads only the ``shard`` column of the kept rows, to learn which shards
have kept texts (and in which Parquet files); when the stream reaches shard S, it reads S's kept rows by
predicate pushdown and yields one sample per kept text of every key in S, with the image from S. No global
shuffle of images — mixing comes from the stream's unit order and shuffle buffer — so a worker's memory is
one shard's kept rows plus the buffer.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import storage
from .karpathy import KarpathySource
from .shards import NotCommittedError, iter_shard, list_shards, shard_name
from .sources import RawSample, Source, StreamUnit, source_name
from .stream import ShardStream

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "capfilt.dataset"
VERSION = 1


@dataclass
class DatasetManifest:
    """A parsed manifest with every location resolved to an absolute URL."""

    round: int
    human_annotations: str | None
    human_image_root: str | None
    shards: str | None
    capfilt: str | None
    counts: dict = field(default_factory=dict)
    keep: dict | None = None  # the keep rule of assemble's own, if any (its ``capfilt`` resolved)


def _split(url: str) -> tuple[str, str]:
    """('s3://bucket', '/run/x') or ('', '/data/run/x'): the part relative paths may not cross, and the path."""
    if "://" in url:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}", parts.path or "/"
    return "", url


def resolve(base_dir: str, ref: str | None) -> str | None:
    """A manifest location -> absolute URL (relative ones against the manifest's directory)."""
    if ref is None:
        return None
    if "://" in ref or ref.startswith("/"):
        return ref
    head, path = _split(base_dir)
    if head and not path.startswith("/"):
        path = "/" + path
    joined = posixpath.normpath(posixpath.join(path, ref))
    return f"{head}{joined}" if head else joined


def relativize(base_dir: str, url: str | None) -> str | None:
    """The inverse of ``resolve`` where possible (same scheme and bucket); else the URL unchanged."""
    if url is None:
        return None
    (h1, p1), (h2, p2) = _split(base_dir), _split(url)
    if h1 != h2 or not p1.startswith("/") or not p2.startswith("/"):
        return url
    return posixpath.relpath(p2, p1)


def write_manifest(
    dataset_dir: str,
    *,
    round: int,
    human_annotations: str | None,
    human_image_root: str | None,
    shards: str | None,
    capfilt: str | None,
    counts: dict | None = None,
    keep: dict | None = None,
    relative: bool = True,
) -> str:
    """Write ``<dataset_dir>/manifest.json`` (the caller commits the directory afterwards); returns its URL."""
    if (human_annotations is None) != (human_image_root is None):
        raise ValueError("human_annotations and human_image_root go together")
    if (shards is None) != (capfilt is None):
        raise ValueError("shards and capfilt go together")
    rel = (lambda u: relativize(dataset_dir, u)) if relative else (lambda u: u)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "round": round,
        "human": None
        if human_annotations is None
        else {"annotations": rel(human_annotations), "image_root": rel(human_image_root)},
        "shards": rel(shards),
        "capfilt": rel(capfilt),
        "counts": counts or {},
    }
    if keep is not None:
        payload["keep"] = {**keep, "capfilt": rel(keep.get("capfilt"))}
    url = storage.join(dataset_dir, MANIFEST)
    storage.write_json(url, payload)
    return url


def read_manifest(url: str) -> DatasetManifest:
    """Read a manifest (the file's URL or its directory's) and resolve its locations."""
    if not url.rstrip("/").endswith(".json"):
        url = storage.join(url, MANIFEST)
    data = storage.read_json(url)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{url} is not a capfilt dataset manifest (format must be {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{url}: manifest version {data.get('version')!r} is not supported (expected {VERSION})")
    base = posixpath.dirname(url.rstrip("/")) if "://" not in url else url.rsplit("/", 1)[0]
    human = data.get("human") or {}
    keep = data.get("keep")
    return DatasetManifest(
        round=int(data.get("round", 0)),
        human_annotations=resolve(base, human.get("annotations")),
        human_image_root=resolve(base, human.get("image_root")),
        shards=resolve(base, data.get("shards")),
        capfilt=resolve(base, data.get("capfilt")),
        counts=data.get("counts") or {},
        keep=None if keep is None else {**keep, "capfilt": resolve(base, keep.get("capfilt"))},
    )


def parquet_files(url: str, **storage_options: Any) -> tuple[Any, list[str]]:
    """A Parquet file or directory -> (fsspec filesystem, sorted ``*.parquet`` paths)."""
    fs, path = storage.filesystem(url, **storage_options)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    elif fs.exists(path):
        files = [path]
    else:
        raise FileNotFoundError(f"no CapFilt Parquet at {url}")
    return fs, files


KEPT = pc.field("keep") == True  # noqa: E712  (a pyarrow expression, not a Python comparison)
PLANNING_THREADS = 16  # Parquet files read at once when planning the stream (object stores: latency-bound)


class BootstrappedSource(Source):
    """The kept CapFilt rows joined back to their shard images, one unit per shard with kept texts."""

    def __init__(
        self, shards_url: str, capfilt_url: str, *, allow_uncommitted: bool = False, storage_options: dict | None = None
    ):
        self.shards_url, self.capfilt_url = shards_url, capfilt_url
        self.allow_uncommitted = allow_uncommitted
        self.storage_options = storage_options or {}
        self.image_source = source_name(storage.join(shards_url, "x.tar"))

    def units(self, with_sizes: bool = False) -> list[StreamUnit]:
        # One pass over the ``shard`` column of the kept rows, files read in parallel (each gives only its per-shard
        # counts): counts and file lists per shard, O(shards) memory.
        fs, files = parquet_files(self.capfilt_url, **self.storage_options)
        counts: Counter = Counter()
        stored: dict[str, set] = defaultdict(set)
        where: dict[str, set] = defaultdict(set)

        def shard_counts(path: str) -> tuple[list, list]:
            table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["shard"], filter=KEPT)
            return _value_counts(table.column("shard"))

        with ThreadPoolExecutor(PLANNING_THREADS) as pool:
            for path, (values, ns) in zip(files, pool.map(shard_counts, files)):
                for value, n in zip(values, ns):
                    name = shard_name(str(value))
                    counts[name] += n
                    stored[name].add(value)
                    where[name].add(path)
        available = {
            shard_name(u): u
            for u in list_shards(self.shards_url, allow_uncommitted=self.allow_uncommitted, **self.storage_options)
        }
        orphans = sorted(set(counts) - set(available))
        if orphans:
            log.warning(
                "%d kept rows name shards missing from %s (%s...); they are skipped",
                sum(counts[s] for s in orphans),
                self.shards_url,
                orphans[:5],
            )
        return [
            StreamUnit(
                f"{self.image_source}/{name}",
                (available[name], tuple(sorted(stored[name])), tuple(sorted(where[name]))),
                counts[name],
            )
            for name in sorted(counts)
            if name in available
        ]

    def read(self, unit: StreamUnit) -> Iterator[RawSample]:
        shard_url, stored_values, files = unit.ref
        fs, _ = storage.filesystem(self.capfilt_url, **self.storage_options)
        table = pads.dataset(list(files), filesystem=fs, format="parquet").to_table(
            columns=["key", "text", "source"], filter=KEPT & pc.field("shard").isin(list(stored_values))
        )
        texts: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key, text, source in zip(*(table.column(c).to_pylist() for c in ("key", "text", "source"))):
            if text is None:
                log.warning("kept row of key %s in shard %s has no text; skipped", key, unit.name)
                continue
            texts[str(key)].append((text, source or "web"))
        del table
        seen = set()
        for s in iter_shard(shard_url, keys=set(texts), **self.storage_options):
            seen.add(s.key)
            for text, source in texts[s.key]:
                yield RawSample(
                    key=s.key, image_id=f"{self.image_source}:{s.key}", text=text, source=source, image=s.image
                )
        for key in sorted(set(texts) - seen):  # the stream counts these as missing images
            for text, source in texts[key]:
                yield RawSample(key=key, image_id=f"{self.image_source}:{key}", text=text, source=source)


def _value_counts(column) -> tuple[list, list]:
    vc = pc.value_counts(column)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def bootstrapped_sources(
    manifest_url: str,
    *,
    images_per_unit: int = 256,
    allow_uncommitted: bool = False,
    storage_options: dict | None = None,
) -> list[Source]:
    """The sources a round's manifest names: the human set (if any) and the kept CapFilt rows (if any)."""
    man_dir = manifest_url if not manifest_url.rstrip("/").endswith(".json") else manifest_url.rsplit("/", 1)[0]
    if not allow_uncommitted and not storage.is_committed(man_dir):
        raise NotCommittedError(f"{man_dir} is not committed; the assemble stage has not finished it")
    m = read_manifest(manifest_url)
    sources: list[Source] = []
    opts = storage_options or {}
    if m.human_annotations is not None:
        sources.append(
            KarpathySource(
                m.human_annotations, m.human_image_root, images_per_unit=images_per_unit, storage_options=opts
            )
        )
    if m.capfilt is not None:
        sources.append(
            BootstrappedSource(m.shards, m.capfilt, allow_uncommitted=allow_uncommitted, storage_options=opts)
        )
    if not sources:
        raise ValueError(f"{manifest_url} names neither a human set nor CapFilt output")
    return sources


def bootstrapped_stream(
    manifest_url: str,
    *,
    images_per_unit: int = 256,
    allow_uncommitted: bool = False,
    storage_options: dict | None = None,
    **stream_kwargs: Any,
) -> ShardStream:
    """The training stream of a round's bootstrapped dataset; ``stream_kwargs`` go to ShardStream."""
    sources = bootstrapped_sources(
        manifest_url,
        images_per_unit=images_per_unit,
        allow_uncommitted=allow_uncommitted,
        storage_options=storage_options,
    )
    return ShardStream(sources, **stream_kwargs)
