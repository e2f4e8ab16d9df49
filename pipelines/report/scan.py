"""What the report reads and counts: the CapFilt Parquet in one pass (totals, histograms, the threshold sweep),
metrics files, the ground truth, and sample images from the ingest shards."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..keep_rule import KeepRule, decide_table
from ..shards import iter_shard

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["key", "shard", "text", "source", "candidate", "itm_score", "keep", "drop_reason", "status"]
HISTOGRAMS = (("itm_score", 0.0, 1.0, 20, "ITM P(match)"), ("itc_score", -1.0, 1.0, 20, "ITC cosine similarity"))
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1

# ------------------------------------------------------------------------------------------------ inputs


def capfilt_files(url: str) -> list[str]:
    """The URLs of the ``part-*.parquet`` files of a CapFilt directory (bookkeeping files never match)."""
    fs, path = storage.filesystem(url)
    if not fs.isdir(path):
        return []
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [storage.join(url, n) for n in names if n.startswith("part-") and n.endswith(".parquet")]


def read_metrics(url: str) -> list[dict] | None:
    """The rows of a ``metrics.jsonl``; a torn last line (a job still writing) is skipped, not fatal."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    rows = []
    with fs.open(path, "r") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def read_json_or_none(url: str) -> Any:
    fs, path = storage.filesystem(url)
    return storage.read_json(url) if fs.exists(path) else None


# ------------------------------------------------------------------------------------------------ numbers


