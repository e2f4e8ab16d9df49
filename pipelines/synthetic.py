"""The synthetic world (``capfilt synth``): small images of simple objects with known ground truth.

No real web data can be downloaded in development or CI, so CapFilt is measured on a world whose facts we
know. Each image shows 1-3 objects (shape, colour, size) on a background, in one of three layouts:

- ``single``: one object at a position (left, right, top, bottom, center);
- ``pair``: two different objects, one ``left_of`` or ``above`` the other;
- ``group``: two or three identical objects (a count).

Captions are compositional, lower case, with several phrasings per fact (synonyms, word orders, which object
of a pair comes first), so a model has to look at the image to write or match them; the vocabulary is small
and regular so that :func:`parse_caption` reads any caption back into facts and
:func:`caption_attribute_accuracy` scores it, which is how the evaluation measures captioners and filters.

What ``<root>/world/`` holds (:func:`world_files` names the paths):

- ``images/{web,human,test}/NNNNNN.jpg``: the images (JPEG).
- ``web.parquet`` (``url``, ``caption``): the "web" corpus the pipeline ingests. Captions are noisy at
  ``world.noise_rate`` with ``world.noise_mix`` of types: ``unrelated`` (ads, "my favourite photo",
  file names), ``wrong_attribute`` (one fact changed), ``other_caption`` (another image's caption),
  ``partial`` (true but incomplete). URLs are ``{base}/web/NNNNNN.jpg``: ``{base}`` is a placeholder for
  the root URL of ``images/``, which only exists while :func:`serve_world` runs; ``capfilt ingest``
  starts the server and rewrites the placeholder to its live address. A placeholder (rather than a fixed
  host and port) keeps the world a plain directory that can be copied, moved to S3 and served again.
- ``human_train.json``, ``human_test.json``: the clean human-annotated training set and the held-out test
  set, in COCO-Karpathy JSON as BLIP reads it (train: one entry per caption,
  ``{"image", "caption": str, "image_id"}``; test: one entry per image, ``{"image", "caption": [..],
  "image_id"}``), image paths relative to ``images/``.
- ``truth/web.parquet`` (one row per web row: ``row``, ``image_id``, ``path``, ``facts`` as JSON,
  ``clean_caption``, ``caption``, ``noisy``, ``noise_type``, ``noise_detail``) and ``truth/images.parquet``
  (every image of every split with its facts). No pipeline stage reads ``truth/``; only evaluation does.
  Join ingested rows to the truth by the URL's path below ``images/`` (``web/NNNNNN.jpg`` == ``path``).
- ``manifest.json``: counts, settings and the measured noise mix; then ``_COMMITTED``.

Determinism: every image and its captions come from a generator seeded by ``(seed, split, index)``, so the
first N images of a world do not depend on how many are generated; the noise assignment is seeded by
``seed`` alone and is exact (``round(noise_rate * n_web)`` noisy rows, split by the mix with largest
remainders).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import logging
import math
import mimetypes
import posixpath
import threading
import time
import urllib.parse
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from . import storage
from .config import NOISE_TYPES, RunConfig, WorldConfig
from .errors import StageError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
URL_PLACEHOLDER = "{base}"

# ----------------------------------------------------------------------------------------------------------
# Vocabulary. Object colours and background words are disjoint, so "a red circle on a black background"
# parses without ambiguity.
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 25),
}
SIZES = ("small", "large")
BACKGROUNDS = ("white", "gray", "black", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left_of", "above")  # canonical: objects[0] is left of / above objects[1]
LAYOUTS = ("single", "pair", "group")

SIZE_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"web": 300, "human": 60, "test": 40},
    "demo": {"web": 3000, "human": 400, "test": 200},
    "full": {"web": 30000, "human": 3000, "test": 1000},
}
SPLITS = ("web", "human", "test")
_SPLIT_CODE = {"web": 1, "human": 2, "test": 3}

# Phrasings. Synonyms map back to one canonical word in the parser.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BG_WORDS = {"white": ("white",), "gray": ("gray", "grey"), "black": ("black",), "striped": ("striped",),
             "dotted": ("dotted",)}
_POS_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "in the centre"),
}
_NUMBER_WORDS = {2: "two", 3: "three"}
_BG_TRAILING = ("on a {bg} background", "against a {bg} background", "with a {bg} background")

_UNRELATED = (
    "IMG_{n4}.JPG", "DSC{n5}.jpg", "my favourite photo", "my favourite photo of the year", "untitled",
    "buy now and save {n2} percent", "free shipping on orders over {n2} dollars", "click here to subscribe",
    "best deals this week only", "photo by user{n3}", "screenshot 20{n2}", "happy birthday grandma",
    "view from my window", "copyright 20{n2} all rights reserved", "wallpaper hd download", "lol",
    "image{n3}.jpeg", "limited offer visit our shop", "this made my day", "throwback to last summer",
)


# ----------------------------------------------------------------------------------------------------------
# Facts


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _random_object(rng: np.random.Generator) -> dict:
    return {"shape": _choice(rng, SHAPES), "colour": _choice(rng, list(COLOURS)), "size": _choice(rng, SIZES)}


def sample_facts(rng: np.random.Generator) -> dict:
    """One image's facts: ``layout``, ``background``, ``count``, ``objects``, ``position``, ``relation``.

    ``objects`` lists distinct object types: one for ``single`` and ``group`` (repeated ``count`` times in the
    image), two for ``pair`` (in canonical order: the first is left of / above the second).
    """
    layout = _choice(rng, LAYOUTS)
    facts: dict[str, Any] = {"layout": layout, "background": _choice(rng, BACKGROUNDS), "position": None,
                             "relation": None}
    if layout == "single":
        facts.update(count=1, objects=[_random_object(rng)], position=_choice(rng, POSITIONS))
    elif layout == "pair":
        a = _random_object(rng)
        b = _random_object(rng)
        while b == a:
            b = _random_object(rng)
        facts.update(count=2, objects=[a, b], relation=_choice(rng, RELATIONS))
    else:
        facts.update(count=int(rng.integers(2, 4)), objects=[_random_object(rng)])
    return facts


# ----------------------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: dict, rng: np.random.Generator, count: int = 1) -> str:
    """``a small red circle`` / ``three big blue stars``; attributes missing from ``obj`` are left out."""
    words = []
    if "size" in obj:
        words.append(_choice(rng, _SIZE_WORDS[obj["size"]]))
    if "colour" in obj:
        words.append(obj["colour"])
    words.append(obj["shape"] if count == 1 else PLURALS[obj["shape"]])
    if count == 1:
        return " ".join([_choice(rng, ("a", "one")) if rng.random() < 0.15 else _article(words[0])] + words)
    return " ".join([_NUMBER_WORDS[count]] + words)


def _relation_phrase(facts: dict, rng: np.random.Generator) -> str:
    a, b = facts["objects"]
    if rng.random() < 0.5:  # first object first
        word = {"left_of": ("to the left of", "left of"), "above": ("above",)}[facts["relation"]]
        return f"{_object_phrase(a, rng)} {_choice(rng, word)} {_object_phrase(b, rng)}"
    word = {"left_of": ("to the right of", "right of"), "above": ("below", "under")}[facts["relation"]]
    return f"{_object_phrase(b, rng)} {_choice(rng, word)} {_object_phrase(a, rng)}"


def render_caption(facts: dict, rng: np.random.Generator) -> str:
    """A caption stating every fact present in ``facts`` (keys set to None or absent are not mentioned).

    ``partial`` captions come from the same function with some facts removed, so they stay true.
    """
    bg = facts.get("background")
    bg_word = _choice(rng, _BG_WORDS[bg]) if bg else None
    layout = facts["layout"]
    if layout == "single":
        body = _object_phrase(facts["objects"][0], rng)
        pos = facts.get("position")
        pos_phrase = _choice(rng, _POS_PHRASES[pos]) if pos else None
        forms = [f"{body} {pos_phrase}" if pos_phrase else body]
        if pos_phrase:
            forms.append(f"{pos_phrase} there is {body}")
    elif layout == "pair":
        if facts.get("relation"):
            body = _relation_phrase(facts, rng)
        else:
            a, b = facts["objects"]
            body = f"{_object_phrase(a, rng)} and {_object_phrase(b, rng)}"
        forms = [body, f"there is {body}"]
    else:
        body = _object_phrase(facts["objects"][0], rng, count=facts["count"])
        forms = [body, f"there are {body}"]
    text = _choice(rng, forms)
    if bg_word:
        if rng.random() < 0.25:
            text = f"a {bg_word} background with {body}" + (
                f" {pos_phrase}" if layout == "single" and pos_phrase else "")
        else:
            text = f"{text} {_choice(rng, _BG_TRAILING).format(bg=bg_word)}"
    if rng.random() < 0.1 and text.startswith(body):
        text = f"a picture of {text}"
    return text


def distinct_captions(facts: dict, rng: np.random.Generator, k: int) -> list[str]:
    """Up to ``k`` different phrasings of the same facts (fewer only if the facts allow fewer)."""
    out: list[str] = []
    for _ in range(20 * k):
        c = render_caption(facts, rng)
        if c not in out:
            out.append(c)
            if len(out) == k:
                break
    return out


# ----------------------------------------------------------------------------------------------------------
# Parsing captions back into facts


_NUM = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_SIZE_PARSE = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_BG_PARSE = {w: b for b, ws in _BG_WORDS.items() for w in ws}
_SHAPE_PARSE = {**{s: (s, False) for s in SHAPES}, **{p: (s, True) for s, p in PLURALS.items()}}
_POS_PARSE = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center",
              "centre": "center", "middle": "center"}


def parse_caption(text: str) -> dict:
    """Read a caption back into facts, with the keys of :func:`sample_facts` for what the text states.

    Keys are present only for facts the caption mentions: ``background``, ``objects`` (each with the
    attributes mentioned), ``count`` (when objects are mentioned and every count is explicit or implied by
    an article), ``position``, ``relation`` (pairs, canonicalised like the facts: "b right of a" becomes
    objects ``[a, b]`` with ``left_of``), and ``layout``. Unknown words are ignored, so BLIP's prompt
    ("a picture of ") and pre-processing (lower case, no punctuation) do not change the result.
    """
    words = [w for w in "".join(c if c.isalpha() else " " for c in str(text).lower()).split()]
    used = [False] * len(words)
    facts: dict[str, Any] = {}
    for i, w in enumerate(words):
        if w == "background" and i > 0 and words[i - 1] in _BG_PARSE and "background" not in facts:
            facts["background"] = _BG_PARSE[words[i - 1]]
            used[i - 1] = used[i] = True

    objects: list[dict] = []  # {"attrs": {...}, "count": int|None, "start": i, "end": i}
    pending: dict[str, Any] = {}
    start = None
    for i, w in enumerate(words):
        if used[i]:
            pending, start = {}, None
            continue
        if w in _NUM:
            pending, start = {"count": _NUM[w]}, i
        elif w in _SIZE_PARSE or w in COLOURS:
            key = "size" if w in _SIZE_PARSE else "colour"
            pending[key] = _SIZE_PARSE.get(w, w)
            start = i if start is None else start
        elif w in _SHAPE_PARSE:
            shape, plural = _SHAPE_PARSE[w]
            count = pending.pop("count", None)  # None: no number or article ("circles", "the circle")
            if count is not None and (count > 1) != plural:
                count = None  # "a circles", "two circle": the number does not agree, so it is not stated
            attrs = {"shape": shape, **{k: v for k, v in pending.items() if k in ("colour", "size")}}
            objects.append({"attrs": attrs, "count": count, "start": i if start is None else start, "end": i})
            used[i] = True
            pending, start = {}, None
        else:
            pending, start = {}, None

    relation = None
    if len(objects) == 2:
        gap = words[objects[0]["end"] + 1:objects[1]["start"]]
        for j, w in enumerate(gap):
            nxt = gap[j + 1] if j + 1 < len(gap) else None
            if w == "left" and nxt == "of":
                relation = ("left_of", False)
            elif w == "right" and nxt == "of":
                relation = ("left_of", True)
            elif w == "top" and nxt == "of" or w == "above":
                relation = ("above", False)
            elif w in ("below", "under", "beneath"):
                relation = ("above", True)
            if relation:
                for k in range(objects[0]["end"] + 1, objects[1]["start"]):
                    used[k] = True
                break
    if relation:
        facts["relation"] = relation[0]
        if relation[1]:
            objects.reverse()

    for i, w in enumerate(words):
        if not used[i] and w in _POS_PARSE and not (i + 1 < len(words) and words[i + 1] == "of"):
            facts["position"] = _POS_PARSE[w]
            break

    if objects:
        facts["objects"] = [o["attrs"] for o in objects]
        counts = [o["count"] for o in objects]
        if all(c is not None for c in counts):
            facts["count"] = sum(counts)
        if len(objects) == 2:
            facts["layout"] = "pair"
        elif len(objects) == 1 and counts[0] is not None:
            facts["layout"] = "single" if counts[0] == 1 else "group"
    return facts


def _object_agreement(parsed: dict, true: dict) -> int:
    return sum(parsed.get(k) == true[k] for k in ("shape", "colour", "size") if k in parsed)


def caption_attribute_accuracy(facts_true: dict, text: str) -> dict:
    """Score a caption against an image's facts, attribute by attribute.

    Attributes: ``background``, ``count``, each object's ``shape``/``colour``/``size``, and ``position``
    (single) or ``relation`` (pair). A caption that mentions an attribute the image does not have (a
    position for a pair, a third object) counts it as mentioned and wrong. Parsed objects are aligned to the
    true ones by best agreement (identity on ties); a pair's relation is right only if its type matches and
    the alignment keeps the order.

    Returns ``correct``, ``mentioned``, ``total`` (attributes of the truth), ``precision``
    (correct / mentioned, 0.0 when nothing is mentioned), ``recall`` (correct / total), ``exact`` (every
    true attribute stated and nothing wrong) and ``errors`` (names of the wrong attributes).
    """
    parsed = parse_caption(text)
    true_objs = facts_true["objects"]
    results: dict[str, bool] = {}

    if "background" in parsed:
        results["background"] = parsed["background"] == facts_true["background"]
    if "count" in parsed:
        results["count"] = parsed["count"] == facts_true["count"]

    p_objs = parsed.get("objects", [])
    order = list(range(len(p_objs)))
    if len(p_objs) == 2 and len(true_objs) == 2:
        keep = _object_agreement(p_objs[0], true_objs[0]) + _object_agreement(p_objs[1], true_objs[1])
        swap = _object_agreement(p_objs[0], true_objs[1]) + _object_agreement(p_objs[1], true_objs[0])
        if swap > keep:
            order = [1, 0]
    for pi, ti in enumerate(order):
        for k, v in p_objs[pi].items():
            name = f"objects[{ti}].{k}"
            results[name] = ti < len(true_objs) and v == true_objs[ti][k]

    if "position" in parsed:
        results["position"] = parsed["position"] == facts_true.get("position")
    if "relation" in parsed:
        results["relation"] = parsed["relation"] == facts_true.get("relation") and order == [0, 1]

    total = 2 + 3 * len(true_objs) + (facts_true.get("position") is not None) + (
        facts_true.get("relation") is not None)
    correct = sum(results.values())
    mentioned = len(results)
    return {
        "correct": correct,
        "mentioned": mentioned,
        "total": total,
        "precision": correct / mentioned if mentioned else 0.0,
        "recall": correct / total,
        "exact": correct == total and mentioned == total,
        "errors": sorted(k for k, ok in results.items() if not ok),
    }


# ----------------------------------------------------------------------------------------------------------
# Images

_SUPERSAMPLE = 4


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
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
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
    radius = {"small": 0.11, "large": 0.19}
    j = lambda s: float(rng.uniform(-s, s))  # noqa: E731
    objs = facts["objects"]
    if facts["layout"] == "single":
        cx, cy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                  "center": (0.5, 0.5)}[facts["position"]]
        return [(objs[0], cx + j(0.04), cy + j(0.04), radius[objs[0]["size"]])]
    if facts["layout"] == "pair":
        along = (0.25 + j(0.04), 0.75 + j(0.04))
        across = (0.5 + j(0.15), 0.5 + j(0.15))
        if facts["relation"] == "left_of":
            return [(o, along[k], across[k], radius[o["size"]]) for k, o in enumerate(objs)]
        return [(o, across[k], along[k], radius[o["size"]]) for k, o in enumerate(objs)]
    o = objs[0]
    grid = (0.25, 0.75) if o["size"] == "large" else (1 / 6, 0.5, 5 / 6)
    cells = [(x, y) for y in grid for x in grid]
    picked = rng.choice(len(cells), size=facts["count"], replace=False)
    return [(o, cells[c][0] + j(0.03), cells[c][1] + j(0.03), radius[o["size"]]) for c in sorted(picked)]


def render_image(facts: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the facts at ``size`` px (drawn 4x larger and downsampled, for smooth edges)."""
    n = size * _SUPERSAMPLE
    img = Image.new("RGB", (n, n))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, facts["background"], n, rng)
    for obj, cx, cy, r in _placements(facts, rng):
        draw_object(draw, obj, cx * n, cy * n, r * n)
    return img.resize((size, size), Image.LANCZOS)


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


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Noise


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``n`` by ``weights`` exactly, largest remainders first (ties in NOISE_TYPES order)."""
    total = sum(weights.values())
    raw = {t: n * weights.get(t, 0.0) / total for t in NOISE_TYPES}
    out = {t: int(math.floor(v)) for t, v in raw.items()}
    rest = n - sum(out.values())
    for t in sorted(NOISE_TYPES, key=lambda t: (-(raw[t] - out[t]), NOISE_TYPES.index(t)))[:rest]:
        out[t] += 1
    return out


def _unrelated_text(rng: np.random.Generator) -> str:
    t = _choice(rng, _UNRELATED)
    return t.format(n2=int(rng.integers(10, 100)), n3=int(rng.integers(100, 1000)),
                    n4=int(rng.integers(1000, 10000)), n5=int(rng.integers(10000, 100000)))


def _wrong_attribute(facts: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """A copy of ``facts`` with exactly one fact changed, and what changed."""
    options = ["background"] + [f"{i}.{k}" for i in range(len(facts["objects"]))
                                for k in ("shape", "colour", "size")]
    options += {"single": ["position"], "pair": ["relation"], "group": ["count"]}[facts["layout"]]
    while True:
        f = json.loads(json.dumps(facts))
        what = _choice(rng, options)
        if what == "background":
            old, f["background"] = f["background"], _choice(rng, [b for b in BACKGROUNDS if b != f["background"]])
            new = f["background"]
        elif what == "position":
            old, f["position"] = f["position"], _choice(rng, [p for p in POSITIONS if p != f["position"]])
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
            obj[k] = _choice(rng, [v for v in vocab if v != old])
            new = obj[k]
            if f["layout"] == "pair" and f["objects"][0] == f["objects"][1]:
                continue  # would describe two identical objects: ambiguous, draw again
        return f, f"{what}:{old}->{new}"


def _partial(facts: dict, rng: np.random.Generator) -> tuple[dict, str]:
    """A copy of ``facts`` with some facts dropped (never the shapes or the count): true but incomplete."""
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
    return f, "dropped:" + ",".join(names)


# ----------------------------------------------------------------------------------------------------------
# The world on storage


WORLD_LAYOUT: dict[str, str] = {
    "images": "images",
    "web": "web.parquet",
    "human_train": "human_train.json",
    "human_test": "human_test.json",
    "truth_web": "truth/web.parquet",
    "truth_images": "truth/images.parquet",
    "manifest": "manifest.json",
}


def world_files(world_url: str) -> dict[str, str]:
    """Every path of a world by name, as URLs (``human.*: null`` in a config resolves to ``human_*``)."""
    return {name: storage.join(world_url, *rel.split("/")) for name, rel in WORLD_LAYOUT.items()}


def resolve_counts(world: WorldConfig) -> dict[str, int]:
    d = SIZE_DEFAULTS[world.size]
    return {"web": world.n_web or d["web"], "human": world.n_human or d["human"], "test": world.n_test or d["test"]}


def _settings(world: WorldConfig, seed: int) -> dict:
    mix_total = sum(world.noise_mix.values())
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": world.size,
        "counts": resolve_counts(world),
        "image_size": world.image_size,
        "captions_per_human_image": world.captions_per_human_image,
        "noise_rate": world.noise_rate,
        "noise_mix": {t: world.noise_mix.get(t, 0.0) / mix_total for t in NOISE_TYPES},
    }


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


def _write_images(fs, base: str, split: str, n: int, seed: int, image_size: int) -> list[dict]:
    """Draw and store a split's images in batches (one concurrent put per batch on object stores)."""
    all_facts = []
    batch: dict[str, bytes] = {}
    for i in range(n):
        rng = _rng(seed, _SPLIT_CODE[split], i)
        facts = sample_facts(rng)
        all_facts.append(facts)
        batch[posixpath.join(base, "images", split, f"{i:06d}.jpg")] = _jpeg(render_image(facts, image_size, rng))
        if len(batch) >= 256:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return all_facts


