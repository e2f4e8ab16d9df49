"""Pre-training throughput: samples/s, peak memory and the share of step time spent waiting for data, with 1 and
with 2 Ray Train workers, on the demo config's world (target: data wait < 10%).

The world is generated and ingested once under ``--root`` (reruns reuse it); each measurement is a real
``capfilt pretrain`` job (``pipelines.train.run_job``) into a fresh run root that links those inputs, cut to
``--steps`` optimizer steps, with the global batch size fixed so that 1 and 2 workers do the same work per step.
The first logged window (DataLoader start-up, shuffle buffer filling) is left out of the rates. Memory is the
peak RSS of a trainer process (rank 0) and the summed peak RSS of its DataLoader worker processes; on GPU also
torch's peak allocated memory. ``job s`` is the whole job, Ray Train's start-up and the evaluation included.

    .venv/bin/python benchmarks/bench_train.py [--config flows/configs/demo.yaml] [--root runs/bench-train]
        [--steps 120] [--workers 1 2] [--batch-size 64] [--dataloader-workers 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def ensure_world(config: str, root: str) -> None:
    capfilt = str(Path(sys.executable).parent / "capfilt")
    for stage in ("synth", "ingest"):
        t0 = time.time()
        proc = subprocess.run([capfilt, stage, "--config", config, "--root", root], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"capfilt {stage} failed:\n{proc.stderr[-3000:]}")
        print(f"# {stage}: {time.time() - t0:.0f}s", flush=True)


def measure(config: str, world_root: str, workers: int, steps: int, batch_size: int, loaders: int) -> dict:
    from pipelines.config import load_config
    from pipelines.train import run_job

    overrides = [
        f"train.pretrain.workers={workers}",
        f"train.pretrain.batch_size={batch_size}",
        f"train.pretrain.max_steps={steps}",
        f"train.pretrain.dataloader_workers={loaders}",
        "train.pretrain.checkpoint_every_steps=1000000",
        "train.pretrain.log_every_steps=10",
    ]
    cfg = load_config(config, overrides)
    run = Path(tempfile.mkdtemp(prefix=f"bench-train-w{workers}-"))
    try:
        for name in ("world", "ingest", "tokenizer"):
            if (Path(world_root) / name).exists():
                (run / name).symlink_to(Path(world_root).resolve() / name, target_is_directory=True)
        t0 = time.time()
        summary = run_job(cfg, str(run), 1, "pretrain")
        job_s = time.time() - t0
        with open(run / "round=1" / "pretrain" / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        # keep the tokenizer the first job learned, so later jobs (and reruns) share it
        if not (Path(world_root) / "tokenizer").exists() and (run / "tokenizer").is_dir():
            shutil.copytree(run / "tokenizer", Path(world_root) / "tokenizer")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    train = [r for r in rows if r.get("kind") == "train"]
    steady = train[1:] or train
    windows = [(r["step"] - prev["step"], r) for prev, r in zip(train, train[1:])] or [(train[0]["step"], train[0])]
    n_steps = sum(n for n, _ in windows)
    # each window's rates, weighted by its steps (samples/s is over the window's wall time, logging included)
    sps = sum(r["samples_per_s"] * n for n, r in windows) / max(n_steps, 1)
    step_time = sum(r["step_time_s"] * n for n, r in windows) / max(n_steps, 1)
    wait = sum(r["data_wait"] * r["step_time_s"] * n for n, r in windows) / max(
        sum(r["step_time_s"] * n for n, r in windows), 1e-9
    )
    return {
        "workers": workers,
        "steps": summary["final_step"],
        "global_batch": batch_size,
        "samples_per_s": sps,
        "step_time_s": step_time,
        "data_wait": wait,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in steady),
        "loader_rss_mib": max(r.get("loader_rss_mib", 0.0) for r in steady),
        "peak_gpu_mib": max((r.get("peak_gpu_mib", 0.0) for r in steady), default=0.0),
        "job_s": job_s,
        "eval": summary["eval"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "flows", "configs", "demo.yaml"))
    ap.add_argument("--root", default=os.path.join(ROOT, "runs", "bench-train"), help="where the world is kept")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=64, help="global batch, the same for every worker count")
    ap.add_argument("--dataloader-workers", type=int, default=1, help="DataLoader processes per Ray Train worker")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    ensure_world(args.config, args.root)
    from pipelines.ray_runtime import ensure_ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    ensure_ray(dashboard=True)  # sets Ray's environment before this process first imports ray
    results = [
        measure(args.config, args.root, w, args.steps, args.batch_size, args.dataloader_workers) for w in args.workers
    ]

    print(
        f"\npre-training on {os.path.basename(args.config)}, {args.steps} steps, global batch {args.batch_size}, "
        f"{args.dataloader_workers} DataLoader worker(s) per Ray Train worker, {os.cpu_count()} CPUs"
    )
    head = (
        f"{'workers':>7} {'samples/s':>10} {'step s':>7} {'data wait':>10} {'rank-0 RSS MiB':>15} "
        f"{'loaders MiB':>12} {'GPU MiB':>8} {'job s':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['workers']:>7} {r['samples_per_s']:>10.1f} {r['step_time_s']:>7.3f} {100 * r['data_wait']:>9.1f}% "
            f"{r['peak_rss_mib']:>15.0f} {r['loader_rss_mib']:>12.0f} {r['peak_gpu_mib']:>8.0f} {r['job_s']:>6.0f}"
        )
    if len(results) >= 2:
        base = results[0]
        for r in results[1:]:
            print(
                f"scaling {r['workers']} vs {base['workers']} workers: "
                f"{r['samples_per_s'] / base['samples_per_s']:.2f}x samples/s"
            )
    ok = all(r["data_wait"] < 0.10 for r in results)
    print(f"data wait target (< 10% of step time): {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
