"""``capfilt assemble --round K``: round K's bootstrapped dataset, the training set of round K+1.

The dataset is the human set plus the web texts and the synthetic texts kept, each joined back to its image by
(shard, key). Which texts are kept is decided here, cheaply: by default CapFilt's own ``keep`` column; with the
config's ``assemble:`` section, a keep rule of its own (``pipelines/keep_rule.py``: ITM / ITC / CLIP thresholds,
top-k synthetic texts per image) applied to the scores the CapFilt Parquet stores, so a new rule costs one read of
the Parquet and never a model run.

The stage writes the manifest of ``pipelines/bootstrapped.py`` (``<root>/round=K/dataset/manifest.json``, through
its ``write_manifest``) naming the human annotations, the ingest shards and the rows to train on, plus
``summary.json`` with the counts by source, and commits the directory. With CapFilt's own rule nothing is copied:
the manifest names the committed CapFilt Parquet, whose ``keep`` column the reader filters on. With a rule of its
own, assemble writes the rows it keeps under ``dataset/kept/`` (one file per CapFilt file, the columns the stream
reads, ``keep`` always true), the manifest names those, and its ``keep`` section records the rule, the CapFilt
run's fingerprint it was applied to and the counts. Readers (``bootstrapped_stream``) do the join shard by shard,
by predicate pushdown on the Parquet's ``shard`` and ``keep`` columns, either way.

One pass over the Parquet, a file at a time (an image's rows are all in one file: a commit unit is whole shards),
so the driver holds one file's columns and counters of O(shards). The join is checked: kept rows that name a shard
missing from the ingest directory (``orphans``, which the reader would skip) make the stage fail.

A committed dataset is never re-decided: a rerun with the rule it was committed with does nothing, a rerun with
another rule fails and says so (round K+1 may have trained on it); remove the directory to decide again.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .bootstrapped import parquet_files, write_manifest
from .capfilt import capfilt_dir
from .config import RunConfig
from .dedup import Duplicates, find_duplicates, group_rows
from .errors import StageError
from .karpathy import read_karpathy
from .keep_rule import (
    KeepRule,
    assemble_rule,
    capfilt_rule,
    column_has_values,
    decide_table,
    is_default,
    leak_distance,
    recorded_settings,
    set_columns,
)
from .shards import list_shards, shard_name

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
KEPT_DIR = "kept"
DUPLICATES = "duplicates.parquet"  # with drop_duplicates: every image of a group of two or more, and its group
KEPT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("candidate", pa.int16()),
        pa.field("text", pa.string()),
        pa.field("keep", pa.bool_(), nullable=False),
    ]
)


class AssembleError(StageError):
    """The inputs of assemble are missing or inconsistent."""


def _count(counter: Counter, column: pa.ChunkedArray | pa.Array, name=str) -> None:
    vc = pc.value_counts(column)
    for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        counter[name(value)] += n


def _distinct_images(table: pa.Table) -> int:
    return table.group_by(["shard", "key"]).aggregate([]).num_rows


def _write_kept(url: str, table: pa.Table, rule: KeepRule, source_file: str, row_group_size: int) -> None:
    meta = {"capfilt.assemble": json.dumps({"rule": rule.as_dict(), "capfilt_file": source_file}, sort_keys=True)}
    kept = table.select(KEPT_SCHEMA.names[:-1]).append_column("keep", pa.repeat(True, table.num_rows))
    kept = kept.cast(KEPT_SCHEMA).replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(kept, buf, compression="zstd", row_group_size=row_group_size, write_statistics=True)
    storage.publish_bytes(url, buf.getvalue())


def _read_columns(fs, files: list[str], columns: list[str]):
    for path in files:
        with fs.open(path, "rb") as fh:
            yield pq.ParquetFile(fh).read(columns=columns)


def duplicate_groups(
    capfilt_url: str, distance: int, groups_url: str | None = None, storage_options: dict | None = None
) -> Duplicates:
    """The run's duplicate groups (``pipelines/dedup.py``) from its (shard, key, phash) columns, a file at a
    time; with ``groups_url``, every image of a group of two or more written there (one Parquet file)."""
    fs, files = parquet_files(capfilt_url, **(storage_options or {}))
    dups = find_duplicates(_read_columns(fs, files, ["shard", "key", "phash"]), distance)
    if groups_url is not None:
        buf = io.BytesIO()
        pq.write_table(group_rows(dups, _read_columns(fs, files, ["shard", "key", "phash"])), buf, compression="zstd")
        storage.publish_bytes(groups_url, buf.getvalue())
    return dups


def assemble_rows(
    capfilt_url: str,
    rule: KeepRule | None = None,
    kept_url: str | None = None,
    *,
    row_group_size: int = 32768,
    storage_options: dict | None = None,
    duplicates: Duplicates | None = None,
) -> dict[str, Any]:
    """Rows and kept rows by source, images and kept images, kept rows per shard name, and (with a rule) dropped
    rows by source and reason, one Parquet file at a time. ``rule`` None: CapFilt's ``keep`` column; else the rows
    ``rule`` keeps, written to ``kept_url/<file name>`` when ``kept_url`` is given; a rule that drops duplicates
    needs the run's ``duplicates``."""
    fs, files = parquet_files(capfilt_url, **(storage_options or {}))
    total: Counter = Counter()
    kept: Counter = Counter()
    kept_by_shard: Counter = Counter()
    dropped: dict[str, Counter] = defaultdict(Counter)
    shard_file: dict[str, str] = {}
    images = kept_images = 0
    columns = ["shard", "key", "source", "keep"]
    if rule is not None:
        columns = ["shard", "key", "source", "candidate", "status", "text", *rule.columns()]
    for path in files:
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise AssembleError(f"{path} has no column {missing}: not CapFilt output")
            table = pf.read(columns=columns)
        for shard in pc.unique(table["shard"]).to_pylist():  # the rows of an image must be in one file
            if shard_file.setdefault(shard, path) != path:
                raise AssembleError(f"shard {shard} has rows in {shard_file[shard]} and {path}: not CapFilt output")
        if rule is None:
            keep = pc.fill_null(table["keep"], False)
        else:
            dup = duplicates.row_flags(table) if duplicates is not None else None
            mask, reason = decide_table(table, rule, dup)
            keep = pa.array(mask)
            source = table["source"].to_numpy(zero_copy_only=False)
            for src in ("web", "synthetic"):
                dropped[src].update(reason[(source == src) & ~mask].tolist())
        _count(total, table["source"])
        k = table.filter(keep)
        _count(kept, k["source"])
        _count(kept_by_shard, k["shard"], lambda v: shard_name(str(v)))
        images += _distinct_images(table.filter(pc.equal(table["source"], "web")))
        kept_images += _distinct_images(k)
        if rule is not None and kept_url is not None:
            name = path.rsplit("/", 1)[-1]
            _write_kept(storage.join(kept_url, name), k, rule, name, row_group_size)
        del table, k
    out = {
        "total": dict(total),
        "kept": dict(kept),
        "kept_by_shard": dict(kept_by_shard),
        "images": images,
        "kept_images": kept_images,
    }
    if rule is not None:
        out["dropped"] = {src: dict(sorted(c.items())) for src, c in sorted(dropped.items())}
    return out


