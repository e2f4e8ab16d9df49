"""Noisy web captions: the noise types, in one registry.

A noise type is a function ``(row, rng) -> (caption, detail)`` registered under its name with
:func:`register_noise`. ``row`` (:class:`WebRow`) is the web row to make noisy, with every row's facts and clean
caption; ``rng`` is the row's own generator; ``detail`` (or None) says what the noise did and goes to
``truth/web.parquet``. A config's ``world.noise_mix`` weights the types by their registered names.

:data:`NOISES` keeps registration order, which is the order the world allocates noisy rows in (:func:`assign`)
and reports them in: a new type goes last so that the worlds of the existing types stay the same.

To add a noise type, write its function here (after the others) under ``@register_noise("name")``; configs name
it in ``world.noise_mix`` (validated against this registry). A ``noise_mix`` left out weights every registered
type equally, so a new type changes the worlds of such configs; the shipped configs list their types.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .language import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, choice, render_caption


@dataclass(frozen=True)
class WebRow:
    """One web row to make noisy: its index, and every web image's facts and clean caption."""

    index: int
    all_facts: list[dict]
    clean: list[str]

    @property
    def facts(self) -> dict:
        return self.all_facts[self.index]


NoiseFn = Callable[[WebRow, np.random.Generator], tuple[str, str | None]]
NOISES: dict[str, NoiseFn] = {}


def register_noise(name: str) -> Callable[[NoiseFn], NoiseFn]:
    """Register a noise function under ``name`` (the name a config's ``world.noise_mix`` uses)."""

    def register(fn: NoiseFn) -> NoiseFn:
        if name in NOISES:
            raise ValueError(f"noise type {name!r} is already registered")
        NOISES[name] = fn
        return fn

    return register


# ----------------------------------------------------------------------------------------------------------
# The noise types, in registration order

_UNRELATED = (
    "IMG_{n4}.JPG",
    "DSC{n5}.jpg",
    "my favourite photo",
    "my favourite photo of the year",
    "untitled",
    "buy now and save {n2} percent",
    "free shipping on orders over {n2} dollars",
    "click here to subscribe",
    "best deals this week only",
    "photo by user{n3}",
    "screenshot 20{n2}",
    "happy birthday grandma",
    "view from my window",
    "copyright 20{n2} all rights reserved",
    "wallpaper hd download",
    "lol",
    "image{n3}.jpeg",
    "limited offer visit our shop",
    "this made my day",
    "throwback to last summer",
)


@register_noise("unrelated")
def unrelated(row: WebRow, rng: np.random.Generator) -> tuple[str, str | None]:
    """Text about nothing in the image: ads, "my favourite photo", file names."""
    t = choice(rng, _UNRELATED)
    text = t.format(
        n2=int(rng.integers(10, 100)),
        n3=int(rng.integers(100, 1000)),
        n4=int(rng.integers(1000, 10000)),
        n5=int(rng.integers(10000, 100000)),
    )
    return text, None


@register_noise("wrong_attribute")
def wrong_attribute(row: WebRow, rng: np.random.Generator) -> tuple[str, str | None]:
    """The caption of the image's facts with exactly one fact changed; the detail says which."""
    facts = row.facts
    options = ["background"] + [f"{i}.{k}" for i in range(len(facts["objects"])) for k in ("shape", "colour", "size")]
    options += {"single": ["position"], "pair": ["relation"], "group": ["count"]}[facts["layout"]]
    while True:
        f = json.loads(json.dumps(facts))
        what = choice(rng, options)
        if what == "background":
            old, f["background"] = f["background"], choice(rng, [b for b in BACKGROUNDS if b != f["background"]])
            new = f["background"]
        elif what == "position":
            old, f["position"] = f["position"], choice(rng, [p for p in POSITIONS if p != f["position"]])
            new = f["position"]
        elif what == "relation":  # swap the objects: "a left of b" becomes "b left of a"
            f["objects"].reverse()
            old, new = "order", "swapped"
        elif what == "count":
            old, f["count"] = f["count"], 5 - f["count"]  # 2 <-> 3
            new = f["count"]
        else:
            i, k = what.split(".")
            vocab = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}[k]
            obj = f["objects"][int(i)]
            old = obj[k]
            obj[k] = choice(rng, [v for v in vocab if v != old])
            new = obj[k]
            if f["layout"] == "pair" and f["objects"][0] == f["objects"][1]:
                continue  # would describe two identical objects: ambiguous, draw again
        return render_caption(f, rng), f"{what}:{old}->{new}"


@register_noise("other_caption")
def other_caption(row: WebRow, rng: np.random.Generator) -> tuple[str, str | None]:
    """Another image's clean caption, from an image with different facts; the detail names its row."""
    i, n = row.index, len(row.all_facts)
    j = i
    for _ in range(50):
        j = int(rng.integers(n))
        if j != i and row.all_facts[j] != row.all_facts[i]:
            break
    if j == i:  # a world of one image, or of identical images: nothing else to borrow
        j = (i + 1) % n
    return row.clean[j], f"from_row:{j}"


@register_noise("partial")
def partial(row: WebRow, rng: np.random.Generator) -> tuple[str, str | None]:
    """The caption of the image's facts with some dropped (never the shapes or the count): true but incomplete."""
    facts = row.facts
    droppable = ["background"] + [f"{i}.{k}" for i in range(len(facts["objects"])) for k in ("colour", "size")]
    if facts["layout"] == "single":
        droppable.append("position")
    if facts["layout"] == "pair":
        droppable.append("relation")
    k = int(rng.integers(1, len(droppable) + 1))
    dropped = sorted(rng.choice(len(droppable), size=k, replace=False).tolist())
    f = json.loads(json.dumps(facts))
    names = [droppable[d] for d in dropped]
    for name in names:
        if name in ("background", "position", "relation"):
            f[name] = None
        else:
            i, attr = name.split(".")
            del f["objects"][int(i)][attr]
    return render_caption(f, rng), "dropped:" + ",".join(names)


NOISE_TYPES = tuple(NOISES)


# ----------------------------------------------------------------------------------------------------------
# Which rows get which noise


def allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` by ``weights`` exactly, largest remainders first (ties in registration order)."""
    total = sum(weights.values())
    raw = {t: n * weights.get(t, 0.0) / total for t in NOISE_TYPES}
    out = {t: int(math.floor(v)) for t, v in raw.items()}
    rest = n - sum(out.values())
    for t in sorted(NOISE_TYPES, key=lambda t: (-(raw[t] - out[t]), NOISE_TYPES.index(t)))[:rest]:
        out[t] += 1
    return out


def assign(n: int, noise_rate: float, mix: dict[str, float], rng: np.random.Generator) -> list[str | None]:
    """The noise type of each of ``n`` rows (None: clean): exactly ``round(noise_rate * n)`` noisy rows, drawn
    by one permutation from ``rng``, split by ``mix`` with :func:`allocate`."""
    n_noisy = int(round(noise_rate * n))
    alloc = allocate(n_noisy, mix)
    noisy_rows = rng.permutation(n)[:n_noisy]
    kinds: list[str | None] = [None] * n
    pos = 0
    for t in NOISE_TYPES:
        for r in noisy_rows[pos : pos + alloc[t]]:
            kinds[int(r)] = t
        pos += alloc[t]
    return kinds


def apply_noise(kind: str, row: WebRow, rng: np.random.Generator) -> tuple[str, str | None]:
    """The noisy caption of ``row`` by the registered noise ``kind``, and its detail."""
    return NOISES[kind](row, rng)