def _image_rng(seed: int, split: str, i: int) -> np.random.Generator:
    """The generator for an image's captions: apart from the one that drew it, so captions can change
    without moving a pixel."""
    return _rng(seed, 10 + _SPLIT_CODE[split], i)


def generate_world(world: WorldConfig, seed: int, world_url: str) -> dict:
    """Write a whole world under ``world_url`` (no commit); returns the manifest."""
    t0 = time.time()
    counts = resolve_counts(world)
    fs, base = storage.filesystem(world_url)
    fs.makedirs(base, exist_ok=True)
    files = world_files(world_url)
    for split in SPLITS:
        fs.makedirs(posixpath.join(base, "images", split), exist_ok=True)

    facts = {split: _write_images(fs, base, split, counts[split], seed, world.image_size) for split in SPLITS}

    # --- the web corpus and its truth
    n = counts["web"]
    clean = [render_caption(facts["web"][i], _image_rng(seed, "web", i)) for i in range(n)]
    noise_rng = _rng(seed, 99)
    n_noisy = int(round(world.noise_rate * n))
    alloc = _allocate(n_noisy, world.noise_mix)
    noisy_rows = noise_rng.permutation(n)[:n_noisy]
    kinds: list[str | None] = [None] * n
    pos = 0
    for t in NOISE_TYPES:
        for r in noisy_rows[pos:pos + alloc[t]]:
            kinds[int(r)] = t
        pos += alloc[t]
    captions, details = [], []
    for i in range(n):
        kind = kinds[i]
        rng = _rng(seed, 100, i)
        detail = None
        if kind is None:
            cap = clean[i]
        elif kind == "unrelated":
            cap = _unrelated_text(rng)
        elif kind == "wrong_attribute":
            f, detail = _wrong_attribute(facts["web"][i], rng)
            cap = render_caption(f, rng)
        elif kind == "partial":
            f, detail = _partial(facts["web"][i], rng)
            cap = render_caption(f, rng)
        else:  # other_caption: a different image's clean caption, from an image with different facts
            j = i
            for _ in range(50):
                j = int(rng.integers(n))
                if j != i and facts["web"][j] != facts["web"][i]:
                    break
            if j == i:  # a world of one image, or of identical images: nothing else to borrow
                j = (i + 1) % n
            cap, detail = clean[j], f"from_row:{j}"
        captions.append(cap)
        details.append(detail)

    paths = [f"web/{i:06d}.jpg" for i in range(n)]
    _write_parquet(fs, posixpath.join(base, "web.parquet"), pa.table({
        "url": pa.array([f"{URL_PLACEHOLDER}/{p}" for p in paths], pa.string()),
        "caption": pa.array(captions, pa.string()),
    }))
    fs.makedirs(posixpath.join(base, "truth"), exist_ok=True)
    _write_parquet(fs, posixpath.join(base, "truth", "web.parquet"), pa.table({
        "row": pa.array(range(n), pa.int64()),
        "image_id": pa.array([f"web_{i:06d}" for i in range(n)], pa.string()),
        "path": pa.array(paths, pa.string()),
        "facts": pa.array([json.dumps(f, sort_keys=True) for f in facts["web"]], pa.string()),
        "clean_caption": pa.array(clean, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "noisy": pa.array([k is not None for k in kinds], pa.bool_()),
        "noise_type": pa.array(kinds, pa.string()),
        "noise_detail": pa.array(details, pa.string()),
    }))
    _write_parquet(fs, posixpath.join(base, "truth", "images.parquet"), pa.table({
        "split": pa.array([s for s in SPLITS for _ in facts[s]], pa.string()),
        "image_id": pa.array([f"{s}_{i:06d}" for s in SPLITS for i in range(len(facts[s]))], pa.string()),
        "path": pa.array([f"{s}/{i:06d}.jpg" for s in SPLITS for i in range(len(facts[s]))], pa.string()),
        "facts": pa.array([json.dumps(f, sort_keys=True) for s in SPLITS for f in facts[s]], pa.string()),
    }))

    # --- the human set (BLIP's coco_karpathy_train layout) and the test set (coco_karpathy_test layout)
    k = world.captions_per_human_image
    train = []
    for i, f in enumerate(facts["human"]):
        for cap in distinct_captions(f, _image_rng(seed, "human", i), k):
            train.append({"image": f"human/{i:06d}.jpg", "caption": cap, "image_id": f"human_{i:06d}"})
    test = [{"image": f"test/{i:06d}.jpg", "caption": distinct_captions(f, _image_rng(seed, "test", i), k),
             "image_id": f"test_{i:06d}"} for i, f in enumerate(facts["test"])]
    for name, ann in (("human_train", train), ("human_test", test)):
        with fs.open(posixpath.join(base, WORLD_LAYOUT[name]), "w") as fh:
            json.dump(ann, fh, indent=1)

    measured = Counter(k for k in kinds if k is not None)
    manifest = {
        **_settings(world, seed),
        "settings_hash": _settings_hash(world, seed),
        "n_images": {s: len(facts[s]) for s in SPLITS},
        "n_human_captions": len(train),
        "n_test_captions": sum(len(e["caption"]) for e in test),
        "noisy": n_noisy,
        "noise_counts": {t: measured.get(t, 0) for t in NOISE_TYPES},
        "layouts": dict(Counter(f["layout"] for f in facts["web"])),
        "url_placeholder": URL_PLACEHOLDER,
        "files": dict(WORLD_LAYOUT),
        "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
                       "backgrounds": list(BACKGROUNDS), "positions": list(POSITIONS),
                       "relations": list(RELATIONS)},
        "seconds": round(time.time() - t0, 3),
    }
    storage.write_json(files["manifest"], manifest)
    return manifest


