"""What a benchmark and the CapFilt integration tests share: a tiny captioner and filter trained on a world's
human set, laid out as ``capfilt finetune`` would lay them out.

``benchmarks/bench_capfilt.py`` imports this as ``_common`` (its own directory is on ``sys.path``);
``tests/integration/capfilt_helpers.py`` as ``benchmarks._common`` (the repository root is on pytest's path).
Benchmarks never import test helpers.

The checkpoints are trained here, in-process, with ``blip_core.BlipLosses`` (a captioner with LM, a filter with
ITC + ITM, both from scratch on the tiny world's 60 human images, ~20 s together on one core) rather than with
``capfilt finetune``, whose Ray Train jobs take minutes on 2 shared cores. They are weak models but real ones:
their captions name shapes and colours, and their scores are not constant.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from blip_core import BlipConfig, BlipLosses, BlipModel, BlipTokenizer
from blip_core.transforms import eval_transform
from pipelines import storage
from pipelines.karpathy import KarpathyDataset

log = logging.getLogger(__name__)


def train_tiny(world_dir: Path, out_dir: Path, role: str, steps: int = 150, seed: int = 0, tokenizer=None) -> Path:
    """Fine-tune a tiny model from scratch on the world's human set: ``captioner`` (LM) or ``filter`` (ITC+ITM).

    Written as ``<out_dir>/model`` (our checkpoint format); returns that path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 intra-op threads spin-wait and run ~30x slower
    try:
        return _train(world_dir, out_dir, role, steps, seed, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _train(world_dir: Path, out_dir: Path, role: str, steps: int, seed: int, tokenizer) -> Path:
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
    cfg = BlipConfig.preset("tiny", text={"vocab_size": tokenizer.vocab_size, **tokenizer.special_ids()}, queue_size=64)
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


def tokenizer_for(world_dir: Path) -> BlipTokenizer:
    """One small vocabulary for both models, from the human captions and the web corpus (what a run sees)."""
    texts = [a["caption"] for a in json.loads((world_dir / "human_train.json").read_text())]
    web = pq.read_table(world_dir / "web.parquet", columns=["caption"]).column("caption").to_pylist()
    return BlipTokenizer.train(texts + [w for w in web if w], vocab_size=300)


def train_models(world_dir: Path, out_root: Path, steps: dict[str, int] | None = None) -> dict[str, Path]:
    """A committed tiny captioner and filter as ``capfilt finetune`` lays them out: ``<out_root>/<role>/model``
    plus ``<out_root>/<role>/_COMMITTED``. Returns the role directories."""
    steps = steps or {"captioner": 200, "filter": 120}
    tok = tokenizer_for(world_dir)
    dirs = {}
    for role in ("captioner", "filter"):
        t0 = time.time()
        train_tiny(world_dir, out_root / role, role, steps=steps[role], tokenizer=tok)
        storage.commit(str(out_root / role), {"trained_by": "benchmarks/_common.py", "steps": steps[role]})
        log.info("tiny %s trained in %.1fs", role, time.time() - t0)
        dirs[role] = out_root / role
    return dirs


def link_models(models: dict[str, Path], root: str, round: int = 1) -> None:
    """Round K's captioner and filter of ``root`` are the trained ones (symlinked, committed)."""
    rd = Path(root) / f"round={round}"
    rd.mkdir(parents=True, exist_ok=True)
    for role, d in models.items():
        (rd / role).symlink_to(d, target_is_directory=True)
