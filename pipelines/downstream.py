"""Fine-tune and evaluate the paper's other downstream tasks: VQA, NLVR2 and zero-shot video-text retrieval.

Each task reads its standard annotation file (BLIP's JSON formats, see pipelines/world/tasks.py) with images under a
root (a path or fsspec URL). Fine-tuning starts from any checkpoint ``from_pretrained`` takes (a round's
pre-trained model, an HF BLIP directory, an official ``.pth``) and writes a checkpoint of the task's class.
These are single-process jobs (one GPU when there is one, bf16 autocast there), sized for researchers'
fine-tunes; the bootstrap's own training runs on Ray Train.

VQA accuracy is the VQA v2 score, ``min(1, #annotators who gave the answer / 3)``; with fewer than three
annotated answers a question needs one of them (exact match).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from blip_core import BlipModel, BlipNLVR, BlipVQA
from blip_core.transforms import decode_image, eval_transform, train_transform
from blip_core.video import encode_video, load_clip

from . import storage
from .errors import StageError
from .evaluate import rank_two_stage
from .karpathy import join_url
from .optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


class DownstreamError(StageError):
    """Bad downstream input: an annotation file that is not the task's format, a missing image."""


def read_annotations(url: str, required: tuple[str, ...]) -> list[dict]:
    try:
        with storage.open_url(url, "r") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise DownstreamError(f"no annotation file at {url}") from None
    except json.JSONDecodeError as err:
        raise DownstreamError(f"{url} is not valid JSON: {err}") from None
    if not isinstance(rows, list) or not rows:
        raise DownstreamError(f"{url} must hold a non-empty JSON list")
    for i, row in enumerate(rows):
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise DownstreamError(f"{url}: entry {i} lacks {missing}")
    return rows


