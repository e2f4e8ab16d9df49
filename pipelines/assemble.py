"""``capfilt assemble --round K``: round K's bootstrapped dataset, the training set of round K+1.

The dataset is the human set plus the web texts and the synthetic texts that CapFilt kept, each joined back
to its image by (shard, key). Nothing is copied: the stage writes the manifest of ``pipelines/bootstrapped.py``
(``<root>/round=K/dataset/manifest.json``, through its ``write_manifest``) naming the human annotations, the
ingest shards and the committed CapFilt Parquet, plus ``summary.json`` with the counts by source, and commits
the directory. Readers (``bootstrapped_stream``) do the join shard by shard, by predicate pushdown on the
Parquet's ``shard`` and ``keep`` columns.

The stage counts in one pass over the Parquet, a file at a time (columns ``shard, key, source, keep``), and
checks the join: kept rows that name a shard missing from the ingest directory are counted as ``orphans``
(they would be skipped by the reader) and make the stage fail unless there are none.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import storage
from .bootstrapped import parquet_files, write_manifest
from .capfilt import capfilt_dir
from .config import RunConfig
from .errors import StageError
from .karpathy import read_karpathy
from .shards import list_shards, shard_name

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


class AssembleError(StageError):
    """The inputs of assemble are missing or inconsistent."""


def capfilt_counts(capfilt_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Rows and kept rows by source, kept images, and kept rows per shard name, one Parquet file at a time."""
    fs, files = parquet_files(capfilt_url, **(storage_options or {}))
    total: Counter = Counter()
    kept: Counter = Counter()
    kept_by_shard: Counter = Counter()
    images: set[tuple[str, str]] = set()
    kept_images: set[tuple[str, str]] = set()
    for path in files:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["shard", "key", "source", "keep"])
        vc = pc.value_counts(table["source"])
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            total[value] += n
        k = table.filter(pc.field("keep"))
        vc = pc.value_counts(k["source"])
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            kept[value] += n
        vc = pc.value_counts(k["shard"])
        for value, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            kept_by_shard[shard_name(str(value))] += n
        web = table.filter(pc.equal(table["source"], "web"))
        images.update(zip(web["shard"].to_pylist(), web["key"].to_pylist()))
        kept_images.update(zip(k["shard"].to_pylist(), k["key"].to_pylist()))
    return {
        "total": dict(total),
        "kept": dict(kept),
        "kept_by_shard": dict(kept_by_shard),
        "images": len(images),
        "kept_images": len(kept_images),
    }


def run_assemble(cfg: RunConfig, root: str, round: int) -> dict:
    """Write and commit round K's dataset manifest and its summary; returns the summary."""
    from .modeling import human_set

    root = storage.absolute(root)  # the manifest is read by Ray Train workers, which run elsewhere
    out = storage.RunRoot(root).round(round, "dataset")
    if storage.is_committed(out):
        log.info("dataset %s already committed; nothing to do", out)
        return storage.read_json(storage.join(out, SUMMARY))
    capfilt = capfilt_dir(root, round)
    if not storage.is_committed(capfilt):
        raise AssembleError(f"{capfilt} is not committed: run `capfilt caption-filter --round {round}` first")
    info = storage.read_commit(capfilt)
    source = (info.get("fingerprint") or {}).get("source") or cfg.capfilt.source or cfg.ingest.source
    shards_url = storage.RunRoot(root).ingest(source)
    try:
        human = {k: storage.absolute(v) for k, v in human_set(cfg, root).items()}
    except ValueError as err:
        raise AssembleError(str(err)) from None
    entries = read_karpathy(human["train"])
    counts = capfilt_counts(capfilt)
    available = {shard_name(u) for u in list_shards(shards_url)}
    orphans = {s: n for s, n in counts["kept_by_shard"].items() if s not in available}
    if orphans:
        raise AssembleError(
            f"{sum(orphans.values())} kept CapFilt rows name shards missing from {shards_url}: {sorted(orphans)[:10]}"
        )
    web_kept, syn_kept = counts["kept"].get("web", 0), counts["kept"].get("synthetic", 0)
    human_pairs = sum(len(e.captions) for e in entries)
    summary = {
        "round": round,
        "human": {"pairs": human_pairs, "images": len(entries)},
        "web": {"kept": web_kept, "total": counts["total"].get("web", 0)},
        "synthetic": {"kept": syn_kept, "total": counts["total"].get("synthetic", 0)},
        "bootstrapped": {
            "pairs": web_kept + syn_kept,
            "images": counts["kept_images"],
            "shards": len(counts["kept_by_shard"]),
        },
        "total_pairs": human_pairs + web_kept + syn_kept,
        "captioner_id": (info.get("fingerprint") or {}).get("captioner_id"),
        "filter_id": (info.get("fingerprint") or {}).get("filter_id"),
    }
    manifest = write_manifest(
        out,
        round=round,
        human_annotations=human["train"],
        human_image_root=human["image_root"],
        shards=shards_url,
        capfilt=capfilt,
        counts={"human_pairs": human_pairs, "web": web_kept, "synthetic": syn_kept},
    )
    storage.write_json(storage.join(out, SUMMARY), summary)
    storage.commit(out, {"manifest": manifest.rsplit("/", 1)[-1], "total_pairs": summary["total_pairs"]})
    log.info(
        "dataset of round %d committed at %s: %d human pairs + %d/%d web + %d/%d synthetic texts kept",
        round,
        out,
        human_pairs,
        web_kept,
        summary["web"]["total"],
        syn_kept,
        summary["synthetic"]["total"],
    )
    return summary
