"""The keep rule applied after CapFilt (``pipelines/keep_rule.py``, ``capfilt assemble``'s ``assemble:`` section):
thresholds, top-k ties, nulls and statuses; CapFilt's own rule re-decided from its Parquet gives back its ``keep``
column row for row; assemble's pass over the files; and the report's threshold sweep on hand-made tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from capfilt_settings import PIXELS, make_settings

from pipelines import storage
from pipelines.assemble import AssembleError, assemble_rows, resolve_rule
from pipelines.capfilt import ModelRef, Scorer, Settings, output_schema, register_scorer
from pipelines.capfilt.models import SCORERS
from pipelines.capfilt.rows import UNIT_COLUMN, build_rows, keep_rule
from pipelines.config import AssembleConfig, ConfigError, validate_config
from pipelines.keep_rule import (
    KeepRule,
    ScoreRule,
    assemble_rule,
    capfilt_rule,
    column_has_values,
    decide_table,
    is_default,
    recorded_settings,
)
from pipelines.report import SWEEP_THRESHOLDS, Sweep

K = 3


@register_scorer("unit_glow")
class Glow(Scorer):
    """A scorer of this test only: what a plugin's rule looks like to the keep rule."""

    columns = (pa.field("glow", pa.float32()), pa.field("glow_extra", pa.float32()))


def rows(*specs: tuple, **extra_cols: list) -> pa.Table:
    """CapFilt-like rows from (shard, key, source, candidate, status, itm) tuples; other score columns by name."""
    names = ("shard", "key", "source", "candidate", "status", "itm_score")
    data = {n: [s[i] for s in specs] for i, n in enumerate(names)}
    data["text"] = [f"{s[1]}/{s[2]}/{s[3]}" for s in specs]
    data.update(extra_cols)
    types = {"candidate": pa.int16(), "itm_score": pa.float32()}
    return pa.table(
        {n: pa.array(v, types.get(n, pa.float32() if n in extra_cols else pa.string())) for n, v in data.items()}
    )


def decided(table: pa.Table, rule: KeepRule) -> list[tuple]:
    keep, reason = decide_table(table, rule)
    return list(zip(keep.tolist(), reason.tolist()))


# ------------------------------------------------------------------------------------------------ the rule
def test_thresholds_are_strict_and_every_drop_says_why_in_order():
    t = rows(
        ("0", "a", "web", None, "ok", 0.5),  # at the threshold: dropped
        ("0", "a", "synthetic", 0, "ok", np.float32(0.5) + np.float32(1e-7)),  # just above: kept
        ("0", "a", "synthetic", 1, "empty_text", None),
        ("0", "b", "web", None, "corrupt_image", None),
        ("0", "c", "web", None, "ok", 0.9),  # fails ITC (checked before CLIP) and CLIP
        ("0", "c", "synthetic", 0, "ok", 0.9),  # fails CLIP only
        ("0", "c", "synthetic", 1, "ok", 0.2),  # fails ITM first
        itc_score=[0.3, 0.3, None, None, 0.1, 0.3, 0.0],
        clip_score=[0.5, 0.5, None, None, 0.1, 0.1, 0.0],
    )
    rule = assemble_rule(
        AssembleConfig(itc_threshold=0.2, clip_threshold=0.3),
        KeepRule(0.5, None, (ScoreRule("clip_score", "x", None, 0.9),)),
    )
    assert rule.score_rules == (
        ScoreRule("itc_score", "itc_below_threshold", 0.2),
        ScoreRule("clip_score", "clip_rule", 0.3, 0.9),  # the CLIP rule's lower bound replaced, its upper kept
    )
    assert decided(t, rule) == [
        (False, "itm_below_threshold"),
        (True, None),
        (False, "bad_input"),
        (False, "bad_input"),
        (False, "itc_below_threshold"),
        (False, "clip_rule"),
        (False, "itm_below_threshold"),
    ]
    # ITM is compared in float32, as CapFilt does: float32(0.3) is not above a threshold of 0.3
    assert decided(rows(("0", "a", "web", None, "ok", 0.3)), KeepRule(0.3)) == [(False, "itm_below_threshold")]


