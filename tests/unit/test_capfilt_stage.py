"""The CapFilt stage's pure parts, without Ray: keep decisions and statuses, unit tracking, staging and publication, the plan,
and the fixed-shape model calls that make captions and scores independent of batch composition."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from capfilt_settings import make_settings

from blip_core import BlipConfig, BlipModel, BlipTokenizer
from pipelines import capfilt as C
from pipelines.capfilt.actors import CaptionActor, ScoreActor
from pipelines.capfilt.commit import (
    SUMMARY_KEYS,
    commit_unit,
    done_units,
    load_or_create_plan,
    make_units,
    read_done,
    write_unit,
)
from pipelines.capfilt.decode import text_status
from pipelines.capfilt.fragments import first_of_each, shard_counts, write_fragments
from pipelines.capfilt.rows import SHARD_END, SHARD_READ_COLUMN, UNIT_COLUMN, build_rows
from pipelines.capfilt.tracker import UnitTracker

K = 2


def settings(tmp_path: Path | None = None, scorers: list | None = None, **over) -> C.Settings:
    return make_settings(str(tmp_path or "/x"), num_samples=K, scorers=scorers, **over)


def scored(b: dict, itm: np.ndarray, itc: np.ndarray, **more: np.ndarray) -> dict:
    """The batch as the filter leaves it: ``<column>__j`` scores of text j."""
    for name, values in {"itm_score": itm, "itc_score": itc, **more}.items():
        for j in range(values.shape[1]):
            b[f"{name}__{j}"] = values[:, j]
    return b


def batch(n: int, **cols) -> dict:
    b = {
        UNIT_COLUMN: np.zeros(n, np.int32),
        SHARD_READ_COLUMN: np.full(n, -1, np.int32),
        "shard": np.array(["00000"] * n, dtype=object),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "url": np.array([None] * n, dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "text": np.array([f"web {i}" for i in range(n)], dtype=object),
        "text_length": np.full(n, 5, np.int32),
        "text_status": np.array(["ok"] * n, dtype=object),
        "image_status": np.array(["ok"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }
    for j in range(K):
        b[f"syn_{j}"] = np.array([f"syn {i}.{j}" for i in range(n)], dtype=object)
    b.update(cols)
    return b


# ------------------------------------------------------------------------------------------- decisions
def test_keep_is_the_threshold_and_the_top_k_and_every_drop_says_why():
    b = batch(
        3,
        image_status=np.array(["ok", "ok", "corrupt_image"], dtype=object),
        text_status=np.array(["ok", "empty_text", "ok"], dtype=object),
        error=np.array([None, None, "cannot decode"], dtype=object),
    )
    b["syn_1"][1] = ""
    itm = np.array([[0.9, 0.7, 0.8], [0.1, 0.6, 0.9], [np.nan] * 3], dtype=np.float32)
    itc = np.full((3, 3), 0.2, dtype=np.float32)
    rows = build_rows(scored(b, itm, itc), settings(keep_top_k_synthetic=1)).to_pylist()
    got = {(r["key"], r["source"], r["candidate"]): r for r in rows}
    assert len(rows) == 2 * (1 + K) + 1  # the corrupt image has its web row only
    assert got[("k0", "web", None)]["keep"] and got[("k0", "web", None)]["drop_reason"] is None
    # k0: both candidates pass; top-1 keeps the better (0.8, candidate 1)
    assert [got[("k0", "synthetic", j)]["keep"] for j in range(K)] == [False, True]
    assert got[("k0", "synthetic", 0)]["drop_reason"] == "not_top_k"
    # k1: empty web text is not scored; candidate 1 decoded to nothing
    web1 = got[("k1", "web", None)]
    assert (web1["status"], web1["itm_score"], web1["keep"], web1["drop_reason"]) == (
        "empty_text",
        None,
        False,
        "bad_input",
    )
    assert got[("k1", "synthetic", 0)]["keep"] and got[("k1", "synthetic", 1)]["status"] == "empty_text"
    bad = got[("k2", "web", None)]
    assert (bad["status"], bad["error"], bad["keep"], bad["itm_score"]) == (
        "corrupt_image",
        "cannot decode",
        False,
        None,
    )
    assert all(r["seed"] is None for r in rows if r["source"] == "web")
    assert got[("k0", "synthetic", 1)]["seed"] == 0 and got[("k1", "synthetic", 0)]["seed"] == 1


def test_without_top_k_every_candidate_above_the_threshold_is_kept_and_at_the_threshold_is_not():
    b = batch(1)
    itm = np.array([[0.5, 0.51, 0.5]], dtype=np.float32)
    rows = build_rows(scored(b, itm, itm), settings()).to_pylist()
    assert [r["keep"] for r in rows] == [False, True, False]
    assert [r["drop_reason"] for r in rows] == ["itm_below_threshold", None, "itm_below_threshold"]


def test_texts_are_checked_before_any_model_sees_them():
    assert text_status("", 10) == "empty_text"
    assert text_status(" \n\t", 10) == "empty_text"
    assert text_status("x" * 11, 10) == "text_too_long"
    assert text_status("a red circle", 20) == "ok"


# ---------------------------------------------------------------------------------------- units, commits
def test_units_are_named_after_their_shards():
    urls = [f"/r/ingest/web/{i:05d}.tar" for i in range(5)]
    assert [u.file for u in make_units(urls, 1)][:2] == ["part-00000.parquet", "part-00001.parquet"]
    units = make_units(urls, 2)
    assert [(u.name, len(u.shards)) for u in units] == [
        ("part-00000_00001", 2),
        ("part-00002_00003", 2),
        ("part-00004", 1),
    ]


def _rows(unit: int, keys: list[str], shard: str = "00000", **cols) -> pa.Table:
    return build_rows(_scored_batch(unit, keys, shard, **cols), settings())


def _scored_batch(unit: int, keys: list[str], shard: str = "00000", **cols) -> dict:
    n = len(keys)
    b = batch(n, key=np.array(keys, dtype=object), shard=np.array([shard] * n, dtype=object), **cols)
    b[UNIT_COLUMN] = np.full(n, unit, np.int32)
    z = np.full((n, 1 + K), 0.9, dtype=np.float32)
    return scored(b, z, z)


def _end(unit: int, shard: str, read: int, error: str | None = None) -> dict:
    """The reader's end row of a shard (decode.py), as the filter sees it."""
    return _scored_batch(
        unit,
        [f"__end_of_{shard}__"],
        shard,
        image_status=np.array([SHARD_END], dtype=object),
        error=np.array([error], dtype=object),
        **{SHARD_READ_COLUMN: np.array([read], np.int32)},
    )


