"""``capfilt synth``: draw a whole world and write it under ``<root>/world/`` (the files of
:mod:`pipelines.world`'s docstring), then commit it.

Every image and its captions come from generators seeded by ``(seed, split, index)``; the noise assignment from
``seed`` alone (:func:`pipelines.world.noise.assign`); so a seed and the settings give the same bytes every time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..config import RunConfig, WorldConfig
from ..errors import StageError
from .copies import plan, transform
from .images import jpeg, render_image
from .language import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    distinct_captions,
    render_caption,
    sample_facts,
    seeded_rng,
)
from .layout import COPIES_FILE, URL_PLACEHOLDER, WORLD_LAYOUT, copies_url, world_files
from .noise import NOISE_TYPES, WebRow, apply_noise, assign

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1

SIZE_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": {"web": 300, "human": 60, "test": 40},
    "demo": {"web": 3000, "human": 400, "test": 200},
    "full": {"web": 30000, "human": 3000, "test": 1000},
}
SPLITS = ("web", "human", "test")
_SPLIT_CODE = {"web": 1, "human": 2, "test": 3}
_IMAGE_BATCH = 256  # images per put (one concurrent put per batch on object stores)


def resolve_counts(world: WorldConfig) -> dict[str, int]:
    """Images per split: the counts the config sets, else its size's defaults."""
    d = SIZE_DEFAULTS[world.size]
    return {"web": world.n_web or d["web"], "human": world.n_human or d["human"], "test": world.n_test or d["test"]}


def _settings(world: WorldConfig, seed: int) -> dict:
    mix_total = sum(world.noise_mix.values())
    copies = (
        {"duplicate_rate": world.duplicate_rate, "leak_rate": world.leak_rate}
        if world.duplicate_rate or world.leak_rate
        else {}  # a world without copies keeps the settings (and hash) it had before they existed
    )
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "size": world.size,
        "counts": resolve_counts(world),
        "image_size": world.image_size,
        "captions_per_human_image": world.captions_per_human_image,
        "noise_rate": world.noise_rate,
        "noise_mix": {t: world.noise_mix.get(t, 0.0) / mix_total for t in NOISE_TYPES},
        **copies,
    }


def _settings_hash(world: WorldConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps(_settings(world, seed), sort_keys=True).encode()).hexdigest()[:16]


def _image_rng(seed: int, split: str, i: int) -> np.random.Generator:
    """The generator for an image's captions: apart from the one that drew it, so captions can change
    without moving a pixel."""
    return seeded_rng(seed, 10 + _SPLIT_CODE[split], i)


def _write_images(world_url: str, split: str, n: int, seed: int, image_size: int) -> list[dict]:
    """Draw and store a split's images in batches; returns their facts."""
    # storage has no batch put, so the filesystem's pipe(): one concurrent put per batch on object stores.
    fs, base = storage.filesystem(world_url)
    directory = posixpath.join(base, "images", split)
    fs.makedirs(directory, exist_ok=True)
    all_facts = []
    batch: dict[str, bytes] = {}
    for i in range(n):
        rng = seeded_rng(seed, _SPLIT_CODE[split], i)
        facts = sample_facts(rng)
        all_facts.append(facts)
        batch[posixpath.join(directory, f"{i:06d}.jpg")] = jpeg(render_image(facts, image_size, rng))
        if len(batch) >= _IMAGE_BATCH:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return all_facts


def _web_captions(web_facts: list[dict], world: WorldConfig, seed: int) -> dict[str, list]:
    """The web corpus's captions: ``clean`` (each image's own), ``caption`` (noisy at ``world.noise_rate``),
    ``noise_type`` and ``noise_detail`` per row."""
    n = len(web_facts)
    clean = [render_caption(web_facts[i], _image_rng(seed, "web", i)) for i in range(n)]
    kinds = assign(n, world.noise_rate, world.noise_mix, seeded_rng(seed, 99))
    captions, details = [], []
    for i, kind in enumerate(kinds):
        if kind is None:
            cap, detail = clean[i], None
        else:
            cap, detail = apply_noise(kind, WebRow(i, web_facts, clean), seeded_rng(seed, 100, i))
        captions.append(cap)
        details.append(detail)
    return {"clean": clean, "caption": captions, "noise_type": kinds, "noise_detail": details}


def _write_copies(world_url: str, facts: dict[str, list[dict]], web: dict[str, list], world: WorldConfig, seed: int):
    """Append the injected copies (:mod:`.copies`) to the web split: their images, facts and clean captions
    (``facts`` and ``web`` grow in place); returns the columns of ``truth/copies.parquet`` (None without copies)."""
    n_web = len(facts["web"])
    copies = plan(n_web, len(facts["test"]), world.duplicate_rate, world.leak_rate, seed)
    if not copies:
        return None
    fs, base = storage.filesystem(world_url)
    truth: dict[str, list] = {"row": [], "path": [], "kind": [], "source_path": [], "transform": []}
    batch: dict[str, bytes] = {}
    for j, c in enumerate(copies):
        source = f"{c.split}/{c.index:06d}.jpg"
        data, detail = transform(
            fs.cat_file(posixpath.join(base, "images", source)), c.transform, seeded_rng(seed, 301, j)
        )
        row = n_web + j
        batch[posixpath.join(base, "images", "web", f"{row:06d}.jpg")] = data
        src_facts = facts[c.split][c.index]
        facts["web"].append(src_facts)
        caption = render_caption(src_facts, seeded_rng(seed, 302, j))
        for column, text in (("clean", caption), ("caption", caption), ("noise_type", None), ("noise_detail", None)):
            web[column].append(text)
        for column, value in zip(truth, (row, f"web/{row:06d}.jpg", c.kind, source, detail)):
            truth[column].append(value)
        if len(batch) >= _IMAGE_BATCH:
            fs.pipe(batch)
            batch = {}
    if batch:
        fs.pipe(batch)
    return {
        "row": pa.array(truth["row"], pa.int64()),
        **{k: pa.array(v, pa.string()) for k, v in truth.items() if k != "row"},
    }