def test_nulls_fail_their_rule_and_a_score_nobody_thresholds_is_never_read():
    t = rows(
        ("0", "a", "web", None, "ok", None),  # scored nothing though ok: no ITM, so not above the threshold
        ("0", "a", "synthetic", 0, "ok", 0.8),  # null CLIP under a CLIP rule: fails it
        ("0", "a", "synthetic", 1, "ok", 0.8),
        clip_score=[0.9, None, float("nan")],
    )
    assert decided(t, KeepRule(0.5, None, (ScoreRule("clip_score", "clip_rule", 0.0),))) == [
        (False, "itm_below_threshold"),
        (False, "clip_rule"),
        (False, "clip_rule"),
    ]
    assert decided(t, KeepRule(0.5, None, (ScoreRule("clip_score", "clip_rule"),))) == [
        (False, "itm_below_threshold"),
        (True, None),
        (True, None),
    ]


def test_top_k_is_per_image_by_itm_with_ties_to_the_lower_candidate():
    t = rows(
        ("0", "a", "synthetic", 2, "ok", 0.7),
        ("1", "a", "synthetic", 0, "ok", 0.6),  # key "a" of another shard: another image
        ("0", "b", "synthetic", 0, "ok", 0.9),
        ("0", "a", "synthetic", 1, "ok", 0.8),  # an image's rows need not be adjacent
        ("0", "a", "synthetic", 0, "ok", 0.7),  # ties with candidate 2: the lower candidate wins
        ("0", "a", "web", None, "ok", 0.95),  # web texts are never ranked
        ("0", "a", "synthetic", 3, "ok", 0.99),
        ("0", "a", "synthetic", 4, "ok", 0.4),  # fails ITM before any ranking: that stays its reason
    )
    assert decided(t, KeepRule(0.5, 2)) == [
        (False, "not_top_k"),
        (True, None),
        (True, None),
        (True, None),
        (False, "not_top_k"),
        (True, None),
        (True, None),
        (False, "itm_below_threshold"),
    ]
    keep_3 = [k for k, _ in decided(t, KeepRule(0.5, 3))]
    assert keep_3 == [False, True, True, True, True, True, True, False]
    # without an ITM condition (the sweep's base), a NaN score ranks last
    t2 = rows(("0", "a", "synthetic", 0, "ok", None), ("0", "a", "synthetic", 1, "ok", 0.1))
    assert decided(t2, KeepRule(None, 1)) == [(False, "not_top_k"), (True, None)]


def test_a_rule_names_the_columns_it_needs():
    from pipelines.keep_rule import KeepRuleError

    with pytest.raises(KeepRuleError, match="clip_score"):
        decide_table(
            rows(("0", "a", "web", None, "ok", 0.9)), KeepRule(0.5, None, (ScoreRule("clip_score", "c", 0.1),))
        )


# -------------------------------------------------------------------------------------- CapFilt agreement
def settings(scorers: list[ModelRef], **over) -> Settings:
    return make_settings("", num_samples=K, scorers=scorers, **over)