def resolve_rule(cfg: RunConfig, capfilt: str) -> KeepRule | None:
    """Assemble's own rule (None: CapFilt's ``keep`` column): CapFilt's recorded rule with ``assemble:``'s fields.
    A threshold on a score column no row has (``clip_threshold`` without the CLIP scorer) is an error."""
    if is_default(cfg.assemble):
        return None
    settings = recorded_settings(capfilt)
    if settings is None:
        raise AssembleError(f"{capfilt} records no CapFilt settings: cannot tell which rule CapFilt applied")
    try:
        rule = assemble_rule(
            cfg.assemble,
            capfilt_rule(settings, cfg.capfilt.plugins, order=list(cfg.capfilt.scorers)),
            leak_distance(settings),
        )
    except StageError as err:  # a scorer's rule whose column cannot be told (its plugin not importable)
        raise AssembleError(str(err)) from None
    files = storage.list_files(capfilt, ".parquet")
    for field, column in set_columns(cfg.assemble).items():
        if not column_has_values(files, column):
            raise AssembleError(
                f"{field}: {column} is null in every row of {capfilt} (was its scorer configured in caption-filter?)"
            )
    return rule


def _describe(record: dict | None) -> str:
    return "CapFilt's keep column" if record is None else KeepRule.from_dict(record).describe()


