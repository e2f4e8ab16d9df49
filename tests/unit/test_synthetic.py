"""The synthetic world: reproducible, honest about its noise, and its captions parse back into its facts."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import storage
from pipelines.config import ConfigError, RunConfig, WorldConfig, load_config
from pipelines.world import (
    BACKGROUNDS,
    COLOURS,
    NOISE_TYPES,
    SHAPES,
    WorldExistsError,
    caption_attribute_accuracy,
    distinct_captions,
    generate_world,
    parse_caption,
    render_caption,
    render_image,
    run_synth,
    sample_facts,
    world_files,
)

SMALL = dict(n_web=60, n_human=6, n_test=5)


def _world(tmp_path: Path, name: str = "w", seed: int = 0, **kw) -> tuple[str, dict]:
    url = str(tmp_path / name / "world")
    cfg = WorldConfig(**{**SMALL, **kw})
    return url, generate_world(cfg, seed, url)


def _files(world: str) -> dict[str, bytes]:
    root = Path(world)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _truth(world: str) -> list[dict]:
    return pq.read_table(world_files(world)["truth_web"]).to_pylist()


def _blip_pre_caption(text: str) -> str:
    """What BLIP's data loader does to a caption before training (lower case, punctuation out)."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    return re.sub(r"\s{2,}", " ", text).strip()


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_world_byte_for_byte(tmp_path):
    a, ma = _world(tmp_path, "a")
    b, mb = _world(tmp_path, "b")
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert len([k for k in fa if k.endswith(".jpg")]) == sum(SMALL.values())
    assert fa == fb
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb


def test_another_seed_gives_another_world(tmp_path):
    a, _ = _world(tmp_path, "a", seed=0)
    b, _ = _world(tmp_path, "b", seed=1)
    ca = pq.read_table(world_files(a)["web"])["caption"].to_pylist()
    cb = pq.read_table(world_files(b)["web"])["caption"].to_pylist()
    assert ca != cb
    assert _files(a)["images/web/000000.jpg"] != _files(b)["images/web/000000.jpg"]


def test_images_do_not_depend_on_how_many_are_generated(tmp_path):
    small, _ = _world(tmp_path, "small", n_web=20)
    big, _ = _world(tmp_path, "big", n_web=60)
    fs, fb = _files(small), _files(big)
    for i in range(20):
        assert fs[f"images/web/{i:06d}.jpg"] == fb[f"images/web/{i:06d}.jpg"]
    clean_small = [r["clean_caption"] for r in _truth(small)]
    clean_big = [r["clean_caption"] for r in _truth(big)][:20]
    assert clean_small == clean_big


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize(
    "rate,mix",
    [
        (0.4, {t: 1.0 for t in NOISE_TYPES}),
        (0.3, {"unrelated": 2.0, "wrong_attribute": 1.0, "other_caption": 1.0, "partial": 0.0}),
        (0.0, {t: 1.0 for t in NOISE_TYPES}),
        (1.0, {"partial": 1.0}),
    ],
)
def test_noise_rate_and_mix_are_honoured(tmp_path, rate, mix):
    world, manifest = _world(tmp_path, n_web=400, noise_rate=rate, noise_mix=mix)
    truth = _truth(world)
    measured_rate = sum(r["noisy"] for r in truth) / len(truth)
    assert measured_rate == pytest.approx(rate, abs=0.5 / len(truth))
    counts = Counter(r["noise_type"] for r in truth if r["noisy"])
    n_noisy = sum(counts.values())
    total_w = sum(mix.values())
    for t in NOISE_TYPES:
        assert abs(counts.get(t, 0) - n_noisy * mix.get(t, 0.0) / total_w) <= 1, (t, counts)
    assert manifest["noise_counts"] == {t: counts.get(t, 0) for t in NOISE_TYPES}
    web = pq.read_table(world_files(world)["web"]).to_pylist()
    assert [w["caption"] for w in web] == [r["caption"] for r in truth]
    for r in truth:
        assert (r["caption"] != r["clean_caption"]) == r["noisy"]
        assert (r["noise_type"] is None) == (not r["noisy"])


def test_each_noise_type_is_what_it_says(tmp_path):
    world, _ = _world(tmp_path, n_web=400, noise_rate=0.6)
    seen = Counter()
    for r in _truth(world):
        facts = json.loads(r["facts"])
        score = caption_attribute_accuracy(facts, r["caption"])
        kind = r["noise_type"]
        seen[kind] += 1
        if kind is None:
            assert score["exact"], (r["caption"], facts, score)
        elif kind == "unrelated":
            assert score["mentioned"] == 0, r["caption"]
        elif kind == "wrong_attribute":
            assert len(score["errors"]) == 1 and score["mentioned"] == score["total"], (r["caption"], score)
        elif kind == "partial":
            assert score["precision"] == 1.0 and score["recall"] < 1.0, (r["caption"], score)
        else:
            assert kind == "other_caption" and not score["exact"], (r["caption"], score)
    assert set(seen) == {None, *NOISE_TYPES}