def random_batch(rng: np.random.Generator, n: int, shard: str, score_columns: list[str]) -> dict:
    """A scored batch as the filter leaves it: statuses, empty captions, NaNs, and ITM ties on a coarse grid."""
    b = {
        UNIT_COLUMN: np.zeros(n, np.int32),
        "shard": np.array([shard] * n, dtype=object),
        "key": np.array([f"{shard}{i:04d}" for i in range(n)], dtype=object),
        "url": np.array([f"http://h/web/{shard}{i:04d}.jpg" for i in range(n)], dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "text": np.array([f"web {i}" for i in range(n)], dtype=object),
        "text_length": np.full(n, 5, np.int32),
        "text_status": rng.choice(np.array(["ok"] * 6 + ["empty_text"], dtype=object), n),
        "image_status": rng.choice(np.array(["ok"] * 8 + ["corrupt_image", "missing_image"], dtype=object), n),
        "error": np.array([None] * n, dtype=object),
    }
    for j in range(K):
        b[f"syn_{j}"] = np.array([("" if rng.random() < 0.1 else f"syn {i}.{j}") for i in range(n)], dtype=object)
    for c in ["itm_score", "itc_score", *score_columns]:
        v = np.where(rng.random((n, 1 + K)) < 0.5, rng.choice([0.3, 0.5, 0.7], (n, 1 + K)), rng.random((n, 1 + K)))
        v = v.astype(np.float32)
        v[rng.random((n, 1 + K)) < 0.05] = np.nan
        for j in range(1 + K):
            b[f"{c}__{j}"] = v[:, j]
    return b


@pytest.fixture
def capfilt_dir(tmp_path: Path) -> dict:
    """A committed CapFilt directory of two files written by ``build_rows`` with a CLIP rule, a plugin's rule and a
    top-2, and its settings recorded as the stage records them (keys sorted)."""
    clip = ModelRef("clip", SCORERS["clip"], "/clip", "1" * 16, PIXELS, {"model": "m"}, keep_above=0.2)
    glow = ModelRef("unit_glow", Glow, None, "2" * 16, PIXELS, keep_below=0.8)
    s = settings([glow, clip], keep_top_k_synthetic=2)
    rng = np.random.default_rng(7)
    out = tmp_path / "capfilt"
    out.mkdir()
    tables = []
    for shard in ("00000", "00001"):
        t = build_rows(random_batch(rng, 40, shard, ["clip_score", "glow", "glow_extra"]), s).drop_columns(
            [UNIT_COLUMN]
        )
        t = t.cast(output_schema(s))
        pq.write_table(t, out / f"part-{shard}.parquet", row_group_size=50)
        tables.append(t)
    storage.commit(str(out), {"fingerprint": json.loads(json.dumps(s.fingerprint(), sort_keys=True))})
    return {"url": str(out), "settings": s, "table": pa.concat_tables(tables)}


def test_capfilt_rule_as_recorded_reproduces_keep_and_drop_reason_row_for_row(capfilt_dir):
    s, table = capfilt_dir["settings"], capfilt_dir["table"]
    recorded = recorded_settings(capfilt_dir["url"])
    rule = capfilt_rule(recorded, order=["unit_glow", "clip"])
    assert rule == keep_rule(s)
    assert assemble_rule(AssembleConfig(), rule) == rule  # assemble's fields unset: CapFilt's rule
    keep, reason = decide_table(table, rule)
    assert keep.tolist() == table["keep"].to_pylist()
    assert reason.tolist() == table["drop_reason"].to_pylist()
    got = set(reason.tolist())
    assert {None, "bad_input", "itm_below_threshold", "clip_rule", "unit_glow_rule", "not_top_k"} <= got
    assert capfilt_rule({"itm_threshold": 0.5}) == KeepRule(0.5)


def test_assemble_pass_null_config_counts_keep_and_a_rule_writes_what_it_keeps(capfilt_dir, tmp_path):
    url, table = capfilt_dir["url"], capfilt_dir["table"]
    kept = table.filter(table["keep"])
    default = assemble_rows(url)
    assert default["kept"] == {
        s: kept.filter(pa.compute.equal(kept["source"], s)).num_rows for s in ("web", "synthetic")
    }
    assert default["total"] == {"web": 80, "synthetic": table.num_rows - 80}
    assert default["kept_images"] == len(set(zip(kept["shard"].to_pylist(), kept["key"].to_pylist())))
    assert default["images"] == 80 and "dropped" not in default

    same = capfilt_rule(recorded_settings(url), order=["unit_glow", "clip"])
    counts = assemble_rows(url, same, str(tmp_path / "kept"))
    assert {k: counts[k] for k in default} == default
    files = sorted((tmp_path / "kept").glob("*.parquet"))
    assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
    written = pa.concat_tables([pq.read_table(f) for f in files])
    cols = ["shard", "key", "source", "candidate", "text"]
    assert written.select(cols).to_pylist() == kept.select(cols).to_pylist()
    assert all(written["keep"].to_pylist())
    assert json.loads(pq.read_schema(files[0]).metadata[b"capfilt.assemble"])["rule"] == same.as_dict()

    # a stricter ITM threshold keeps what CapFilt kept above it (the top-k only ever loses its lowest)
    strict = assemble_rule(AssembleConfig(itm_threshold=0.75), same)
    tighter = assemble_rows(url, strict, str(tmp_path / "strict"))
    assert sum(tighter["kept"].values()) < sum(default["kept"].values())
    stricter = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "strict").glob("*.parquet"))])
    above = kept.filter(pa.compute.greater(kept["itm_score"], pa.scalar(0.75, pa.float32())))
    assert stricter.select(cols).to_pylist() == above.select(cols).to_pylist()
    assert tighter["dropped"]["web"]["itm_below_threshold"] > counts["dropped"]["web"]["itm_below_threshold"]
    assert sum(tighter["dropped"]["web"].values()) == tighter["total"]["web"] - tighter["kept"]["web"]


