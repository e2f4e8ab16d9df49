"""Helpers for the CapFilt integration tests (and ``benchmarks/bench_capfilt.py``): a tiny captioner and filter
trained on a world's human set, a tiny CLIP checkpoint, and process plumbing for the kill test.

A plain module (not a conftest) so test files say where their helpers come from. The checkpoints are trained
here, in-process, with ``blip_core.BlipLosses`` (a captioner with LM, a filter with ITC + ITM, both from scratch
on the tiny world's 60 human images, ~20 s together on one core) rather than with ``capfilt finetune``, whose
Ray Train jobs take minutes on 2 shared cores. They are weak models but real ones: their captions name shapes
and colours, and their scores are not constant, which is all the pipeline tests need.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from integration_helpers import CAPFILT, REPO

log = logging.getLogger(__name__)

def train_tiny(world_dir: Path, out_dir: Path, role: str, steps: int = 150, seed: int = 0,
               tokenizer=None) -> Path:
    """Fine-tune a tiny model from scratch on the world's human set: ``captioner`` (LM) or ``filter`` (ITC+ITM).

    Written as ``<out_dir>/model`` (our checkpoint format); returns that path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 intra-op threads spin-wait and run ~30x slower
    try:
        return _train(world_dir, out_dir, role, steps, seed, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _train(world_dir: Path, out_dir: Path, role: str, steps: int, seed: int, tokenizer) -> Path:
    import math

    from blip_core import BlipConfig, BlipLosses, BlipModel, BlipTokenizer
    from blip_core.transforms import eval_transform
    from pipelines.karpathy import KarpathyDataset

    torch.manual_seed(seed)
    ds = KarpathyDataset(str(world_dir / "human_train.json"), str(world_dir / "images"), transform=eval_transform(64))
    images, texts, image_ids = [], [], []
    for i in range(len(ds)):
        img, caps, _ = ds[i]
        for c in caps:
            images.append(img)
            texts.append(c)
            image_ids.append(i)
    images_t = torch.stack(images)
    ids_t = torch.tensor(image_ids)
    if tokenizer is None:
        tokenizer = BlipTokenizer.train(texts, vocab_size=200)
    cfg = BlipConfig.preset("tiny", text={"vocab_size": tokenizer.vocab_size, **tokenizer.special_ids()},
                            queue_size=64)
    model = BlipModel(cfg, tokenizer).train()
    losses = BlipLosses(model)
    objectives = ("lm",) if role == "captioner" else ("itc", "itm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.05)
    prompt = cfg.prompt
    g = torch.Generator().manual_seed(seed)
    n, batch = len(texts), 24
    for step in range(steps):
        idx = torch.randperm(n, generator=g)[:batch]
        batch_texts = [(prompt + texts[j]) if role == "captioner" else texts[j] for j in idx.tolist()]
        ids, mask = model.tokenize(batch_texts)
        plen = len(tokenizer([prompt], add_sep=False)[0][0]) if role == "captioner" else 0
        out = losses(images_t[idx], ids, mask, image_ids=ids_t[idx], objectives=objectives, prompt_length=plen)
        loss = sum(out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    model.eval()
    path = out_dir / "model"
    model.save_pretrained(path)
    log.info("trained tiny %s: final loss %.3f", role, float(loss.detach()))
    return path


def tokenizer_for(world_dir: Path):
    """One small vocabulary for both models, from the human captions and the web corpus (what a run sees)."""
    from blip_core import BlipTokenizer

    texts = [a["caption"] for a in json.loads((world_dir / "human_train.json").read_text())]
    web = pq.read_table(world_dir / "web.parquet", columns=["caption"]).column("caption").to_pylist()
    return BlipTokenizer.train(texts + [w for w in web if w], vocab_size=300)


def tiny_clip_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A randomly initialised small open_clip model saved as safetensors, with its architecture's JSON config
    (open_clip has no architecture this small built in). Returns (config file, weights file)."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    name = "capfilt-tiny-clip"
    config = {"embed_dim": 32,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    cfg_path = directory / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = directory / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg_path, weights


# --------------------------------------------------------------------------------------------- processes

def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (``NAME=value``): everything a test's ``capfilt``
    process started, Ray's raylet, GCS and workers included (they inherit the environment; workers rename
    themselves, so command lines would not do)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            state = next((ln for ln in Path(f"/proc/{entry}/status").read_text().splitlines()
                          if ln.startswith("State:")), "")
        except OSError:
            continue
        if "zombie" not in state:
            pids.append(int(entry))
    return pids


def start_capfilt(*args: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``capfilt ...`` in its own session (process group), so the test can SIGKILL all of it at once.
    ``env`` is the whole environment of the process."""
    with open(log_path, "wb") as logf:  # the child keeps its own descriptor
        return subprocess.Popen([CAPFILT, *args], stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None,
             poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def train_models(world_dir: Path, out_root: Path, steps: dict[str, int] | None = None) -> dict[str, Path]:
    """A committed tiny captioner and filter as ``capfilt finetune`` lays them out: ``<out_root>/<role>/model``
    plus ``<out_root>/<role>/_COMMITTED``. Returns the role directories."""
    from pipelines import storage

    steps = steps or {"captioner": 200, "filter": 120}
    tok = tokenizer_for(world_dir)
    dirs = {}
    for role in ("captioner", "filter"):
        t0 = time.time()
        train_tiny(world_dir, out_root / role, role, steps=steps[role], tokenizer=tok)
        storage.commit(str(out_root / role), {"trained_by": "tests/integration/capfilt_helpers.py", "steps": steps[role]})
        log.info("tiny %s trained in %.1fs", role, time.time() - t0)
        dirs[role] = out_root / role
    return dirs


def link_inputs(src_root: str, dst_root: Path, names: tuple[str, ...] = ("world", "ingest")) -> str:
    """A new run root whose inputs are those of ``src_root`` (read-only), linked rather than copied."""
    dst_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(src_root) / name).exists():
            (dst_root / name).symlink_to(Path(src_root) / name, target_is_directory=True)
    return str(dst_root)


def link_models(models: dict[str, Path], root: str, round: int = 1) -> None:
    """Round K's captioner and filter of ``root`` are the trained ones (symlinked, committed)."""
    rd = Path(root) / f"round={round}"
    rd.mkdir(parents=True, exist_ok=True)
    for role, d in models.items():
        (rd / role).symlink_to(d, target_is_directory=True)
