"""``pipelines.report``: the round report rendered by a real headless Chromium, checked on the DOM it builds.

The run root is the session's tiny world (synth + ingest, linked read-only) plus stage outputs written here in
a second: a CapFilt Parquet over every ingested image (the documented schema, scores from a seeded generator,
bad-input rows, and hostile web captions), two of the three training jobs' ``metrics.jsonl`` (the filter's is
left missing) and round 1's evaluation only (round 2's is missing). The report must show all of it, say
"not available" for the missing pieces, escape the hostile captions and make no external request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from capfilt_helpers import link_inputs
from integration_helpers import TINY

from pipelines import storage
from pipelines.capfilt import OUTPUT_SCHEMA
from pipelines.config import load_config
from pipelines.report import SWEEP_THRESHOLDS, choose_samples, run_report
from pipelines.shards import iter_shard, list_shards, shard_name
from pipelines.summary import filter_agreement

pytestmark = pytest.mark.integration

HOSTILE = "<script>alert(1)</script>"
HOSTILE_ATTR = '"><img src=x onerror=alert(2)>'
SAMPLES = 24


# ------------------------------------------------------------------------------------------------ a tiny DOM

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent, self.children, self.texts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(self.texts) + "".join(c.text() for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs} under <{self.tag} {self.attrs}>"
        return found[0]

    def by_class(self, cls: str) -> list[Node]:
        return [n for n in self.iter() if cls in (n.attrs.get("class") or "").split()]


class TreeBuilder(HTMLParser):
    """Enough of a DOM for assertions; Chromium's --dump-dom output is well-formed serialised HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.texts.append(data)


def parse(html: str) -> Node:
    b = TreeBuilder()
    b.feed(html)
    return b.root


# ------------------------------------------------------------------------------------------------ inputs


def write_capfilt(root: str, seed: int = 0) -> Path:
    """A CapFilt Parquet over every ingested image: one web and one synthetic row each, a few bad inputs,
    hostile captions on two of the images the report will pick."""
    rng = np.random.default_rng(seed)
    rows = []
    for shard_url in list_shards(storage.join(root, "ingest", "web")):
        for i, s in enumerate(iter_shard(shard_url)):
            base = {
                "key": s.key,
                "shard": shard_name(shard_url),
                "url": s.meta.get("url"),
                "round": 1,
                "captioner_id": "c" * 16,
                "filter_id": "f" * 16,
                "clip_score": None,
                "error": None,
                "seed": None,
            }
            bad = i % 37 == 5
            for source, cand, text in (("web", None, s.text), ("synthetic", 0, f"a picture of thing {s.key}")):
                if bad and source == "synthetic":
                    continue
                itm = None if bad else float(rng.beta(2, 2) if source == "web" else rng.beta(4, 2))
                itc = None if bad else float(rng.uniform(-0.3, 0.7))
                keep = itm is not None and itm > 0.5
                rows.append(
                    {
                        **base,
                        "source": source,
                        "candidate": cand,
                        "text": text,
                        "text_length": len(text),
                        "itm_score": itm,
                        "itc_score": itc,
                        "keep": keep,
                        "status": "corrupt_image" if bad else "ok",
                        "drop_reason": None if keep else ("bad_input" if bad else "itm_below_threshold"),
                    }
                )
    table = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
    shown = [k for _, k in choose_samples(table, SAMPLES)]  # the choice depends on keys and keep, not on texts
    texts = table.column("text").to_pylist()
    for i, (k, src) in enumerate(zip(table.column("key").to_pylist(), table.column("source").to_pylist())):
        if src == "web" and k in shown[:2]:
            texts[i] = HOSTILE if k == shown[0] else HOSTILE_ATTR
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    out = Path(root) / "round=1" / "capfilt"
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000.parquet", compression="zstd")
    storage.commit(str(out), {"rows": table.num_rows})
    return out


def write_metrics(root: str) -> dict:
    """pretrain (4 losses) and captioner (lm) metrics.jsonl, round 1's eval; the filter's metrics and round 2's
    eval stay missing."""
    r1 = Path(root) / "round=1"
    steps = {"pretrain": 12, "captioner": 7}
    for job, n in steps.items():
        (r1 / job).mkdir(parents=True)
        with open(r1 / job / "metrics.jsonl", "w") as f:
            for s in range(1, n + 1):
                losses = {"lm": 5 / s} if job == "captioner" else {"itc": 4 / s, "itm": 0.7, "lm": 5 / s}
                f.write(
                    json.dumps(
                        {"kind": "train", "step": 5 * s, "epoch": 0, **losses, "loss": sum(losses.values()), "lr": 1e-4}
                    )
                    + "\n"
                )
            f.write(json.dumps({"kind": "eval", "step": 5 * n, "epoch": 0, "r1_mean": 12.5}) + "\n")
    metrics = {
        "round": 1,
        "retrieval_r1": 13.75,
        "cider": 42.125,
        "caption_attribute_accuracy": 61.5,
        "images": 40,
        "retrieval": {"txt_r1": 17.5, "img_r1": 10.0, "txt_r5": 40.0, "img_r5": 35.0, "r_mean": 30.0},
        "captioning": {"bleu4": 8.25},
    }
    storage.write_json(str(r1 / "eval" / "metrics.json"), metrics)
    storage.commit(str(r1 / "eval"))
    return {"steps": steps, "eval": metrics}


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    pytest.fail("chromium is missing: run `make install` (it installs Debian's `chromium` package with apt-get)")