def test_a_threshold_on_a_score_no_row_has_is_an_error(tmp_path):
    t = rows(("00000", "a", "web", None, "ok", 0.9), ("00000", "a", "synthetic", 0, "ok", 0.9), clip_score=[None, None])
    t = t.append_column("keep", pa.array([True, True]))
    out = tmp_path / "capfilt"
    out.mkdir()
    pq.write_table(t, out / "part-00000.parquet")
    pq.write_table(t.drop_columns(["clip_score"]), out / "part-00001.parquet", write_statistics=False)
    storage.commit(str(out), {"fingerprint": {"itm_threshold": 0.5, "keep_top_k_synthetic": None}})
    files = storage.list_files(str(out), ".parquet")
    assert not column_has_values(files, "clip_score") and not column_has_values(files, "glow")
    assert column_has_values(files, "itm_score") and column_has_values(files[1:], "itm_score")  # no statistics
    cfg = validate_config({"world": {}, "assemble": {"clip_threshold": 0.2}})
    with pytest.raises(AssembleError, match=r"assemble.clip_threshold: clip_score is null in every row"):
        resolve_rule(cfg, str(out))
    with pytest.raises(AssembleError, match=r"assemble.itc_threshold: itc_score is null in every row"):
        resolve_rule(validate_config({"world": {}, "assemble": {"itc_threshold": 0.1}}), str(out))
    assert resolve_rule(validate_config({"world": {}}), str(out)) is None  # null config: CapFilt's keep column
    assert resolve_rule(validate_config({"world": {}, "assemble": {"itm_threshold": 0.7}}), str(out)) == KeepRule(0.7)


def test_assemble_config_defaults_to_capfilt_and_validates():
    cfg = validate_config({"world": {}})
    assert is_default(cfg.assemble) and cfg.assemble.model_dump() == {
        "itm_threshold": None,
        "itc_threshold": None,
        "clip_threshold": None,
        "top_k_synthetic": None,
        "drop_duplicates": False,
        "duplicate_distance": 4,
        "drop_leaks": False,
    }
    assert not is_default(validate_config({"world": {}, "assemble": {"top_k_synthetic": 1}}).assemble)
    assert is_default(validate_config({"world": {}, "assemble": {"duplicate_distance": 2}}).assemble)
    for on in ("drop_duplicates", "drop_leaks"):
        assert not is_default(validate_config({"world": {}, "assemble": {on: True}}).assemble)
    for bad in (
        {"itm_threshold": 1.5},
        {"top_k_synthetic": 0},
        {"clip_threshold": -2},
        {"itm": 0.5},
        {"duplicate_distance": -1},
    ):
        with pytest.raises(ConfigError, match="assemble"):
            validate_config({"world": {}, "assemble": bad})
    rule = assemble_rule(AssembleConfig(itm_threshold=0.7, top_k_synthetic=1), KeepRule(0.5, 3))
    assert rule == KeepRule(0.7, 1) and KeepRule.from_dict(json.loads(json.dumps(rule.as_dict()))) == rule
    assert rule.describe() == (
        "status ok and itm_score > 0.7 (synthetic: and among the 1 best of its image by itm_score, ties to the "
        "lower candidate)"
    )


# ------------------------------------------------------------------------------------------------ the sweep
def sweep_table(rng: np.random.Generator, n: int) -> tuple[pa.Table, np.ndarray]:
    specs, noisy = [], []
    for i in range(n):
        shard, key = f"{i // 10:05d}", f"{i:06d}"
        bad = i % 11 == 4
        specs.append((shard, key, "web", None, "corrupt_image" if bad else "ok", None if bad else float(rng.random())))
        noisy.append(-1 if i % 13 == 0 else int(rng.random() < 0.4))
        if bad:
            continue
        for j in range(2):
            itm = float(rng.choice([0.25, 0.5, rng.random()]))
            specs.append((shard, key, "synthetic", j, "ok", itm))
            noisy.append(-1)
    return rows(*specs), np.array(noisy)