def run_assemble(cfg: RunConfig, root: str, round: int) -> dict:
    """Write and commit round K's dataset manifest and its summary; returns the summary."""
    from .modeling import human_set

    root = storage.absolute(root)  # the manifest is read by Ray Train workers, which run elsewhere
    out = storage.RunRoot(root).round(round, "dataset")
    capfilt = capfilt_dir(root, round)
    if storage.is_committed(out):
        committed = storage.read_commit(out).get("keep_rule")
        wanted = committed
        if storage.is_committed(capfilt):
            rule = resolve_rule(cfg, capfilt)
            wanted = None if rule is None else rule.as_dict()
        if committed != wanted:
            raise AssembleError(
                f"{out} is committed with the keep rule {_describe(committed)!r}, not {_describe(wanted)!r}; "
                f"round {round + 1} may have trained on it: remove {out} to decide again"
            )
        log.info("dataset %s already committed; nothing to do", out)
        return storage.read_json(storage.join(out, SUMMARY))
    if not storage.is_committed(capfilt):
        raise AssembleError(f"{capfilt} is not committed: run `capfilt caption-filter --round {round}` first")
    info = storage.read_commit(capfilt)
    source = (info.get("fingerprint") or {}).get("source") or cfg.capfilt.source or cfg.ingest.source
    shards_url = storage.RunRoot(root).ingest(source)
    human: dict[str, str | None] = {"train": None, "image_root": None}  # curate mode on real data may have none
    if cfg.world is not None or cfg.human.train is not None:
        try:
            human = {k: storage.absolute(v) for k, v in human_set(cfg, root).items()}
        except ValueError as err:
            raise AssembleError(str(err)) from None
    entries = read_karpathy(human["train"]) if human["train"] else []
    rule = resolve_rule(cfg, capfilt)
    kept_url = storage.join(out, KEPT_DIR) if rule is not None else None
    dups = None
    if rule is not None and rule.duplicate_distance is not None:
        dups = duplicate_groups(capfilt, rule.duplicate_distance, storage.join(out, DUPLICATES))
    counts = assemble_rows(capfilt, rule, kept_url, row_group_size=cfg.capfilt.row_group_size, duplicates=dups)
    available = {shard_name(u) for u in list_shards(shards_url)}
    orphans = {s: n for s, n in counts["kept_by_shard"].items() if s not in available}
    if orphans:
        raise AssembleError(
            f"{sum(orphans.values())} kept CapFilt rows name shards missing from {shards_url}: {sorted(orphans)[:10]}"
        )
    web_kept, syn_kept = counts["kept"].get("web", 0), counts["kept"].get("synthetic", 0)
    human_pairs = sum(len(e.captions) for e in entries)
    summary = {
        "round": round,
        "human": {"pairs": human_pairs, "images": len(entries)},
        "web": {"kept": web_kept, "total": counts["total"].get("web", 0)},
        "synthetic": {"kept": syn_kept, "total": counts["total"].get("synthetic", 0)},
        "bootstrapped": {
            "pairs": web_kept + syn_kept,
            "images": counts["kept_images"],
            "shards": len(counts["kept_by_shard"]),
        },
        "total_pairs": human_pairs + web_kept + syn_kept,
        "captioner_id": (info.get("fingerprint") or {}).get("captioner_id"),
        "filter_id": (info.get("fingerprint") or {}).get("filter_id"),
    }
    keep = None
    if rule is not None:
        keep = {
            "rule": rule.as_dict(),
            "description": rule.describe(),
            "config": cfg.assemble.model_dump(),
            "capfilt": capfilt,
            "capfilt_fingerprint": info.get("fingerprint"),
            "counts": {
                src: {
                    "kept": summary[src]["kept"],
                    "total": summary[src]["total"],
                    "dropped": counts["dropped"].get(src, {}),
                }
                for src in ("web", "synthetic")
            },
        }
        if dups is not None:
            keep["duplicates"] = {
                "groups": storage.join(out, DUPLICATES),
                "images_hashed": dups.images,
                "images_in_groups": int(dups.grouped.sum()),
                "images_dropped": int((dups.rep != np.arange(dups.images)).sum()),
            }
            summary["duplicates"] = keep["duplicates"]
        summary["keep_rule"] = rule.describe()
    manifest = write_manifest(
        out,
        round=round,
        human_annotations=human["train"],
        human_image_root=human["image_root"],
        shards=shards_url,
        capfilt=kept_url or capfilt,
        counts={"human_pairs": human_pairs, "web": web_kept, "synthetic": syn_kept},
        keep=keep,
    )
    storage.write_json(storage.join(out, SUMMARY), summary)
    storage.commit(
        out,
        {
            "manifest": manifest.rsplit("/", 1)[-1],
            "total_pairs": summary["total_pairs"],
            "keep_rule": None if rule is None else rule.as_dict(),
        },
    )
    log.info(
        "dataset of round %d committed at %s: %d human pairs + %d/%d web + %d/%d synthetic texts kept (%s)",
        round,
        out,
        human_pairs,
        web_kept,
        summary["web"]["total"],
        syn_kept,
        summary["synthetic"]["total"],
        "CapFilt's keep column" if rule is None else rule.describe(),
    )
    return summary