def test_web_urls_use_the_placeholder_and_point_at_existing_images(tmp_path):
    world, _ = _world(tmp_path)
    web = pq.read_table(world_files(world)["web"])
    assert web.column_names == ["url", "caption"]
    for i, url in enumerate(web["url"].to_pylist()):
        assert url == f"{{base}}/web/{i:06d}.jpg"
        assert (Path(world) / "images" / url.removeprefix("{base}/")).is_file()


# ---------------------------------------------------------------------------------------------- captions


def test_every_phrasing_parses_back_to_its_facts():
    for i in range(600):
        rng = np.random.default_rng([7, i])
        facts = sample_facts(rng)
        for text in distinct_captions(facts, rng, 4):
            for variant in (text, _blip_pre_caption(text), "a picture of " + text, text.upper() + "."):
                score = caption_attribute_accuracy(facts, variant)
                assert score["exact"], (variant, facts, parse_caption(variant), score)


def test_captions_vary_in_phrasing():
    rng = np.random.default_rng(0)
    facts = {
        "layout": "pair",
        "background": "gray",
        "count": 2,
        "position": None,
        "relation": "left_of",
        "objects": [
            {"shape": "circle", "colour": "red", "size": "small"},
            {"shape": "square", "colour": "blue", "size": "large"},
        ],
    }
    texts = distinct_captions(facts, rng, 8)
    assert len(texts) == 8
    assert any("left of" in t for t in texts) and any("right of" in t for t in texts)  # either object first
    assert any("grey" in t for t in texts) and any("gray" in t for t in texts)
    assert len({t.split()[0] for t in texts}) > 1 and len({t.split()[-1] for t in texts}) > 1


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "a blue square to the right of a red circle",
            {
                "objects": [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}],
                "relation": "left_of",
                "count": 2,
                "layout": "pair",
            },
        ),
        (
            "three big green stars against a grey background",
            {
                "objects": [{"shape": "star", "colour": "green", "size": "large"}],
                "count": 3,
                "layout": "group",
                "background": "gray",
            },
        ),
        (
            "in the middle there is an orange cross",
            {"objects": [{"shape": "cross", "colour": "orange"}], "count": 1, "layout": "single", "position": "center"},
        ),
        (
            "a little yellow triangle under a large purple star on a dotted background",
            {
                "objects": [
                    {"shape": "star", "colour": "purple", "size": "large"},
                    {"shape": "triangle", "colour": "yellow", "size": "small"},
                ],
                "relation": "above",
                "count": 2,
                "layout": "pair",
                "background": "dotted",
            },
        ),
        ("IMG_2041.JPG", {}),
        ("buy now and save 20 percent", {}),
    ],
)
def test_parse_caption_examples(text, expected):
    assert parse_caption(text) == expected


def test_attribute_accuracy_names_the_wrong_attribute():
    facts = {
        "layout": "single",
        "background": "white",
        "count": 1,
        "position": "left",
        "relation": None,
        "objects": [{"shape": "circle", "colour": "red", "size": "small"}],
    }
    right = caption_attribute_accuracy(facts, "a small red circle on the left on a white background")
    assert right == {
        "correct": 6,
        "mentioned": 6,
        "total": 6,
        "precision": 1.0,
        "recall": 1.0,
        "exact": True,
        "errors": [],
    }
    wrong = caption_attribute_accuracy(facts, "a small blue circle on the left on a white background")
    assert wrong["errors"] == ["objects[0].colour"] and wrong["correct"] == 5
    partial = caption_attribute_accuracy(facts, "a red circle")
    assert partial["precision"] == 1.0 and partial["recall"] == pytest.approx(3 / 6) and not partial["exact"]
    extra = caption_attribute_accuracy(facts, "a red circle left of a green star")
    assert "objects[1].shape" in extra["errors"] and "relation" in extra["errors"]
    nothing = caption_attribute_accuracy(facts, "my favourite photo")
    assert nothing["mentioned"] == 0 and nothing["precision"] == 0.0 and nothing["recall"] == 0.0


def test_relation_flip_is_one_error():
    facts = {
        "layout": "pair",
        "background": "black",
        "count": 2,
        "position": None,
        "relation": "above",
        "objects": [
            {"shape": "star", "colour": "yellow", "size": "large"},
            {"shape": "cross", "colour": "green", "size": "small"},
        ],
    }
    assert caption_attribute_accuracy(facts, "a big yellow star above a small green cross on a black background")[
        "exact"
    ]
    flipped = caption_attribute_accuracy(facts, "a big yellow star below a small green cross on a black background")
    assert flipped["errors"] == ["relation"]


def test_vocabulary_of_unrelated_text_and_backgrounds_is_disjoint_from_objects():
    assert not set(BACKGROUNDS) & set(COLOURS)
    assert not set(BACKGROUNDS) & set(SHAPES)


# ---------------------------------------------------------------------------------------------- images


