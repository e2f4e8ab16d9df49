"""Ingestion throughput: ``capfilt synth`` then ``capfilt ingest`` of a world's web corpus on loopback.

Prints, per setting (processes x threads): wall time of the stage, images/s over the wall time, images/s per
worker process while it downloads (img2dataset's per-shard durations, without its ~10 s of spawning and
importing), and the success rate. The images come from the world's HTTP server in the same process, so this
measures img2dataset + our server on one machine, not a network.

    .venv/bin/python benchmarks/bench_ingest.py [--n-web 3000] [--shard-size 500] [--settings 1x8,2x16]
        [--root DIR-or-s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from pipelines import storage
from pipelines.config import IngestConfig, RunConfig, WorldConfig
from pipelines.ingest import run_ingest
from pipelines.world import run_synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-web", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--settings", default="1x8,2x16", help="processes x threads, comma separated")
    ap.add_argument("--root", default=None, help="run root (default: a temporary directory)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        t0 = time.time()
        cfg = RunConfig(world=WorldConfig(size="demo", n_web=args.n_web, n_human=10, n_test=10))
        run_synth(cfg, root)
        synth_s = time.time() - t0
        print(f"synth: {args.n_web + 20} images in {synth_s:.1f}s ({(args.n_web + 20) / synth_s:.0f} images/s)")
        print(f"{'processes x threads':>20} {'wall s':>8} {'img/s (wall)':>13} {'img/s/worker':>13} {'success':>8}")
        for setting in args.settings.split(","):
            p, t = (int(x) for x in setting.split("x"))
            source = f"bench-{p}x{t}"
            cfg.ingest = IngestConfig(source=source, shard_size=args.shard_size, processes=p, threads=t)
            t0 = time.time()
            m = run_ingest(cfg, root)
            wall = time.time() - t0
            r = m["this_run"]
            print(
                f"{setting:>20} {wall:8.1f} {m['total'] / wall:13.0f} {r['worker_samples_per_second']:13.0f} "
                f"{m['success_rate']:8.3f}"
            )
            if args.root:
                storage.filesystem(storage.RunRoot(root).ingest(source))[0].rm(
                    storage.filesystem(storage.RunRoot(root).ingest(source))[1], recursive=True
                )


if __name__ == "__main__":
    main()
