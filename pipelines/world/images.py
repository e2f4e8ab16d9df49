"""The world's pixels: an image (or an animated clip) drawn from its facts, 4x larger then downsampled."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from .language import COLOURS

_SUPERSAMPLE = 4
_RADIUS = {"small": 0.11, "large": 0.19}  # an object's radius in units of the image side, by size


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        t = 0.36 * r
        return [
            (cx - t, cy - r),
            (cx + t, cy - r),
            (cx + t, cy - t),
            (cx + r, cy - t),
            (cx + r, cy + t),
            (cx + t, cy + t),
            (cx + t, cy + r),
            (cx - t, cy + r),
            (cx - t, cy + t),
            (cx - r, cy + t),
            (cx - r, cy - t),
            (cx - t, cy - t),
        ]
    return None


def _draw_background(draw: ImageDraw.ImageDraw, kind: str, n: int, rng: np.random.Generator) -> None:
    base = {"white": (250, 250, 250), "gray": (140, 140, 140), "black": (25, 25, 25)}.get(kind, (250, 250, 250))
    draw.rectangle([0, 0, n, n], fill=base)
    if kind == "striped":
        step = n // 8
        phase = int(rng.integers(step))
        for k in range(-n, n, step):
            x = k + phase
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + n, n), (x + n, n)], fill=(205, 205, 205))
    elif kind == "dotted":
        step = n // 8
        off = int(rng.integers(step))
        rad = max(2, n // 48)
        for y in range(off, n, step):
            for x in range(off, n, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=(190, 190, 190))


def _placements(facts: dict, rng: np.random.Generator) -> list[tuple[dict, float, float, float]]:
    """(object, cx, cy, radius) in units of the image side."""
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731
    objs = facts["objects"]
    if facts["layout"] == "single":
        cx, cy = {
            "left": (0.25, 0.5),
            "right": (0.75, 0.5),
            "top": (0.5, 0.25),
            "bottom": (0.5, 0.75),
            "center": (0.5, 0.5),
        }[facts["position"]]
        return [(objs[0], cx + j(0.04), cy + j(0.04), _RADIUS[objs[0]["size"]])]
    if facts["layout"] == "pair":
        along = (0.25 + j(0.04), 0.75 + j(0.04))
        across = (0.5 + j(0.15), 0.5 + j(0.15))
        if facts["relation"] == "left_of":
            return [(o, along[k], across[k], _RADIUS[o["size"]]) for k, o in enumerate(objs)]
        return [(o, across[k], along[k], _RADIUS[o["size"]]) for k, o in enumerate(objs)]
    o = objs[0]
    grid = (0.25, 0.75) if o["size"] == "large" else (1 / 6, 0.5, 5 / 6)
    cells = [(x, y) for y in grid for x in grid]
    picked = rng.choice(len(cells), size=facts["count"], replace=False)
    return [(o, cells[c][0] + j(0.03), cells[c][1] + j(0.03), _RADIUS[o["size"]]) for c in sorted(picked)]


def render_image(facts: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the facts at ``size`` px (drawn 4x larger and downsampled, for smooth edges)."""
    n = size * _SUPERSAMPLE
    img = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, facts["background"], n, rng)
    for obj, cx, cy, r in _placements(facts, rng):
        draw_object(draw, obj, cx * n, cy * n, r * n)
    return img.resize((size, size), Image.LANCZOS)


def render_clip(facts: dict, size: int, frames: int, rng: np.random.Generator) -> list[Image.Image]:
    """An object moving in a straight line across a fixed background (drawn 4x larger, then downsampled)."""
    n = size * _SUPERSAMPLE
    obj = facts["objects"][0]
    r = _RADIUS[obj["size"]] * n
    (x0, y0), (x1, y1) = rng.uniform(0.25, 0.75, size=(2, 2)) * n
    background = Image.new("RGB", (n, n))
    _draw_background(ImageDraw.Draw(background), facts["background"], n, rng)
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        img = background.copy()
        draw_object(ImageDraw.Draw(img), obj, x0 + t * (x1 - x0), y0 + t * (y1 - y0), r)
        out.append(img.resize((size, size), Image.LANCZOS))
    return out


def draw_object(draw: ImageDraw.ImageDraw, obj: dict, cx: float, cy: float, r: float) -> None:
    """One object of the world centred at (cx, cy) with radius r, in pixels."""
    fill = COLOURS[obj["colour"]]
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj["shape"] == "square":
        s = 0.85 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon(_shape_points(obj["shape"], cx, cy, r), fill=fill)


def jpeg(img: Image.Image) -> bytes:
    """The image as a JPEG file (quality 90), as the world stores it."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