def _settings_hash(world: WorldConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps(_settings(world, seed), sort_keys=True).encode()).hexdigest()[:16]


class WorldExistsError(StageError):
    """A committed world with different settings is in the way."""


def run_synth(cfg: RunConfig, root: str) -> dict:
    """``capfilt synth``: generate and commit ``<root>/world/``; a rerun with the same settings is a no-op."""
    if cfg.world is None:
        raise StageError("the config has no synthetic world (world: null); nothing to generate")
    world_url = storage.RunRoot(root).world()
    wanted = _settings_hash(cfg.world, cfg.seed)
    if storage.is_committed(world_url):
        manifest = storage.read_json(world_files(world_url)["manifest"])
        if manifest.get("settings_hash") != wanted:
            raise WorldExistsError(
                f"{world_url} already holds a committed world with other settings "
                f"({manifest.get('settings_hash')} != {wanted}); use another --root")
        log.info("world already committed at %s; nothing to do", world_url)
        return manifest
    manifest = generate_world(cfg.world, cfg.seed, world_url)
    storage.commit(world_url, {"settings_hash": wanted, "n_images": manifest["n_images"]})
    total = sum(manifest["n_images"].values())
    log.info("world written to %s: %s images in %.1fs (%.0f images/s), %d noisy web captions of %d",
             world_url, total, manifest["seconds"], total / max(manifest["seconds"], 1e-9), manifest["noisy"],
             manifest["n_images"]["web"])
    return manifest


