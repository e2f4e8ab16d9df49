"""The report's pure helpers: counts, bins, the sample choice, images as data URIs, charts, missing inputs."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
from PIL import Image

from pipelines.config import load_config
from pipelines.report import (
    Totals,
    bar_chart,
    choose_samples,
    data_uri,
    histogram,
    line_chart,
    read_metrics,
    render_report,
)


def _table(n: int = 40) -> pa.Table:
    rows = []
    for i in range(n):
        key = f"{i:07d}"
        bad = i == 3
        rows.append(
            {
                "key": key,
                "shard": f"{i // 20:05d}",
                "source": "web",
                "keep": i % 3 == 0 and not bad,
                "status": "corrupt_image" if bad else "ok",
                "itm_score": None if bad else i / n,
                "itc_score": None if bad else -0.95,
            }
        )
        if not bad:
            rows.append(
                {
                    "key": key,
                    "shard": f"{i // 20:05d}",
                    "source": "synthetic",
                    "keep": i % 2 == 0,
                    "status": "ok",
                    "itm_score": 1 - i / n,
                    "itc_score": 0.95,
                }
            )
    return pa.Table.from_pylist(rows)


def test_totals_count_bad_input_apart_batch_by_batch() -> None:
    table, totals = _table(), Totals()
    for batch in table.to_batches(max_chunksize=7):  # counts must not depend on how rows are batched
        totals.add(batch)
    web, syn = totals.kept_share()
    assert (web["source"], web["texts"], web["bad_input"], web["kept"]) == ("web", 40, 1, 13)
    assert (syn["source"], syn["texts"], syn["bad_input"], syn["kept"]) == ("synthetic", 39, 0, 20)
    assert web["kept_share"] == 13 / 40 and web["kept_share_usable"] == 13 / 39
    assert totals.hists[("itm_score", "web")].tolist() == histogram([i / 40 for i in range(40) if i != 3], 0, 1, 20)
    assert totals.hists[("itc_score", "web")].tolist() == [39] + [0] * 19
    assert totals.hists[("itc_score", "synthetic")].tolist() == [0] * 19 + [39]


def test_histogram_bins_and_clipping() -> None:
    assert histogram([0.0, 0.05, 0.1, 0.99, 1.0, 1.5, -2, None, float("nan")], 0, 1, 10) == [
        3,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        3,
    ]
    assert histogram([], -1, 1, 20) == [0] * 20


def test_choose_samples_is_deterministic_and_mixed() -> None:
    t = _table()
    picks = choose_samples(t, 10)
    assert picks == choose_samples(t.take(list(reversed(range(t.num_rows)))), 10)  # not the row order
    kept = {(r["shard"], r["key"]) for r in t.to_pylist() if r["source"] == "web" and r["keep"]}
    assert len(picks) == 10 and len(set(picks)) == 10 and sum(p in kept for p in picks) == 5
    assert len(choose_samples(t, 100)) == 40  # no more than there are
    only_removed = t.filter(pa.compute.invert(t["keep"]))
    assert len(choose_samples(only_removed, 10)) == 10


def test_data_uri_embeds_shrinks_and_refuses_garbage() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (600, 300), "red").save(buf, format="PNG")
    uri = data_uri(buf.getvalue(), max_side=128)
    head, _, payload = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    assert Image.open(io.BytesIO(base64.b64decode(payload))).size == (128, 64)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(small, format="PNG")
    assert data_uri(small.getvalue()) == "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    assert data_uri(b"not an image") is None and data_uri(None) is None


def test_charts_escape_series_names() -> None:
    svg = bar_chart("h", 0, 1, {"web": [1, 2], "<b>": [0, 0]}, marker=0.5)
    assert svg.count('class="bar"') == 4 and "<b>" not in svg and 'class="threshold"' in svg
    svg = line_chart("c", {"loss": [(1, 2.0), (2, 1.0)], "lm": [(1, 1.0)]})
    assert svg.count('class="series"') == 2 and 'data-points="2"' in svg


def test_read_metrics_skips_a_torn_line(tmp_path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n" + '{"kind": "tr')
    assert read_metrics(str(p)) == [{"kind": "train", "step": 1, "loss": 2.0}]
    assert read_metrics(str(tmp_path / "absent.jsonl")) is None


def test_empty_run_root_renders_not_available(tmp_path) -> None:
    html = render_report(load_config("flows/configs/tiny.yaml"), str(tmp_path / "nothing"), 1)
    for sid in ("kept-share", "score-histograms", "samples", "training-curves", "evaluation", "filter-agreement"):
        assert f'<section id="{sid}">' in html
    assert html.count("Not available") >= 6 and "<svg" not in html and "<img" not in html
