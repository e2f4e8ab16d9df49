"""The GPU path, checked and measured in one command (``benchmarks/gpu_check.sh`` runs it on a GPU machine).

Random-weight BLIP models at the given size (default: ViT-B/16 + BERT-base at 384 px, the released CapFilt
models' shape), no download:

  checks      the filter's scores on the device in float32 equal the CPU's (max |ΔP(match)| < 2e-3); under
              ``--amp`` autocast they stay within 0.05; a caption drawn twice with one seed is the same caption;
              ``run_caption_filter`` on a local Ray with GPU actor pools commits every unit, every row scored
  throughput  images/s of the captioner (nucleus sampling, 1 caption of up to 30 tokens per image) and of the
              filter (ITM + ITC of the web text and the caption) alone, each in the actor class the pipeline
              uses, at ``--batch`` images per model call, and of the whole Ray pipeline (both models sharing
              the GPU, decode on CPU)

One table at the end; exit status 1 when a check fails. ``--device cpu --size tiny`` runs the same code without
a GPU.

    .venv/bin/python benchmarks/gpu_check.py [--size base] [--image-size 384] [--amp bf16] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY_CONFIG = str(ROOT / "flows" / "configs" / "tiny.yaml")


def random_checkpoint(size: str, image_size: int, path: Path) -> str:
    import torch

    from blip_core import BlipConfig, BlipModel, BlipTokenizer

    tok = BlipTokenizer.bert_base_uncased()
    over: dict = {"vision": {"image_size": image_size}}
    if size == "tiny":
        over["text"] = {"vocab_size": tok.vocab_size, **tok.special_ids()}
    cfg = BlipConfig.preset(size, **over)
    torch.manual_seed(0)
    BlipModel(cfg, tok).save_pretrained(path)
    return str(path)


def model_overrides(ckpt: str, args: argparse.Namespace) -> list[str]:
    """The CapFilt settings every check shares: one checkpoint as captioner and filter, the precision, the batch."""
    return [
        f"capfilt.captioner={ckpt}",
        f"capfilt.filter={ckpt}",
        f"capfilt.amp={args.amp}",
        f"capfilt.model_batch_size={args.batch}",
        "capfilt.num_samples=1",
    ]


def settings_for(ckpt: str, args: argparse.Namespace, root: str):
    from pipelines.capfilt import resolve_settings
    from pipelines.config import load_config

    cfg = load_config(TINY_CONFIG, [*model_overrides(ckpt, args), "capfilt.max_length=30", "capfilt.min_length=5"])
    s = resolve_settings(cfg, root, 1)
    s.use_gpu = args.device == "cuda"
    return s


def batch_of(n: int, size: int, column: str, k: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "text": np.array(["a photo of something on a table"] * n, dtype=object),
        "text_status": np.array(["ok"] * n, dtype=object),
        "image_status": np.array(["ok"] * n, dtype=object),
        column: rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
    }
    for j in range(k):
        b[f"syn_{j}"] = np.array(["a small red object"] * n, dtype=object)
    return b


def rate(fn, batch: dict, repeats: int) -> float:
    """Images/s of ``fn`` over ``repeats`` calls after one warm-up call (CUDA synchronised)."""
    import torch

    fn(dict(batch))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(dict(batch))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return repeats * len(batch["key"]) / (time.perf_counter() - t0)


def checks(s, args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    import dataclasses

    import torch

    from pipelines.capfilt.actors import CaptionActor, ScoreActor

    out = []
    col, size = s.filter.pixels.column, s.filter.pixels.size
    b = batch_of(4, size, col)
    pool = {"torch_threads": 4}
    cpu = dataclasses.replace(s, use_gpu=False, amp="none")
    ref = ScoreActor(cpu.filter, cpu, pool)(dict(b))["itm_score__0"]
    fp32 = dataclasses.replace(s, amp="none")
    dev = ScoreActor(fp32.filter, fp32, pool)(dict(b))["itm_score__0"]
    d = float(np.max(np.abs(dev - ref)))
    out.append(("filter float32: device vs CPU", f"max abs dP {d:.2e}", d < 2e-3))
    if s.amp != "none":
        amp = ScoreActor(s.filter, s, pool)(dict(b))["itm_score__0"]
        d = float(np.max(np.abs(amp - ref)))
        out.append((f"filter {s.amp} autocast vs float32", f"max abs dP {d:.2e}", d < 0.05))
    cap = CaptionActor(s.captioner, s, pool)
    one, two = cap(dict(b))["syn_0"], cap(dict(b))["syn_0"]
    out.append(("captions, same seeds twice", f"{int(np.sum(one == two))}/{len(one)} equal", bool(np.all(one == two))))
    out.append(
        (
            "device",
            str(cap.device) + (f" ({torch.cuda.get_device_name()})" if cap.device.type == "cuda" else ""),
            cap.device.type == args.device,
        )
    )
    return out


def throughput(s, args: argparse.Namespace) -> list[tuple[str, float]]:
    from pipelines.capfilt.actors import CaptionActor, ScoreActor

    pool = {"torch_threads": os.cpu_count() or 1}
    b = batch_of(args.batch, s.captioner.pixels.size, s.captioner.pixels.column)
    cap = CaptionActor(s.captioner, s, pool)
    filt = ScoreActor(s.filter, s, pool)
    return [
        ("captioner alone (1 nucleus caption/image)", rate(cap, b, args.repeats)),
        ("filter alone (ITM + ITC, 2 texts/image)", rate(filt, b, args.repeats)),
    ]


def pipeline(ckpt: str, args: argparse.Namespace, work: Path) -> tuple[float, dict]:
    """A caption-filter run on a local Ray with both models on the device; images/s of the stage."""
    import pyarrow.parquet as pq
    from bench_scale import write_shards

    from pipelines.capfilt import run_caption_filter
    from pipelines.config import load_config
    from pipelines.ray_runtime import ensure_ray

    root = work / "run"
    write_shards(root / "ingest" / "web", args.pipeline_images, 256)
    gpu = 0.5 if args.device == "cuda" else 0
    cfg = load_config(
        TINY_CONFIG,
        [
            *model_overrides(ckpt, args),
            f"capfilt.use_gpu={str(args.device == 'cuda').lower()}",
            "capfilt.decode_batch_rows=256",
            *[f"capfilt.{p}.batch_size={args.batch}" for p in ("captioner_pool", "filter_pool")],
            *[f"capfilt.{p}.num_gpus={gpu}" for p in ("captioner_pool", "filter_pool")],
            *[f"capfilt.{p}.num_cpus={1 if args.device == 'cuda' else 0.5}" for p in ("captioner_pool", "filter_pool")],
        ],
    )
    ensure_ray()
    summary = run_caption_filter(cfg, str(root), 1)
    table = pq.read_table(root / "round=1" / "capfilt")
    unscored = table.filter(table["status"].to_numpy(zero_copy_only=False) == "ok")["itm_score"].null_count
    return summary["images"] / summary["this_run"]["seconds"], {"rows": table.num_rows, "unscored": unscored, **summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pipeline-images", type=int, default=2048, help="0: leave the Ray pipeline out (no Ray there)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for the CPU smoke run")
    with tempfile.TemporaryDirectory(prefix="capfilt-gpu-") as tmp:
        work = Path(tmp)
        ckpt = random_checkpoint(args.size, args.image_size, work / "model")
        s = settings_for(ckpt, args, str(work / "run"))
        results = checks(s, args)
        rates = throughput(s, args)
        if args.pipeline_images:
            pipe_rate, info = pipeline(ckpt, args, work)
            ok = info["unscored"] == 0
            results.append(("pipeline: every unit committed, every ok row scored", f"{info['rows']} rows", ok))
    label = f"{args.size} @ {args.image_size}px, {args.amp}, batch {args.batch}, {args.device}"
    print(f"\n## gpu_check: {label}\n")
    print("| check | result | ok |\n|---|---|---|")
    for name, value, ok in results:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    print("\n| throughput | images/s |\n|---|---|")
    for name, r in rates:
        print(f"| {name} | {r:.1f} |")
    if args.pipeline_images:
        print(f"| whole Ray pipeline, both models on one device ({args.pipeline_images} images) | {pipe_rate:.1f} |")
    if not all(ok for _, _, ok in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