def histogram(values: Iterable[float | None], lo: float, hi: float, bins: int) -> list[int]:
    """Counts in ``bins`` equal bins over [lo, hi]; nulls are left out, values outside go to the end bins."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    v = v[~np.isnan(v)]
    idx = np.clip(np.floor((v - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    return np.bincount(idx, minlength=bins).tolist()


@dataclass
class Totals:
    """What the report counts over every row, one record batch at a time (memory stays flat at any size):
    per source texts, bad input (status not ok: never scored, never kept) and kept; per (score, source) a histogram."""

    rows: dict[str, list[int]] = field(default_factory=dict)
    hists: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        bad = pc.not_equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
        keep = pc.fill_null(batch.column("keep"), False).to_numpy(zero_copy_only=False)
        for source in pc.unique(batch.column("source")).to_pylist():
            sel = pc.equal(batch.column("source"), source).to_numpy(zero_copy_only=False)
            counts = self.rows.setdefault(source, [0, 0, 0])
            counts[0] += int(sel.sum())
            counts[1] += int((bad & sel).sum())
            counts[2] += int((keep & sel).sum())
            for col, lo, hi, bins, _ in HISTOGRAMS:
                scores = np.asarray(batch.column(col).to_numpy(zero_copy_only=False), dtype=float)[sel]
                prev = self.hists.get((col, source), np.zeros(bins, dtype=np.int64))
                self.hists[(col, source)] = prev + np.asarray(histogram(scores, lo, hi, bins))

    def kept_share(self) -> list[dict]:
        """Per source (web first): counts, and kept shares of all texts and of usable (status ok) texts."""
        out = []
        for source in sorted(self.rows, key=lambda s: (s != "web", s)):
            texts, bad, kept = self.rows[source]
            out.append(
                {
                    "source": source,
                    "texts": texts,
                    "bad_input": bad,
                    "kept": kept,
                    "kept_share": kept / max(texts, 1),
                    "kept_share_usable": kept / max(texts - bad, 1),
                }
            )
        return out


@dataclass
class Sweep:
    """Per ITM threshold t: the texts of each source that ``rule`` with ``itm_threshold = t`` keeps (its other
    parts as they are) and, with the world's truth, precision and recall of removing noisy web captions (the web
    rows with status ok that the truth knows, as ``summary.filter_agreement`` counts them). Counted table by table
    (each holding every row of its images) in O(thresholds) memory."""

    rule: KeepRule
    thresholds: tuple[float, ...] = SWEEP_THRESHOLDS
    texts: dict[str, int] = field(default_factory=dict)
    kept: dict[str, np.ndarray] = field(default_factory=dict)
    known: int = 0
    noisy: int = 0
    kept_known: np.ndarray | None = None
    kept_noisy: np.ndarray | None = None

    def _kept_at(self, above: np.ndarray) -> np.ndarray:
        """``above``: per kept-before-ITM text, how many thresholds lie below its score; -> kept texts per t."""
        counts = np.bincount(above, minlength=len(self.thresholds) + 1)
        return np.cumsum(counts[::-1])[::-1][1:]

    def add(self, table: pa.Table, noisy: np.ndarray | None = None) -> None:
        """``noisy``: per row, 1 noisy, 0 clean, -1 unknown to the truth (None: no truth)."""
        base, _ = decide_table(table, self.rule.without_itm())
        itm = np.asarray(pc.fill_null(table["itm_score"], np.nan).to_numpy(zero_copy_only=False), dtype=np.float32)
        base &= ~np.isnan(itm)
        # the keep rule compares ITM in float32: so do the thresholds here
        above = np.searchsorted(np.asarray(self.thresholds, dtype=np.float32), itm, side="left")
        source = table["source"].to_numpy(zero_copy_only=False)
        zeros = np.zeros(len(self.thresholds), dtype=np.int64)
        for src in pc.unique(table["source"]).to_pylist():
            sel = source == src
            self.texts[src] = self.texts.get(src, 0) + int(sel.sum())
            self.kept[src] = self.kept.get(src, zeros) + self._kept_at(above[sel & base])
        if noisy is not None:
            ok = pc.fill_null(pc.equal(table["status"], "ok"), False).to_numpy(zero_copy_only=False)
            rows = (source == "web") & ok & (noisy >= 0)
            bad = rows & (noisy == 1)
            self.known += int(rows.sum())
            self.noisy += int(bad.sum())
            self.kept_known = (zeros if self.kept_known is None else self.kept_known) + self._kept_at(
                above[rows & base]
            )
            self.kept_noisy = (zeros if self.kept_noisy is None else self.kept_noisy) + self._kept_at(above[bad & base])

    def rows(self) -> list[dict]:
        out = []
        for m, t in enumerate(self.thresholds):
            row: dict[str, Any] = {
                "threshold": t,
                "kept": {s: int(k[m]) for s, k in self.kept.items()},
                "kept_share": {s: int(k[m]) / max(self.texts[s], 1) for s, k in self.kept.items()},
            }
            if self.kept_known is not None:
                removed = self.known - int(self.kept_known[m])
                hits = self.noisy - int(self.kept_noisy[m])
                row |= {
                    "removed": removed,
                    "precision": hits / removed if removed else None,
                    "recall": hits / self.noisy if self.noisy else None,
                }
            out.append(row)
        return out


def read_truth(truth_url: str) -> tuple[pa.Array, np.ndarray] | None:
    """The world's web truth: image paths (below ``images/``) and whether each caption is noisy."""
    fs, path = storage.filesystem(truth_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        truth = pq.read_table(f, columns=["path", "noisy"])
    return truth.column("path").combine_chunks(), np.asarray(truth.column("noisy").to_numpy(zero_copy_only=False))


def noisy_flags(table: pa.Table, truth: tuple[pa.Array, np.ndarray]) -> np.ndarray:
    """Per row: 1 if the truth says its image's web caption is noisy, 0 if clean, -1 if the truth has no such
    image (joined by the URL's path, as ``summary.filter_agreement`` does)."""
    paths = pa.array(
        [None if u is None else urlparse(u).path.lstrip("/") for u in table["url"].to_pylist()], pa.string()
    )
    idx = pc.fill_null(pc.index_in(paths, value_set=truth[0]), -1).to_numpy(zero_copy_only=False)
    return np.where(idx >= 0, truth[1][np.maximum(idx, 0)].astype(np.int64), -1)


def scan_capfilt(
    files: list[str], batch_size: int = 65536, sweep: Sweep | None = None, truth: tuple | None = None
) -> Totals:
    """Totals over every row of the CapFilt files, reading only the columns counted; with ``sweep``, the sweep
    too, in the same pass, a whole file at a time (an image's rows are in one file)."""
    totals = Totals()
    columns = ["source", "status", "keep", "itm_score", "itc_score"]
    if sweep is not None:
        columns += ["shard", "key", "candidate", *(c for c in sweep.rule.columns() if c not in columns)]
        columns += ["url"] if truth is not None else []
    for path in files:
        with storage.filesystem(path)[0].open(path, "rb") as fh:
            if sweep is None:
                for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns):
                    totals.add(batch)
                continue
            pf = pq.ParquetFile(fh)
            table = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names])  # the rule names what lacks
        for batch in table.to_batches(max_chunksize=batch_size):
            totals.add(batch)
        sweep.add(table, None if truth is None or "url" not in table.column_names else noisy_flags(table, truth))
        del table
    return totals


