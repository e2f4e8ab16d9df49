"""COCO-Karpathy annotation files (the human set) with an image root on any fsspec URL.

The format is BLIP's: a JSON list of ``{"image": <path relative to the image root>, "caption": str | [str],
"image_id"?: any}``. BLIP's train file has one entry per caption (same image repeated), its test files one
entry per image with a list of captions; both are read the same way: entries are grouped by image path, in
order of first appearance. ``image_id`` is the entry's own when present, else the image path without
extension; it is always a string.

Three views of one file:
  - ``KarpathyDataset``: map-style, (image, captions, image_id) per image — evaluation and retrieval;
  - ``KarpathyPairs``: map-style, (image, caption, image_id) per caption — fine-tuning the captioner/filter;
  - ``KarpathySource``: units for ``ShardStream``, so training can mix the human set with web shards.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from blip_core.transforms import decode_image

from . import storage
from .sources import RawSample, Source, StreamUnit


@dataclass(frozen=True)
class KarpathyEntry:
    image: str  # path relative to the image root
    captions: tuple[str, ...]
    image_id: str


def join_url(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel.lstrip("/")


def read_karpathy(ann_url: str, **storage_options: Any) -> list[KarpathyEntry]:
    """Parse and validate an annotation file; errors name the file and the bad entry."""
    with storage.open_url(ann_url, "r", encoding="utf-8", **storage_options) as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise ValueError(f"{ann_url} is not valid JSON: {err}") from None
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise ValueError(f"{ann_url}: expected a JSON list of {{image, caption}} entries")
    grouped: dict[str, dict] = {}
    for i, ann in enumerate(data):
        if not isinstance(ann, dict) or "image" not in ann or "caption" not in ann:
            raise ValueError(f"{ann_url}: entry {i} needs 'image' and 'caption', got {str(ann)[:200]}")
        caps = ann["caption"]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{ann_url}: entry {i} has a non-string caption")
        g = grouped.setdefault(ann["image"], {"captions": [], "image_id": None})
        g["captions"].extend(caps)
        if g["image_id"] is None and ann.get("image_id") is not None:
            g["image_id"] = str(ann["image_id"])
    return [
        KarpathyEntry(image=img, captions=tuple(g["captions"]), image_id=g["image_id"] or posixpath.splitext(img)[0])
        for img, g in grouped.items()
    ]


class KarpathyDataset(Dataset):
    """(image, captions, image_id) per image; ``image`` is transformed, or a PIL image without a transform."""

    def __init__(
        self, ann_url: str, image_root: str, transform: Callable | None = None, storage_options: dict | None = None
    ):
        self.ann_url, self.image_root = ann_url, image_root
        self.transform = transform
        self.storage_options = storage_options or {}
        self.entries = read_karpathy(ann_url, **self.storage_options)

    def __len__(self) -> int:
        return len(self.entries)

    def load_image(self, entry: KarpathyEntry) -> Any:
        """Read and decode one image; a corrupt one raises CorruptImageError naming its URL."""
        url = join_url(self.image_root, entry.image)
        with storage.open_url(url, "rb", **self.storage_options) as f:
            data = f.read()
        try:
            img = decode_image(data)
        except ValueError as err:
            raise type(err)(f"{url}: {err}") from None
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, i: int) -> tuple[Any, list[str], str]:
        e = self.entries[i]
        return self.load_image(e), list(e.captions), e.image_id

    def pairs(self) -> KarpathyPairs:
        return KarpathyPairs(self)

    def stream_source(self, images_per_unit: int = 256, source: str = "human") -> KarpathySource:
        return KarpathySource(
            self.ann_url,
            self.image_root,
            images_per_unit=images_per_unit,
            source=source,
            storage_options=self.storage_options,
            entries=self.entries,
        )


class KarpathyPairs(Dataset):
    """The flattened view: (image, caption, image_id) per caption, as BLIP fine-tunes on the human set."""

    def __init__(self, dataset: KarpathyDataset):
        self.dataset = dataset
        self.index = [(i, c) for i, e in enumerate(dataset.entries) for c in range(len(e.captions))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> tuple[Any, str, str]:
        i, c = self.index[j]
        e = self.dataset.entries[i]
        return self.dataset.load_image(e), e.captions[c], e.image_id


class KarpathySource(Source):
    """The human set as stream units: slices of ``images_per_unit`` images, one sample per caption.

    Images are fetched after the shuffle buffer (the buffer holds URLs, not pixels).
    """

    def __init__(
        self,
        ann_url: str,
        image_root: str,
        *,
        images_per_unit: int = 256,
        source: str = "human",
        storage_options: dict | None = None,
        entries: list[KarpathyEntry] | None = None,
    ):
        self.ann_url, self.image_root = ann_url, image_root
        self.images_per_unit = max(1, images_per_unit)
        self.source = source
        self.storage_options = storage_options or {}
        self.entries = entries if entries is not None else read_karpathy(ann_url, **self.storage_options)

    def units(self, with_sizes: bool = False) -> list[StreamUnit]:
        n, k = len(self.entries), self.images_per_unit
        return [
            StreamUnit(
                f"{self.source}/{start:08d}",
                (start, min(start + k, n)),
                sum(len(e.captions) for e in self.entries[start : start + k]),
            )
            for start in range(0, n, k)
        ]

    def read(self, unit: StreamUnit) -> Iterator[RawSample]:
        start, stop = unit.ref
        for e in self.entries[start:stop]:
            url = join_url(self.image_root, e.image)
            for c in e.captions:
                yield RawSample(
                    key=e.image, image_id=f"{self.source}:{e.image_id}", text=c, source=self.source, image_url=url
                )