def _load_image(root: str, rel: str, transform) -> torch.Tensor:
    url = join_url(root, rel)
    try:
        with storage.open_url(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DownstreamError(f"missing image {url}") from None
    try:
        return transform(decode_image(data))
    except ValueError as err:
        raise DownstreamError(f"{url}: {err}") from None


class _Rows(Dataset):
    def __init__(self, rows: list[dict], load):
        self.rows, self.load = rows, load

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.load(self.rows[i])


def _collate(batch):
    return [list(x) for x in zip(*batch)]


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _train(
    model, loader: DataLoader, loss_fn, *, epochs: int, lr: float, weight_decay: float, device: torch.device
) -> list[float]:
    """AdamW with a cosine schedule (BLIP's fine-tunes), bf16 autocast on GPU; returns the loss per epoch."""
    model.to(device).train()
    model.amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    opt = build_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = build_scheduler(opt, lr=lr, total_steps=epochs * len(loader))
    curve = []
    for epoch in range(epochs):
        total, n, t0 = 0.0, 0, time.perf_counter()
        for batch in loader:
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
        curve.append(total / max(n, 1))
        log.info("epoch %d: loss %.4f (%.1f s)", epoch, curve[-1], time.perf_counter() - t0)
    model.eval()
    model.amp_dtype = None
    return curve


def _image_size(model) -> int:
    return model.config.vision.image_size


# --- VQA -------------------------------------------------------------------------------------------------
def _answer_weights(answers: list[str]) -> tuple[list[str], list[float]]:
    counts = Counter(answers)
    return list(counts), [c / len(answers) for c in counts.values()]


def vqa_score(predicted: str, answers: list[str]) -> float:
    need = min(3, len(answers))
    return min(1.0, sum(a == predicted for a in answers) / need)


def _train_transform(size: int, augment: bool):
    """BLIP's fine-tuning crops and RandAugment (no flips: statements and answers say left and right), or the
    plain eval transform where a crop could cut away what the text is about (the tiny synthetic images)."""
    return train_transform(size, hflip=False) if augment else eval_transform(size)


def finetune_vqa(
    model: str,
    train: str,
    images: str,
    out: str,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 2e-5,
    weight_decay: float = 0.05,
    augment: bool = True,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Fine-tune BlipVQA on a VQA JSON (each question's answers weighted by how many annotators gave them)."""
    rows = read_annotations(train, ("image", "question", "answer"))
    torch.manual_seed(seed)  # before the heads the checkpoint lacks are built, so a fine-tune is its seed's alone
    vqa = BlipVQA.from_pretrained(model)
    tf = _train_transform(_image_size(vqa), augment)

    def load(row):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        unique, weights = _answer_weights([str(a) for a in answers])
        return _load_image(images, row["image"], tf), row["question"], unique, weights

    def loss_fn(m, batch):
        imgs, questions, answers, weights = batch
        return m.loss(torch.stack(imgs), questions, answers, weights)

    loader = DataLoader(
        _Rows(rows, load),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(rows) > batch_size,
    )
    curve = _train(vqa, loader, loss_fn, epochs=epochs, lr=lr, weight_decay=weight_decay, device=_device(device))
    return {"checkpoint": out, "checkpoint_id": vqa.save_pretrained(out), "loss": curve, "questions": len(rows)}


@torch.no_grad()
def eval_vqa(
    model: str,
    test: str,
    images: str,
    *,
    answer_list: str | None = None,
    k: int = 128,
    batch_size: int = 64,
    out: str | None = None,
    device: str | None = None,
) -> dict:
    """Answer every question (ranked over ``answer_list`` when given, else generated); writes BLIP's result
    JSON ``[{"question_id", "answer"}]`` to ``out`` and scores it when the file has answers."""
    rows = read_annotations(test, ("image", "question"))
    vqa = BlipVQA.from_pretrained(model).to(_device(device)).eval()
    candidates = read_annotations(answer_list, ()) if answer_list else None
    tf = eval_transform(_image_size(vqa))
    loader = DataLoader(
        _Rows(rows, lambda r: (_load_image(images, r["image"], tf), r["question"])),
        batch_size=batch_size,
        collate_fn=_collate,
    )
    predicted: list[str] = []
    for imgs, questions in loader:
        predicted += vqa.answer(torch.stack(imgs), questions, answer_list=candidates, k=k)
    results = [{"question_id": r.get("question_id", i), "answer": a} for i, (r, a) in enumerate(zip(rows, predicted))]
    if out:
        with storage.open_url(out, "w") as f:
            json.dump(results, f)
    metrics: dict[str, Any] = {"questions": len(rows), "method": "rank" if candidates else "generate"}
    scored = [
        (p, r["answer"] if isinstance(r["answer"], list) else [r["answer"]])
        for p, r in zip(predicted, rows)
        if "answer" in r
    ]
    if scored:
        metrics["accuracy"] = 100.0 * sum(vqa_score(p, [str(a) for a in ans]) for p, ans in scored) / len(scored)
    return metrics


# --- NLVR2 -----------------------------------------------------------------------------------------------
def _label(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1"):
        return True
    if str(value).lower() in ("false", "0"):
        return False
    raise DownstreamError(f"NLVR2 label must be True/False, got {value!r}")


def _nlvr_loader(rows, images, tf, batch_size, shuffle=False, seed=0):
    def load(row):
        if len(row["images"]) != 2:
            raise DownstreamError(f"an NLVR2 entry needs two images, got {row['images']!r}")
        left, right = (_load_image(images, rel, tf) for rel in row["images"])
        return left, right, row["sentence"], _label(row["label"])

    return DataLoader(
        _Rows(rows, load),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(seed),
    )


def finetune_nlvr(
    model: str,
    train: str,
    images: str,
    out: str,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-5,
    weight_decay: float = 0.05,
    augment: bool = True,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    rows = read_annotations(train, ("images", "sentence", "label"))
    torch.manual_seed(seed)  # before the heads the checkpoint lacks are built, so a fine-tune is its seed's alone
    nlvr = BlipNLVR.from_pretrained(model)
    tf = _train_transform(_image_size(nlvr), augment)

    def loss_fn(m, batch):
        left, right, texts, labels = batch
        return m.loss(torch.stack(left), torch.stack(right), texts, labels)

    curve = _train(
        nlvr,
        _nlvr_loader(rows, images, tf, batch_size, shuffle=True, seed=seed),
        loss_fn,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        device=_device(device),
    )
    return {"checkpoint": out, "checkpoint_id": nlvr.save_pretrained(out), "loss": curve, "pairs": len(rows)}


@torch.no_grad()
def eval_nlvr(model: str, test: str, images: str, *, batch_size: int = 64, device: str | None = None) -> dict:
    rows = read_annotations(test, ("images", "sentence", "label"))
    nlvr = BlipNLVR.from_pretrained(model).to(_device(device)).eval()
    correct = 0
    for left, right, texts, labels in _nlvr_loader(rows, images, eval_transform(_image_size(nlvr)), batch_size):
        pred = nlvr.predict(torch.stack(left), torch.stack(right), texts)
        correct += sum(p == y for p, y in zip(pred, labels))
    return {
        "pairs": len(rows),
        "accuracy": 100.0 * correct / len(rows),
        "majority": 100.0 * max(Counter(_label(r["label"]) for r in rows).values()) / len(rows),
    }


# --- zero-shot video-text retrieval ----------------------------------------------------------------------
@torch.no_grad()
def eval_video_retrieval(
    model: str,
    test: str,
    videos: str,
    *,
    num_frames: int = 8,
    k: int = 128,
    batch_size: int = 8,
    device: str | None = None,
) -> dict:
    """Text->video and video->text recall of an image-text model applied to clips (no video training)."""
    rows = read_annotations(test, ("video", "caption"))
    blip = BlipModel.from_pretrained(model).to(_device(device)).eval()
    tf = eval_transform(_image_size(blip))
    if "://" in videos and not videos.startswith("file://"):
        raise DownstreamError("video clips are read from a local directory (decoders need files)")
    root = Path(videos.removeprefix("file://"))
    tokens, feats, texts, txt2vid, vid2txt = [], [], [], [], []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        try:
            clips = torch.stack([load_clip(root / r["video"], num_frames, tf) for r in chunk])
        except (OSError, ValueError) as err:
            raise DownstreamError(str(err)) from None
        t, f = encode_video(blip, clips)
        tokens.append(t.cpu())
        feats.append(f.cpu())
        for r in chunk:
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            vid2txt.append(list(range(len(texts), len(texts) + len(caps))))
            txt2vid.extend([len(vid2txt) - 1] * len(caps))
            texts.extend(caps)
    out = rank_two_stage(blip, tokens, torch.cat(feats), texts, txt2vid, vid2txt, k=k)  # tokens: chunks in order
    out.update(frames=num_frames, videos=len(rows))
    return out