def sample_pool(files: list[str], n: int, max_files: int = 8) -> pa.Table | None:
    """The rows samples are drawn from: whole files, taken in a fixed order (a hash of the file name) until the
    pool holds ``n`` web rows kept and ``n`` removed, or ``max_files`` were read: a few files, not the run."""
    tables: list[pa.Table] = []
    kept = removed = 0
    for path in sorted(files, key=lambda p: hashlib.sha1(p.rsplit("/", 1)[-1].encode()).hexdigest())[:max_files]:
        with storage.filesystem(path)[0].open(path, "rb") as fh:
            t = pq.read_table(fh, columns=SAMPLE_COLUMNS)
        tables.append(t)
        web = [k for s, k in zip(t.column("source").to_pylist(), t.column("keep").to_pylist()) if s == "web"]
        kept, removed = kept + sum(web), removed + len(web) - sum(web)
        if kept >= n and removed >= n:
            break
    return pa.concat_tables(tables) if tables else None


def choose_samples(table: pa.Table, n: int) -> list[tuple[str, str]]:
    """``n`` images as (shard, key), chosen by a hash of the key (stable across reruns and machines): half whose web
    caption was kept, half whose web caption was removed, topped up from the other side when one runs short."""
    web = [r for r in table.select(["shard", "key", "source", "keep"]).to_pylist() if r["source"] == "web"]
    web.sort(key=lambda r: hashlib.sha1(f"{r['shard']}/{r['key']}".encode()).hexdigest())
    kept = [(r["shard"], r["key"]) for r in web if r["keep"]]
    removed = [(r["shard"], r["key"]) for r in web if not r["keep"]]
    take_kept = min(len(kept), max(n // 2, n - len(removed)))
    picks = kept[:take_kept] + removed[: n - take_kept]
    return sorted(picks)


def data_uri(image: bytes | None, max_side: int = 256) -> str | None:
    """An image as a ``data:`` URI, shrunk to ``max_side`` pixels (JPEG) when larger; None when undecodable."""
    from PIL import Image

    if not image:
        return None
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            fmt = (im.format or "").lower()
            if max(im.size) > max_side or fmt not in ("jpeg", "png"):
                im = im.convert("RGB")
                im.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=85)
                image, fmt = buf.getvalue(), "jpeg"
    except Exception:  # noqa: BLE001 - a corrupt image is shown as such, never a failed report
        return None
    return f"data:image/{fmt};base64,{base64.b64encode(image).decode('ascii')}"


def load_images(ingest_url: str, picks: list[tuple[str, str]]) -> dict[tuple[str, str], bytes | None]:
    """The encoded images of the picked samples, one front-to-back read per shard involved."""
    out: dict[tuple[str, str], bytes | None] = {p: None for p in picks}
    for shard in sorted({s for s, _ in picks}):
        keys = {k for s, k in picks if s == shard}
        try:
            for sample in iter_shard(storage.join(ingest_url, f"{shard}.tar"), keys=keys):
                out[(shard, sample.key)] = sample.image
        except Exception as err:  # noqa: BLE001 - a missing or broken shard costs its pictures, not the page
            log.warning("report: cannot read shard %s: %s", shard, err)
    return out