def _cat(*batches: dict) -> dict:
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}


def test_a_unit_is_complete_when_every_sample_of_its_shards_is_counted_in_any_order():
    units = make_units([f"/r/{i:05d}.tar" for i in range(4)], 2)  # units 0: 00000+00001, 1: 00002+00003
    tracker = UnitTracker(units)
    assert tracker.add(shard_counts(_scored_batch(0, ["a", "b"], "00000"))) == []
    # the end row of 00000 (3 samples) arrives before its last sample; 00001 is empty
    assert tracker.add(shard_counts(_cat(_end(0, "00000", 3), _end(0, "00001", 0), _end(1, "00002", 0)))) == []
    assert tracker.add(shard_counts(_scored_batch(0, ["c"], "00000"))) == [units[0]]
    assert tracker.take(units[0]) == {"00000": {"read": 3, "error": None}, "00001": {"read": 0, "error": None}}
    # a retried batch of a committed unit changes nothing
    assert tracker.add(shard_counts(_scored_batch(0, ["c"], "00000"))) == []
    assert tracker.incomplete() == {"part-00002_00003": ["00003"]}
    broken = _end(1, "00003", 1, "after 1 samples: ReadError")
    assert tracker.add(shard_counts(_cat(_scored_batch(1, ["d"], "00003"), broken))) == [units[1]]
    assert tracker.take(units[1])["00003"] == {"read": 1, "error": "after 1 samples: ReadError"}
    assert tracker.incomplete() == {}


def test_a_retried_batch_stages_its_rows_again_and_the_commit_keeps_one_of_each(tmp_path):
    out = str(tmp_path / "capfilt")
    s = settings()
    unit = make_units(["/r/00000.tar", "/r/00001.tar"], 2)[0]
    first = _cat(_scored_batch(0, ["b", "a"], "00000"), _end(0, "00000", 3))
    write_fragments(out, build_rows(first, s))
    write_fragments(out, build_rows(first, s))  # the same batch, retried after its actor died
    shards = {"00000": {"read": 3, "error": None}, "00001": {"read": 0, "error": "after 0 samples: ReadError"}}
    with pytest.raises(C.CapfiltError, match="found, read"):
        commit_unit(out, unit, s, 1024, shards)  # key "c" of 00000 is not staged yet: nothing is published
    assert read_done(out, unit, s.fingerprint()) is None
    write_fragments(out, build_rows(_scored_batch(0, ["c"], "00000"), s))
    marker = commit_unit(out, unit, s, 1024, shards)
    assert (marker["images"], marker["rows"]) == (3, 3 * (1 + K))
    assert marker["shard_errors"] == [{"shard": "00001", "error": "after 0 samples: ReadError"}]
    table = pa.parquet.read_table(tmp_path / "capfilt" / unit.file)
    assert table["key"].to_pylist() == [k for k in "abc" for _ in range(1 + K)]
    assert not (tmp_path / "capfilt" / "_staging" / "00000000").exists()
    assert done_units(out, [unit], s.fingerprint()) == {0: {k: marker[k] for k in SUMMARY_KEYS}}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_the_dedupe_keeps_the_first_row_of_each_id_in_any_fragment_order(order):
    """A retried batch's fragment may be read before or after the others: whatever the order, every id stays
    once, with its own row, in the order of first appearance."""

    def frag(keys, tag):
        n = len(keys)
        return pa.table({"shard": ["00000"] * n, "key": keys, "source": ["web"] * n,
                         "candidate": [0] * n, "tag": [f"{k}{tag}" for k in keys]})  # fmt: skip

    frags = [frag(["b", "a"], 1), frag(["b", "a"], 2), frag(["c"], 3)]
    table = pa.concat_tables([frags[i] for i in order])
    kept = first_of_each(table)
    first_seen = list(dict.fromkeys(table["key"].to_pylist()))
    assert kept["key"].to_pylist() == first_seen
    tags = dict(zip(kept["key"].to_pylist(), kept["tag"].to_pylist()))
    assert tags["c"] == "c3"
    assert tags["a"] == ("a1" if order.index(0) < order.index(1) else "a2")