# ----------------------------------------------------------------------------------------------------------
# Serving


class _Handler(http.server.BaseHTTPRequestHandler):
    fs: Any = None
    root: str = ""
    server_version = "capfilt-world"

    def _resolve(self) -> str | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") or "\\" in p for p in parts):
            return None
        return posixpath.join(self.root, *parts)

    def _serve(self, body: bool) -> None:
        target = self._resolve()
        try:
            if target is None:
                raise FileNotFoundError(self.path)
            data = self.fs.cat_file(target)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self.send_error(404, "File not found")
            return
        except Exception as err:  # noqa: BLE001 - the storage failed: tell the client, keep serving
            log.warning("serving %s failed: %s", self.path, err)
            self.send_error(500, "Storage error")
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(target)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s " + format, self.address_string(), *args)


@contextlib.contextmanager
def serve_directory(url: str) -> Iterator[str]:
    """Serve the files under ``url`` (any fsspec URL) over HTTP on 127.0.0.1, on a free port.

    Yields the base URL (``http://127.0.0.1:PORT``); a file ``url/a/b.jpg`` is at ``BASE/a/b.jpg``. Files are
    read through fsspec on each request, so an ``s3://`` directory serves the same way as a local one.
    Only GET and HEAD; paths that leave the directory are 404s.
    """
    fs, root = storage.filesystem(url)
    handler = type("WorldHandler", (_Handler,), {"fs": fs, "root": root.rstrip("/")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="capfilt-http", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("serving %s at %s", url, base)
    try:
        yield base
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def serve_world(world_url: str) -> Iterator[str]:
    """Serve a world's ``images/`` (never ``truth/``) on 127.0.0.1; yields what replaces ``{base}``."""
    with serve_directory(world_files(world_url)["images"]) as base:
        yield base


def resolve_urls(urls: list[str], base: str) -> list[str]:
    """Replace the ``{base}`` placeholder at the start of each URL by the live server's address."""
    n = len(URL_PLACEHOLDER)
    return [base + u[n:] if u.startswith(URL_PLACEHOLDER) else u for u in urls]
