"""The pipeline's own cost at scale: caption-filter with models that cost nothing (benchmarks/zero_cost.py), over
webdataset shards written directly (tiny JPEGs, ``--per-shard`` samples each; no download), at several sizes, on
local disk and on a SeaweedFS S3 server on loopback.

Per run (each in a fresh process, on a fresh local Ray with the machine's CPUs) it prints:

  images/s           images over the stage's own seconds (Ray started, models built: the stage's ``this_run``)
  driver RSS         the driver process's peak resident memory (Ray's own processes are other processes), and
                     its peak before the stage started (Python, torch, Ray client: the floor)
  driver CPU µs/img  the driver process's user + system CPU time during the stage, per image
  files/unit         files left in the CapFilt directory per commit unit
  requests/unit      S3 requests by type per unit, from the server's own metrics (S3 runs only)

``--tree DIR`` runs another checkout of the project (e.g. ``git worktree add /tmp/before <commit>``) with the same
zero-cost models, to measure a design before a change against after it on the same machine in one go::

    .venv/bin/python benchmarks/bench_scale.py --images 10000 100000 --storage local s3
    .venv/bin/python benchmarks/bench_scale.py --images 10000 --tree /tmp/before --label before

``--assemble-rows N ...`` also measures ``capfilt assemble``'s driver peak RSS over CapFilt directories of N rows
(written directly, 2 rows per image).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "flows/configs/tiny.yaml"

OVERRIDES = [
    "capfilt.plugins=[zero_cost]",
    "capfilt.captioner_kind=zero",
    "capfilt.num_samples=1",
    "capfilt.model_batch_size=256",
    "capfilt.decode_num_cpus=0.5",
    "capfilt.decode_batch_rows=256",
    "capfilt.shards_per_unit=1",
    *[f"capfilt.{p}.{k}" for p in ("captioner_pool", "filter_pool") for k in ("actors=1", "batch_size=256")],
    *[f"capfilt.{p}.{k}" for p in ("captioner_pool", "filter_pool") for k in ("num_cpus=0.2", "torch_threads=1")],
]


# ----------------------------------------------------------------------------------------------- inputs
def tiny_jpegs(n: int = 64) -> list[bytes]:
    from PIL import Image

    rng = random.Random(0)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_shards(directory: Path, images: int, per_shard: int) -> None:
    """``images`` samples in shards of ``per_shard``, as img2dataset lays them out, committed."""
    sys.path.insert(0, str(ROOT))
    from pipelines import storage

    if storage.is_committed(str(directory)):
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    jpegs = tiny_jpegs()
    for s in range((images + per_shard - 1) // per_shard):
        n = min(per_shard, images - s * per_shard)
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("jpg", jpegs[(s * per_shard + i) % len(jpegs)]), ("txt", f"photo {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (directory / f"{s:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    storage.commit(str(directory))


def upload(local: Path, url: str) -> None:
    from pipelines import storage

    storage.upload_dir(str(local), url)


# ----------------------------------------------------------------------------------------------- child
def child(args: argparse.Namespace) -> None:
    """One caption-filter run in this process; prints its figures as JSON."""
    import zero_cost

    from pipelines.capfilt import models, run_caption_filter
    from pipelines.config import CapfiltConfig, load_config
    from pipelines.ray_runtime import ensure_ray

    overrides = list(OVERRIDES)
    if "filter_kind" in CapfiltConfig.model_fields:
        overrides.append("capfilt.filter_kind=zero_itm")
    else:  # a tree from before the filter was a seam: the zero-cost filter takes the built-in's name
        models.register_scorer("blip_itm")(zero_cost.ZeroFilter)
    cfg = load_config(TINY, overrides)
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    summary = run_caption_filter(cfg, args.root, 1)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - start.ru_utime - start.ru_stime
    print(
        "RESULT "
        + json.dumps(
            {
                "images": summary["images"],
                "rows": summary["rows"],
                "units": summary["units"],
                "stage_seconds": summary["this_run"]["seconds"],
                "wall_seconds": wall,
                "driver_rss_mib": usage.ru_maxrss / 1024,
                "driver_rss_before_mib": start.ru_maxrss / 1024,
                "driver_cpu_seconds": cpu,
            }
        ),
        flush=True,
    )


def child_assemble(args: argparse.Namespace) -> None:
    from pipelines.assemble import run_assemble
    from pipelines.config import load_config

    cfg = load_config(TINY, ["assemble.itm_threshold=0.5"])
    t0 = time.perf_counter()
    run_assemble(cfg, args.root, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": time.perf_counter() - t0,
                "driver_rss_mib": usage.ru_maxrss / 1024,
                "driver_cpu_seconds": usage.ru_utime + usage.ru_stime,
            }
        ),
        flush=True,
    )


def run_child(tree: Path, mode: str, root: str, env: dict[str, str], log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", "--root", root]
    env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "benchmarks")]),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} run failed ({proc.returncode}); see {log}")
    return json.loads(lines[-1][7:])


# ----------------------------------------------------------------------------------------------- main
def write_capfilt(directory: Path, rows: int, per_file: int = 200_000) -> None:
    """A committed CapFilt directory of ``rows`` rows (web + one synthetic per image) for assemble, with what
    assemble reads beside it: the ingest directory's shard names and an empty human set."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from pipelines import storage

    if storage.is_committed(str(directory)):
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shards = directory.parents[1] / "ingest" / "web"
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    (directory.parents[1] / "world").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for f, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start) // 2
        keys = np.array([f"{f:05d}{i:06d}" for i in range(n)], dtype=object)
        table = pa.table(
            {
                "key": np.repeat(keys, 2),
                "shard": [f"{f:05d}"] * (2 * n),
                "url": [None] * (2 * n),
                "text": np.tile(np.array(["a web text", "a synthetic text"], dtype=object), n),
                "source": np.tile(np.array(["web", "synthetic"], dtype=object), n),
                "candidate": pa.array(np.tile([None, 0], n).tolist(), pa.int16()),
                "itm_score": rng.random(2 * n, dtype=np.float32),
                "itc_score": rng.random(2 * n, dtype=np.float32),
                "clip_score": pa.nulls(2 * n, pa.float32()),
                "keep": np.ones(2 * n, dtype=bool),
                "drop_reason": pa.nulls(2 * n, pa.string()),
                "status": ["ok"] * (2 * n),
                "error": pa.nulls(2 * n, pa.string()),
                "seed": pa.nulls(2 * n, pa.int64()),
                "text_length": np.full(2 * n, 10, dtype=np.int32),
                "captioner_id": ["zero"] * (2 * n),
                "filter_id": ["zero"] * (2 * n),
            }
        )
        pq.write_table(table, directory / f"part-{f:05d}.parquet", compression="zstd")
        (shards / f"{f:05d}.tar").write_bytes(b"")  # assemble checks that kept rows name ingested shards
    storage.commit(str(shards), {"bench": "names only"})
    (directory.parents[1] / "world" / "human_train.json").write_text("[]")  # a run without a human set
    storage.commit(str(directory), {"fingerprint": {"itm_threshold": 0.5, "keep_top_k_synthetic": None}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--storage", nargs="+", default=["local"], choices=["local", "s3"])
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/capfilt-bench-scale"))
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose pipeline runs")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--assemble-rows", type=int, nargs="*", default=[])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-assemble", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.child_assemble:
        return child_assemble(args)

    sys.path.insert(0, str(ROOT))
    from infra import local_s3

    args.work.mkdir(parents=True, exist_ok=True)
    server = local_s3.start(args.work / "s3") if "s3" in args.storage else None
    results = []
    try:
        for n in args.images:
            shards = args.work / "shards" / f"{n}" / "ingest" / "web"
            t0 = time.perf_counter()
            write_shards(shards, n, args.per_shard)
            print(f"# {n} images in shards of {args.per_shard}: ready in {time.perf_counter() - t0:.0f}s", flush=True)
            for where in args.storage:
                env = dict(server.env) if where == "s3" and server else {}
                if where == "local":
                    root = args.work / "runs" / f"{args.label}-{n}".replace(" ", "_")
                    shutil.rmtree(root, ignore_errors=True)
                    (root / "ingest").mkdir(parents=True)
                    (root / "ingest" / "web").symlink_to(shards, target_is_directory=True)
                    root_url = str(root)
                else:
                    root_url = f"s3://{server.bucket}/{args.label}-{n}-{int(time.time())}".replace(" ", "_")
                    os.environ.update(env)
                    upload(shards, f"{root_url}/ingest/web")
                before = server.requests() if where == "s3" and server else {}
                r = run_child(args.tree, "child", root_url, env, args.work / f"{args.label}-{n}-{where}.log")
                after = server.requests() if where == "s3" and server else {}
                r["requests_per_unit"] = {k: round((after[k] - before.get(k, 0)) / r["units"], 2) for k in after}
                if where == "local":
                    out = Path(root_url) / "round=1" / "capfilt"
                    r["files_per_unit"] = round(sum(1 for p in out.rglob("*") if p.is_file()) / r["units"], 2)
                r.update(n=n, storage=where)
                results.append(r)
                print(
                    f"{args.label:>10} {where:>5} {n:>9,} images: {r['images'] / r['stage_seconds']:8.0f} images/s, "
                    f"driver RSS {r['driver_rss_mib']:6.0f} MiB (floor {r['driver_rss_before_mib']:.0f}), driver CPU "
                    f"{1e6 * r['driver_cpu_seconds'] / r['images']:6.1f} µs/image, "
                    + (
                        f"files/unit {r['files_per_unit']}"
                        if where == "local"
                        else f"requests/unit {r['requests_per_unit']}"
                    ),
                    flush=True,
                )
        for rows in args.assemble_rows:
            root = args.work / "assemble" / f"{rows}"
            write_capfilt(root / "round=1" / "capfilt", rows)
            shutil.rmtree(root / "round=1" / "dataset", ignore_errors=True)
            r = run_child(args.tree, "child-assemble", str(root), {}, args.work / f"{args.label}-assemble-{rows}.log")
            r.update(rows=rows)
            results.append(r)
            print(
                f"{args.label:>10} assemble {rows:>11,} rows: {r['seconds']:6.1f} s, driver RSS "
                f"{r['driver_rss_mib']:6.0f} MiB",
                flush=True,
            )
    finally:
        if server:
            local_s3.stop(server)
    (args.work / f"results-{args.label}.json".replace(" ", "_")).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
