"""The world's language: its vocabulary, the facts of an image, captions that state them, and the parser that
reads a caption back into facts (:func:`parse_caption`) so :func:`caption_attribute_accuracy` can score it.

Captions are compositional, lower case, with several phrasings per fact (synonyms, word orders, which object of a
pair comes first); the vocabulary is small and regular so that every phrasing parses back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
NUMBER_WORDS = {2: "two", 3: "three"}

# Phrasings. Synonyms map back to one canonical word in the parser.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BG_WORDS = {
    "white": ("white",),
    "gray": ("gray", "grey"),
    "black": ("black",),
    "striped": ("striped",),
    "dotted": ("dotted",),
}
_POS_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "in the centre"),
}
_BG_TRAILING = ("on a {bg} background", "against a {bg} background", "with a {bg} background")


# ----------------------------------------------------------------------------------------------------------
# Facts


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of one item of the world, seeded by ``(seed, *key)``: items never share draws."""
    return np.random.default_rng([seed, *key])


def choice(rng: np.random.Generator, seq):
    """One element of ``seq``, drawn with one ``integers`` call (the world's only way of picking)."""
    return seq[int(rng.integers(len(seq)))]


def random_object(rng: np.random.Generator) -> dict:
    """A random object type: ``shape``, ``colour``, ``size``."""
    return {"shape": choice(rng, SHAPES), "colour": choice(rng, list(COLOURS)), "size": choice(rng, SIZES)}


def sample_facts(rng: np.random.Generator) -> dict:
    """One image's facts: ``layout``, ``background``, ``count``, ``objects``, ``position``, ``relation``.

    ``objects`` lists distinct object types: one for ``single`` and ``group`` (repeated ``count`` times in the
    image), two for ``pair`` (in canonical order: the first is left of / above the second).
    """
    layout = choice(rng, LAYOUTS)
    facts: dict[str, Any] = {
        "layout": layout,
        "background": choice(rng, BACKGROUNDS),
        "position": None,
        "relation": None,
    }
    if layout == "single":
        facts.update(count=1, objects=[random_object(rng)], position=choice(rng, POSITIONS))
    elif layout == "pair":
        a = random_object(rng)
        b = random_object(rng)
        while b == a:
            b = random_object(rng)
        facts.update(count=2, objects=[a, b], relation=choice(rng, RELATIONS))
    else:
        facts.update(count=int(rng.integers(2, 4)), objects=[random_object(rng)])
    return facts


# ----------------------------------------------------------------------------------------------------------
# Captions


def article(word: str) -> str:
    """The indefinite article of ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: dict, rng: np.random.Generator, count: int = 1) -> str:
    """``a small red circle`` / ``three big blue stars``; attributes missing from ``obj`` are left out."""
    words = []
    if "size" in obj:
        words.append(choice(rng, _SIZE_WORDS[obj["size"]]))
    if "colour" in obj:
        words.append(obj["colour"])
    words.append(obj["shape"] if count == 1 else PLURALS[obj["shape"]])
    if count == 1:
        return " ".join([choice(rng, ("a", "one")) if rng.random() < 0.15 else article(words[0])] + words)
    return " ".join([NUMBER_WORDS[count]] + words)


def _relation_phrase(facts: dict, rng: np.random.Generator) -> str:
    a, b = facts["objects"]
    if rng.random() < 0.5:  # first object first
        word = {"left_of": ("to the left of", "left of"), "above": ("above",)}[facts["relation"]]
        return f"{_object_phrase(a, rng)} {choice(rng, word)} {_object_phrase(b, rng)}"
    word = {"left_of": ("to the right of", "right of"), "above": ("below", "under")}[facts["relation"]]
    return f"{_object_phrase(b, rng)} {choice(rng, word)} {_object_phrase(a, rng)}"


def render_caption(facts: dict, rng: np.random.Generator) -> str:
    """A caption stating every fact present in ``facts`` (keys set to None or absent are not mentioned).

    ``partial`` captions come from the same function with some facts removed, so they stay true.
    """
    bg = facts.get("background")
    bg_word = choice(rng, _BG_WORDS[bg]) if bg else None
    layout = facts["layout"]
    if layout == "single":
        body = _object_phrase(facts["objects"][0], rng)
        pos = facts.get("position")
        pos_phrase = choice(rng, _POS_PHRASES[pos]) if pos else None
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
    text = choice(rng, forms)
    if bg_word:
        if rng.random() < 0.25:
            text = f"a {bg_word} background with {body}" + (
                f" {pos_phrase}" if layout == "single" and pos_phrase else ""
            )
        else:
            text = f"{text} {choice(rng, _BG_TRAILING).format(bg=bg_word)}"
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
_POS_PARSE = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "center": "center",
    "centre": "center",
    "middle": "center",
}


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
        gap = words[objects[0]["end"] + 1 : objects[1]["start"]]
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


# ----------------------------------------------------------------------------------------------------------
# Attribute accuracy


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

    total = 2 + 3 * len(true_objs) + (facts_true.get("position") is not None)
    total += facts_true.get("relation") is not None
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
