"""Peak memory and time of ``capfilt eval``'s retrieval: the former whole-matrix algorithm against the chunked one.

BEFORE (``--before-tree``: another checkout of the project, e.g. ``git worktree add /tmp/eval-before 4569bd9``):
every image's tokens [N, tokens, width] are held for the ITM re-rank, with the full [images, texts] ITC similarity,
two score matrices of that size and full argsorts. AFTER (this tree's ``pipelines.evaluate.retrieval_metrics``):
ITC features and top-k lists only; the re-rank encodes the images again, one batch of tokens at a time. Both
trees' ``retrieval_metrics(model, dataset, k=, batch_size=)`` are called the same way.

Each (algorithm, size) runs in a fresh subprocess on one thread and reports its peak RSS (``ru_maxrss``) and its
RSS once the model and dataset are ready, so "eval" is what the retrieval itself added (allocations of 1 MiB and
more are mmapped, so freed batches go back to the system and peak RSS follows what is held). The model is a
random-weight BLIP with a 224 px ViT/16 of width 192 (197 tokens: 151 kB per image against a 128 B ITC feature)
and the tiny text encoder; the dataset is N noise images with 5 captions each, generated on access (nothing held).

    git worktree add /tmp/eval-before 4569bd9
    .venv/bin/python benchmarks/bench_eval.py --before-tree /tmp/eval-before [--sizes 200 800] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import Dataset

from blip_core import BlipConfig, BlipModel, BlipTokenizer
from pipelines.evaluate import retrieval_metrics  # the tree on PYTHONPATH: this one, or --before-tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = "a the red green blue yellow circle square star triangle left right top bottom small large near two one".split()
BATCH = 32


class NoiseImages(Dataset):
    """``n`` (image [3, size, size], 5 captions, id) items, each drawn from a generator seeded by its index."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, self.size, self.size, generator=g)
        words = torch.randint(len(WORDS), (5, 8), generator=g).tolist()
        return image, [" ".join(WORDS[w] for w in caption) for caption in words], str(i)


def build_model() -> BlipModel:
    """Random weights; the text init at ~1/sqrt(width) so that ITC and ITM scores differ between pairs."""
    torch.manual_seed(0)
    cfg = BlipConfig.preset(
        "tiny",
        vision={"image_size": 224, "patch_size": 16, "width": 192, "depth": 1, "heads": 3},
        text={"initializer_range": 0.125},
    )
    return BlipModel(cfg, BlipTokenizer.bert_base_uncased()).eval()


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(n: int, k: int) -> dict:
    """One retrieval evaluation in this process: its metrics, seconds, RSS before it and peak RSS (MB)."""
    torch.set_num_threads(1)  # a shared 2-core machine: two intra-op threads spin-wait
    model, data = build_model(), NoiseImages(n, 224)
    base = rss_mb()
    t0 = time.perf_counter()
    metrics = retrieval_metrics(model, data, k=k, batch_size=BATCH)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB
    return {"metrics": metrics, "seconds": seconds, "base_mb": base, "peak_mb": peak}


def run(tree: str, n: int, k: int) -> dict:
    """``worker`` in a fresh interpreter with ``tree``'s packages, so that each peak RSS is its own."""
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(n), "--k", str(k)]
    # glibc otherwise raises its mmap threshold after the first large free and keeps later freed batches in a
    # fragmented heap: peak RSS then grows with the number of batches whatever the algorithm holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "PYTHONPATH": tree}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 800], help="numbers of images")
    ap.add_argument("--k", type=int, default=10, help="re-ranked candidates per query (>= 10: ties cannot matter)")
    ap.add_argument("--before-tree", help="a checkout of the project before the change (required)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.sizes[0], args.k)))
        return
    if not args.before_tree:
        ap.error("--before-tree is required: git worktree add /tmp/eval-before <commit before the change>")
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores" + (" (busy machine: timings inflated)" * (load > 3)))
    print(f"k = {args.k}, batch {BATCH}; image tokens 197 x 192 float32 = {197 * 192 * 4 / 1e3:.0f} kB per image")
    head = ("images", "texts", "base MB", "peak MB before", "after", "eval MB before", "after", "s before", "after")
    print(" | ".join(head) + " | metrics equal")
    for n in args.sizes:
        before, after = run(os.path.abspath(args.before_tree), n, args.k), run(ROOT, n, args.k)
        row = (
            n,
            before["metrics"]["texts"],
            f"{after['base_mb']:.0f}",
            f"{before['peak_mb']:.0f}",
            f"{after['peak_mb']:.0f}",
            f"{before['peak_mb'] - before['base_mb']:.0f}",
            f"{after['peak_mb'] - after['base_mb']:.0f}",
            f"{before['seconds']:.1f}",
            f"{after['seconds']:.1f}",
        )
        print(" | ".join(str(x) for x in row) + f" | {before['metrics'] == after['metrics']}")


if __name__ == "__main__":
    main()
