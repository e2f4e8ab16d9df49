"""Helpers shared by the reader tests: small img2dataset-format shards, COCO-Karpathy sets, CapFilt Parquet.

A plain module (not conftest.py) so that test files say where their helpers come from.
"""

from __future__ import annotations

import io
import json
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from pipelines import storage


def colour(n: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust colour per integer."""
    return ((n * 67) % 200 + 30, (n * 131) % 200 + 30, (n * 29) % 200 + 30)


def jpeg(rgb: tuple[int, int, int], size: int = 16, fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", (size, size), rgb)
    img.putpixel((0, 0), (255, 255, 255))  # not flat: decoders and transforms do real work
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """A JPEG cut in half: its header parses, its decode fails."""
    good = jpeg((200, 10, 10), size=32)
    return good[: len(good) // 2]


def key_of(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}"


def write_shards(url: str, sizes: list[int], *, corrupt: set[str] = frozenset(), commit: bool = True) -> dict:
    """img2dataset's webdataset layout under ``url``: NNNNN.tar (+ .parquet, _stats.json), then the commit
    marker. Returns {key: {"text", "image" (bytes), "shard", "url"}}."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    samples = {}
    for s, n in enumerate(sizes):
        rows = []
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for i in range(n):
                key = key_of(s, i)
                img = corrupt_jpeg() if key in corrupt else jpeg(colour(s * 1000 + i))
                text = f"caption of {key} ünïcode ✓"
                meta = {
                    "url": f"http://127.0.0.1:1/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": text,
                    "width": 16,
                    "height": 16,
                    "error_message": None,
                }
                sink.write({"__key__": key, "jpg": img, "txt": text, "json": json.dumps(meta).encode()})
                rows.append(meta)
                samples[key] = {"text": text, "image": img, "shard": f"{s:05d}", "url": meta["url"]}
        with fs.open(posixpath.join(root, f"{s:05d}.tar"), "wb") as f:
            f.write(buf.getvalue())
        with fs.open(posixpath.join(root, f"{s:05d}.parquet"), "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({"key": pa.array([], pa.string())}), f)
        with fs.open(posixpath.join(root, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0}, f)
    if commit:
        storage.commit(url, {"shards": len(sizes)})
    return samples


def write_karpathy(root_url: str, n_images: int, *, per_caption_entries: bool = True, offset: int = 500) -> dict:
    """A COCO-Karpathy JSON at ``<root>/ann.json`` and images under ``<root>/images/``.

    ``per_caption_entries``: BLIP's train layout (one entry per caption, with image_id); else the test layout
    (one entry per image, a list of captions, no image_id). Returns {image_path: (captions, image bytes)}.
    """
    fs, root = fsspec.core.url_to_fs(root_url)
    fs.makedirs(posixpath.join(root, "images", "val"), exist_ok=True)
    entries, truth = [], {}
    for i in range(n_images):
        path = f"val/img_{i:03d}.jpg"
        data = jpeg(colour(offset + i))
        with fs.open(posixpath.join(root, "images", path), "wb") as f:
            f.write(data)
        caps = [f"human caption {j} of image {i}" for j in range(1 + i % 3)]
        truth[path] = (caps, data)
        if per_caption_entries:
            entries += [{"image": path, "caption": c, "image_id": f"coco_{i}"} for c in caps]
        else:
            entries.append({"image": path, "caption": caps if len(caps) > 1 else caps[0]})
    with fs.open(posixpath.join(root, "ann.json"), "w") as f:
        json.dump(entries, f)
    return truth