def run_chromium(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    """Chromium in its own process group, the whole group stopped if it hangs: a dialog opened by an injected
    ``alert()`` blocks a headless load forever, which is one of the failures this test is looking for."""
    proc = subprocess.Popen(
        [chromium(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(
            f"chromium did not finish loading the report in {timeout:.0f}s: a script in the page "
            "(injected through an unescaped caption?) may have opened a dialog"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def render(html_file: Path, tmp: Path) -> tuple[str, bytes]:
    """Chromium's DOM after loading the page (scripts run, if any got in), and a screenshot."""
    base = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'profile'}",
        "--window-size=1400,4000",
    ]
    dom = run_chromium(base + ["--dump-dom", html_file.as_uri()])
    assert dom.returncode == 0 and "<html" in dom.stdout, dom.stderr[-2000:]
    shot = tmp / "report.png"
    proc = run_chromium(base + [f"--screenshot={shot}", html_file.as_uri()])
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    return dom.stdout, shot.read_bytes()


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def report(tiny_world: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    root = link_inputs(tiny_world, tmp / "run")
    capfilt_dir = write_capfilt(root)
    written = write_metrics(root)
    url = run_report(load_config(TINY), root, 1)
    assert url == str(Path(root) / "round=1" / "eval" / "report.html")
    html = Path(url).read_text()
    dom, png = render(Path(url), tmp)
    return {"root": root, "capfilt": capfilt_dir, "html": html, "dom": parse(dom), "png": png, **written}


def test_sections_and_self_containment(report: dict) -> None:
    dom = report["dom"]
    for sid in (
        "kept-share",
        "score-histograms",
        "threshold-sweep",
        "samples",
        "training-curves",
        "evaluation",
        "filter-agreement",
    ):
        section = dom.find("section", id=sid)
        assert section.find("h2").text().strip()
    assert not dom.find_all("script") and not dom.find_all("link") and not dom.find_all("iframe")
    for node in dom.iter():
        for attr in ("src", "href", "srcset", "poster", "data"):
            value = node.attrs.get(attr)
            assert value is None or value.startswith(("data:", "#")), f"<{node.tag} {attr}={value[:80]}>"
    assert "url(" not in report["html"] and "@import" not in report["html"]
    from PIL import Image

    shot = Image.open(io.BytesIO(report["png"]))
    assert shot.size[0] == 1400 and len(np.unique(np.asarray(shot.convert("L")))) > 50  # drawn, not a blank page


def test_kept_share_matches_parquet(report: dict) -> None:
    expected = duckdb.sql(f"""SELECT source, count(*), count(*) FILTER (WHERE status <> 'ok'), sum(keep::INT)
                              FROM read_parquet('{report["capfilt"]}/part-*.parquet') GROUP BY source""").fetchall()
    section = report["dom"].find("section", id="kept-share")
    for source, texts, bad, kept in expected:
        row = section.find("tr", data_source=source)
        assert row.by_class("texts")[0].text() == str(texts)
        assert row.by_class("bad-input")[0].text() == str(bad)
        assert row.by_class("kept")[0].text() == str(kept)
        assert row.by_class("kept-share")[0].text() == f"{100 * kept / texts:.1f}%"
    assert {s for s, *_ in expected} == {"web", "synthetic"}


def test_score_histograms(report: dict) -> None:
    scored = dict(
        duckdb.sql(f"""SELECT source, count(itm_score) FROM read_parquet('{report["capfilt"]}/*.parquet')
                                 GROUP BY source""").fetchall()
    )
    section = report["dom"].find("section", id="score-histograms")
    for chart_id, bins in (("hist-itm", 20), ("hist-itc", 20)):
        bars = section.find("svg", id=chart_id).by_class("bar")
        assert len(bars) == 2 * bins
        for source in ("web", "synthetic"):
            mine = [b for b in bars if b.attrs["data-series"] == source]
            assert len(mine) == bins and sum(int(b.attrs["data-count"]) for b in mine) == scored[source]
    assert section.find("svg", id="hist-itm").by_class("threshold")


def test_samples_grid(report: dict) -> None:
    from PIL import Image

    section = report["dom"].find("section", id="samples")
    cards = section.by_class("card")
    imgs = section.find_all("img")
    assert len(cards) == SAMPLES and len(imgs) == SAMPLES
    for img in imgs:
        head, _, payload = img.attrs["src"].partition(",")
        assert head in ("data:image/jpeg;base64", "data:image/png;base64")
        with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
            im.load()
            assert im.size[0] > 8
    decisions = [c.find("li", **{"class": "web"}) for c in cards]
    assert any(d.by_class("keep") for d in decisions) and any(d.by_class("drop") for d in decisions)
    assert all(len(c.find_all("li", **{"class": "web"})) == 1 for c in cards)
    assert any(c.find_all("li", **{"class": "synthetic"}) for c in cards)
    assert "itm_below_threshold" in section.text()
    # hostile captions are text, not markup: no script ran or exists, the img count above is exact
    texts = [q.text() for q in section.find_all("q")]
    assert HOSTILE in texts and HOSTILE_ATTR in texts
    assert "<script>alert(1)" not in report["html"] and "&lt;script&gt;alert(1)&lt;/script&gt;" in report["html"]


def test_training_curves(report: dict) -> None:
    section = report["dom"].find("section", id="training-curves")
    expected = {"pretrain": {"itc", "itm", "lm", "loss"}, "captioner": {"lm", "loss"}}
    for job, series in expected.items():
        lines = section.find("svg", id=f"curve-{job}").by_class("series")
        assert {p.attrs["data-series"] for p in lines} == series
        for line in lines:
            assert int(line.attrs["data-points"]) == len(line.attrs["points"].split()) == report["steps"][job]
        assert "r1_mean" in section.find("div", id=f"training-{job}").text()  # the eval row
    missing = section.find("div", id="training-filter")
    assert not missing.find_all("svg") and "Not available" in missing.text()


def test_evaluation_table(report: dict) -> None:
    section = report["dom"].find("section", id="evaluation")
    m = report["eval"]
    for metric, value in (
        ("retrieval_r1", m["retrieval_r1"]),
        ("cider", m["cider"]),
        ("caption_attribute_accuracy", m["caption_attribute_accuracy"]),
        ("retrieval.txt_r1", m["retrieval"]["txt_r1"]),
        ("retrieval.img_r1", m["retrieval"]["img_r1"]),
    ):
        row = section.find("tr", data_metric=metric)
        assert row.by_class("round-1")[0].text() == f"{value:.2f}"
        assert row.by_class("round-2")[0].text() == "not available"
    assert "round 2 has no evaluation yet" in section.text()


def test_filter_agreement(report: dict) -> None:
    root = report["root"]
    agreement = filter_agreement(str(report["capfilt"]), storage.join(root, "world", "truth", "web.parquet"))
    section = report["dom"].find("section", id="filter-agreement")
    cell = lambda m: section.find("tr", data_metric=m).find_all("td")[1].text()  # noqa: E731
    assert cell("web-rows") == str(agreement["web_rows"]) and agreement["web_rows"] > 250
    assert cell("removed") == str(agreement["removed"])
    assert cell("precision") == f"{100 * agreement['precision']:.1f}%"
    assert cell("recall") == f"{100 * agreement['recall']:.1f}%"
    assert agreement["by_noise_type"] and all(t in section.text() for t in agreement["by_noise_type"])


def test_threshold_sweep(report: dict) -> None:
    """Kept texts per ITM threshold as DuckDB counts them (float32 comparisons, as the keep rule); at CapFilt's own
    threshold, the precision and recall of the filter-vs-truth section."""
    section = report["dom"].find("section", id="threshold-sweep")
    parquet = f"{report['capfilt']}/part-*.parquet"
    for t in SWEEP_THRESHOLDS:
        kept = dict(
            duckdb.sql(f"""SELECT source, count(*) FILTER (WHERE status = 'ok' AND itm_score > CAST({t} AS FLOAT))
                           FROM read_parquet('{parquet}') GROUP BY source""").fetchall()
        )
        row = section.find("tr", data_threshold=f"{t:.2f}")
        for source in ("web", "synthetic"):
            assert row.by_class(source)[0].attrs["data-kept"] == str(kept[source]), (t, source)
    agreement = filter_agreement(str(report["capfilt"]), storage.join(report["root"], "world", "truth", "web.parquet"))
    row = section.find("tr", data_threshold="0.50")
    assert row.by_class("removed")[0].text() == str(agreement["removed"])
    assert row.by_class("precision")[0].text() == f"{100 * agreement['precision']:.1f}%"
    assert row.by_class("recall")[0].text() == f"{100 * agreement['recall']:.1f}%"
    for chart_id, series in (("sweep-kept", {"web", "synthetic"}), ("sweep-filter", {"precision", "recall"})):
        svg = section.find("svg", id=chart_id)
        assert {p.attrs["data-series"] for p in svg.by_class("series")} == series
        assert svg.by_class("threshold")
    assert all(
        int(p.attrs["data-points"]) == len(SWEEP_THRESHOLDS)
        for p in section.find("svg", id="sweep-kept").by_class("series")
    )