def test_the_sweep_counts_what_the_rule_keeps_at_each_threshold():
    rng = np.random.default_rng(3)
    table, noisy = sweep_table(rng, 60)
    rule = KeepRule(0.5, 1)
    sweep = Sweep(rule)
    for a, b in ((0, 50), (50, table.num_rows)):  # two "files", cut between images
        sweep.add(table.slice(a, b - a), noisy[a:b])
    out = sweep.rows()
    assert [r["threshold"] for r in out] == list(SWEEP_THRESHOLDS) and len(out) == 21
    source = np.array(table["source"].to_pylist())
    ok = np.array(table["status"].to_pylist()) == "ok"
    web_known = (source == "web") & ok & (noisy >= 0)
    for r in out:
        keep, _ = decide_table(table, KeepRule(r["threshold"], 1))  # brute force: the rule at this threshold
        for s in ("web", "synthetic"):
            assert r["kept"][s] == int((keep & (source == s)).sum())
            assert r["kept_share"][s] == r["kept"][s] / int((source == s).sum())
        removed = web_known & ~keep
        hits = int((removed & (noisy == 1)).sum())
        assert r["removed"] == int(removed.sum())
        assert r["precision"] == (hits / int(removed.sum()) if removed.any() else None)
        assert r["recall"] == hits / int((web_known & (noisy == 1)).sum())
    assert out[0]["kept"]["web"] > out[10]["kept"]["web"] > out[-1]["kept"]["web"] == 0
    assert out[0]["recall"] == 0 and out[-1]["recall"] == 1


def test_the_sweep_without_truth_has_no_precision():
    table, _ = sweep_table(np.random.default_rng(4), 20)
    sweep = Sweep(KeepRule(0.5))
    sweep.add(table)
    r = sweep.rows()[10]
    assert r["threshold"] == 0.5 and "precision" not in r
    assert r["kept"]["web"] == int(
        decide_table(table, KeepRule(0.5))[0][np.array(table["source"].to_pylist()) == "web"].sum()
    )


