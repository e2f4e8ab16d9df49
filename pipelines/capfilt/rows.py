"""The CapFilt Parquet's rows: the schema (version 1, plus the columns of extra scorers at the end) and the keep
rule, written once here.

The keep rule: a text is kept when its status is ``ok``, the filter's ITM P(match) exceeds
``capfilt.itm_threshold`` and every extra scorer with a ``keep_above``/``keep_below`` passes on its first column;
of an image's synthetic texts that pass, at most the best ``keep_top_k_synthetic`` by ITM (ties to the lower
candidate). Each dropped row says why in ``drop_reason``: ``bad_input``, ``itm_below_threshold``,
``<scorer>_rule`` or ``not_top_k``, checked in that order.

Bad input never fails a batch: an image that is missing or cannot be decoded gets one web row with its status
(and no synthetic rows); the models skip rows whose status is not ``ok``; their scores are null.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from .settings import Settings

STATUSES = ("ok", "corrupt_image", "missing_image", "empty_text", "text_too_long")
UNIT_COLUMN = "_unit"  # internal: the commit unit of a row, never written
SHARD_ERROR_KEY = "__shard_error__"  # an internal row: a truncated tar, reported by the reader, never written

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
        pa.field("round", pa.int32(), nullable=False),
        pa.field("captioner_id", pa.string(), nullable=False),
        pa.field("filter_id", pa.string(), nullable=False),
    ]
)
OUTPUT_SCHEMA = BASE_SCHEMA  # the schema of a run without extra scorers
SCORE_COLUMNS = ("itm_score", "itc_score", "clip_score")  # built-in scores: null where their scorer did not run


def output_schema(settings: Settings) -> pa.Schema:
    """Version 1's columns, then each extra scorer's own columns in the order the scorers run."""
    extra = [f for s in settings.scorers for f in s.cls.columns if f.name not in BASE_SCHEMA.names]
    return pa.schema(list(BASE_SCHEMA) + extra)


def score_columns(settings: Settings) -> list[str]:
    return list(SCORE_COLUMNS) + [f.name for f in output_schema(settings)][len(BASE_SCHEMA) :]


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


def _nan_to_none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def _rule_failures(batch: dict[str, np.ndarray], settings: Settings, i: int, j: int) -> list[str]:
    """The extra scorers whose rule text ``j`` of image ``i`` fails."""
    failed = []
    for s in settings.scorers:
        if s.keep_above is None and s.keep_below is None:
            continue
        v = float(batch[f"{s.cls.columns[0].name}__{j}"][i])
        if (
            np.isnan(v)
            or (s.keep_above is not None and not v > s.keep_above)
            or (s.keep_below is not None and not v < s.keep_below)
        ):
            failed.append(s.kind)
    return failed


def build_rows(batch: dict[str, np.ndarray], settings: Settings) -> pa.Table:
    """One row per (image, text) with the keep decisions; a bad image gets its web row only. ``batch`` holds
    the decode columns, ``syn_j`` captions and ``<column>__j`` scores."""
    s = settings
    n, k = len(batch["key"]), s.num_samples
    schema = output_schema(s)
    cols: dict[str, list] = {f.name: [] for f in schema}
    cols[UNIT_COLUMN] = []
    scores = score_columns(s)
    itm = np.stack([batch[f"itm_score__{j}"] for j in range(1 + k)], axis=1)

    def add(
        i: int,
        text: str,
        source: str,
        cand: int | None,
        j: int,
        status: str,
        error: str | None,
        keep: bool,
        reason: str | None,
        length: int,
    ) -> None:
        scored = status == "ok"
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
        cols["keep"].append(keep)
        cols["drop_reason"].append(reason)
        cols["status"].append(status)
        cols["error"].append(error)
        cols["seed"].append(int(batch["seed"][i]) if source == "synthetic" and s.method == "nucleus" else None)
        cols["text_length"].append(length)
        cols["round"].append(s.round)
        cols["captioner_id"].append(s.captioner.id)
        cols["filter_id"].append(s.filter.id)
        cols[UNIT_COLUMN].append(int(batch[UNIT_COLUMN][i]))

    def verdict(i: int, j: int, status: str) -> str | None:
        """Why text ``j`` of image ``i`` is dropped before the top-k (None: it passes)."""
        if status != "ok":
            return "bad_input"
        if not bool(itm[i, j] > s.itm_threshold):
            return "itm_below_threshold"
        failed = _rule_failures(batch, s, i, j)
        return f"{failed[0]}_rule" if failed else None

    for i in range(n):
        image_status = str(batch["image_status"][i])
        err = batch["error"][i]
        err = None if err is None else str(err)
        if image_status != "ok":  # missing, corrupt (or the reader's shard_error row): the web row only
            add(
                i,
                str(batch["text"][i]),
                "web",
                None,
                0,
                image_status,
                err,
                False,
                "bad_input",
                int(batch["text_length"][i]),
            )
            continue
        web_status = str(batch["text_status"][i])
        reason = verdict(i, 0, web_status)
        add(
            i,
            str(batch["text"][i]),
            "web",
            None,
            0,
            web_status,
            None,
            reason is None,
            reason,
            int(batch["text_length"][i]),
        )
        texts = [str(batch[f"syn_{j}"][i]) for j in range(k)]
        statuses = ["ok" if t.strip() else "empty_text" for t in texts]
        reasons = [verdict(i, j + 1, statuses[j]) for j in range(k)]
        passing = [j for j in range(k) if reasons[j] is None]
        if s.keep_top_k_synthetic is not None:
            ranked = sorted(passing, key=lambda j: (-float(itm[i, j + 1]), j))
            kept = set(ranked[: s.keep_top_k_synthetic])
        else:
            kept = set(passing)
        for j in range(k):
            reason = None if j in kept else (reasons[j] or "not_top_k")
            add(i, texts[j], "synthetic", j, j + 1, statuses[j], None, j in kept, reason, len(texts[j]))
    arrays = [pa.array(cols[f.name], type=f.type) for f in schema]
    return pa.Table.from_arrays(
        arrays + [pa.array(cols[UNIT_COLUMN], pa.int32())], names=[f.name for f in schema] + [UNIT_COLUMN]
    )


def empty_table(settings: Settings) -> pa.Table:
    return pa.Table.from_pylist([], schema=output_schema(settings))
