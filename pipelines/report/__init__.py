"""One self-contained HTML page per round: what CapFilt kept, why, and what it did to the models.

``capfilt report --round K`` reads round K's committed outputs (the CapFilt Parquet, the three training jobs'
``metrics.jsonl``, ``eval/metrics.json``, round K+1's evaluation when there is one, the world's ground truth)
and writes ``<root>/round=K/eval/report.html``. Its threshold sweep shows what assemble's keep rule
(``pipelines/keep_rule.py``) would keep at each ITM threshold, so a user picks ``assemble.itm_threshold`` from a
plot; the counts, the histograms and the sweep come from one pass over the Parquet, a file at a time. The page
makes no external request — CSS inline, charts drawn here as SVG, sample images as data URIs read from the ingest
shards — so it can be attached to a ticket or opened straight from a bucket. Each section has a stable id; a
missing input renders as a "not available" note instead of failing the page. Captions are untrusted web text: every string goes through ``html.escape``.
"""

from .charts import bar_chart, line_chart
from .page import REPORT_NAME, render_report, run_report, threshold_sweep
from .scan import SWEEP_THRESHOLDS, Sweep, Totals, choose_samples, data_uri, histogram, read_metrics

__all__ = [
    "REPORT_NAME",
    "SWEEP_THRESHOLDS",
    "Sweep",
    "Totals",
    "bar_chart",
    "choose_samples",
    "data_uri",
    "histogram",
    "line_chart",
    "read_metrics",
    "render_report",
    "run_report",
    "threshold_sweep",
]
