"""``capfilt caption-filter`` and ``capfilt assemble`` on the tiny world, on a real local Ray, with a trained tiny
captioner and filter and a randomly initialised tiny CLIP: rows and schema, the README's DuckDB queries, the
same rows whatever the actors and batch sizes, a SIGKILL mid-run then a rerun, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from capfilt_helpers import kill_group, link_inputs, processes_with_env, start_capfilt, tiny_clip_checkpoint, wait_for
from integration_helpers import CAPFILT, REPO, TINY

from benchmarks._common import link_models, train_models
from pipelines import storage
from pipelines.capfilt import OUTPUT_SCHEMA, STATUSES, image_seed, run_caption_filter
from pipelines.config import load_config
from pipelines.shards import iter_shard, list_shards, shard_name

pytestmark = pytest.mark.integration

K = 2
ROUND = 1
README = REPO / "README.md"
# Three pools of 2 actors (0.3 CPU each) and a decode task (0.2) fit in the session's 2 CPUs.
POOLS_1x8 = [
    f"capfilt.{p}.{k}" for p in ("captioner_pool", "filter_pool") for k in ("actors=1", "batch_size=8", "num_cpus=0.3")
]
POOLS_2x3 = [
    f"capfilt.{p}.{k}" for p in ("captioner_pool", "filter_pool") for k in ("actors=2", "batch_size=3", "num_cpus=0.3")
]


def settings(clip: tuple[Path, Path] | None = None) -> list[str]:
    """The test's CapFilt settings; with ``clip``, the CLIP score too (its own actor pool: only the reference
    run pays for it; the other runs compare every other column with the reference's)."""
    out = [
        f"capfilt.num_samples={K}",
        "capfilt.keep_top_k_synthetic=1",
        "capfilt.itm_threshold=0.3",
        "capfilt.model_batch_size=8",
        "capfilt.decode_num_cpus=0.2",
    ]
    if clip is not None:
        config_file, weights = clip
        out += [
            "capfilt.scorers.clip.model=capfilt-tiny-clip",
            f"capfilt.scorers.clip.checkpoint={weights}",
            f"capfilt.scorers.clip.model_config_file={config_file}",
        ]
        out += [f"capfilt.scorers.clip.pool.{k}" for k in ("actors=1", "batch_size=8", "num_cpus=0.3")]
    return out


def without_clip(table: pa.Table) -> pa.Table:
    return table.drop_columns(["clip_score"])


def read_output(root: str) -> pa.Table:
    files = sorted((Path(root) / f"round={ROUND}" / "capfilt").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]).replace_schema_metadata(None)
    return table.sort_by([("shard", "ascending"), ("key", "ascending"), ("candidate", "ascending", "at_start")])


def key_set(table: pa.Table) -> list[tuple]:
    return list(zip(table["key"].to_pylist(), table["source"].to_pylist(), table["candidate"].to_pylist()))