def test_images_show_their_facts():
    facts = {
        "layout": "single",
        "background": "white",
        "count": 1,
        "position": "left",
        "relation": None,
        "objects": [{"shape": "square", "colour": "red", "size": "large"}],
    }
    img = np.asarray(render_image(facts, 64, np.random.default_rng(0)), dtype=int)
    assert img.shape == (64, 64, 3)
    assert np.abs(img[32, 16] - COLOURS["red"]).max() < 30  # the object on the left
    assert img[32, 48].min() > 235  # the right half is background
    facts["background"] = "black"
    facts["position"] = "right"
    img = np.asarray(render_image(facts, 96, np.random.default_rng(0)), dtype=int)
    assert img.shape == (96, 96, 3)
    assert np.abs(img[48, 72] - COLOURS["red"]).max() < 30
    assert img[48, 24].max() < 40


def test_world_images_are_jpegs_of_the_configured_size(tmp_path):
    world, _ = _world(tmp_path, image_size=80)
    for p in list((Path(world) / "images").rglob("*.jpg"))[:10]:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (80, 80)


# ---------------------------------------------------------------------------------------------- human set


def test_karpathy_json_reads_back(tmp_path):
    world, manifest = _world(tmp_path, captions_per_human_image=3)
    files = world_files(world)
    facts = {r["image_id"]: json.loads(r["facts"]) for r in pq.read_table(files["truth_images"]).to_pylist()}
    train = json.loads(Path(files["human_train"]).read_text())
    test = json.loads(Path(files["human_test"]).read_text())
    assert isinstance(train, list) and isinstance(test, list)
    # train: BLIP's coco_karpathy_train layout, one entry per caption
    assert all(set(e) == {"image", "caption", "image_id"} and isinstance(e["caption"], str) for e in train)
    per_image = Counter(e["image_id"] for e in train)
    assert len(per_image) == SMALL["n_human"] and set(per_image.values()) == {3}
    assert manifest["n_human_captions"] == len(train)
    # test: coco_karpathy_test layout, one entry per image with a list of captions
    assert len(test) == SMALL["n_test"]
    assert all(isinstance(e["caption"], list) and len(set(e["caption"])) == 3 for e in test)
    for e in train + [dict(t, caption=c) for t in test for c in t["caption"]]:
        assert (Path(files["images"]) / e["image"]).is_file()
        assert e["image"].split("/")[0] in ("human", "test")
        assert caption_attribute_accuracy(facts[e["image_id"]], e["caption"])["exact"], e


def test_truth_is_apart_from_what_the_pipeline_reads(tmp_path):
    world, _ = _world(tmp_path)
    web = pq.read_table(world_files(world)["web"])
    assert set(web.column_names) == {"url", "caption"}
    truth = pq.read_table(world_files(world)["truth_web"])
    assert {"facts", "clean_caption", "noisy", "noise_type"} <= set(truth.column_names)
    assert not (Path(world) / "images" / "truth").exists()


# ---------------------------------------------------------------------------------------------- stage + config


def test_run_synth_commits_and_a_rerun_is_a_no_op(tmp_path):
    cfg = RunConfig(world=WorldConfig(**SMALL))
    root = str(tmp_path / "run")
    m1 = run_synth(cfg, root)
    assert storage.is_committed(storage.RunRoot(root).world())
    before = {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")}
    m2 = run_synth(cfg, root)
    assert m1 == m2
    assert {p: p.stat().st_mtime_ns for p in Path(root).rglob("*")} == before
    other = RunConfig(seed=5, world=WorldConfig(**SMALL))
    with pytest.raises(WorldExistsError):
        run_synth(other, root)


def test_sizes_have_defaults_and_counts_override():
    from pipelines.world import resolve_counts

    tiny, demo, full = (resolve_counts(WorldConfig(size=s)) for s in ("tiny", "demo", "full"))
    assert 100 <= tiny["web"] < 1000 and 1000 <= demo["web"] < 10000 and full["web"] >= 10000
    assert resolve_counts(WorldConfig(size="demo", n_web=7))["web"] == 7


@pytest.mark.parametrize(
    "override,field",
    [
        ("world.image_size=200", "world.image_size"),
        ("world.image_size=32", "world.image_size"),
        ("world.noise_rate=1.5", "world.noise_rate"),
        ("world.noise_mix={typo: 1}", "world.noise_mix"),
        ("world.noise_mix={partial: -1}", "world.noise_mix"),
        ("world.size=huge", "world.size"),
        ("world.n_web=0", "world.n_web"),
        ("world.colour=red", "world.colour"),
    ],
)
def test_bad_world_fields_are_config_errors(tmp_path, override, field):
    path = tmp_path / "c.yaml"
    path.write_text("world: {size: tiny}\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), [override])
    assert field in str(err.value)


def test_shipped_configs_load():
    root = Path(__file__).resolve().parents[2] / "flows" / "configs"
    tiny = load_config(str(root / "tiny.yaml"))
    demo = load_config(str(root / "demo.yaml"))
    assert tiny.world.size == "tiny" and demo.world.size == "demo"
    assert tiny.ingest.url_list is None and tiny.ingest.shard_size <= 100


def test_render_caption_is_lower_case_and_plain():
    for i in range(200):
        rng = np.random.default_rng([3, i])
        text = render_caption(sample_facts(rng), rng)
        assert text == text.lower() and re.fullmatch(r"[a-z ]+", text), text
