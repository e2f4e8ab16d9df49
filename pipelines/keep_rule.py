"""The keep rule: which CapFilt texts a dataset keeps, decided over whole columns at once.

The CapFilt stage applies it as it writes its rows (``pipelines/capfilt/rows.py``) and stores every score, so
``capfilt assemble`` can apply another rule later (the config's ``assemble:`` section) over the stored scores, one
Parquet file at a time and without running a model, and the report can sweep the ITM threshold.

A text is kept when its status is ``ok``, its ITM P(match) exceeds ``itm_threshold``, every score rule passes (its
column strictly above ``above`` and below ``below`` where set; a null or NaN score fails) and, for a synthetic
text under ``top_k_synthetic: k``, it is among the k best of its image's passing synthetic texts by ITM, ties to
the lower candidate. A dropped text says why, checked in that order: ``bad_input``, ``itm_below_threshold``, the
first failing score rule's reason (``itc_below_threshold``, ``<scorer>_rule``), ``not_top_k``.

Comparisons are the CapFilt stage's, so that CapFilt's own rule applied to its Parquet gives back its ``keep``
column row for row: ITM in float32 (the stored precision; the threshold is rounded to float32), score rules in
float64 (of the stored float32 values).

An image is decided as a whole (its top-k), so a table given to ``decide_table`` must hold every row of each of
its images: a CapFilt file does (a commit unit is whole shards).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .errors import StageError

if TYPE_CHECKING:
    from .config import AssembleConfig, RunConfig

# Built-in scorers whose first column is known without importing the scorer registry (which imports torch).
KNOWN_COLUMNS = {"clip": "clip_score", "phash": "leak_distance"}
LEAK_REASON = "test_set_leak"


class KeepRuleError(StageError):
    """A keep rule that cannot be applied to the Parquet it names."""


@dataclass(frozen=True)
class ScoreRule:
    """A condition on one score column: strictly above ``above`` and below ``below`` where set."""

    column: str
    reason: str
    above: float | None = None
    below: float | None = None

    def describe(self) -> str:
        return "".join(
            f" and {self.column} {op} {v:g}" for op, v in ((">", self.above), ("<", self.below)) if v is not None
        )


@dataclass(frozen=True)
class KeepRule:
    """``itm_threshold`` None: no ITM condition (the report's sweep adds its own). ``duplicate_distance`` set: one
    image per duplicate group (perceptual hashes within that many bits, ``pipelines/dedup.py``)."""

    itm_threshold: float | None
    top_k_synthetic: int | None = None
    score_rules: tuple[ScoreRule, ...] = field(default_factory=tuple)
    duplicate_distance: int | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self) | {"score_rules": [asdict(r) for r in self.score_rules]}
        if self.duplicate_distance is None:  # the record of a rule without it, as before it existed
            del d["duplicate_distance"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KeepRule:
        return cls(
            d["itm_threshold"],
            d.get("top_k_synthetic"),
            tuple(ScoreRule(**r) for r in d.get("score_rules", ())),
            d.get("duplicate_distance"),
        )

    def without_itm(self) -> KeepRule:
        return replace(self, itm_threshold=None)

    def without_duplicates(self) -> KeepRule:
        """The rule text by text: without dropping duplicates (which needs the whole run's groups)."""
        return replace(self, duplicate_distance=None)

    def columns(self) -> list[str]:
        """The score columns the rule reads (``itm_score`` always: the top-k ranks by it; ``phash`` to group
        duplicates)."""
        cols = ["itm_score", *dict.fromkeys(r.column for r in self.score_rules if r.column != "itm_score")]
        return cols + (["phash"] if self.duplicate_distance is not None and "phash" not in cols else [])

    def describe(self) -> str:
        head = "status ok" + ("" if self.itm_threshold is None else f" and itm_score > {self.itm_threshold:g}")
        if self.duplicate_distance is not None:
            head += f" and not a duplicate (phash within {self.duplicate_distance} bits; one image per group)"
        k = self.top_k_synthetic
        tail = (
            ""
            if k is None
            else f" (synthetic: and among the {k} best of its image by itm_score, ties to the lower candidate)"
        )
        return head + "".join(r.describe() for r in self.score_rules) + tail


# ------------------------------------------------------------------------------------------------ deciding


def decide(
    rule: KeepRule,
    *,
    ok: np.ndarray,
    synthetic: np.ndarray,
    candidate: np.ndarray,
    group: np.ndarray,
    itm: np.ndarray,
    scores: Mapping[str, np.ndarray],
    duplicate: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``keep`` (bool) and ``drop_reason`` (object: None or the reason) of each row. Per row: ``ok`` (status ok),
    ``synthetic``, ``candidate`` (any value on web rows), ``group`` (an id of the row's image), ``itm`` (NaN when
    not scored), per score rule's column its scores (NaN for null) and, with the rule's ``duplicate_distance``,
    ``duplicate``: the row's image is a duplicate that is not its group's representative (reason ``duplicate``,
    checked right after bad input: the whole image goes)."""
    keep = np.asarray(ok, dtype=bool).copy()
    reason = np.full(len(keep), None, dtype=object)
    reason[~keep] = "bad_input"
    itm = np.asarray(itm, dtype=np.float32)

    def drop(fail: np.ndarray, why: str) -> None:
        fail &= keep
        reason[fail] = why
        keep[fail] = False

    if rule.duplicate_distance is not None:
        if duplicate is None:
            raise KeepRuleError("the keep rule drops duplicates, but no duplicate groups were given")
        drop(np.asarray(duplicate, dtype=bool).copy(), "duplicate")

    if rule.itm_threshold is not None:
        drop(~(itm > np.float32(rule.itm_threshold)), "itm_below_threshold")
    for r in rule.score_rules:
        if r.above is None and r.below is None:
            continue
        v = np.asarray(scores[r.column], dtype=np.float64)
        good = ~np.isnan(v)
        if r.above is not None:
            good &= v > r.above
        if r.below is not None:
            good &= v < r.below
        drop(~good, r.reason)
    if rule.top_k_synthetic is not None:
        rows = np.flatnonzero(keep & np.asarray(synthetic, dtype=bool))
        g = np.asarray(group)[rows]
        # by image, then ITM descending (NaN last), then candidate: the rank of each passing text in its image
        order = np.lexsort((np.asarray(candidate)[rows], -itm[rows].astype(np.float64), g))
        rows, g = rows[order], g[order]
        i = np.arange(len(rows))
        first = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], i, 0)) if len(rows) else i
        beyond = np.zeros(len(keep), dtype=bool)
        beyond[rows[i - first >= rule.top_k_synthetic]] = True
        drop(beyond, "not_top_k")
    return keep, reason


def image_groups(table: pa.Table) -> np.ndarray:
    """An id per row for its image, (shard, key)."""
    joined = pc.binary_join_element_wise(table["shard"], table["key"], "\x00")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    return pc.dictionary_encode(joined).indices.to_numpy(zero_copy_only=False)


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False))


def decide_table(table: pa.Table, rule: KeepRule, duplicate: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``decide`` over CapFilt rows (columns ``shard``, ``key``, ``source``, ``candidate``, ``status`` and the
    rule's score columns), every row of each image present; ``duplicate`` as for ``decide``."""
    missing = [c for c in rule.columns() if c not in table.column_names]
    if missing:
        raise KeepRuleError(f"the keep rule reads {missing}, which the Parquet does not have")
    itm = pc.fill_null(table["itm_score"], np.nan).to_numpy(zero_copy_only=False)
    return decide(
        rule,
        ok=pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False),
        synthetic=pc.fill_null(pc.equal(table["source"], "synthetic"), False).to_numpy(zero_copy_only=False),
        candidate=pc.fill_null(table["candidate"], -1).to_numpy(zero_copy_only=False),
        group=image_groups(table),
        itm=np.asarray(itm, dtype=np.float32),
        scores={r.column: _floats(table[r.column]) for r in rule.score_rules},
        duplicate=duplicate,
    )


# ------------------------------------------------------------------------------------------------ resolving


def scorer_column(kind: str, plugins: Sequence[str] = ()) -> str:
    """The first column of a registered scorer (the one its keep rule reads)."""
    if kind in KNOWN_COLUMNS:
        return KNOWN_COLUMNS[kind]
    from .capfilt.models import import_plugins, scorer_class

    import_plugins(plugins)
    return scorer_class(kind).columns[0].name


def capfilt_rule(settings: Mapping[str, Any], plugins: Sequence[str] = (), order: Sequence[str] = ()) -> KeepRule:
    """The rule a CapFilt run applied, from its settings as recorded (the fingerprint in ``_COMMITTED`` or in each
    file's ``capfilt.settings``): ``itm_threshold``, ``keep_top_k_synthetic``, ``scorers``' rules. The record's
    keys are sorted, so score rules follow ``order`` (the config's ``capfilt.scorers``), then the record's order;
    the order only decides which reason a text failing several rules gets."""
    scorers = settings.get("scorers") or {}
    kinds = [k for k in order if k in scorers] + [k for k in scorers if k not in order]
    rules = tuple(
        ScoreRule(scorer_column(k, plugins), f"{k}_rule", scorers[k].get("keep_above"), scorers[k].get("keep_below"))
        for k in kinds
        if (scorers[k].get("keep_above"), scorers[k].get("keep_below")) != (None, None)
    )
    if settings.get("itm_threshold") is None:
        raise KeepRuleError("the CapFilt settings record no itm_threshold: cannot tell which rule CapFilt applied")
    return KeepRule(float(settings["itm_threshold"]), settings.get("keep_top_k_synthetic"), rules)


def config_settings(cfg: RunConfig) -> dict[str, Any]:
    """The keep settings of ``cfg.capfilt`` in the form CapFilt records them (for output without a record)."""
    cc = cfg.capfilt
    return {
        "itm_threshold": cc.itm_threshold,
        "keep_top_k_synthetic": cc.keep_top_k_synthetic,
        "scorers": {
            k: {"keep_above": s.keep_above, "keep_below": s.keep_below} for k, s in cc.scorers.items() if s.enabled
        },
    }


def recorded_settings(capfilt_url: str) -> dict[str, Any] | None:
    """CapFilt's settings as it recorded them: the committed fingerprint, else the first file's metadata."""
    if storage.is_committed(capfilt_url):
        fp = storage.read_commit(capfilt_url).get("fingerprint")
        if fp:
            return fp
    for url in storage.list_files(capfilt_url, ".parquet")[:1]:
        with storage.open_url(url, "rb") as fh:
            meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
        if b"capfilt.settings" in meta:
            return json.loads(meta[b"capfilt.settings"])
    return None


def is_default(acfg: AssembleConfig) -> bool:
    """No threshold set and nothing dropped: CapFilt's own ``keep`` column, no rule of assemble's own."""
    thresholds = ("itm_threshold", "itc_threshold", "clip_threshold", "top_k_synthetic")
    return all(getattr(acfg, k) is None for k in thresholds) and not (acfg.drop_duplicates or acfg.drop_leaks)


def assemble_rule(acfg: AssembleConfig, base: KeepRule, leak_distance: int | None = None) -> KeepRule:
    """CapFilt's rule ``base`` with the fields ``assemble:`` sets: ``itm_threshold``, ``top_k_synthetic``, an ITC
    rule (``itc_score > itc_threshold``, checked right after ITM), the CLIP rule's lower bound
    (``clip_score > clip_threshold``; a CapFilt ``keep_below`` on CLIP stays), ``drop_leaks`` (``leak_distance >
    leak_distance``, the phash scorer's option as CapFilt recorded it: a text of an image that close to a test
    image goes, reason ``test_set_leak``) and ``drop_duplicates`` (``duplicate_distance``)."""
    if acfg.drop_leaks and leak_distance is None:
        raise KeepRuleError("assemble.drop_leaks: the CapFilt run has no phash scorer (capfilt.scorers.phash)")
    rules = list(base.score_rules)
    if acfg.drop_leaks:
        rules.append(ScoreRule("leak_distance", LEAK_REASON, leak_distance))
    if acfg.clip_threshold is not None:
        old = next((r for r in rules if r.column == "clip_score"), None)
        new = ScoreRule("clip_score", "clip_rule", acfg.clip_threshold, old.below if old else None)
        rules = [new if r is old else r for r in rules] if old else rules + [new]
    if acfg.itc_threshold is not None:
        rules.insert(0, ScoreRule("itc_score", "itc_below_threshold", acfg.itc_threshold))
    return KeepRule(
        base.itm_threshold if acfg.itm_threshold is None else acfg.itm_threshold,
        base.top_k_synthetic if acfg.top_k_synthetic is None else acfg.top_k_synthetic,
        tuple(rules),
        acfg.duplicate_distance if acfg.drop_duplicates else None,
    )


def set_columns(acfg: AssembleConfig) -> dict[str, str]:
    """The score columns ``assemble:`` puts a rule on, by config field."""
    return {
        f"assemble.{name}": column
        for name, column in (
            ("itc_threshold", "itc_score"),
            ("clip_threshold", "clip_score"),
            ("drop_leaks", "leak_distance"),
            ("drop_duplicates", "phash"),
        )
        if getattr(acfg, name) not in (None, False)
    }


def leak_distance(settings: Mapping[str, Any]) -> int | None:
    """The phash scorer's ``leak_distance`` option as a CapFilt run recorded it (None: no phash scorer)."""
    phash = (settings.get("scorers") or {}).get("phash")
    return None if phash is None else int(phash["options"]["leak_distance"])


def column_has_values(files: Sequence[str], column: str, storage_options: dict | None = None) -> bool:
    """Whether any row of the files has a non-null ``column``: from the row groups' statistics where written (a
    few footers, the first non-null row group ends the search), else by reading the column."""
    for url in files:
        with storage.open_url(url, "rb", **(storage_options or {})) as fh:
            pf = pq.ParquetFile(fh)
            if column not in pf.schema_arrow.names:
                continue
            leaf = pf.schema_arrow.get_field_index(column)  # a flat schema: the field's index is its column chunk's
            for g in range(pf.metadata.num_row_groups):
                rg = pf.metadata.row_group(g)
                stats = rg.column(leaf).statistics
                if stats is None or not stats.has_null_count:
                    if pf.read_row_group(g, columns=[column]).column(0).null_count < rg.num_rows:
                        return True
                elif stats.null_count < rg.num_rows:
                    return True
    return False
