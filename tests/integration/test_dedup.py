"""Duplicates and test-set leaks: the perceptual hash on real photographs, the synthetic world's injected copies and
their truth, then one caption-filter run with the phash scorer on a tiny world with copies (real Ray), whose hashes,
leak distances, duplicate groups and precision/recall are checked against brute force, and assemble dropping both
by rule."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from integration_helpers import TINY, capfilt
from PIL import Image

from benchmarks._common import link_models, train_models
from pipelines import storage
from pipelines.capfilt.phash import hash_images, hash_pixels, pixels
from pipelines.config import WorldConfig, load_config
from pipelines.dedup import hamming

pytestmark = pytest.mark.integration

ROUND = 1
WORLD = ["world.n_web=100", "world.n_human=30", "world.n_test=20", "world.duplicate_rate=0.2", "world.leak_rate=0.1"]
POOLS = [
    f"capfilt.{p}.{k}"
    for p in ("captioner_pool", "filter_pool", "scorers.phash.pool")
    for k in ("actors=1", "batch_size=8", "num_cpus=0.3")
]
CAPFILT_SETS = ["capfilt.model_batch_size=8", "capfilt.decode_num_cpus=0.2", *POOLS]


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def jpeg(rgb: np.ndarray, quality: int = 90) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def resized(rgb: np.ndarray, size: int = 64) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))


def test_copies_of_a_photograph_hash_within_a_few_bits_and_other_photographs_far():
    """Real photographs (scikit-image's samples): a re-encoded or resized copy within 4 bits, a 1% crop within 8
    (crops move a phash most), another photograph more than 16 bits away."""
    from skimage import data

    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    hashes = {name: hash_pixels(resized(p)) for name, p in photos.items()}
    for name, p in photos.items():
        h, w = p.shape[:2]
        copies = {
            "jpeg q30": (jpeg(p, 30), 4),
            "half size": (np.asarray(Image.fromarray(p).resize((w // 2, h // 2), Image.BICUBIC)), 4),
            "cropped 1%": (p[h // 100 : h - h // 100, w // 100 : w - w // 100], 8),
        }
        for how, (c, most) in copies.items():
            d = int(hamming(np.array([hash_pixels(resized(c))]), np.array([hashes[name]]))[0])
            assert d <= most, (name, how, d)
    names = sorted(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert hamming(np.array([hashes[a]]), np.array([hashes[b]]))[0] > 16, (a, b)


@pytest.fixture(scope="module")
def copies_world(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("dedup-world") / "run")
    for stage in ("synth", "ingest"):
        proc, seconds = capfilt(stage, "--config", TINY, "--root", root, *sets(WORLD))
        assert proc.returncode == 0, f"capfilt {stage} failed after {seconds:.0f}s:\n{proc.stderr[-3000:]}"
    return root


def test_the_world_injects_copies_with_their_truth_and_without_rates_is_unchanged(copies_world):
    from pipelines.world.build import _settings_hash

    world = Path(copies_world) / "world"
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["copies"] == {"duplicates": 20, "leaks": 10, "file": "truth/copies.parquet"}
    assert manifest["n_images"]["web"] == 130 and manifest["duplicate_rate"] == 0.2
    copies = pq.read_table(world / "truth" / "copies.parquet").to_pylist()
    assert [c["row"] for c in copies] == list(range(100, 130))
    assert {c["kind"] for c in copies} == {"duplicate", "leak"}
    truth = pq.read_table(world / "truth" / "web.parquet").to_pylist()
    web = pq.read_table(world / "web.parquet").to_pylist()
    assert len(truth) == len(web) == 130
    for c in copies:
        src_split = "web" if c["kind"] == "duplicate" else "test"
        assert c["source_path"].startswith(src_split + "/") and c["transform"].split(":")[0] in (
            "reencode",
            "resize",
            "crop",
        )
        row = truth[c["row"]]
        assert row["path"] == c["path"] and not row["noisy"] and web[c["row"]]["caption"] == row["clean_caption"]
        src = Image.open(world / "images" / c["source_path"])
        copy = Image.open(world / "images" / c["path"])
        diff = np.abs(np.asarray(copy.resize(src.size), np.float32) - np.asarray(src, np.float32)).mean()
        assert diff < 25, (c, diff)  # a copy of its source, not another image
    # Rates 0 (every existing config): the settings, and so the world's hash, are those from before copies existed.
    assert _settings_hash(WorldConfig(size="tiny"), 0) == "0b46e3d6c75d2c77"
    assert _settings_hash(WorldConfig(size="demo"), 0) == "5a07d6c794ee9d89"


@pytest.fixture(scope="module")
def phash_run(copies_world, ray_session, tmp_path_factory) -> dict:
    import ray

    from pipelines.capfilt import run_caption_filter

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.time()
    models = train_models(
        Path(copies_world) / "world", tmp_path_factory.mktemp("dedup-models"), {"captioner": 2, "filter": 2}
    )
    link_models(models, copies_world, ROUND)
    cfg = load_config(TINY, WORLD + CAPFILT_SETS + ["capfilt.scorers.phash.leak_distance=4"])
    run_caption_filter(cfg, copies_world, ROUND)
    print(f"\nmodels + caption-filter with phash: {time.time() - t0:.1f}s")
    files = sorted((Path(copies_world) / f"round={ROUND}" / "capfilt").glob("*.parquet"))
    return {"cfg": cfg, "table": pa.concat_tables([pq.read_table(f) for f in files])}


def web_images(table: pa.Table) -> pa.Table:
    """One row per web image with a hash: (shard, key, url, phash, leak_distance), sorted by (shard, key)."""
    t = table.filter(pc.is_valid(table["phash"]))
    t = t.group_by(["shard", "key"], use_threads=False).aggregate(
        [("url", "min"), ("phash", "min"), ("phash", "max"), ("leak_distance", "min"), ("leak_distance", "max")]
    )
    return t.sort_by([("shard", "ascending"), ("key", "ascending")])


def test_phash_columns_are_the_hash_of_each_ingested_image_and_its_distance_to_the_test_set(copies_world, phash_run):
    from blip_core.transforms import decode_image
    from pipelines.capfilt.pixels import pil_transform
    from pipelines.karpathy import join_url, read_karpathy
    from pipelines.shards import iter_shard, list_shards

    table = phash_run["table"]
    assert table.schema.field("phash").type == pa.int64() and table.schema.field("leak_distance").type == pa.int32()
    assert table.column_names.index("leak_distance") + 1 == table.column_names.index("phash")  # the rule's first
    bad = table.filter(pc.invert(pc.equal(table["status"], "ok")))
    assert bad["phash"].null_count == bad.num_rows  # not scored: null, as every score
    img = web_images(table)
    assert img["phash_min"].equals(img["phash_max"]) and img["leak_distance_min"].equals(img["leak_distance_max"])
    world = storage.join(copies_world, "world")
    test = hash_images(
        [
            join_url(storage.join(world, "images"), e.image)
            for e in read_karpathy(storage.join(world, "human_test.json"))
        ],
        pixels(64),
    )
    resize = pil_transform(pixels(64))
    images = {s.key: s.image for u in list_shards(storage.RunRoot(copies_world).ingest("web")) for s in iter_shard(u)}
    for key, h, leak in zip(*(img[c].to_pylist() for c in ("key", "phash_min", "leak_distance_min"))):
        assert hash_pixels(np.asarray(resize(decode_image(images[key])), np.uint8)) == h
        assert leak == int(hamming(np.array([h], np.int64), test).min())


def test_duplicates_and_leaks_against_the_truth_equal_brute_force(copies_world, phash_run):
    from scipy.sparse.csgraph import connected_components

    from pipelines.summary import copies_vs_truth

    cfg = phash_run["cfg"]
    got = copies_vs_truth(cfg, storage.RunRoot(copies_world), storage.RunRoot(copies_world).round(ROUND, "capfilt"))
    img = web_images(phash_run["table"])
    paths = ["/".join(u.split("/")[-2:]) for u in img["url_min"].to_pylist()]
    copies = {
        c["path"]: c for c in pq.read_table(Path(copies_world) / "world" / "truth" / "copies.parquet").to_pylist()
    }
    origin = [copies[p]["source_path"] if p in copies else p for p in paths]
    h = img["phash_min"].to_numpy()
    _, label = connected_components(hamming(h[:, None], h[None, :]) <= 4, directed=False)
    first: dict[int, int] = {}
    rep = [first.setdefault(lab, i) for i, lab in enumerate(label)]
    flagged = [i for i in range(len(rep)) if rep[i] != i]
    right = [i for i in flagged if origin[i] == origin[rep[i]]]
    dup = [i for i, p in enumerate(paths) if copies.get(p, {}).get("kind") == "duplicate"]
    assert got["images"] == len(paths) == 130
    assert got["duplicates"]["flagged"] == len(flagged) and got["duplicates"]["true"] == len(dup) == 20
    assert got["duplicates"]["precision"] == pytest.approx(len(right) / max(len(flagged), 1))
    assert got["duplicates"]["recall"] == pytest.approx(len(set(right) & set(dup)) / 20)
    leak = img["leak_distance_min"].to_numpy() <= 4
    true_leak = np.array([copies.get(p, {}).get("kind") == "leak" for p in paths])
    assert got["leaks"]["flagged"] == int(leak.sum()) and got["leaks"]["true"] == 10
    assert got["leaks"]["recall"] == pytest.approx((leak & true_leak).sum() / 10)
    assert got["leaks"]["precision"] == pytest.approx((leak & true_leak).sum() / max(int(leak.sum()), 1))
    # a re-encoded copy keeps its hash within 4 bits: the phash finds those (resizes and crops of these 64 px
    # drawings move it more: see docs/DESIGN.md)
    for kind in ("duplicates", "leaks"):
        assert got[kind]["recall_by_transform"]["reencode"] >= 0.75, got[kind]
    print(f"\nagainst the truth: {json.dumps(got)}")


def test_assemble_keeps_one_image_per_group_and_drops_leaks_recording_its_rule(copies_world, phash_run):
    from pipelines.assemble import DUPLICATES, run_assemble
    from pipelines.bootstrapped import read_manifest

    cfg = load_config(
        TINY,
        WORLD
        + CAPFILT_SETS
        + [
            "capfilt.scorers.phash.leak_distance=4",
            "assemble.drop_duplicates=true",
            "assemble.drop_leaks=true",
            "assemble.itm_threshold=0",  # the 2-step filter's ITM would hide the reasons under its own
        ],
    )
    summary = run_assemble(cfg, copies_world, ROUND)
    dataset = Path(copies_world) / f"round={ROUND}" / "dataset"
    m = read_manifest(str(dataset))
    assert m.keep["rule"]["duplicate_distance"] == 4
    assert {"column": "leak_distance", "reason": "test_set_leak", "above": 4, "below": None} in m.keep["rule"][
        "score_rules"
    ]
    assert m.keep["config"]["drop_duplicates"] and m.keep["config"]["drop_leaks"]
    groups = pq.read_table(dataset / DUPLICATES)
    img = web_images(phash_run["table"])
    in_groups = set(zip(groups["shard"].to_pylist(), groups["key"].to_pylist()))
    reps = set(zip(groups["group_shard"].to_pylist(), groups["group_key"].to_pylist()))
    assert summary["duplicates"]["images_in_groups"] == len(in_groups)
    assert summary["duplicates"]["images_dropped"] == len(in_groups) - len(reps)
    kept = pa.concat_tables([pq.read_table(f) for f in sorted((dataset / "kept").glob("*.parquet"))])
    kept_images = set(zip(kept["shard"].to_pylist(), kept["key"].to_pylist()))
    assert not kept_images & (in_groups - reps)  # no duplicate but its representative stays
    leaks = img.filter(pc.less_equal(img["leak_distance_min"], 4))
    assert not kept_images & set(zip(leaks["shard"].to_pylist(), leaks["key"].to_pylist()))
    dropped = m.keep["counts"]["web"]["dropped"]
    assert dropped.get("duplicate", 0) > 0 and dropped.get("test_set_leak", 0) > 0