def test_a_unit_is_done_only_with_its_marker_its_file_and_the_same_fingerprint(tmp_path):
    out = str(tmp_path / "capfilt")
    s = settings()
    unit = make_units(["/r/00000.tar"], 1)[0]
    marker = write_unit(out, unit, _rows(0, ["b", "a"]), s, 1024, [])
    assert marker["rows"] == 2 * (1 + K) and marker["images"] == 2
    assert read_done(out, unit, s.fingerprint()) == marker
    assert not list((tmp_path / "capfilt").rglob(".*"))  # no temporary file left behind
    table = pa.parquet.read_table(tmp_path / "capfilt" / unit.file)
    assert table["key"].to_pylist()[: 1 + K] == ["a"] * (1 + K)  # sorted by key, web first
    assert table["candidate"].to_pylist()[: 1 + K] == [None, 0, 1]
    assert read_done(out, unit, {**s.fingerprint(), "itm_threshold": 0.1}) is None
    with open(tmp_path / "capfilt" / unit.file, "ab") as f:
        f.write(b"x")  # not the file the marker describes
    assert read_done(out, unit, s.fingerprint()) is None
    (tmp_path / "capfilt" / "_done" / f"{unit.name}.json").write_text("{trunc")
    assert read_done(out, unit, s.fingerprint()) is None


def test_the_plan_of_the_first_run_binds_the_reruns(tmp_path):
    out = str(tmp_path / "capfilt")
    shards = [f"/r/ingest/web/{i:05d}.tar" for i in range(3)]
    plan = load_or_create_plan(out, shards, settings(), 2)
    again = load_or_create_plan(out, shards, settings(), 1)  # the stored plan wins over a new unit size
    assert [u.shards for u in again.units] == [u.shards for u in plan.units]
    with pytest.raises(C.CapfiltError, match="itm_threshold"):
        load_or_create_plan(out, shards, settings(itm_threshold=0.7), 2)
    with pytest.raises(C.CapfiltError, match="other shards"):
        load_or_create_plan(out, shards[:2], settings(), 2)
    assert json.loads((tmp_path / "capfilt" / "_plan.json").read_text())["fingerprint"] == settings().fingerprint()


# ----------------------------------------------------------------------------------- fixed-shape models
CORPUS = [
    f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left", "top")
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    tok = BlipTokenizer.train(CORPUS, vocab_size=80)
    cfg = BlipConfig.preset(
        "tiny",
        vision={"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        text={
            "width": 32,
            "depth": 1,
            "heads": 2,
            "intermediate_size": 64,
            "max_positions": 48,
            "vocab_size": tok.vocab_size,
            **tok.special_ids(),
        },
        embed_dim=16,
        queue_size=8,
    )
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    BlipModel(cfg, tok).save_pretrained(d / "cap")
    torch.manual_seed(1)
    BlipModel(cfg, tok).save_pretrained(d / "filt")
    return d


def test_a_row_gets_the_same_captions_and_scores_whatever_its_neighbours(checkpoints):
    s = settings(checkpoints)
    cap = CaptionActor(s.captioner, s, {"torch_threads": 1})
    filt = ScoreActor(s.filter, s, {"torch_threads": 1}, emit_rows=True)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)

    def run(idx: list[int]) -> dict:
        b = batch(
            len(idx),
            key=np.array([f"k{i}" for i in idx], dtype=object),
            seed=np.array(idx, dtype=np.int64),
            text=np.array([CORPUS[i] for i in idx], dtype=object),
        )
        b["px_blip_32"] = px[idx]
        rows = filt(cap(b)).to_pylist()
        return {(r["key"], r["candidate"]): (r["text"], r["itm_score"], r["itc_score"]) for r in rows}

    def same(got: dict, want: dict) -> bool:
        """The same texts; scores equal up to float32 rounding (a BLAS kernel may round a row differently by its
        position in the chunk: one ITM score moved 6e-8 when the ViT's position table changed)."""

        def close(a, b) -> bool:
            return a == b or (a is not None and b is not None and abs(a - b) <= 1e-6)

        return got.keys() == want.keys() and all(
            got[k][0] == want[k][0] and all(map(close, got[k][1:], want[k][1:])) for k in want
        )

    alone = {}
    for i in range(7):
        alone.update(run([i]))
    assert same(run(list(range(7))), alone)  # one call of 7 (chunks of 4 + 3 padded) == 7 calls of 1
    assert same(run([6, 2, 4]), {k: v for k, v in alone.items() if k[0] in ("k6", "k2", "k4")})
    assert len({v[0] for k, v in alone.items() if k[1] is not None}) > 1  # real, varied captions