# ---------------------------------------------------------------------------------- duplicates and leaks
def test_duplicate_groups_are_the_components_of_near_hashes_with_the_smallest_index_as_representative():
    """Against brute force (every pair), at distances that use one level of bands (few distinct hashes) and two
    (more distinct hashes than a band has values); exact copies, chains and far hashes included."""
    from scipy.sparse.csgraph import connected_components

    from pipelines.dedup import group_representatives, hamming, masks

    rng = np.random.default_rng(3)
    centres = rng.integers(-(2**63), 2**63 - 1, size=400, dtype=np.int64)
    hashes = centres[rng.integers(0, 400, 3000)]
    for _ in range(3):  # up to 3 bits flipped away from a centre
        bit = np.left_shift(np.int64(1), rng.integers(0, 64, 3000).astype(np.int64))
        hashes = hashes ^ np.where(rng.random(3000) < 0.5, bit, 0)
    d = hamming(hashes[:, None], hashes[None, :])
    for distance in (0, 2, 4, 6):
        assert len(masks(distance, 3000)) == (distance + 1) ** (2 if 3000 > 2 ** (64 // (distance + 1)) else 1)
        _, label = connected_components(d <= distance, directed=False)
        first = {}
        for i, lab in enumerate(label):
            first.setdefault(lab, i)
        assert group_representatives(hashes, distance).tolist() == [first[lab] for lab in label], distance
    # a hash never joins one more than `distance` bits away, however many copies either has
    far = np.array([0, 0, 0b1111, 0b1111, 0b11111], dtype=np.int64)
    assert group_representatives(far, 4).tolist() == [0, 0, 0, 0, 0]
    assert group_representatives(far, 3).tolist() == [0, 0, 2, 2, 2]


def phash_rows(specs: list[tuple]) -> pa.Table:
    """CapFilt rows with the phash scorer's columns from (shard, key, source, status, itm, phash, leak_distance)."""
    names = ("shard", "key", "source", "status", "itm_score", "phash", "leak_distance")
    data = {n: [s[i] for s in specs] for i, n in enumerate(names)}
    types = {"itm_score": pa.float32(), "phash": pa.int64(), "leak_distance": pa.int32()}
    t = pa.table({n: pa.array(v, types.get(n, pa.string())) for n, v in data.items()})
    t = t.append_column("candidate", pa.array([None if s[2] == "web" else 0 for s in specs], pa.int16()))
    t = t.append_column("text", pa.array([f"{s[1]}/{s[2]}" for s in specs]))
    return t.append_column("keep", pa.array([(s[4] or 0) > 0.5 for s in specs]))


def test_assemble_drops_duplicates_but_their_representative_and_leaks_by_rule(tmp_path):
    """Two files: image 00001/b is 2 bits from 00000/a (a near copy, in another file), 00000/c an exact copy of
    00001/e, 00000/d far from all; 00001/b is also 3 bits from a test image. Each group keeps its smallest
    (shard, key); a leak goes by the phash scorer's recorded leak_distance."""
    from pipelines.assemble import DUPLICATES, duplicate_groups

    out = tmp_path / "capfilt"
    out.mkdir()
    a, c, d = 0b1010 << 40, 0x0F0F_0F0F_0F0F, -1
    pq.write_table(
        phash_rows(
            [
                ("00000", "a", "web", "ok", 0.9, a, 20),
                ("00000", "a", "synthetic", "ok", 0.9, a, 20),
                ("00000", "c", "web", "empty_text", None, None, None),  # its hash is on its synthetic row
                ("00000", "c", "synthetic", "ok", 0.9, c, 30),
                ("00000", "d", "web", "ok", 0.9, d, 40),
            ]
        ),
        out / "part-00000.parquet",
    )
    pq.write_table(
        phash_rows(
            [
                ("00001", "b", "web", "ok", 0.9, a ^ 0b11, 3),
                ("00001", "e", "web", "ok", 0.9, c, 30),
                ("00001", "e", "synthetic", "ok", 0.2, c, 30),
                ("00001", "f", "web", "corrupt_image", None, None, None),
            ]
        ),
        out / "part-00001.parquet",
    )
    fingerprint = {"itm_threshold": 0.5, "scorers": {"phash": {"options": {"leak_distance": 4}}}}
    storage.commit(str(out), {"fingerprint": fingerprint})

    cfg = validate_config({"world": {}, "assemble": {"drop_duplicates": True, "drop_leaks": True}})
    rule = resolve_rule(cfg, str(out))
    assert rule.duplicate_distance == 4 and rule.score_rules == (ScoreRule("leak_distance", "test_set_leak", 4),)
    assert "not a duplicate (phash within 4 bits" in rule.describe() and "leak_distance > 4" in rule.describe()
    assert KeepRule.from_dict(json.loads(json.dumps(rule.as_dict()))) == rule
    assert "duplicate_distance" not in KeepRule(0.5).as_dict()  # a rule recorded before duplicates existed

    groups_url = str(tmp_path / DUPLICATES)
    dups = duplicate_groups(str(out), 4, groups_url)
    assert dups.images == 5 and dups.rep.tolist() == [0, 1, 2, 0, 1]  # a c d | b e
    groups = pq.read_table(groups_url).to_pylist()
    assert [(g["shard"], g["key"], g["group_shard"], g["group_key"]) for g in groups] == [
        ("00000", "a", "00000", "a"),
        ("00001", "b", "00000", "a"),
        ("00000", "c", "00000", "c"),
        ("00001", "e", "00000", "c"),
    ]
    counts = assemble_rows(str(out), rule, str(tmp_path / "kept"), duplicates=dups)
    assert counts["dropped"] == {
        "web": {"bad_input": 2, "duplicate": 2},  # b (a duplicate before a leak), e; c's empty text, f
        "synthetic": {"duplicate": 1},  # e's
    }
    kept = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "kept").glob("*.parquet"))])
    assert sorted(zip(kept["key"].to_pylist(), kept["source"].to_pylist())) == [
        ("a", "synthetic"),
        ("a", "web"),
        ("c", "synthetic"),
        ("d", "web"),
    ]
    # leaks alone: b goes as a leak; without a phash scorer there is no leak rule to apply
    only_leaks = resolve_rule(validate_config({"world": {}, "assemble": {"drop_leaks": True}}), str(out))
    assert assemble_rows(str(out), only_leaks)["dropped"]["web"] == {"bad_input": 2, "test_set_leak": 1}
    storage.remove(str(out / "_COMMITTED"))
    storage.commit(str(out), {"fingerprint": {"itm_threshold": 0.5}})
    with pytest.raises(AssembleError, match="no phash scorer"):
        resolve_rule(validate_config({"world": {}, "assemble": {"drop_leaks": True}}), str(out))
