"""The held-out evaluation at the end of a job, split over ranks: ITC retrieval for models with ITC, caption
loss for captioning models (the captioner; the shared model gets both)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from blip_core import BlipModel
from blip_core.transforms import eval_transform

from ..config import TrainJob
from ..karpathy import KarpathyDataset
from .collectives import gather, share
from .data import eval_collate, pre_caption
from .metrics import itc_retrieval_metrics


@torch.no_grad()
def evaluate(
    model: BlipModel,
    test: dict,
    jc: TrainJob,
    objectives: tuple[str, ...],
    *,
    rank: int,
    world: int,
    device: torch.device,
    prompt: str = "",
    prompt_length: int = 0,
) -> dict:
    """The held-out set ``test`` ({"ann", "image_root"}), split over ranks: retrieval for models with ITC,
    caption loss for captioning models (the captioner; the shared model gets both). Every rank gets the metrics."""
    was_training = model.training
    model.eval()
    ds = KarpathyDataset(test["ann"], test["image_root"], transform=eval_transform(jc.image_size))
    part = Subset(ds, list(range(rank, len(ds), world)))
    loader = DataLoader(
        part, batch_size=jc.eval_batch_size, num_workers=min(2, jc.dataloader_workers), collate_fn=eval_collate
    )
    result: dict = {}
    if "itc" in objectives:
        result.update(
            _retrieval(
                model,
                loader,
                [i for i in range(rank, len(ds), world)],
                max_text_length=jc.max_text_length,
                rank=rank,
                world=world,
                device=device,
            )
        )
    if prompt:
        result.update(
            _caption_loss(
                model,
                loader,
                prompt=prompt,
                prompt_length=prompt_length,
                max_text_length=jc.max_text_length,
                world=world,
                device=device,
            )
        )
    model.train(was_training)
    return result


def _retrieval(
    model: BlipModel,
    loader: DataLoader,
    indices: list[int],
    *,
    max_text_length: int,
    rank: int,
    world: int,
    device: torch.device,
) -> dict:
    """ITC features of this rank's part, gathered on rank 0, which ranks them all; ``indices``: the part's
    items in the whole set."""
    m = model
    img_feats, txt_feats, owners = [], [], []
    pos = 0
    for images, captions, _ in loader:
        img_feats.append(m.image_features(m.encode_image(images.to(device))).cpu())
        flat = [pre_caption(c) for caps in captions for c in caps]
        ids, mask = m.tokenizer(flat, max_length=max_text_length)
        txt_feats.append(m.text_features(m.encode_text_ids(ids.to(device), mask.to(device))).cpu())
        for j, caps in enumerate(captions):
            owners += [indices[pos + j]] * len(caps)
        pos += len(captions)
    local = (indices, torch.cat(img_feats) if img_feats else None, torch.cat(txt_feats) if txt_feats else None, owners)
    parts = gather(local, world)
    metrics: dict = {}
    if rank == 0:
        idx = [i for p in parts for i in p[0]]
        img = torch.cat([p[1] for p in parts if p[1] is not None])
        txt = torch.cat([p[2] for p in parts if p[2] is not None])
        owner = torch.tensor([o for p in parts for o in p[3]])
        metrics = itc_retrieval_metrics(img, torch.tensor(idx), txt, owner)
    return share(metrics, world)


def _caption_loss(
    model: BlipModel,
    loader: DataLoader,
    *,
    prompt: str,
    prompt_length: int,
    max_text_length: int,
    world: int,
    device: torch.device,
) -> dict:
    """The token-weighted LM loss of the captions after the prompt (prompt tokens out of the loss), summed
    over ranks."""
    m = model
    cfg = m.config.text
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for images, captions, _ in loader:
        embeds = m.encode_image(images.to(device))
        counts = torch.tensor([len(c) for c in captions], device=device)
        texts = [prompt + pre_caption(c) for caps in captions for c in caps]
        ids, mask = m.tokenizer(texts, max_length=max_text_length)
        ids, mask = ids.to(device), mask.to(device)
        ids[:, 0] = cfg.bos_token_id
        logits = m.lm_logits(embeds.repeat_interleave(counts, dim=0), ids, mask)
        targets = ids.masked_fill(mask == 0, -100)
        targets[:, :prompt_length] = -100
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets[:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += torch.stack([loss.double(), (targets[:, 1:] != -100).sum().double()])
    if world > 1:
        dist.all_reduce(total)
    loss_sum, tokens = total.tolist()
    loss = loss_sum / max(tokens, 1)
    return {"caption_loss": loss, "caption_perplexity": math.exp(min(loss, 50.0)), "caption_tokens": int(tokens)}
