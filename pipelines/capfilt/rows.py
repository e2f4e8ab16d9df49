"""The CapFilt Parquet's rows: the schema (version 2, then the columns of extra scorers, then the ingest's extra
columns) and the keep decisions, made by the keep rule of ``pipelines/keep_rule.py`` (which ``capfilt assemble`` applies again, with
thresholds of its own, over the stored scores).

The keep rule: a text is kept when its status is ``ok``, the filter's ITM P(match) exceeds
``capfilt.itm_threshold`` and every extra scorer with a ``keep_above``/``keep_below`` passes on its first column;
of an image's synthetic texts that pass, at most the best ``keep_top_k_synthetic`` by ITM (ties to the lower
candidate). Each dropped row says why in ``drop_reason``: ``bad_input``, ``itm_below_threshold``,
``<scorer>_rule`` or ``not_top_k``, checked in that order.

Bad input never fails a batch: an image that is missing or cannot be decoded gets one web row with its status
(and no synthetic rows); the models skip rows whose status is not ``ok``; their scores are null.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..ingest import MANIFEST
from ..keep_rule import KeepRule, ScoreRule, decide

if TYPE_CHECKING:
    from .settings import Settings

STATUSES = ("ok", "corrupt_image", "missing_image", "empty_text", "text_too_long")
UNIT_COLUMN = "_unit"  # internal: the commit unit of a row, never written
EXTRA_COLUMN = "_extra"  # internal: an image's ingest extra columns as JSON text (decode.py), never written
# Internal, never written: the reader ends each shard with one row of status SHARD_END, whose SHARD_READ_COLUMN
# holds the number of samples it read (-1 on every other row) and whose ``error`` says why a broken tar ended early.
SHARD_END = "shard_end"
SHARD_READ_COLUMN = "_shard_read"

BASE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("text", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("candidate", pa.int16()),
        pa.field("itm_score", pa.float32()),
        pa.field("itc_score", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("drop_reason", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("text_length", pa.int32(), nullable=False),
        pa.field("captioner_id", pa.string(), nullable=False),
        pa.field("filter_id", pa.string(), nullable=False),
    ]
)
OUTPUT_SCHEMA = BASE_SCHEMA  # the schema of a run without extra scorers
SCORE_COLUMNS = ("itm_score", "itc_score", "clip_score")  # built-in scores: null where their scorer did not run


def _scorer_fields(settings: Settings) -> list[pa.Field]:
    return [f for s in settings.scorers for f in s.cls.columns if f.name not in BASE_SCHEMA.names]


def output_schema(settings: Settings) -> pa.Schema:
    """Version 2's columns, then each extra scorer's own columns in the order the scorers run, then the ingest's
    extra columns (``ingest.extra_columns``)."""
    return pa.schema(list(BASE_SCHEMA) + _scorer_fields(settings) + list(settings.extra_columns))


def score_columns(settings: Settings) -> list[str]:
    return list(SCORE_COLUMNS) + [f.name for f in _scorer_fields(settings)]


def ingest_extra_fields(ingest_url: str) -> list[pa.Field]:
    """The extra columns an ingest carried (its manifest's ``input.extra_columns``), typed and ordered as its shards'
    Parquet holds them (img2dataset keeps the list's Arrow types there); none for an ingest without any."""
    url = storage.join(ingest_url, MANIFEST)
    names = set(storage.read_json(url)["input"].get("extra_columns") or ()) if storage.exists(url) else set()
    if not names:
        return []
    tables = storage.list_files(ingest_url, ".parquet")
    with storage.open_url(tables[0], "rb") as f:
        schema = pq.read_schema(f)
    return [f for f in schema if f.name in names]


def check_extra_columns(settings: Settings) -> str | None:
    """Why the ingest's extra columns cannot join the CapFilt rows (a name the rows already use, compared without
    case as DuckDB and Spark do), or None."""
    taken = {f.name.lower() for f in list(BASE_SCHEMA) + _scorer_fields(settings)}
    clash = [f.name for f in settings.extra_columns if f.name.lower() in taken]
    return f"the ingest's extra columns {clash} clash with CapFilt's columns" if clash else None


def describe_keep_rule(settings: Settings) -> str:
    """The keep rule in words (stored in the Parquet metadata and the stage summary)."""
    rules = [
        f" and {s.cls.columns[0].name} {op} {v:g}"
        for s in settings.scorers
        for op, v in ((">", s.keep_above), ("<", s.keep_below))
        if v is not None
    ]
    return (
        "status ok and itm_score > itm_threshold"
        + "".join(rules)
        + " (synthetic: and among the best keep_top_k_synthetic of the image, ties to the lower candidate)"
    )


def _nan_to_none(x: float) -> float | int | None:
    if isinstance(x, np.integer):  # an integer scorer column (a hash): exact
        return int(x)
    return None if x is None or np.isnan(x) else float(x)


def keep_rule(settings: Settings) -> KeepRule:
    """The run's keep rule: ``capfilt.itm_threshold``, ``keep_top_k_synthetic`` and the extra scorers' rules, in
    the order they run."""
    return KeepRule(
        settings.itm_threshold,
        settings.keep_top_k_synthetic,
        tuple(
            ScoreRule(s.cls.columns[0].name, f"{s.kind}_rule", s.keep_above, s.keep_below)
            for s in settings.scorers
            if s.keep_above is not None or s.keep_below is not None
        ),
    )


def build_rows(batch: dict[str, np.ndarray], settings: Settings) -> pa.Table:
    """One row per (image, text) with the keep decisions; a bad image gets its web row only. ``batch`` holds
    the decode columns, ``syn_j`` captions and ``<column>__j`` scores."""
    s = settings
    n, k = len(batch["key"]), s.num_samples
    schema = output_schema(s)
    cols: dict[str, list] = {f.name: [] for f in schema}
    cols[UNIT_COLUMN] = []
    scores = score_columns(s)
    where: list[tuple[int, int]] = []  # (image i, text j) of each row: where its scores are in the batch

    def add(i: int, text: str, source: str, cand: int | None, j: int, status: str, error: str | None, length: int):
        scored = status == "ok"
        where.append((i, j))
        cols["key"].append(str(batch["key"][i]))
        cols["shard"].append(str(batch["shard"][i]))
        url = batch["url"][i]
        cols["url"].append(None if url is None else str(url))
        cols["text"].append(text)
        cols["source"].append(source)
        cols["candidate"].append(cand)
        for c in scores:
            values = batch.get(f"{c}__{j}")
            cols[c].append(_nan_to_none(values[i]) if scored and values is not None else None)
        cols["status"].append(status)
        cols["error"].append(error)
        cols["seed"].append(int(batch["seed"][i]) if source == "synthetic" and s.method == "nucleus" else None)
        cols["text_length"].append(length)
        for f, v in zip(s.extra_columns, extras[i]):
            cols[f.name].append(v)
        cols["captioner_id"].append(s.captioner.id)
        cols["filter_id"].append(s.filter.id)
        cols[UNIT_COLUMN].append(int(batch[UNIT_COLUMN][i]))

    extras: list[list] = [[]] * n  # per image, the values of s.extra_columns
    if s.extra_columns:
        metas = [json.loads(x) if x else {} for x in batch[EXTRA_COLUMN]]
        extras = [[m.get(f.name) for f in s.extra_columns] for m in metas]
    for i in range(n):
        image_status = str(batch["image_status"][i])
        err = batch["error"][i]
        err = None if err is None else str(err)
        if image_status == SHARD_END:  # the reader's end-of-shard row: not a sample
            continue
        if image_status != "ok":  # missing or corrupt: the web row only
            add(i, str(batch["text"][i]), "web", None, 0, image_status, err, int(batch["text_length"][i]))
            continue
        add(i, str(batch["text"][i]), "web", None, 0, str(batch["text_status"][i]), None, int(batch["text_length"][i]))
        for j in range(k):
            text = str(batch[f"syn_{j}"][i])
            add(i, text, "synthetic", j, j + 1, "ok" if text.strip() else "empty_text", None, len(text))

    # The decisions, from the batch's own scores (a bad row's are NaN, never read: bad input is checked first).
    rule = keep_rule(s)
    ri, rj = np.array(where, dtype=np.int64).reshape(-1, 2).T

    def at(column: str) -> np.ndarray:
        return np.stack([batch[f"{column}__{j}"] for j in range(1 + k)], axis=1)[ri, rj]

    keep, reason = decide(
        rule,
        ok=np.array([st == "ok" for st in cols["status"]], dtype=bool),
        synthetic=np.array([src == "synthetic" for src in cols["source"]], dtype=bool),
        candidate=np.array([-1 if c is None else c for c in cols["candidate"]], dtype=np.int64),
        group=ri,
        itm=at("itm_score"),
        scores={r.column: at(r.column) for r in rule.score_rules},
    )
    cols["keep"], cols["drop_reason"] = keep.tolist(), reason.tolist()
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(
        arrays + [pa.array(cols[UNIT_COLUMN], pa.int32())], names=[f.name for f in schema] + [UNIT_COLUMN]
    )


def empty_table(settings: Settings) -> pa.Table:
    return pa.Table.from_pylist([], schema=output_schema(settings))
