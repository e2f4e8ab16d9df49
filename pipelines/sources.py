"""What the training stream reads: units of work, the samples they hold, and the sources that list and read them.

A *unit* (``StreamUnit``) is the smallest piece of work a stream slot takes (a shard, a slice of a Karpathy file,
a shard of a round's bootstrapped dataset); a *source* lists its units and reads one, front to back, as RawSamples
(image still encoded or named by URL). ``ShardStream`` (pipelines/stream.py) decides who reads which unit.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import storage
from .shards import iter_shard, shard_name, shard_size


class Sample(NamedTuple):
    """What the stream yields. Tokenizer-free: the training collate tokenises ``text``.

    ``image_id`` names the picture, not the pair: all texts of one image share it (ITC positives), and it is
    namespaced by source (``web:000000123``, ``human:391895``) so different sources cannot collide.
    """

    image: Any  # a normalised float tensor [3, H, W] with a transform; a PIL image without
    text: str
    key: str
    image_id: str
    source: str  # "web" | "synthetic" | "human" | the ingest source name


@dataclass
class RawSample:
    """A sample before decoding: what the shuffle buffer holds (encoded bytes, or a URL to fetch later)."""

    key: str
    image_id: str
    text: str
    source: str
    image: bytes | None = None
    image_url: str | None = None


@dataclass(frozen=True)
class StreamUnit:
    """One unit of the training stream's work (not CapFilt's commit unit, ``pipelines.capfilt.Unit``). ``ref`` is
    whatever its source needs to read it (picklable)."""

    name: str
    ref: Any
    size: int | None = None


class Source(abc.ABC):
    """A set of units and how to read one. Subclasses: ShardSource, KarpathySource, BootstrappedSource."""

    @abc.abstractmethod
    def units(self, with_sizes: bool = False) -> list[StreamUnit]: ...

    @abc.abstractmethod
    def read(self, unit: StreamUnit) -> Iterator[RawSample]: ...

    storage_options: dict = {}  # fsspec options for this source's files; subclasses set their own

    def fetch(self, url: str) -> bytes:
        """Bytes of an image that a RawSample names by URL (read after the shuffle buffer)."""
        with storage.open_url(url, "rb", **self.storage_options) as f:
            return f.read()


class ShardSource(Source):
    """Web shards as they came out of ingestion: one sample per image, with its raw caption."""

    def __init__(self, shard_urls: Sequence[str], source: str | None = None, storage_options: dict | None = None):
        self.shard_urls = list(shard_urls)
        # The ingest directory's name (``web``) namespaces image ids.
        self.source = source or (source_name(self.shard_urls[0]) if self.shard_urls else "web")
        self.storage_options = storage_options or {}

    def units(self, with_sizes: bool = False) -> list[StreamUnit]:
        return [
            StreamUnit(
                f"{self.source}/{shard_name(u)}", u, shard_size(u, **self.storage_options) if with_sizes else None
            )
            for u in self.shard_urls
        ]

    def read(self, unit: StreamUnit) -> Iterator[RawSample]:
        for s in iter_shard(unit.ref, **self.storage_options):
            yield RawSample(
                key=s.key, image_id=f"{self.source}:{s.key}", text=s.text, source=self.source, image=s.image
            )


def source_name(shard_url: str) -> str:
    """The ingest directory's name (``.../ingest/web/00000.tar`` -> ``web``): it namespaces image ids."""
    parts = shard_url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2] else "web"
