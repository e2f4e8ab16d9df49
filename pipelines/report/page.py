"""The report page: one section per question, each with a stable id, and ``run_report``."""

from __future__ import annotations

import logging
from html import escape
from typing import Any

import numpy as np

from .. import storage
from ..config import RunConfig
from ..errors import StageError
from ..keep_rule import assemble_rule, capfilt_rule, config_settings, leak_distance, recorded_settings
from ..summary import filter_agreement
from .charts import bar_chart, fmt, line_chart
from .scan import (
    HISTOGRAMS,
    Sweep,
    Totals,
    capfilt_files,
    choose_samples,
    data_uri,
    load_images,
    read_json_or_none,
    read_metrics,
    read_truth,
    sample_pool,
    scan_capfilt,
)

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
JOBS = ("pretrain", "captioner", "filter")
LOSSES = ("itc", "itm", "lm", "loss")
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


def _sweep_section(totals: Totals | None, sweep: Sweep | None, note: str | None) -> str:
    if totals is None:
        return _na("no CapFilt Parquet")
    if sweep is None or not sweep.kept:
        return _na(note or "no keep rule to sweep")
    rows = sweep.rows()
    sources = sorted(sweep.kept, key=lambda s: (s != "web", s))
    marker = sweep.rule.itm_threshold
    kept = {s: [(r["threshold"], r["kept_share"][s]) for r in rows] for s in sources}
    out = [
        "<figure><figcaption>Kept share of each source's texts per ITM threshold (dashed: the threshold in use)"
        f"</figcaption>{line_chart('sweep-kept', kept, x_label='ITM threshold', y_max=1.0, marker=marker)}</figure>"
    ]
    truth = sweep.kept_known is not None
    if truth:
        pr = {m: [(r["threshold"], r[m]) for r in rows if r[m] is not None] for m in ("precision", "recall")}
        pr = {m: pts for m, pts in pr.items() if pts}
        if pr:
            out.append(
                "<figure><figcaption>Removing noisy web captions, against the world's truth: precision and recall "
                f"per ITM threshold</figcaption>"
                f"{line_chart('sweep-filter', pr, x_label='ITM threshold', y_max=1.0, marker=marker)}</figure>"
            )
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    head = "<tr><th>ITM threshold</th>" + "".join(f"<th>{escape(s)} kept</th>" for s in sources)
    head += "<th>web captions removed</th><th>precision</th><th>recall</th></tr>" if truth else "</tr>"
    body = "".join(
        f'<tr data-threshold="{r["threshold"]:.2f}"><td>{r["threshold"]:.2f}</td>'
        + "".join(f'<td class="{escape(s)}" data-kept="{r["kept"][s]}">{pct(r["kept_share"][s])}</td>' for s in sources)
        + (
            f'<td class="removed">{r["removed"]}</td><td class="precision">{pct(r["precision"])}</td>'
            f'<td class="recall">{pct(r["recall"])}</td>'
            if truth
            else ""
        )
        + "</tr>"
        for r in rows
    )
    rest = escape(sweep.rule.without_itm().describe())
    text = (
        '<p class="note">At each threshold t, the texts assemble\'s rule keeps with '
        f"<code>assemble.itm_threshold: t</code>: itm_score &gt; t and {rest}. Kept shares are of all the "
        "source's texts, bad input included."
        + (
            f" Precision and recall are of removing the {sweep.noisy} noisy captions among the {sweep.known} "
            "usable web captions the truth knows."
            if truth
            else " No ground truth here: no precision or recall."
        )
        + "</p>"
    )
    return "".join(out) + text + f'<table class="sweep">{head}{body}</table>'


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
            f'<q>{escape(r["text"] or "")}</q> <span class="score">ITM {fmt(r["itm_score"])}</span> '
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
                    + ", ".join(f"{escape(str(key))} {fmt(v)}" for key, v in r.items() if key != "kind")
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
    evals = {j: read_json_or_none(storage.join(rr.round(j, "eval"), "metrics.json")) for j in (k, k + 1)}
    if all(v is None for v in evals.values()):
        return _na(f"no evaluation for round {k} or {k + 1}")
    head = (
        f"<tr><th>metric</th><th>round {k} pre-trained (web data)</th>"
        f"<th>round {k + 1} pre-trained (bootstrapped data)</th></tr>"
    )
    rows = "".join(
        f'<tr data-metric="{name}"><td>{escape(label)}</td>'
        + "".join(
            f'<td class="round-{j}">{"not available" if evals[j] is None else fmt(_lookup(evals[j], name), 2)}</td>'
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
        ("auc", "ROC-AUC of 1 - ITM", fmt(a["filter_auc"])),
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
    sweep, note = _sweep_for(cfg, capfilt_url) if files else (None, None)
    truth = read_truth(storage.join(rr.world(), "truth", "web.parquet")) if sweep is not None else None
    try:
        totals = scan_capfilt(files, sweep=sweep, truth=truth) if files else None
    except StageError as err:  # a rule the Parquet cannot answer (a scorer's column missing): the page without it
        sweep, note = None, str(err)
        totals = scan_capfilt(files)
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
        _section("threshold-sweep", "Threshold sweep", _sweep_section(totals, sweep, note)),
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


def threshold_sweep(cfg: RunConfig, root: str, round: int) -> list[dict] | None:
    """The report's threshold sweep as rows (``Sweep.rows``: per ITM threshold, kept texts by source and, with the
    world's truth, precision and recall of removing noisy web captions); None when round K has no CapFilt output
    or its rule cannot be swept."""
    rr = storage.RunRoot(root)
    capfilt_url = rr.round(round, "capfilt")
    files = capfilt_files(capfilt_url)
    sweep, _ = _sweep_for(cfg, capfilt_url) if files else (None, None)
    if sweep is None:
        return None
    scan_capfilt(files, sweep=sweep, truth=read_truth(storage.join(rr.world(), "truth", "web.parquet")))
    return sweep.rows()


def _sweep_for(cfg: RunConfig, capfilt_url: str) -> tuple[Sweep | None, str | None]:
    """The sweep of assemble's rule (CapFilt's as recorded, else as configured, with ``assemble:``'s fields), or
    why there is none."""
    settings = recorded_settings(capfilt_url) or config_settings(cfg)
    try:
        base = capfilt_rule(settings, cfg.capfilt.plugins, order=list(cfg.capfilt.scorers))
        # duplicates are dropped image by image over the whole run: the sweep counts the rule without them
        return Sweep(assemble_rule(cfg.assemble, base, leak_distance(settings)).without_duplicates()), None
    except StageError as err:
        return None, str(err)


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