def readme_sql() -> list[str]:
    """The ```sql blocks of the README's CapFilt section, in order."""
    text = README.read_text()
    section = text[text.index("### Querying with DuckDB") : text.index("### Assemble")]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def models(tiny_world: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    t0 = time.time()
    out = train_models(Path(tiny_world) / "world", tmp_path_factory.mktemp("capfilt-models"))
    print(f"\ntiny captioner + filter trained in {time.time() - t0:.1f}s")
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def quiet_ray(ray_session: str) -> str:
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray_session


def new_root(tiny_world: str, models: dict[str, Path], tmp_path: Path, name: str) -> str:
    root = link_inputs(tiny_world, tmp_path / name)
    link_models(models, root, ROUND)
    return root


@pytest.fixture(scope="module")
def reference(tiny_world, models, clip, quiet_ray, tmp_path_factory) -> dict:
    """An uninterrupted in-process run with one actor per pool and Ray batches of 8."""
    root = new_root(tiny_world, models, tmp_path_factory.mktemp("capfilt-ref"), "run")
    overrides = settings(clip) + POOLS_1x8
    cfg = load_config(TINY, overrides)
    t0 = time.time()
    summary = run_caption_filter(cfg, root, ROUND)
    seconds = time.time() - t0
    print(f"\nreference caption-filter run: {summary['images']} images in {seconds:.1f}s (Ray already up)")
    return {"root": root, "summary": summary, "table": read_output(root), "seconds": seconds, "overrides": overrides}


# ------------------------------------------------------------------------------------------------ rows
def test_rows_schema_decisions_and_the_readme_queries(reference, tiny_world, models):
    import duckdb

    root, table = reference["root"], reference["table"]
    out = Path(root) / f"round={ROUND}" / "capfilt"
    assert storage.is_committed(str(out))
    shards = list_shards(storage.RunRoot(tiny_world).ingest("web"))
    images = {(shard_name(u), s.key): s for u in shards for s in iter_shard(u)}
    assert len(images) == 300
    # One web row and K synthetic rows per decodable image, unique per (key, source, candidate).
    assert table.num_rows == len(images) * (1 + K)
    keys = key_set(table)
    assert len(set(keys)) == len(keys)
    assert set(keys) == {(k, "web", None) for _, k in images} | {
        (k, "synthetic", j) for _, k in images for j in range(K)
    }
    assert {(s, k) for s, k in zip(table["shard"].to_pylist(), table["key"].to_pylist())} == set(images)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA

    rows = table.to_pylist()
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["key"], []).append(r)
        assert r["status"] in STATUSES and "round" not in r  # the directory round=K names it
        if r["status"] == "ok":
            assert r["itm_score"] is not None and 0.0 <= r["itm_score"] <= 1.0
            assert r["itc_score"] is not None and -1.0001 <= r["itc_score"] <= 1.0001
            assert r["clip_score"] is not None and -1.0001 <= r["clip_score"] <= 1.0001
        else:
            assert r["itm_score"] is None and not r["keep"] and r["drop_reason"] == "bad_input"
    for (_, key), sample in images.items():
        web, *syn = sorted(by_image[key], key=lambda r: -1 if r["candidate"] is None else r["candidate"])
        assert web["source"] == "web" and web["text"] == sample.text and web["url"] == sample.meta["url"]
        assert web["seed"] is None and web["text_length"] == len(sample.text)
        assert web["keep"] == (web["status"] == "ok" and web["itm_score"] > 0.3)
        assert [s["candidate"] for s in syn] == list(range(K))
        assert all(s["seed"] == image_seed(0, key) for s in syn)
        passing = [s for s in syn if s["status"] == "ok" and s["itm_score"] > 0.3]
        best = min(passing, key=lambda s: (-s["itm_score"], s["candidate"])) if passing else None
        for s in syn:
            assert s["keep"] == (s is best)
            assert s["drop_reason"] == (
                None
                if s is best
                else "not_top_k"
                if s in passing
                else "itm_below_threshold"
                if s["status"] == "ok"
                else "bad_input"
            )
    ids = {r["captioner_id"] for r in rows}, {r["filter_id"] for r in rows}
    from blip_core import checkpoint_id

    assert ids == ({checkpoint_id(models["captioner"] / "model")}, {checkpoint_id(models["filter"] / "model")})
    kept = pc.sum(table["keep"]).as_py()
    assert 0 < kept < table.num_rows, "the test's threshold should keep some texts and drop others"

    # Files: zstd, sorted, metadata with the settings and versions, the unit's shards.
    files = sorted(out.glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{shard_name(u)}.parquet" for u in shards]
    for f in files:
        pf = pq.ParquetFile(f)
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        meta = pf.schema_arrow.metadata
        s = json.loads(meta[b"capfilt.settings"])
        assert (s["itm_threshold"], s["num_samples"], s["method"], s["top_p"], s["clip_model"]) == (
            0.3,
            K,
            "nucleus",
            0.9,
            "capfilt-tiny-clip",
        )
        assert json.loads(meta[b"capfilt.versions"])["torch"]
        assert meta[b"capfilt.schema_version"] == b"2"
        t = pf.read()
        assert t.equals(
            t.sort_by([("shard", "ascending"), ("key", "ascending"), ("candidate", "ascending", "at_start")])
        )

    # The README's queries run as written (path replaced), and the kept-share one agrees with the rows.
    con = duckdb.connect()
    results = []
    for sql in readme_sql():
        results.append(con.execute(sql.replace("runs/demo/round=1/capfilt", str(out))).fetchall())
    assert len(results) >= 7 and all(r for r in results[1:]), "every README query returns rows"
    share = {src: (texts, kept) for src, texts, _, kept, _ in results[1]}
    for src in ("web", "synthetic"):
        t = table.filter(pc.equal(table["source"], src))
        assert share[src] == (t.num_rows, pc.sum(t["keep"]).as_py())

    # A rerun of the committed stage does nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cfg = load_config(TINY, reference["overrides"])
    assert run_caption_filter(cfg, root, ROUND)["rows"] == table.num_rows
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_assemble_writes_the_manifest_of_human_and_kept_texts(reference):
    from pipelines.assemble import run_assemble
    from pipelines.bootstrapped import bootstrapped_sources, read_manifest

    root, table = reference["root"], reference["table"]
    cfg = load_config(TINY)
    summary = run_assemble(cfg, root, ROUND)
    dataset = Path(root) / f"round={ROUND}" / "dataset"
    assert storage.is_committed(str(dataset))
    assert json.loads((dataset / "summary.json").read_text()) == summary
    kept = table.filter(pc.field("keep"))
    for src in ("web", "synthetic"):
        assert summary[src] == {
            "kept": kept.filter(pc.equal(kept["source"], src)).num_rows,
            "total": table.filter(pc.equal(table["source"], src)).num_rows,
        }
    assert summary["human"] == {"pairs": 180, "images": 60}
    assert summary["total_pairs"] == 180 + kept.num_rows
    m = read_manifest(str(dataset))
    assert (m.round, m.capfilt, m.shards) == (
        ROUND,
        str(dataset.parent / "capfilt"),
        str(Path(root) / "ingest" / "web"),
    )
    # The manifest streams: every kept text comes back once, with its image bytes.
    human, boot = bootstrapped_sources(str(dataset))
    samples = [s for u in boot.units() for s in boot.read(u)]
    assert sorted((s.key, s.text, s.source) for s in samples) == sorted(
        zip(kept["key"].to_pylist(), kept["text"].to_pylist(), kept["source"].to_pylist())
    )
    assert all(s.image for s in samples)
    assert sum(u.size for u in human.units()) == 180


def test_assemble_with_a_stricter_itm_threshold_keeps_fewer_rows_and_records_its_rule(reference, tmp_path):
    from pipelines.assemble import AssembleError, run_assemble
    from pipelines.bootstrapped import bootstrapped_sources, read_manifest
    from pipelines.keep_rule import capfilt_rule, decide_table

    table = reference["table"]
    capfilt = Path(reference["root"]) / f"round={ROUND}" / "capfilt"
    fingerprint = storage.read_commit(str(capfilt))["fingerprint"]
    # CapFilt's rule as the stage recorded it, applied again to the stored scores, gives back its decisions
    keep, reason = decide_table(table, capfilt_rule(fingerprint))
    assert keep.tolist() == table["keep"].to_pylist()
    assert reason.tolist() == table["drop_reason"].to_pylist()

    # A root of its own with the reference's inputs and CapFilt output (the reference's dataset is the test above's).
    root = link_inputs(reference["root"], tmp_path / "stricter")
    (Path(root) / f"round={ROUND}").mkdir()
    (Path(root) / f"round={ROUND}" / "capfilt").symlink_to(capfilt, target_is_directory=True)
    kept = table.filter(pc.field("keep"))
    web_scores = kept.filter(pc.equal(kept["source"], "web"))["itm_score"].to_numpy()
    threshold = round(float(np.median(web_scores)), 2)  # stricter than CapFilt's 0.3, and some rows pass it
    assert threshold > 0.3
    cfg = load_config(TINY, [f"assemble.itm_threshold={threshold}"])
    summary = run_assemble(cfg, root, ROUND)

    # What it keeps: CapFilt's kept rows above the new threshold (CapFilt's top-1 synthetic per image stays).
    expected = kept.filter(pc.greater(kept["itm_score"], pa.scalar(threshold, pa.float32())))
    for src in ("web", "synthetic"):
        n = expected.filter(pc.equal(expected["source"], src)).num_rows
        assert summary[src]["kept"] == n <= kept.filter(pc.equal(kept["source"], src)).num_rows
        assert summary[src]["total"] == table.filter(pc.equal(table["source"], src)).num_rows
    assert 0 < summary["bootstrapped"]["pairs"] == expected.num_rows < kept.num_rows
    assert summary["total_pairs"] == 180 + expected.num_rows

    # The manifest records the rule, the CapFilt run it was applied to, and the counts; the stream reads its rows.
    dataset = Path(root) / f"round={ROUND}" / "dataset"
    m = read_manifest(str(dataset))
    assert m.capfilt == str(dataset / "kept") and m.keep["capfilt"] == str(Path(root) / f"round={ROUND}" / "capfilt")
    assert m.keep["rule"]["itm_threshold"] == threshold and m.keep["rule"]["top_k_synthetic"] == 1
    assert m.keep["config"]["itm_threshold"] == threshold and m.keep["capfilt_fingerprint"] == fingerprint
    assert m.keep["counts"]["web"]["kept"] == summary["web"]["kept"]
    assert m.keep["counts"]["web"]["dropped"]["itm_below_threshold"] > 0
    assert f"itm_score > {threshold:g}" in m.keep["description"] == summary["keep_rule"]
    _, boot = bootstrapped_sources(str(dataset))
    samples = [s for u in boot.units() for s in boot.read(u)]
    assert sorted((s.key, s.text, s.source) for s in samples) == sorted(
        zip(expected["key"].to_pylist(), expected["text"].to_pylist(), expected["source"].to_pylist())
    )
    assert all(s.image for s in samples)

    # A rerun with the same rule does nothing; with another, it refuses to re-decide a committed dataset.
    assert run_assemble(cfg, root, ROUND) == summary
    with pytest.raises(AssembleError, match="committed with the keep rule"):
        run_assemble(load_config(TINY), root, ROUND)


# ----------------------------------------------------------------------------------------- determinism
def test_two_actors_with_batches_of_3_give_the_rows_of_one_actor_with_batches_of_8(
    reference, tiny_world, models, tmp_path
):
    root = new_root(tiny_world, models, tmp_path, "run")
    cfg = load_config(TINY, settings() + POOLS_2x3)
    t0 = time.time()
    run_caption_filter(cfg, root, ROUND)
    print(f"\n2 actors x batch 3: {time.time() - t0:.1f}s")
    other = without_clip(read_output(root))
    ref = without_clip(reference["table"])
    assert other.num_rows == ref.num_rows
    for name in ref.column_names:  # column by column, for a readable failure; floats compared bit for bit
        assert other[name].equals(ref[name]), name


# --------------------------------------------------------------------------------------------- kill
def test_sigkill_mid_run_then_rerun_gives_exactly_the_rows_of_an_uninterrupted_run(
    reference, tiny_world, models, tmp_path
):
    root = new_root(tiny_world, models, tmp_path, "run")
    out = Path(root) / f"round={ROUND}" / "capfilt"
    marker = f"CAPFILT_TEST_RUN={uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="cfk", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {"CAPFILT_TEST_RUN": marker.split("=", 1)[1], "RAY_TMPDIR": ray_tmp}
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, not the session's
    args = ["caption-filter", "--config", TINY, "--root", root, "--round", str(ROUND)]
    # Ray batches of 4 images (each padded to the model's fixed batch of 8) spread the units out in time, so
    # the kill lands between the first and the last commit; the rows do not depend on it.
    for s in settings() + POOLS_1x8 + ["capfilt.captioner_pool.batch_size=4"]:
        args += ["--set", s]
    done = lambda: sorted((out / "_done").glob("*.json")) if (out / "_done").exists() else []  # noqa: E731

    proc = start_capfilt(*args, env={**base, **env}, log_path=tmp_path / "killed.log")
    try:
        wait_for(lambda: len(done()) >= 1, timeout=300, what="the first committed unit", proc=proc, poll=0.02)
    finally:
        kill_group(proc)
    n_done = len(done())
    total = len(list_shards(str(Path(tiny_world) / "ingest" / "web")))
    log_text = (tmp_path / "killed.log").read_text(errors="replace")
    assert 1 <= n_done < total, f"the kill should land mid-run ({n_done}/{total} units done):\n{log_text[-2000:]}"
    assert not storage.is_committed(str(out))
    wait_for(lambda: not processes_with_env(marker), timeout=30, what="the killed run's processes to exit")
    committed = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in out.glob("*.parquet")
        if (out / "_done" / f"{p.stem}.json").exists()
    }
    assert len(committed) == n_done

    proc = subprocess.run([CAPFILT, *args], capture_output=True, text=True, cwd=REPO, env={**base, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{n_done} already committed, {total - n_done} to do" in proc.stderr
    assert storage.is_committed(str(out))
    # Committed units were not recomputed; the final rows are the uninterrupted run's.
    assert {name: (out / name).stat().st_ino for name in committed} == {n: v[0] for n, v in committed.items()}
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == {n: v[1] for n, v in committed.items()}
    final = read_output(root)
    keys = key_set(final)
    assert len(keys) == len(set(keys)) == reference["table"].num_rows
    assert without_clip(final).equals(without_clip(reference["table"]))
    assert not (out / "_tmp").exists() or not list((out / "_tmp").iterdir())
    wait_for(lambda: not processes_with_env(marker), timeout=30, what="the rerun's processes to exit")


# --------------------------------------------------------------------------------------------- bad input
def _write_tar(path: Path, samples: list[dict], truncate_at: float | None = None) -> None:
    """A webdataset shard: per sample ``<key>.jpg`` (unless None), ``<key>.txt``, ``<key>.json``."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            members = [("json", json.dumps(s["meta"]).encode()), ("txt", s["text"].encode("utf-8"))]
            if s["image"] is not None:
                members.insert(0, ("jpg", s["image"]))
            for ext, data in members:
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * truncate_at)] if truncate_at else data)


def test_bad_images_and_texts_get_a_status_and_never_cost_their_neighbours(
    reference, tiny_world, models, quiet_ray, tmp_path
):
    root = str(tmp_path / "run")
    link_models(models, root, ROUND)
    ingest = Path(root) / "ingest" / "web"
    ingest.mkdir(parents=True)
    src = list_shards(str(Path(tiny_world) / "ingest" / "web"))
    shard0 = [{"key": s.key, "image": s.image, "text": s.text, "meta": s.meta} for s in iter_shard(src[0])]
    keys = [s["key"] for s in shard0]
    bad = {
        keys[3]: "corrupt_image",
        keys[5]: "corrupt_image",
        keys[11]: "missing_image",
        keys[7]: "empty_text",
        keys[9]: "empty_text",
        keys[13]: "text_too_long",
    }
    shard0[3]["image"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    shard0[5]["image"] = shard0[5]["image"][: len(shard0[5]["image"]) // 3]  # a truncated JPEG
    shard0[11]["image"] = None
    shard0[7]["text"] = ""
    shard0[9]["text"] = "  \n\t "
    shard0[13]["text"] = "a very long caption " * 200
    _write_tar(ingest / f"{shard_name(src[0])}.tar", shard0)
    shard1 = [{"key": s.key, "image": s.image, "text": s.text, "meta": s.meta} for s in iter_shard(src[1])]
    _write_tar(ingest / f"{shard_name(src[1])}.tar", shard1, truncate_at=0.6)  # a broken shard
    storage.commit(str(ingest))

    cfg = load_config(TINY, settings() + POOLS_1x8)
    summary = run_caption_filter(cfg, root, ROUND)
    got = without_clip(read_output(root))
    ref = without_clip(reference["table"])
    rows = got.to_pylist()
    by_key: dict[str, list[dict]] = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
    for key, status in bad.items():
        web = next(r for r in by_key[key] if r["source"] == "web")
        assert web["status"] == status, key
        assert web["itm_score"] is None and web["itc_score"] is None
        assert not web["keep"] and web["drop_reason"] == "bad_input"
        syn = [r for r in by_key[key] if r["source"] == "synthetic"]
        if status.endswith("_image"):
            assert syn == [] and web["error"], key  # no pixels, no captions; the reason is recorded
        else:  # the image is fine: it is captioned and its captions scored as in the reference run
            want = ref.filter(pc.and_(pc.equal(ref["key"], key), pc.equal(ref["source"], "synthetic"))).to_pylist()
            assert syn == want, key
    assert next(r for r in by_key[keys[13]] if r["source"] == "web")["text_length"] == len(shard0[13]["text"])
    # Neighbours: every other row of shard 0 is the reference's, to the bit.
    good = [k for k in keys if k not in bad]
    mine = got.filter(pc.is_in(got["key"], pa.array(good)))
    theirs = ref.filter(pc.is_in(ref["key"], pa.array(good)))
    assert mine.num_rows == len(good) * (1 + K) and mine.equals(theirs)
    # The broken shard: the rows before the break are there and right; the break is reported, not fatal.
    read1 = got.filter(pc.equal(got["shard"], shard_name(src[1])))
    read_keys = sorted(set(read1["key"].to_pylist()))
    assert 0 < len(read_keys) < len(shard1)
    assert read1.equals(ref.filter(pc.is_in(ref["key"], pa.array(read_keys))))
    assert [e["shard"] for e in summary["shard_errors"]] == [shard_name(src[1])]
    assert summary["by_status"]["corrupt_image"] == 2 and summary["by_status"]["missing_image"] == 1
    assert summary["by_status"]["empty_text"] == 2 and summary["by_status"]["text_too_long"] == 1


# --------------------------------------------------------------------------------- the extension seams
PLUGIN = ["capfilt.plugins=[toy_plugins]"]


def test_a_scorer_registered_by_a_plugin_adds_its_column_and_its_rule(reference, tiny_world, models, tmp_path):
    """toy_plugins' brightness scorer, named only in the config: its column comes last in the Parquet, its values
    are each image's mean colour, and its keep_above drops exactly the texts of darker images."""
    from toy_plugins import PIXELS

    from blip_core.transforms import decode_image
    from pipelines.capfilt.pixels import pil_transform

    threshold = 0.6
    root = new_root(tiny_world, models, tmp_path, "brightness")
    cfg = load_config(
        TINY,
        settings()
        + POOLS_1x8
        + PLUGIN
        + [
            f"capfilt.scorers.brightness.keep_above={threshold}",
            *[f"capfilt.scorers.brightness.pool.{k}" for k in ("actors=1", "batch_size=8", "num_cpus=0.3")],
        ],
    )
    summary = run_caption_filter(cfg, root, ROUND)
    assert read_output(root).column_names == OUTPUT_SCHEMA.names + ["brightness"]
    got = without_clip(read_output(root))
    assert "brightness > 0.6" in summary["settings"]["keep_rule"]
    ref = without_clip(reference["table"])
    assert got.drop_columns(["brightness", "keep", "drop_reason"]).equals(ref.drop_columns(["keep", "drop_reason"]))

    resize = pil_transform(PIXELS)
    images = {s.key: s.image for u in list_shards(storage.RunRoot(tiny_world).ingest("web")) for s in iter_shard(u)}
    dark = bright = 0
    for r, want in zip(got.to_pylist(), ref.to_pylist()):
        if r["status"] != "ok":
            assert r["brightness"] is None and r["drop_reason"] == want["drop_reason"]
            continue
        expected = float(np.asarray(resize(decode_image(images[r["key"]])), dtype=np.float64).mean() / 255)
        assert abs(r["brightness"] - expected) < 1e-5
        if r["brightness"] > threshold:
            bright += 1
            assert (r["keep"], r["drop_reason"]) == (want["keep"], want["drop_reason"])
        else:
            dark += 1
            assert not r["keep"]
            assert r["drop_reason"] == (
                want["drop_reason"] if want["drop_reason"] == "itm_below_threshold" else "brightness_rule"
            )
    assert dark > 30 and bright > 30, (dark, bright)  # the rule cut the set, not all or nothing


def test_a_captioner_registered_by_a_plugin_writes_the_synthetic_texts(reference, tiny_world, models, tmp_path):
    """toy_plugins' colour captioner replaces BLIP's by config alone; the filter scores its captions."""
    from toy_plugins import PIXELS, dominant_colour

    from blip_core.transforms import decode_image
    from pipelines.capfilt.pixels import pil_transform

    root = new_root(tiny_world, models, tmp_path, "colour")
    cfg = load_config(TINY, settings() + POOLS_1x8 + PLUGIN + ["capfilt.captioner_kind=toy_colour"])
    summary = run_caption_filter(cfg, root, ROUND)
    got = without_clip(read_output(root))
    assert summary["settings"]["captioner_kind"] == "toy_colour"
    assert set(got["captioner_id"].to_pylist()) == {"toy-colour-v1"}
    ref = without_clip(reference["table"])
    web = pc.equal(got["source"], "web")
    got_web, ref_web = got.filter(web), ref.filter(pc.equal(ref["source"], "web"))
    scores = ["itm_score", "itc_score", "captioner_id"]
    assert got_web.drop_columns(scores).equals(ref_web.drop_columns(scores))
    for col in ("itm_score", "itc_score"):  # the same image and text; other neighbours in the chunk (last bits)
        a, b = (np.array(t[col].to_pylist(), dtype=float) for t in (got_web, ref_web))
        assert np.allclose(a, b, atol=1e-5, equal_nan=True)
    resize = pil_transform(PIXELS)
    images = {s.key: s.image for u in list_shards(storage.RunRoot(tiny_world).ingest("web")) for s in iter_shard(u)}
    synthetic = got.filter(pc.equal(got["source"], "synthetic")).to_pylist()
    assert len(synthetic) == K * sum(1 for r in got.filter(web).to_pylist() if r["status"] == "ok")
    for r in synthetic:
        colour = dominant_colour(np.asarray(resize(decode_image(images[r["key"]])), dtype=np.float64))
        assert r["text"] == f"a mostly {colour} picture"
        assert r["itm_score"] is not None
    assert len({r["text"] for r in synthetic}) > 1


# ------------------------------------------------------------------------------------------ object stores
def test_units_publish_and_are_recognised_on_s3(s3_root):
    """On an object store a unit's file is written under its final name (an object appears only once its upload
    completes), then its marker; no temporary objects; a rerun recognises the unit, and not a tampered one."""
    import fsspec
    import numpy as np

    out = f"{s3_root}/round=1/capfilt"
    from pipelines.capfilt.commit import load_or_create_plan, read_done, write_unit
    from pipelines.capfilt.rows import UNIT_COLUMN, build_rows
    from tests.unit.capfilt_settings import make_settings

    s = make_settings("", num_samples=1, max_length=20, min_length=5, max_text_chars=100, model_batch_size=8)
    shards = [f"{s3_root}/ingest/web/{i:05d}.tar" for i in range(2)]
    plan = load_or_create_plan(out, shards, s, 1)
    b = {
        UNIT_COLUMN: np.zeros(2, np.int32),
        "shard": np.array(["00000"] * 2, dtype=object),
        "key": np.array(["k1", "k0"], dtype=object),
        "url": np.array([None, None], dtype=object),
        "seed": np.arange(2, dtype=np.int64),
        "text": np.array(["a", "b"], dtype=object),
        "text_length": np.ones(2, np.int32),
        "text_status": np.array(["ok"] * 2, dtype=object),
        "image_status": np.array(["ok"] * 2, dtype=object),
        "error": np.array([None] * 2, dtype=object),
        "syn_0": np.array(["x", "y"], dtype=object),
    }
    for name in ("itm_score", "itc_score"):
        b.update({f"{name}__{j}": np.full(2, 0.7, dtype=np.float32) for j in range(2)})
    marker = write_unit(out, plan.units[0], build_rows(b, s), s, 1024, [])
    assert read_done(out, plan.units[0], plan.fingerprint) == marker
    assert read_done(out, plan.units[1], plan.fingerprint) is None
    fs, path = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))
    assert names == ["_plan.json", "part-00000.json", "part-00000.parquet"]
    with fs.open(f"{path}/part-00000.parquet", "rb") as f:
        assert pq.read_table(f)["key"].to_pylist() == ["k0", "k0", "k1", "k1"]
    fs.pipe(f"{path}/part-00000.parquet", b"half an upload")  # a file that is not the one the marker describes
    assert read_done(out, plan.units[0], plan.fingerprint) is None
