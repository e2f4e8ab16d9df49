"""Tiny downstream tasks drawn from the synthetic world, in the annotation formats of the real ones.

- VQA (BLIP's vqa JSON): questions about one image's objects, ``{"question_id", "image", "question", "answer":
  [..]}``, plus ``answer_list.json`` (every answer the world can give) for ranking.
- NLVR2 (BLIP's nlvr JSON): two images and a statement, ``{"images": [left, right], "sentence", "label":
  "True"|"False"}``, balanced.
- Video retrieval (BLIP's MSR-VTT test JSON): short animated GIF clips of one object moving across a fixed
  background, ``{"video", "caption": [..]}``; captions state the object and background, as an image caption would.

Each answer and label comes from the facts that drew the pixels, so a head's accuracy is measured against truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .images import render_clip, render_image
from .language import (
    BACKGROUNDS,
    COLOURS,
    NUMBER_WORDS,
    PLURALS,
    POSITIONS,
    SHAPES,
    SIZES,
    article,
    choice,
    random_object,
    render_caption,
    sample_facts,
    seeded_rng,
)

_TASK_CODE = {"vqa": 101, "nlvr": 102, "video": 103}
NUMBERS = NUMBER_WORDS


def _question(facts: dict, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) about an image's facts."""
    obj = facts["objects"][0]
    layout = facts["layout"]
    options = [("what is the background?", facts["background"])]
    if layout == "single":
        options += [
            (f"what colour is the {obj['shape']}?", obj["colour"]),
            (f"what shape is the {obj['colour']} object?", obj["shape"]),
            (f"is the {obj['colour']} {obj['shape']} small or large?", obj["size"]),
            (f"where is the {obj['shape']}?", facts["position"]),
        ]
    elif layout == "group":
        options += [
            (f"how many {PLURALS[obj['shape']]} are there?", NUMBERS[facts["count"]]),
            (f"what colour are the {PLURALS[obj['shape']]}?", obj["colour"]),
        ]
    else:
        a, b = facts["objects"]
        if a["shape"] != b["shape"]:
            options += [
                (f"what colour is the {a['shape']}?", a["colour"]),
                (f"what colour is the {b['shape']}?", b["colour"]),
            ]
        options.append(("how many objects are there?", "two"))
    return options[int(rng.integers(len(options)))]


def answer_list() -> list[str]:
    return sorted({*COLOURS, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS, *NUMBERS.values()})


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)


def write_vqa(out: Path, n_images: dict[str, int], seed: int, image_size: int) -> dict[str, str]:
    files = {}
    qid = 0
    for s, (split, n) in enumerate(n_images.items()):
        rows = []
        for i in range(n):
            rng = seeded_rng(seed, _TASK_CODE["vqa"], s, i)
            facts = sample_facts(rng)
            rel = f"images/vqa/{split}/{i:06d}.jpg"
            _save(render_image(facts, image_size, rng), out / rel)
            question, answer = _question(facts, rng)
            rows.append({"question_id": qid, "image": rel, "question": question, "answer": [answer]})
            qid += 1
        files[split] = str(out / f"vqa_{split}.json")
        Path(files[split]).write_text(json.dumps(rows, indent=1))
    files["answer_list"] = str(out / "answer_list.json")
    Path(files["answer_list"]).write_text(json.dumps(answer_list()))
    return files


def single_facts(rng: np.random.Generator) -> dict:
    """The facts of a random one-object image (the ``single`` layout of :func:`sample_facts`)."""
    return {
        "layout": "single",
        "background": choice(rng, BACKGROUNDS),
        "count": 1,
        "objects": [random_object(rng)],
        "position": choice(rng, POSITIONS),
        "relation": None,
    }


def _statement(left: dict, right: dict, rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about the colours of the pair, true half the time (the objects are recoloured to make it so)."""
    a, b = left["objects"][0], right["objects"][0]
    want = bool(rng.random() < 0.5)
    colour = choice(rng, list(COLOURS))
    other = lambda: choice(rng, [x for x in COLOURS if x != colour])  # noqa: E731
    if rng.random() < 0.5:  # "both": false when one side (or neither) has the colour
        a["colour"], b["colour"] = (
            (colour, colour)
            if want
            else [(colour, other()), (other(), colour), (other(), other())][int(rng.integers(3))]
        )
        return f"both images show {article(colour)} {colour} object", want
    # "at least one": false when neither side has the colour
    a["colour"], b["colour"] = (
        [(colour, other()), (other(), colour), (colour, colour)][int(rng.integers(3))] if want else (other(), other())
    )
    return f"at least one image shows {article(colour)} {colour} object", want


def write_nlvr(out: Path, n_pairs: dict[str, int], seed: int, image_size: int) -> dict[str, str]:
    files = {}
    for s, (split, n) in enumerate(n_pairs.items()):
        rows = []
        for i in range(n):
            rng = seeded_rng(seed, _TASK_CODE["nlvr"], s, i)
            left, right = single_facts(rng), single_facts(rng)
            for facts in (left, right):  # large objects: a small one is a few pixels of a tiny image
                facts["objects"][0]["size"] = "large"
            sentence, label = _statement(left, right, rng)
            rels = []
            for side, facts in (("l", left), ("r", right)):
                rel = f"images/nlvr/{split}/{i:06d}-{side}.jpg"
                _save(render_image(facts, image_size, rng), out / rel)
                rels.append(rel)
            rows.append({"images": rels, "sentence": sentence, "label": "True" if label else "False"})
        files[split] = str(out / f"nlvr_{split}.json")
        Path(files[split]).write_text(json.dumps(rows, indent=1))
    return files


def write_video(out: Path, n_clips: int, seed: int, image_size: int, frames: int = 12) -> dict[str, str]:
    rows = []
    for i in range(n_clips):
        rng = seeded_rng(seed, _TASK_CODE["video"], i)
        facts = single_facts(rng)
        clip = render_clip(facts, image_size, frames, rng)
        rel = f"videos/{i:06d}.gif"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        clip[0].save(out / rel, save_all=True, append_images=clip[1:], duration=80, loop=0)
        caption = render_caption({**facts, "position": None}, rng)
        rows.append({"video": rel, "caption": [caption]})
    path = out / "video_test.json"
    path.write_text(json.dumps(rows, indent=1))
    return {"test": str(path)}


def write_tasks(
    out_dir: str,
    *,
    seed: int = 0,
    image_size: int = 64,
    vqa_images: tuple[int, int] = (2000, 300),
    nlvr_pairs: tuple[int, int] = (2000, 300),
    video_clips: int = 100,
) -> dict[str, dict[str, str]]:
    """Write the three tasks under ``out_dir``; returns each task's annotation files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vqa": write_vqa(out, {"train": vqa_images[0], "test": vqa_images[1]}, seed, image_size),
        "nlvr": write_nlvr(out, {"train": nlvr_pairs[0], "test": nlvr_pairs[1]}, seed, image_size),
        "video": write_video(out, video_clips, seed, image_size),
    }
    (out / "tasks.json").write_text(json.dumps(files, indent=1))
    return files
