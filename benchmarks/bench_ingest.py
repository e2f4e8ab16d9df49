"""Ingestion throughput: ``capfilt synth`` then ``capfilt ingest`` of a world's web corpus on loopback.

Prints, per distributor and setting (shards at once x threads per shard): wall time of the stage, images/s over
the wall time, images/s per shard task while it downloads (img2dataset's per-shard durations, without the ~5-10 s
of spawning and importing), and the success rate. ``multiprocessing`` runs a pool of that many processes;
``ray`` that many Ray tasks at once on a local Ray of that many CPUs, started before the clock (its start time is
printed apart: in the flow Ray is already up). The images come from the world's HTTP server in the same process,
so this measures img2dataset + our server on one machine, not a network.

    .venv/bin/python benchmarks/bench_ingest.py [--n-web 3000] [--shard-size 500] [--settings 1x8,2x16]
        [--distributors multiprocessing,ray] [--root DIR-or-s3://bucket/prefix]
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
    ap.add_argument("--settings", default="1x8,2x16", help="shards at once x threads, comma separated")
    ap.add_argument("--distributors", default="multiprocessing,ray", help="comma separated")
    ap.add_argument("--root", default=None, help="run root (default: a temporary directory)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        t0 = time.time()
        cfg = RunConfig(world=WorldConfig(size="demo", n_web=args.n_web, n_human=10, n_test=10))
        run_synth(cfg, root)
        synth_s = time.time() - t0
        print(f"synth: {args.n_web + 20} images in {synth_s:.1f}s ({(args.n_web + 20) / synth_s:.0f} images/s)")
        rows = []
        for distributor in args.distributors.split(","):
            if distributor == "ray":
                from pipelines.ray_runtime import ensure_ray

                t0 = time.time()
                ensure_ray(num_cpus=max(int(s.split("x")[0]) for s in args.settings.split(",")))
                print(f"local Ray started in {time.time() - t0:.1f}s")
            for setting in args.settings.split(","):
                p, t = (int(x) for x in setting.split("x"))
                source = f"bench-{distributor}-{p}x{t}"
                cfg.ingest = IngestConfig(
                    source=source,
                    shard_size=args.shard_size,
                    processes=p,
                    threads=t,
                    distributor=distributor,
                    max_concurrent_shards=p,
                )
                t0 = time.time()
                m = run_ingest(cfg, root)
                wall = time.time() - t0
                r = m["this_run"]
                rows.append(
                    f"{distributor:>16} {setting:>8} {wall:8.1f} {m['total'] / wall:13.0f} "
                    f"{r['worker_samples_per_second']:13.0f} {m['success_rate']:8.3f}"
                )
                if args.root:
                    storage.remove(storage.RunRoot(root).ingest(source))
        print(f"{'distributor':>16} {'p x t':>8} {'wall s':>8} {'img/s (wall)':>13} {'img/s/task':>13} {'success':>8}")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