def _publish_parquet(url: str, columns: dict[str, pa.Array]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, compression="zstd")
    storage.publish_bytes(url, buf.getvalue())


def _write_web(files: dict[str, str], facts: dict[str, list[dict]], web: dict[str, list]) -> None:
    """``web.parquet`` (what the pipeline ingests) and the truth: ``truth/web.parquet``, ``truth/images.parquet``."""
    n = len(facts["web"])
    paths = [f"web/{i:06d}.jpg" for i in range(n)]
    _publish_parquet(
        files["web"],
        {
            "url": pa.array([f"{URL_PLACEHOLDER}/{p}" for p in paths], pa.string()),
            "caption": pa.array(web["caption"], pa.string()),
        },
    )
    _publish_parquet(
        files["truth_web"],
        {
            "row": pa.array(range(n), pa.int64()),
            "image_id": pa.array([f"web_{i:06d}" for i in range(n)], pa.string()),
            "path": pa.array(paths, pa.string()),
            "facts": pa.array([json.dumps(f, sort_keys=True) for f in facts["web"]], pa.string()),
            "clean_caption": pa.array(web["clean"], pa.string()),
            "caption": pa.array(web["caption"], pa.string()),
            "noisy": pa.array([k is not None for k in web["noise_type"]], pa.bool_()),
            "noise_type": pa.array(web["noise_type"], pa.string()),
            "noise_detail": pa.array(web["noise_detail"], pa.string()),
        },
    )
    _publish_parquet(
        files["truth_images"],
        {
            "split": pa.array([s for s in SPLITS for _ in facts[s]], pa.string()),
            "image_id": pa.array([f"{s}_{i:06d}" for s in SPLITS for i in range(len(facts[s]))], pa.string()),
            "path": pa.array([f"{s}/{i:06d}.jpg" for s in SPLITS for i in range(len(facts[s]))], pa.string()),
            "facts": pa.array([json.dumps(f, sort_keys=True) for s in SPLITS for f in facts[s]], pa.string()),
        },
    )


def _write_human(files: dict[str, str], facts: dict[str, list[dict]], seed: int, k: int) -> tuple[list, list]:
    """The human set (BLIP's coco_karpathy_train layout, one entry per caption) and the test set
    (coco_karpathy_test layout, one entry per image); returns both."""
    train = []
    for i, f in enumerate(facts["human"]):
        for cap in distinct_captions(f, _image_rng(seed, "human", i), k):
            train.append({"image": f"human/{i:06d}.jpg", "caption": cap, "image_id": f"human_{i:06d}"})
    test = [
        {
            "image": f"test/{i:06d}.jpg",
            "caption": distinct_captions(f, _image_rng(seed, "test", i), k),
            "image_id": f"test_{i:06d}",
        }
        for i, f in enumerate(facts["test"])
    ]
    for name, ann in (("human_train", train), ("human_test", test)):
        storage.publish_text(files[name], json.dumps(ann, indent=1))
    return train, test


def generate_world(world: WorldConfig, seed: int, world_url: str) -> dict:
    """Write a whole world under ``world_url`` (no commit); returns the manifest."""
    t0 = time.time()
    counts = resolve_counts(world)
    files = world_files(world_url)
    facts = {split: _write_images(world_url, split, counts[split], seed, world.image_size) for split in SPLITS}
    web = _web_captions(facts["web"], world, seed)
    copies = _write_copies(world_url, facts, web, world, seed)
    _write_web(files, facts, web)
    if copies is not None:
        _publish_parquet(copies_url(world_url), copies)
    train, test = _write_human(files, facts, seed, world.captions_per_human_image)

    measured = Counter(k for k in web["noise_type"] if k is not None)
    manifest = {
        **_settings(world, seed),
        "settings_hash": _settings_hash(world, seed),
        "n_images": {s: len(facts[s]) for s in SPLITS},
        "n_human_captions": len(train),
        "n_test_captions": sum(len(e["caption"]) for e in test),
        "noisy": sum(measured.values()),
        "noise_counts": {t: measured.get(t, 0) for t in NOISE_TYPES},
        "layouts": dict(Counter(f["layout"] for f in facts["web"])),
        "url_placeholder": URL_PLACEHOLDER,
        "files": dict(WORLD_LAYOUT),
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "backgrounds": list(BACKGROUNDS),
            "positions": list(POSITIONS),
            "relations": list(RELATIONS),
        },
        "seconds": round(time.time() - t0, 3),
    }
    if copies is not None:
        kinds = Counter(copies["kind"].to_pylist())
        manifest["copies"] = {"duplicates": kinds["duplicate"], "leaks": kinds["leak"], "file": COPIES_FILE}
    storage.write_json(files["manifest"], manifest)
    return manifest


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
                f"({manifest.get('settings_hash')} != {wanted}); use another --root"
            )
        log.info("world already committed at %s; nothing to do", world_url)
        return manifest
    manifest = generate_world(cfg.world, cfg.seed, world_url)
    storage.commit(world_url, {"settings_hash": wanted, "n_images": manifest["n_images"]})
    total = sum(manifest["n_images"].values())
    log.info(
        "world written to %s: %s images in %.1fs (%.0f images/s), %d noisy web captions of %d",
        world_url,
        total,
        manifest["seconds"],
        total / max(manifest["seconds"], 1e-9),
        manifest["noisy"],
        manifest["n_images"]["web"],
    )
    return manifest
