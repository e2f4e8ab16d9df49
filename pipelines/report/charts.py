"""Inline SVG charts for the report: bar charts of binned shares and line charts of curves."""

from __future__ import annotations

import math
from collections.abc import Iterable
from html import escape
from typing import Any

COLOURS = {
    "web": "#d9534f",
    "synthetic": "#337ab7",
    "itc": "#337ab7",
    "itm": "#5cb85c",
    "lm": "#f0ad4e",
    "loss": "#333333",
    "precision": "#8e44ad",
    "recall": "#16a085",
}

# ------------------------------------------------------------------------------------------------ SVG


def fmt(x: Any, digits: int = 3) -> str:
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


def line_chart(
    chart_id: str,
    series: dict[str, list[tuple[float, float]]],
    width: int = 520,
    height: int = 220,
    *,
    x_label: str = "step",
    y_max: float | None = None,
    marker: float | None = None,
) -> str:
    """One polyline per series over a shared x axis (training steps by default) and a shared y axis from 0 (to
    ``y_max``, or the largest value); ``marker``: a dashed vertical line at that x."""
    left, right, top, bottom = 45, max(70, 24 + 7 * max(map(len, series), default=0)), 10, 30  # room for the legend
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ymax = y_max or max([y for pts in series.values() for _, y in pts] + [1e-9])
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
        f'<text x="{left}" y="{height - 10}">{escape(x_label)} {xmin:g}</text>',
        f'<text x="{left + pw}" y="{height - 10}" text-anchor="end">{xmax:g}</text>',
    ]
    if marker is not None:
        mx = left + pw * (marker - xmin) / xspan
        parts.append(
            f'<line class="threshold" x1="{mx:.1f}" y1="{top}" x2="{mx:.1f}" y2="{top + ph}" '
            f'stroke="#000" stroke-dasharray="4 3"><title>{escape(x_label)} {marker:g}</title></line>'
        )
    for name, pts in series.items():
        parts.append(
            f'<polyline class="series" data-series="{escape(name)}" data-points="{len(pts)}" fill="none" '
            f'stroke="{COLOURS.get(name, "#777")}" stroke-width="1.5" '
            f'points="{" ".join(pt(x, y) for x, y in pts)}"><title>{escape(name)}</title></polyline>'
        )
    parts.append(_legend(series, width - right + 10) + "</svg>")
    return "".join(parts)
