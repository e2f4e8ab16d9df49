"""Training-stream memory: peak RSS of one epoch over N shards against 10 x N shards.

The stream reads a shard front to back and holds one sample at a time plus the shuffle buffer, so its peak
memory should not grow with the number of shards (target: ratio ~1.0). Each measurement runs in a fresh
Python process (peak RSS is a high-water mark, so measurements must not share a process); it streams one
epoch through a torch DataLoader with BLIP's train transform and reports the peak RSS of the main process
and of its DataLoader workers (from getrusage), plus the main process's RSS before streaming (imports).

    .venv/bin/python benchmarks/bench_stream.py [--shards 8] [--per-shard 200] [--workers 2] [--buffer 500]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_shards(directory: str, n_shards: int, per_shard: int, image_size: int) -> None:
    """img2dataset's layout: NNNNN.tar (jpg/txt/json) + NNNNN_stats.json, then the commit marker."""
    import webdataset as wds
    from PIL import Image

    from pipelines import storage

    rng = random.Random(0)
    pool = []
    for _ in range(64):  # distinct noisy JPEGs (realistic sizes), reused across samples
        img = Image.effect_noise((image_size, image_size), rng.uniform(20, 80)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    os.makedirs(directory, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(directory, f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"http://127.0.0.1/{key}.jpg", "key": key, "status": "success"}
                sink.write(
                    {
                        "__key__": key,
                        "jpg": pool[(s * per_shard + i) % len(pool)],
                        "txt": f"a synthetic caption number {key} " * 3,
                        "json": json.dumps(meta).encode(),
                    }
                )
        with open(os.path.join(directory, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard}, f)
    storage.commit(directory)


def child(directory: str, n_shards: int, workers: int, buffer: int, batch: int, image_size: int) -> None:
    import torch
    from torch.utils.data import DataLoader

    from blip_core.transforms import train_transform
    from pipelines.data import ShardStream, list_shards

    torch.set_num_threads(1)
    shards = list_shards(directory)[:n_shards]
    baseline = rss_mib()
    stream = ShardStream(shards, transform=train_transform(image_size), shuffle_buffer=buffer, seed=0)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers)
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b.key)
    elapsed = time.perf_counter() - t
    del loader  # workers exit, so their peak is in RUSAGE_CHILDREN
    print(
        json.dumps(
            {
                "shards": len(shards),
                "samples": n,
                "seconds": elapsed,
                "baseline_mib": baseline,
                "peak_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                # With no workers, RUSAGE_CHILDREN would only see short-lived helpers forked during imports.
                "peak_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None,
                "stats": stream.stats(),
            }
        )
    )


def measure(directory: str, n_shards: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        directory,
        "--shards",
        str(n_shards),
        "--workers",
        str(args.workers),
        "--buffer",
        str(args.buffer),
        "--batch",
        str(args.batch),
        "--image-size",
        str(args.image_size),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8, help="N; the second run streams 10 x N")
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--buffer", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.shards, args.workers, args.buffer, args.batch, args.image_size)
        return

    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        directory = os.path.join(tmp, "ingest", "web")
        t = time.perf_counter()
        write_shards(directory, 10 * args.shards, args.per_shard, args.image_size)
        size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 2**20
        print(
            f"wrote {10 * args.shards} shards x {args.per_shard} samples ({size:.0f} MiB) in "
            f"{time.perf_counter() - t:.1f}s; {args.workers} DataLoader workers, shuffle buffer {args.buffer}, "
            f"batch {args.batch}, {args.image_size} px train transform"
        )
        small, large = measure(directory, args.shards, args), measure(directory, 10 * args.shards, args)

    rows = [
        ("shards", "shards", "{:.0f}"),
        ("samples streamed", "samples", "{:.0f}"),
        ("RSS before streaming, main (MiB)", "baseline_mib", "{:.1f}"),
        ("peak RSS, main (MiB)", "peak_main_mib", "{:.1f}"),
        ("peak RSS, largest worker (MiB)", "peak_worker_mib", "{:.1f}"),
        ("peak - before, main (MiB)", None, "{:.1f}"),
        ("samples/s", None, "{:.0f}"),
    ]
    print(f"\n{'':34s}{'N shards':>12s}{'10 x N':>12s}{'ratio':>9s}")
    for label, key, fmt in rows:
        if key is None and label.startswith("peak - before"):
            a, b = small["peak_main_mib"] - small["baseline_mib"], large["peak_main_mib"] - large["baseline_mib"]
        elif key is None:
            a, b = small["samples"] / small["seconds"], large["samples"] / large["seconds"]
        else:
            a, b = small[key], large[key]
        if a is None:
            continue
        ratio = f"{b / a:9.2f}" if a else f"{'-':>9s}"
        print(f"{label:34s}{fmt.format(a):>12s}{fmt.format(b):>12s}{ratio}")
    ratios = [large[k] / small[k] for k in ("peak_main_mib", "peak_worker_mib") if small[k]]
    print(f"\npeak memory ratio (10 x N / N, worst of main and workers): {max(ratios):.2f} (target: ~1.0, not 10)")


if __name__ == "__main__":
    main()
