"""CapFilt throughput and memory: the whole Ray Data pipeline against the bare models in one process.

Side by side, on the same images and checkpoints (a tiny captioner and filter trained on a synthetic world's
human set by ``benchmarks/_common.py``, as the integration tests train them):

  bare      decode + caption + filter in one Python process (``pipelines.capfilt.LocalRunner``: the same stage
            code, no Ray), over N shards; images/s counted after the models are loaded, for 1 and for all
            torch threads (the better of the two is "the bare-model rate").
  pipeline  ``run_caption_filter`` on a local Ray with the machine's CPUs, over N shards and over 10 x N:
            images/s over the whole run (Ray already started: actor start-up and model loading included) and
            marginally (extra images / extra seconds from N to 10 x N shards: the fixed start-up cancels),
            in steady state (the commit rate over the second half of the 10 x N run's units), and peak memory. With one captioner actor the pipeline uses the same one core for the models as the
            1-thread bare process; with two it uses both cores.

Each measurement runs in a fresh process. Memory is the peak, sampled every 0.25 s, of the summed PSS
(proportional set size: shared pages split between their processes, so libraries count once) of every process
of the run (found by an environment marker that Ray's processes inherit) — driver, raylet, GCS, workers and
the object store's pages included — and the driver's own peak RSS.

    .venv/bin/python benchmarks/bench_capfilt.py [--shards 3] [--per-shard 200] [--samples 1]
        [--captioner-actors 2] [--model-batch 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = str(ROOT / "flows" / "configs" / "tiny.yaml")
MARKER_VAR = "CAPFILT_BENCH_RUN"


# ----------------------------------------------------------------------------------------------- setup
def write_shards(world: Path, directory: Path, n_shards: int, per_shard: int) -> None:
    """The world's web images and captions as img2dataset shards (NNNNN.tar + _stats.json), committed."""
    import io
    import tarfile

    import pyarrow.parquet as pq

    from pipelines import storage

    web = pq.read_table(world / "web.parquet").to_pylist()
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                row = web[(s * per_shard + i) % len(web)]
                key = f"{s:05d}{i:04d}"
                image = (world / "images" / row["url"].split("}/", 1)[1]).read_bytes()
                meta = {"url": row["url"], "key": key, "status": "success", "caption": row["caption"]}
                for ext, data in (
                    ("jpg", image),
                    ("txt", (row["caption"] or "").encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (directory / f"{s:05d}.tar").write_bytes(buf.getvalue())
        (directory / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    storage.commit(str(directory))


def setup(work: Path, n_shards: int, per_shard: int) -> tuple[Path, Path]:
    """A world, 10 x N shards of it, and a trained tiny captioner and filter. Returns (small root, large root)."""
    from _common import link_models, train_models  # benchmarks/_common.py, shared with the CapFilt tests

    from pipelines.config import load_config
    from pipelines.world import run_synth

    world_root = work / "world-run"
    n_images = 10 * n_shards * per_shard
    cfg = load_config(TINY, [f"world.n_web={min(n_images, 3000)}", "world.n_human=60", "world.n_test=10"])
    run_synth(cfg, str(world_root))
    world = world_root / "world"
    models = train_models(world, work / "models")
    roots = []
    for name, shards in (("x1", n_shards), ("x10", 10 * n_shards)):
        root = work / name
        write_shards(world, root / "ingest" / "web", shards, per_shard)
        link_models(models, str(root), 1)
        roots.append(root)
    return roots[0], roots[1]


# ---------------------------------------------------------------------------------------------- children
def overrides(args: argparse.Namespace) -> list[str]:
    cap_cpus = round(min(0.7, (2.0 - 0.2 - 0.4) / args.captioner_actors), 2)
    return [
        f"capfilt.num_samples={args.samples}",
        f"capfilt.model_batch_size={args.model_batch}",
        "capfilt.decode_num_cpus=0.2",
        "capfilt.decode_batch_rows=64",
        "capfilt.decode_concurrency=2",
        f"capfilt.captioner_pool.actors={args.captioner_actors}",
        "capfilt.captioner_pool.batch_size=64",
        f"capfilt.captioner_pool.num_cpus={cap_cpus}",
        "capfilt.captioner_pool.torch_threads=1",
        "capfilt.filter_pool.actors=1",
        "capfilt.filter_pool.batch_size=64",
        "capfilt.filter_pool.num_cpus=0.4",
        "capfilt.filter_pool.torch_threads=1",
    ]


def child_bare(root: str, args: argparse.Namespace) -> None:
    import pyarrow.compute as pc
    import torch

    from pipelines.capfilt import LocalRunner, resolve_settings
    from pipelines.config import load_config
    from pipelines.shards import list_shards

    cfg = load_config(TINY, overrides(args))
    settings = resolve_settings(cfg, root, 1)
    shards = list_shards(os.path.join(root, "ingest", "web"))
    pools = {r: {"torch_threads": args.threads} for r in ("captioner", "filter")}
    t0 = time.perf_counter()
    runner = LocalRunner(settings, pools)
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    table = runner(shards, batch_size=64)
    seconds = time.perf_counter() - t1
    images = table.filter(pc.equal(table["source"], "web")).num_rows
    print(
        json.dumps(
            {
                "mode": "bare",
                "threads": torch.get_num_threads(),
                "images": images,
                "seconds": seconds,
                "load_seconds": load,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


class _Commits(logging.Handler):
    """Collects the stage's per-unit commit log lines (time, images)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[tuple[float, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"committed part-\S+: (\d+) images", record.getMessage())
        if m:
            self.times.append((time.perf_counter(), int(m.group(1))))


def child_pipeline(root: str, args: argparse.Namespace) -> None:
    from pipelines.capfilt import run_caption_filter
    from pipelines.config import load_config
    from pipelines.ray_runtime import ensure_ray

    logging.basicConfig(level=logging.WARNING)
    commits = _Commits()
    logging.getLogger("pipelines.capfilt").addHandler(commits)
    logging.getLogger("pipelines.capfilt").setLevel(logging.INFO)
    cfg = load_config(TINY, overrides(args))
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    summary = run_caption_filter(cfg, root, 1)
    seconds = time.perf_counter() - t0
    # Steady state: units commit in order, so once the pipeline is full the commit rate is its throughput.
    # Skip the first half of the units: start-up, and the catch-up of a stage whose actors started later
    # while the one before it ran ahead.
    steady = None
    if len(commits.times) >= 8:
        i0 = len(commits.times) // 2
        (ta, _), (tb, _) = commits.times[i0], commits.times[-1]
        steady = sum(n for _, n in commits.times[i0 + 1 :]) / (tb - ta)
    print(
        json.dumps(
            {
                "mode": "pipeline",
                "images": summary["images"],
                "seconds": seconds,
                "first_commit_s": commits.times[0][0] - t0 if commits.times else None,
                "steady_images_per_s": steady,
                "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


# ------------------------------------------------------------------------------------------- measuring
def _pss_kib(pid: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _marked(marker: bytes) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    out.append(pid)
            except OSError:
                continue
    return out


def run_child(mode: str, root: Path, args: argparse.Namespace, extra: list[str] = ()) -> dict:
    token = uuid.uuid4().hex
    marker = f"{MARKER_VAR}={token}".encode()
    env = {**os.environ, MARKER_VAR: token}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--root",
        str(root),
        "--samples",
        str(args.samples),
        "--captioner-actors",
        str(args.captioner_actors),
        "--model-batch",
        str(args.model_batch),
        *extra,
    ]
    peak = {"pss": 0, "procs": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = _marked(marker)
            total = sum(_pss_kib(p) for p in pids)
            if total > peak["pss"]:
                peak["pss"], peak["procs"] = total, len(pids)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_pss_mib"] = peak["pss"] / 1024
    result["processes_at_peak"] = peak["procs"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=4, help="N; the memory run uses 10 x N")
    p.add_argument("--per-shard", type=int, default=200)
    p.add_argument("--samples", type=int, default=1, help="synthetic captions per image (K)")
    p.add_argument("--captioner-actors", type=int, default=2)
    p.add_argument("--model-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest of each is shown")
    p.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    p.add_argument("--child", choices=["bare", "pipeline"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "bare":
        import torch

        torch.set_num_threads(args.threads)
        return child_bare(args.root, args)
    if args.child == "pipeline":
        return child_pipeline(args.root, args)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_capfilt_"))
    t = time.perf_counter()
    small, large = setup(work, args.shards, args.per_shard)
    print(
        f"setup (world, {11 * args.shards} shards of {args.per_shard}, tiny captioner + filter trained) in "
        f"{time.perf_counter() - t:.0f}s; K={args.samples}, model batch {args.model_batch}, "
        f"{args.captioner_actors} captioner actor(s) + 1 filter actor, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    cpus = os.cpu_count() or 1
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeat):  # interleaved, best of each: the machine may be shared
        for n in sorted({1, cpus}):
            runs.setdefault(f"bare{n}", []).append(run_child("bare", small, args, ["--threads", str(n)]))
        for name, root in (("pipe1", small), ("pipe10", large)):
            runs.setdefault(name, []).append(run_child("pipeline", root, args))
            # A committed stage is a no-op when rerun: each measurement starts from nothing.
            shutil.rmtree(root / "round=1" / "capfilt", ignore_errors=True)
    fastest = lambda rs: min(rs, key=lambda r: r["seconds"])  # noqa: E731
    bare = [fastest(runs[f"bare{n}"]) for n in sorted({1, cpus})]
    pipe1, pipe10 = fastest(runs["pipe1"]), fastest(runs["pipe10"])
    pipe10["steady_images_per_s"] = max((r["steady_images_per_s"] or 0) for r in runs["pipe10"]) or None
    pipe1["peak_pss_mib"] = max(r["peak_pss_mib"] for r in runs["pipe1"])
    pipe10["peak_pss_mib"] = max(r["peak_pss_mib"] for r in runs["pipe10"])

    best = max(bare, key=lambda r: r["images"] / r["seconds"])
    bare_rate = best["images"] / best["seconds"]
    print(f"\n{'':46s}{'images':>8s}{'seconds':>9s}{'images/s':>10s}{'x bare':>8s}")
    for r in bare:
        rate = r["images"] / r["seconds"]
        print(
            f"{'bare models, 1 process, ' + str(r['threads']) + ' torch thread(s)':46s}{r['images']:8d}"
            f"{r['seconds']:9.1f}{rate:10.1f}{rate / bare_rate:8.2f}"
        )
    for name, r in (("pipeline N shards", pipe1), ("pipeline 10 x N shards", pipe10)):
        rate = r["images"] / r["seconds"]
        print(f"{name + ', whole run':46s}{r['images']:8d}{r['seconds']:9.1f}{rate:10.1f}{rate / bare_rate:8.2f}")
    extra_i, extra_s = pipe10["images"] - pipe1["images"], pipe10["seconds"] - pipe1["seconds"]
    marginal = extra_i / extra_s if extra_s > 0 else float("nan")
    print(
        f"{'pipeline, marginal (10 x N minus N)':46s}{extra_i:8d}{extra_s:9.1f}{marginal:10.1f}{marginal / bare_rate:8.2f}"
    )
    if pipe10["steady_images_per_s"]:
        st = pipe10["steady_images_per_s"]
        print(f"{'pipeline 10 x N, steady state (commit rate)':46s}{'':8s}{'':9s}{st:10.1f}{st / bare_rate:8.2f}")
    print(f"\n{'peak memory (MiB)':46s}{'N':>10s}{'10 x N':>10s}{'ratio':>8s}")
    rows = [("summed PSS, all processes of the run", "peak_pss_mib"), ("driver peak RSS", "driver_peak_rss_mib")]
    for label, key in rows:
        a, b = pipe1[key], pipe10[key]
        print(f"{label:46s}{a:10.0f}{b:10.0f}{b / a:8.2f}")
    print(f"{'bare process peak RSS (N shards)':46s}{best['peak_rss_mib']:10.0f}")
    print(
        f"\npipeline / bare (marginal): {marginal / bare_rate:.2f} (target >= 0.9); "
        f"memory 10 x N / N: {pipe10['peak_pss_mib'] / pipe1['peak_pss_mib']:.2f} (target ~1.0); "
        f"load average now {os.getloadavg()[0]:.1f}"
    )
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
