"""Injected copies, with ground truth: web images that are re-encoded, resized or slightly cropped copies of other
web images (``world.duplicate_rate``, duplicates) or of held-out test images (``world.leak_rate``, test-set leaks),
as a web crawl holds them.

``round(rate * n_web)`` copies of each kind are appended to the web corpus after its ``n_web`` originals (so the
originals, their captions and their noise are those of a world without copies), in an order drawn from the seed.
A copy's caption is a clean caption of its source's facts in a phrasing of its own. Each copy is one transform of
its source's stored JPEG: ``reencode`` (JPEG quality 30-70), ``resize`` (60-80% or 125-160% of the side) or
``crop`` (0-2 px off each side). ``truth/copies.parquet`` records each copy: its web ``row`` and ``path``,
``kind`` (``duplicate`` / ``leak``), ``source_path`` (``web/...`` or ``test/...``) and ``transform``.

With both rates 0 (the default) nothing is added and the world is byte for byte what it was.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .language import seeded_rng

TRANSFORMS = ("reencode", "resize", "crop")


@dataclass(frozen=True)
class Copy:
    kind: str  # "duplicate" or "leak"
    split: str  # the source's split: "web" or "test"
    index: int  # the source's index in its split
    transform: str


def plan(n_web: int, n_test: int, duplicate_rate: float, leak_rate: float, seed: int) -> list[Copy]:
    """The copies to append, in web order: sources drawn without replacement where there are enough."""
    rng = seeded_rng(seed, 300)
    n_dup, n_leak = int(round(duplicate_rate * n_web)), int(round(leak_rate * n_web))
    copies = [
        Copy("duplicate", "web", int(i), str(t))
        for i, t in zip(rng.choice(n_web, n_dup, replace=n_dup > n_web), rng.choice(TRANSFORMS, n_dup))
    ]
    copies += [
        Copy("leak", "test", int(i), str(t))
        for i, t in zip(rng.choice(n_test, n_leak, replace=n_leak > n_test), rng.choice(TRANSFORMS, n_leak))
    ]
    return [copies[i] for i in rng.permutation(len(copies))]


def transform(data: bytes, how: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """A copy of the JPEG ``data`` by ``how``; returns its JPEG and a detail of what was done."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    quality = 90
    if how == "reencode":
        quality = int(rng.integers(30, 71))
        detail = f"quality={quality}"
    elif how == "resize":
        scale = float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.6)]))
        side = max(8, int(round(img.width * scale)))
        img = img.resize((side, side), Image.Resampling.BICUBIC)
        detail = f"side={side}"
    elif how == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, 3, size=4))
        img = img.crop((left, top, img.width - right, img.height - bottom))
        detail = f"crop={left},{top},{right},{bottom}"
    else:
        raise ValueError(f"unknown copy transform {how!r}; choose from {TRANSFORMS}")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), f"{how}:{detail}"
