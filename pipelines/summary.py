"""What a user wants to see at the end of a bootstrap run, read back from the committed outputs.

Images ingested; kept shares by source per round; for a synthetic world, how well the filter agreed with the
ground truth (precision and recall of removing noisy web captions, ROC-AUC of its ITM score); round k vs
k+1 evaluation; a DuckDB one-liner; and where the Parquet, checkpoints and evaluations are. Returned both as
plain text (printed by ``make demo``) and as markdown (the Prefect artifact).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .config import RunConfig


def _read_table(url: str, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(url)
    files = sorted(
        p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
    )
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney ROC-AUC (ties count half); None without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank of each distinct score, ties averaged
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def filter_agreement(capfilt_url: str, truth_url: str) -> dict[str, Any] | None:
    """Filter decisions on web captions against the world's truth (joined by the image URL's path)."""
    fs, path = storage.filesystem(truth_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        truth = pq.read_table(f, columns=["path", "noisy", "noise_type"])
    noisy_by_path = dict(zip(truth.column("path").to_pylist(), truth.column("noisy").to_pylist()))
    type_by_path = dict(zip(truth.column("path").to_pylist(), truth.column("noise_type").to_pylist()))
    rows = _read_table(capfilt_url, ["url", "source", "status", "keep", "itm_score"])
    rows = rows.filter(pc.and_(pc.equal(rows["source"], "web"), pc.equal(rows["status"], "ok")))
    paths = [urlparse(u).path.lstrip("/") for u in rows.column("url").to_pylist()]
    known = [p in noisy_by_path for p in paths]
    noisy = np.array([noisy_by_path.get(p, False) for p in paths])[known]
    removed = ~np.array(rows.column("keep").to_pylist(), dtype=bool)[known]
    itm = np.array(rows.column("itm_score").to_pylist(), dtype=float)[known]
    tp = int((removed & noisy).sum())
    by_type = {}
    types = np.array([type_by_path.get(p) for p in paths], dtype=object)[known]
    for t in sorted({t for t in types if t}):
        sel = types == t
        by_type[t] = {
            "noisy": int(sel.sum()),
            "removed": int((removed & sel).sum()),
            "recall": float((removed & sel).sum() / max(int(sel.sum()), 1)),
        }
    return {
        "web_rows": int(len(noisy)),
        "noisy": int(noisy.sum()),
        "removed": int(removed.sum()),
        "precision": tp / max(int(removed.sum()), 1),
        "recall": tp / max(int(noisy.sum()), 1),
        "filter_auc": roc_auc(-itm, noisy),  # a low P(match) should flag a noisy caption
        "noise_rate_before": float(noisy.mean()) if len(noisy) else None,
        "noise_rate_after": float((noisy & ~removed).sum() / max(int((~removed).sum()), 1)),
        "by_noise_type": by_type,
    }


def _pr(flagged: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    tp = int((flagged & true).sum())
    return {
        "true": int(true.sum()),
        "flagged": int(flagged.sum()),
        "precision": tp / max(int(flagged.sum()), 1),
        "recall": tp / max(int(true.sum()), 1),
    }


def copies_agreement(capfilt_url: str, copies_url: str, duplicate_distance: int, leak_distance: int) -> dict | None:
    """The phash scorer's duplicates and test-set leaks against the world's injected copies (``truth/copies.parquet``,
    joined by the image URL's path), per web image with a hash. Duplicates: the groups of ``pipelines/dedup.py`` at
    ``duplicate_distance``; an image is flagged when it is not its group's representative (what
    ``assemble.drop_duplicates`` drops), rightly when the representative has the same source (a copy's source is
    the image it copies, an original's itself); recall is over the duplicate copies. Leaks: ``leak_distance <=
    leak_distance`` against the leak copies. None when the world has no copies or the run no phash scorer."""
    from .dedup import group_representatives

    fs, path = storage.filesystem(copies_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        copies = pq.read_table(f).to_pylist()
    cols = ["shard", "key", "url", "source", "phash", "leak_distance"]
    try:
        rows = _read_table(capfilt_url, cols)
    except (KeyError, ValueError, pa.ArrowInvalid):  # no phash scorer in this run
        return None
    rows = rows.filter(pc.and_(pc.equal(rows["source"], "web"), pc.is_valid(rows["phash"])))
    img = rows.group_by(["shard", "key"], use_threads=False).aggregate(
        [("url", "min"), ("phash", "min"), ("leak_distance", "min")]
    )
    img = img.sort_by([("shard", "ascending"), ("key", "ascending")])
    paths = np.array([urlparse(u).path.lstrip("/") for u in img["url_min"].to_pylist()], dtype=object)
    by_path = {c["path"]: c for c in copies}
    origin = np.array([by_path[p]["source_path"] if p in by_path else p for p in paths], dtype=object)
    kind = np.array([by_path[p]["kind"] if p in by_path else None for p in paths], dtype=object)
    how = np.array([by_path[p]["transform"].split(":")[0] if p in by_path else None for p in paths], dtype=object)
    rep = group_representatives(img["phash_min"].to_numpy(), duplicate_distance)
    flagged = rep != np.arange(len(rep))
    right = flagged & (origin == origin[rep])
    dup = kind == "duplicate"
    leak_flag = img["leak_distance_min"].to_numpy() <= leak_distance
    leak = kind == "leak"
    out: dict[str, Any] = {
        "images": len(paths),
        "duplicates": {
            **_pr(flagged, dup),
            "precision": int(right.sum()) / max(int(flagged.sum()), 1),
            "recall": int((right & dup).sum()) / max(int(dup.sum()), 1),
            "distance": duplicate_distance,
        },
        "leaks": {**_pr(leak_flag, leak), "distance": leak_distance},
    }
    for name, sel, found in (("duplicates", dup, right), ("leaks", leak, leak_flag)):
        out[name]["recall_by_transform"] = {
            t: float((found & sel & (how == t)).sum() / max(int((sel & (how == t)).sum()), 1))
            for t in sorted({h for h in how[sel] if h})
        }
    return out


def run_summary(cfg: RunConfig, root: str) -> dict[str, Any]:
    rr = storage.RunRoot(root)
    rounds = cfg.flow.rounds
    ingest_url = rr.ingest(cfg.ingest.source)
    manifest = storage.read_json(storage.join(ingest_url, "manifest.json"))
    out: dict[str, Any] = {
        "root": root,
        "mode": cfg.flow.mode,
        "ingest": {k: manifest.get(k) for k in ("total", "successes", "success_rate")},
        "rounds": [],
    }
    truth = storage.join(rr.world(), "truth", "web.parquet")
    for k in range(1, rounds + 1):
        capfilt_url = rr.round(k, "capfilt")
        dataset = storage.read_json(storage.join(rr.round(k, "dataset"), "summary.json"))
        out["rounds"].append(
            {
                "round": k,
                "capfilt": capfilt_url,
                "dataset": dataset,
                "filter_vs_truth": filter_agreement(capfilt_url, truth) if cfg.world is not None else None,
                "copies_vs_truth": copies_vs_truth(cfg, rr, capfilt_url),
                "captioner": cfg.capfilt.captioner or storage.join(rr.round(k, "captioner"), "model"),
                "filter": cfg.capfilt.filter or storage.join(rr.round(k, "filter"), "model"),
                "report": storage.join(rr.round(k, "eval"), "report.html"),
            }
        )
    out["eval_paths"] = {k: storage.join(rr.round(k, "eval"), "metrics.json") for k in cfg.pretrained_rounds}
    out["eval"] = {k: storage.read_json(url) for k, url in out["eval_paths"].items()}
    out["duckdb"] = (
        f'duckdb -c "SELECT source, count(*) AS rows, avg(keep::INT) AS kept_share FROM '
        f"read_parquet('{storage.join(rr.round(1, 'capfilt'), 'part-*.parquet')}') GROUP BY source\""
    )
    out["text"], out["markdown"] = _render(out)
    return out


def copies_vs_truth(cfg: RunConfig, rr: storage.RunRoot, capfilt_url: str) -> dict | None:
    """``copies_agreement`` for a world with injected copies and a run with the phash scorer, else None."""
    phash = cfg.capfilt.scorers.get("phash")
    if cfg.world is None or phash is None or not phash.enabled:
        return None
    from .world.layout import copies_url

    leak = int((phash.model_extra or {}).get("leak_distance", 4))
    return copies_agreement(capfilt_url, copies_url(rr.world()), cfg.assemble.duplicate_distance, leak)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _render(s: dict) -> tuple[str, str]:
    ing = s["ingest"]
    text = [
        f"capfilt run at {s['root']}",
        f"  images ingested: {ing['successes']} of {ing['total']} URLs ({_pct(ing['success_rate'])})",
    ]
    md = [
        f"# CapFilt {s.get('mode', 'bootstrap')}: `{s['root']}`",
        "",
        f"Images ingested: **{ing['successes']}** of {ing['total']} URLs ({_pct(ing['success_rate'])}).",
        "",
    ]
    md += [
        "| round | web kept | synthetic kept | human pairs | next-round pairs | filter precision | filter recall | filter AUC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []  # after the table: duplicates and leaks against the world's truth
    for r in s["rounds"]:
        d, f = r["dataset"], r["filter_vs_truth"]
        web = d["web"]["kept"] / max(d["web"]["total"], 1)
        syn = d["synthetic"]["kept"] / max(d["synthetic"]["total"], 1)
        text.append(
            f"  round {r['round']}: kept {d['web']['kept']}/{d['web']['total']} web texts ({_pct(web)}), "
            f"{d['synthetic']['kept']}/{d['synthetic']['total']} synthetic ({_pct(syn)}); "
            f"next round trains on {d['total_pairs']} pairs"
        )
        c = r.get("copies_vs_truth")
        if c:
            for name in ("duplicates", "leaks"):
                x = c[name]
                line = (
                    f"{name} vs ground truth (phash within {x['distance']} bits): flagged {x['flagged']} of "
                    f"{c['images']} web images; precision {_pct(x['precision'])}, recall {_pct(x['recall'])} "
                    f"of the {x['true']} injected"
                )
                text.append("    " + line)
                notes.append(f"- round {r['round']}, {line}.")
        if f:
            auc = "n/a" if f["filter_auc"] is None else f"{f['filter_auc']:.3f}"
            text.append(
                f"    filter vs ground truth: removed {f['removed']} of {f['web_rows']} web captions; "
                f"precision {_pct(f['precision'])}, recall {_pct(f['recall'])} of the {f['noisy']} noisy ones; "
                f"ITM AUC {auc}; noise {_pct(f['noise_rate_before'])} -> {_pct(f['noise_rate_after'])}"
            )
        md.append(
            f"| {r['round']} | {d['web']['kept']}/{d['web']['total']} ({_pct(web)}) | "
            f"{d['synthetic']['kept']}/{d['synthetic']['total']} ({_pct(syn)}) | {d['human']['pairs']} | {d['total_pairs']} | "
            + (
                f"{_pct(f['precision'])} | {_pct(f['recall'])} | {f['filter_auc'] if f['filter_auc'] is None else round(f['filter_auc'], 3)} |"
                if f
                else "n/a | n/a | n/a |"
            )
        )
    md += [""] + notes if notes else []
    if s["eval"]:
        md += [
            "",
            "| evaluated model | retrieval R@1 (mean TR/IR) | CIDEr | caption attribute accuracy |",
            "|---|---|---|---|",
        ]
        text.append("  evaluation on the held-out set (each round's pre-trained model):")
    for k, m in s["eval"].items():
        attr = m.get("caption_attribute_accuracy")
        attr_s = "n/a" if attr is None else f"{attr:.1f}%"
        text.append(
            f"    round {k}: retrieval R@1 {m['retrieval_r1']:.1f}, CIDEr {m['cider']:.1f}, attribute accuracy {attr_s}"
        )
        md.append(f"| round {k} pre-trained | {m['retrieval_r1']:.1f} | {m['cider']:.1f} | {attr_s} |")
    paths = [("CapFilt Parquet", r["capfilt"]) for r in s["rounds"]]
    paths += [(f"round {r['round']} captioner", r["captioner"]) for r in s["rounds"]]
    paths += [(f"round {r['round']} filter", r["filter"]) for r in s["rounds"]]
    paths += [(f"round {r['round']} report", r["report"]) for r in s["rounds"]]
    paths += [(f"round {k} evaluation", url) for k, url in s["eval_paths"].items()]
    text.append("  where things are:")
    text += [f"    {name}: {p}" for name, p in paths]
    text.append(f"  query it: {s['duckdb']}")
    md += ["", "Paths:", ""] + [f"- {name}: `{p}`" for name, p in paths] + ["", "```", s["duckdb"], "```"]
    return "\n".join(text), "\n".join(md)
