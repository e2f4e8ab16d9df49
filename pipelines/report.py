"""One self-contained HTML page per round: what CapFilt kept, why, and what it did to the models.

``capfilt report --round K`` reads round K's committed outputs (the CapFilt Parquet, the three training jobs'
``metrics.jsonl``, ``eval/metrics.json``, round K+1's evaluation when there is one, the world's ground truth)
and writes ``<root>/round=K/eval/report.html``. The page makes no external request — CSS inline, charts drawn
here as SVG, sample images as data URIs read from the ingest shards — so it can be attached to a ticket or
opened straight from a bucket. Each section has a stable id; a missing input renders as a "not available"
note instead of failing the page. Captions are untrusted web text: every string goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .config import RunConfig
from .shards import iter_shard
from .summary import filter_agreement

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
JOBS = ("pretrain", "captioner", "filter")
LOSSES = ("itc", "itm", "lm", "loss")
COLOURS = {
    "web": "#d9534f",
    "synthetic": "#337ab7",
    "itc": "#337ab7",
    "itm": "#5cb85c",
    "lm": "#f0ad4e",
    "loss": "#333333",
}
EVAL_ROWS = (
    ("retrieval_r1", "retrieval R@1 (mean TR/IR)"),
    ("retrieval.txt_r1", "text retrieval R@1"),
    ("retrieval.img_r1", "image retrieval R@1"),
    ("retrieval.txt_r5", "text retrieval R@5"),
    ("retrieval.img_r5", "image retrieval R@5"),
    ("retrieval.r_mean", "retrieval mean recall"),
    ("cider", "CIDEr"),
    ("captioning.bleu4", "BLEU-4"),
    ("caption_attribute_accuracy", "caption attribute accuracy (%)"),
    ("images", "test images"),
)
SAMPLE_COLUMNS = ["key", "shard", "text", "source", "candidate", "itm_score", "keep", "drop_reason", "status"]
HISTOGRAMS = (("itm_score", 0.0, 1.0, 20, "ITM P(match)"), ("itc_score", -1.0, 1.0, 20, "ITC cosine similarity"))


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


def _read_json_or_none(url: str) -> Any:
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


def scan_capfilt(files: list[str], batch_size: int = 65536) -> Totals:
    """Totals over every row of the CapFilt files, reading only the columns counted."""
    totals = Totals()
    columns = ["source", "status", "keep", "itm_score", "itc_score"]
    for path in files:
        with storage.filesystem(path)[0].open(path, "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=columns):
                totals.add(batch)
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


# ------------------------------------------------------------------------------------------------ SVG


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _legend(names: Iterable[str], x: float) -> str:
    return "".join(
        f'<rect x="{x}" y="{8 + 16 * i}" width="10" height="10" fill="{COLOURS.get(n, "#777")}"/>'
        f'<text x="{x + 14}" y="{17 + 16 * i}">{escape(n)}</text>'
        for i, n in enumerate(names)
    )


def bar_chart(
    chart_id: str,
    lo: float,
    hi: float,
    series: dict[str, list[int]],
    marker: float | None = None,
    width: int = 520,
    height: int = 220,
) -> str:
    """Grouped bars, one group per bin, height = the bin's share of its series (sources differ in size)."""
    bins = len(next(iter(series.values())))
    left, right, top, bottom = 40, 90, 10, 30
    pw, ph = width - left - right, height - top - bottom
    gw = pw / bins
    bw = gw / (len(series) + 1)
    shares = {n: [c / max(sum(cs), 1) for c in cs] for n, cs in series.items()}
    ymax = max([max(s) for s in shares.values()] + [1e-9])
    parts = [
        f'<svg id="{chart_id}" class="chart bar-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>',
    ]
    for si, (name, counts) in enumerate(series.items()):
        for b, c in enumerate(counts):
            h = ph * shares[name][b] / ymax
            b_lo = lo + (hi - lo) * b / bins
            parts.append(
                f'<rect class="bar" data-series="{escape(name)}" data-bin="{b_lo:.2f}" data-count="{c}" '
                f'x="{left + b * gw + (si + 0.5) * bw:.1f}" y="{top + ph - h:.1f}" width="{bw:.1f}" '
                f'height="{h:.1f}" fill="{COLOURS.get(name, "#777")}"><title>{escape(name)} '
                f"[{b_lo:.2f}, {b_lo + (hi - lo) / bins:.2f}): {c}</title></rect>"
            )
    for b in range(0, bins + 1, max(bins // 5, 1)):
        parts.append(
            f'<text x="{left + b * gw:.1f}" y="{height - 10}" text-anchor="middle">'
            f"{lo + (hi - lo) * b / bins:.1f}</text>"
        )
    parts.append(f'<text x="4" y="{top + 10}">{100 * ymax:.0f}%</text>')
    if marker is not None:
        mx = left + pw * (marker - lo) / (hi - lo)
        parts.append(
            f'<line class="threshold" x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + ph}" '
            f'stroke="#000" stroke-dasharray="4 3"><title>threshold {marker}</title></line>'
        )
    parts.append(_legend(series, width - right + 10) + "</svg>")
    return "".join(parts)


def line_chart(chart_id: str, series: dict[str, list[tuple[float, float]]], width: int = 520, height: int = 220) -> str:
    """One polyline per series over a shared step axis and a shared y axis from 0."""
    left, right, top, bottom = 45, 70, 10, 30
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ymax = max([y for pts in series.values() for _, y in pts] + [1e-9])
    xmin, xmax = min(xs), max(xs)
    xspan = (xmax - xmin) or 1

    def pt(x: float, y: float) -> str:
        return f"{left + pw * (x - xmin) / xspan:.1f},{top + ph * (1 - y / ymax):.1f}"

    parts = [
        f'<svg id="{chart_id}" class="chart line-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>',
        f'<text x="4" y="{top + 10}">{ymax:.2f}</text><text x="4" y="{top + ph}">0</text>',
        f'<text x="{left}" y="{height - 10}">step {xmin:g}</text>',
        f'<text x="{left + pw}" y="{height - 10}" text-anchor="end">{xmax:g}</text>',
    ]
    for name, pts in series.items():
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" data-points="{len(pts)}" fill="none" '
            f'stroke="{COLOURS.get(name, "#777")}" stroke-width="1.5" '
            f'points="{" ".join(pt(x, y) for x, y in pts)}"><title>{escape(name)}</title></polyline>'
        )
    parts.append(_legend(series, width - right + 10) + "</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ sections


def _na(what: str) -> str:
    return f'<p class="na">Not available: {escape(what)}.</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{body}</section>'


def _kept_section(totals: Totals | None, capfilt_url: str) -> str:
    if totals is None:
        return _na(f"no CapFilt Parquet at {capfilt_url}")
    head = (
        "<tr><th>source</th><th>texts</th><th>bad input</th><th>kept</th><th>kept share</th>"
        "<th>kept share of usable texts</th></tr>"
    )
    rows = "".join(
        f'<tr data-source="{escape(r["source"])}"><td>{escape(r["source"])}</td>'
        f'<td class="texts">{r["texts"]}</td><td class="bad-input">{r["bad_input"]}</td>'
        f'<td class="kept">{r["kept"]}</td><td class="kept-share">{100 * r["kept_share"]:.1f}%</td>'
        f"<td>{100 * r['kept_share_usable']:.1f}%</td></tr>"
        for r in totals.kept_share()
    )
    return (
        f'<table>{head}{rows}</table><p class="note">Bad input (corrupt or missing image, empty or too long '
        f"text) is never scored and never kept. Source: <code>{escape(capfilt_url)}</code></p>"
    )


def _histogram_section(totals: Totals | None, threshold: float) -> str:
    if totals is None:
        return _na("no CapFilt Parquet")
    out = []
    for col, lo, hi, bins, title in HISTOGRAMS:
        series = {s: totals.hists.get((col, s), np.zeros(bins, dtype=np.int64)).tolist() for s in ("web", "synthetic")}
        chart_id = f"hist-{col.split('_')[0]}"
        marker = threshold if col == "itm_score" else None
        out.append(
            f"<figure><figcaption>{escape(title)}: share of each source's scored texts per bin"
            f"{' (dashed: keep threshold)' if marker is not None else ''}</figcaption>"
            f"{bar_chart(chart_id, lo, hi, series, marker)}</figure>"
        )
    return "".join(out)


def _decision(row: dict) -> str:
    if row["keep"]:
        return '<span class="keep">kept</span>'
    return f'<span class="drop">dropped: {escape(str(row["drop_reason"] or row["status"]))}</span>'


def _samples_section(files: list[str], ingest_url: str, n: int) -> str:
    table = sample_pool(files, n)
    if table is None:
        return _na("no CapFilt Parquet")
    picks = choose_samples(table, n)
    if not picks:
        return _na("no web rows")
    images = load_images(ingest_url, picks)
    wanted = set(picks)
    by_image: dict[tuple[str, str], list[dict]] = {}
    for r in table.to_pylist():
        if (r["shard"], r["key"]) in wanted:
            by_image.setdefault((r["shard"], r["key"]), []).append(r)
    cards = []
    for pick in picks:
        rows = sorted(by_image[pick], key=lambda r: (r["source"] != "web", r["candidate"] or 0))
        uri = data_uri(images.get(pick))
        img = f'<img src="{uri}" alt="{escape(pick[1])}">' if uri else '<div class="noimg">image not available</div>'
        texts = "".join(
            f'<li class="{escape(r["source"])}"><span class="label">{escape(r["source"])}'
            f"{'' if r['candidate'] is None else ' ' + str(r['candidate'])}</span> "
            f'<q>{escape(r["text"] or "")}</q> <span class="score">ITM {_fmt(r["itm_score"])}</span> '
            f"{_decision(r)}</li>"
            for r in rows
        )
        cards.append(
            f'<div class="card" data-shard="{escape(pick[0])}" data-key="{escape(pick[1])}">{img}'
            f'<div class="key">{escape(pick[0])}/{escape(pick[1])}</div><ul>{texts}</ul></div>'
        )
    return f'<div class="grid">{"".join(cards)}</div>'


def _training_section(rr: storage.RunRoot, k: int) -> str:
    out = []
    for job in JOBS:
        url = storage.join(rr.round(k, job), "metrics.jsonl")
        rows = read_metrics(url)
        train = [r for r in rows or [] if r.get("kind", "train") == "train" and "step" in r]
        series = {n: [(r["step"], r[n]) for r in train if r.get(n) is not None] for n in LOSSES}
        series = {n: pts for n, pts in series.items() if pts}
        body = line_chart(f"curve-{job}", series) if series else _na(f"no training losses in {url}")
        other = [r for r in rows or [] if r.get("kind", "train") != "train"]
        if other:
            body += (
                '<table class="small">'
                + "".join(
                    f"<tr><th>{escape(str(r.get('kind')))}</th><td>"
                    + ", ".join(f"{escape(str(key))} {_fmt(v)}" for key, v in r.items() if key != "kind")
                    + "</td></tr>"
                    for r in other
                )
                + "</table>"
            )
        out.append(f'<div class="job" id="training-{job}"><h3>{job}</h3>{body}</div>')
    return "".join(out)


def _lookup(d: dict | None, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _eval_section(rr: storage.RunRoot, k: int) -> str:
    evals = {j: _read_json_or_none(storage.join(rr.round(j, "eval"), "metrics.json")) for j in (k, k + 1)}
    if all(v is None for v in evals.values()):
        return _na(f"no evaluation for round {k} or {k + 1}")
    head = (
        f"<tr><th>metric</th><th>round {k} pre-trained (web data)</th>"
        f"<th>round {k + 1} pre-trained (bootstrapped data)</th></tr>"
    )
    rows = "".join(
        f'<tr data-metric="{name}"><td>{escape(label)}</td>'
        + "".join(
            f'<td class="round-{j}">{"not available" if evals[j] is None else _fmt(_lookup(evals[j], name), 2)}</td>'
            for j in (k, k + 1)
        )
        + "</tr>"
        for name, label in EVAL_ROWS
    )
    missing = "".join(_na(f"round {j} has no evaluation yet") for j, v in evals.items() if v is None)
    return f"<table>{head}{rows}</table>{missing}"


def _agreement_section(rr: storage.RunRoot, k: int, has_parquet: bool) -> str:
    truth = storage.join(rr.world(), "truth", "web.parquet")
    if not storage.filesystem(truth)[0].exists(storage.filesystem(truth)[1]):
        return _na("this run has no synthetic world (no ground truth)")
    if not has_parquet:
        return _na("no CapFilt Parquet")
    a = filter_agreement(rr.round(k, "capfilt"), truth)
    if a is None:
        return _na("ground truth unreadable")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    items = [
        ("web-rows", "web captions scored", a["web_rows"]),
        ("noisy", "noisy in truth", a["noisy"]),
        ("removed", "removed by the filter", a["removed"]),
        ("precision", "precision", pct(a["precision"])),
        ("recall", "recall", pct(a["recall"])),
        ("auc", "ROC-AUC of 1 - ITM", _fmt(a["filter_auc"])),
        ("noise-before", "noise rate before", pct(a["noise_rate_before"])),
        ("noise-after", "noise rate after", pct(a["noise_rate_after"])),
    ]
    rows = "".join(f'<tr data-metric="{m}"><td>{escape(label)}</td><td>{v}</td></tr>' for m, label, v in items)
    types = "".join(
        f"<tr><td>{escape(t)}</td><td>{v['noisy']}</td><td>{v['removed']}</td><td>{pct(v['recall'])}</td></tr>"
        for t, v in a["by_noise_type"].items()
    )
    return (
        f"<table>{rows}</table><h3>By noise type</h3><table><tr><th>noise type</th><th>noisy</th>"
        f"<th>removed</th><th>recall</th></tr>{types}</table>"
    )


# ------------------------------------------------------------------------------------------------ page

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}table.small td{text-align:left;font-size:12px}
.na{color:#a94442;font-style:italic}.note{color:#666;font-size:12px}svg text{font-size:11px;fill:#333}
figure{display:inline-block;margin:0 2em 1em 0}.job{display:inline-block;vertical-align:top;margin-right:1em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:4px;padding:6px}.card img{width:100%;image-rendering:pixelated}
.card ul{list-style:none;padding:0;margin:4px 0}.card li{margin:3px 0;font-size:12px;overflow-wrap:anywhere}
.key{font-size:11px;color:#888}.label{font-weight:bold}.keep{color:#3c763d}.drop{color:#a94442}
.score{color:#555}.noimg{height:120px;background:#eee;display:flex;align-items:center;justify-content:center}"""


def render_report(cfg: RunConfig, root: str, round: int, samples: int = 24) -> str:
    """The report's HTML for round ``round`` of the run at ``root``."""
    rr = storage.RunRoot(root)
    capfilt_url = rr.round(round, "capfilt")
    files = capfilt_files(capfilt_url)
    totals = scan_capfilt(files) if files else None
    ingest_url = rr.ingest(cfg.capfilt.source or cfg.ingest.source)
    committed = bool(files) and storage.is_committed(capfilt_url)
    warn = "" if committed or not files else _na("the CapFilt stage has not committed; partial output shown")
    sections = [
        _section("kept-share", "Kept share by source", warn + _kept_section(totals, capfilt_url)),
        _section(
            "score-histograms",
            "Filter scores: web vs synthetic texts",
            _histogram_section(totals, cfg.capfilt.itm_threshold),
        ),
        _section("samples", "Sample images and their captions", _samples_section(files, ingest_url, samples)),
        _section("training-curves", "Training curves", _training_section(rr, round)),
        _section("evaluation", "Evaluation on the held-out set", _eval_section(rr, round)),
        _section("filter-agreement", "Filter vs ground truth", _agreement_section(rr, round, bool(files))),
    ]
    title = f"CapFilt report: {cfg.name}, round {round}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<style>{CSS}</style></head><body><h1>{escape(title)}</h1><p class="note">Run root '
        f"<code>{escape(root)}</code>; keep rule: {escape(_keep_rule(capfilt_url, committed))}.</p>"
        f"{''.join(sections)}</body></html>"
    )


def _keep_rule(capfilt_url: str, committed: bool) -> str:
    """The rule the CapFilt stage applied, as it recorded it (``pipelines/capfilt/rows.py``)."""
    if not committed:
        return "unknown until the CapFilt stage commits"
    return storage.read_commit(capfilt_url).get("settings", {}).get("keep_rule", "not recorded")


def run_report(cfg: RunConfig, root: str, round: int, *, samples: int = 24) -> str:
    """Write ``<root>/round=K/eval/report.html`` and return its URL."""
    url = storage.join(storage.RunRoot(root).round(round, "eval"), REPORT_NAME)
    storage.publish_text(url, render_report(cfg, root, round, samples))
    log.info("report for round %d written to %s", round, url)
    return url
