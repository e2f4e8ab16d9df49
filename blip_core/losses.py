"""BLIP's pre-training objectives: ITC (momentum distillation, feature queues), ITM (hard negatives), LM.

``BlipLosses`` wraps a ``BlipModel`` with the state only training needs: momentum copies of the unimodal
encoders and projections, and the image/text/id queues. One call returns every asked-for loss separately.
With torch.distributed initialised, momentum features and image ids are gathered from all ranks before the
ITC loss and the queue update, so N ranks with batch b give the loss of one process with batch N*b.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .med import padding_mask
from .model import BlipModel

OBJECTIVES = ("itc", "itm", "lm")


def alpha_at(alpha: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Distillation weight: ramped linearly over the first epoch, as the paper's code does."""
    if epoch > 0 or steps_per_epoch <= 0:
        return alpha
    return alpha * min(1.0, step / steps_per_epoch)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0 (no gradient); identity without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m_all: torch.Tensor,
    text_feat_m_all: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    idx: torch.Tensor,
    idx_all: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Image-text contrastive loss of the local rows against all momentum features (batch of every rank +
    queue). Targets: every column with the same image id is a positive; mixed with the momentum model's
    own softmax by ``alpha`` (momentum distillation)."""
    with torch.no_grad():
        pos = (idx[:, None] == idx_all[None, :]).float()
        targets = pos / pos.sum(1, keepdim=True)
        i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_m_all.t() / temp, dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_m_all.t() / temp, dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_feat_m_all.t() / temp
    sim_t2i = text_feat @ image_feat_m_all.t() / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_hard_negatives(sim: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, one column sampled in proportion to softmax(sim), never a positive.
    Returns (index per row, valid per row); a row whose every column is positive has no negative."""
    weights = F.softmax(sim.float(), dim=1) + 1e-4
    weights = weights.masked_fill(positive, 0.0)
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0  # placeholder row, dropped by the caller
    return torch.multinomial(weights, 1).squeeze(1), valid


def lm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    pad_token_id: int,
    prompt_length: int = 0,
    label_smoothing: float = 0.1,
    per_sequence: bool = False,
) -> torch.Tensor:
    """Next-token cross-entropy with label smoothing; padding and (optionally) prompt tokens ignored. The mean
    over all target tokens, or with ``per_sequence`` each sequence's sum [B] (VQA weighs and ranks answers so)."""
    targets = input_ids.masked_fill(input_ids == pad_token_id, -100)
    if prompt_length:
        targets[:, :prompt_length] = -100
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets[:, 1:].reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none" if per_sequence else "mean",
    )
    return loss.view(input_ids.shape[0], -1).sum(1) if per_sequence else loss


class BlipLosses(nn.Module):
    def __init__(self, model: BlipModel):
        super().__init__()
        cfg = model.config
        self.model = model
        # momentum copies of the unimodal pathway (the ViT, the text encoder without cross-attention, projections)
        self.vision_m = copy.deepcopy(model.vision)
        self.vision_proj_m = copy.deepcopy(model.vision_proj)
        self.text_embeddings_m = copy.deepcopy(model.text.embeddings)
        self.text_encoder_m = copy.deepcopy(model.text.encoder)
        for layer in self.text_encoder_m:
            layer.cross_attn = nn.Identity()  # never used without an image; no point keeping a copy
        self.text_proj_m = copy.deepcopy(model.text_proj)
        for p in self._momentum_params():
            p.requires_grad_(False)
        q, d = max(cfg.queue_size, 0), cfg.embed_dim
        g = torch.Generator().manual_seed(0)  # identical initial queues on every rank
        self.register_buffer("image_queue", F.normalize(torch.randn(q, d, generator=g), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(q, d, generator=g), dim=1))
        self.register_buffer("idx_queue", torch.full((q,), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long))

    # --- momentum ---------------------------------------------------------------------------------
    def _online_params(self) -> list[nn.Parameter]:
        m = self.model
        enc = [p for layer in m.text.encoder for mod in (layer.self_attn, layer.ffn) for p in mod.parameters()]
        return [
            *m.vision.parameters(),
            *m.vision_proj.parameters(),
            *m.text.embeddings.parameters(),
            *enc,
            *m.text_proj.parameters(),
        ]

    def _momentum_params(self) -> list[nn.Parameter]:
        enc = [p for layer in self.text_encoder_m for mod in (layer.self_attn, layer.ffn) for p in mod.parameters()]
        return [
            *self.vision_m.parameters(),
            *self.vision_proj_m.parameters(),
            *self.text_embeddings_m.parameters(),
            *enc,
            *self.text_proj_m.parameters(),
        ]

    @torch.no_grad()
    def momentum_update(self) -> None:
        mom = self.model.config.momentum
        online, shadow = self._online_params(), self._momentum_params()
        torch._foreach_mul_(shadow, mom)
        torch._foreach_add_(shadow, [p.detach() for p in online], alpha=1 - mom)

    @torch.no_grad()
    def _momentum_features(self, images, input_ids, attention_mask):
        img = F.normalize(self.vision_proj_m(self.vision_m.forward_features(images)[:, 0]).float(), dim=-1)
        x = self.text_embeddings_m(input_ids)
        mask = padding_mask(attention_mask, x.dtype)
        for layer in self.text_encoder_m:
            x = layer(x, mask)[0]
        txt = F.normalize(self.text_proj_m(x[:, 0]).float(), dim=-1)
        return img, txt

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        q = self.image_queue.shape[0]
        if q == 0:
            return
        n = image_feat.shape[0]
        if n > q:
            image_feat, text_feat, idx, n = image_feat[-q:], text_feat[-q:], idx[-q:], q
        pos = (self.queue_ptr + torch.arange(n, device=idx.device)) % q
        self.image_queue[pos] = image_feat.to(self.image_queue.dtype)
        self.text_queue[pos] = text_feat.to(self.text_queue.dtype)
        self.idx_queue[pos] = idx
        self.queue_ptr.fill_(int((self.queue_ptr + n) % q))

    # --- the objectives ---------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        alpha: float | None = None,
        objectives: Iterable[str] = OBJECTIVES,
        prompt_length: int = 0,
    ) -> dict[str, torch.Tensor]:
        """``input_ids``: ``[CLS] text [SEP]`` (as the tokenizer gives them). ``image_ids``: captions with equal
        ids are positives of each other; by default every sample is its own image."""
        objectives = tuple(objectives)
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; choose from {OBJECTIVES}")
        m, cfg = self.model, self.model.config
        alpha = cfg.alpha if alpha is None else alpha
        images = m.check_images(images)  # once, for the online and the momentum encoders alike
        b = images.shape[0]
        if input_ids.shape[0] != b or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"one text per image: {b} images, input_ids {list(input_ids.shape)}, attention_mask {list(attention_mask.shape)}"
            )
        if image_ids is not None and len(image_ids) != b:
            raise ValueError(f"image_ids must give one id per image: {b} images, {len(image_ids)} ids")
        if image_ids is None:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            image_ids = self.samples_seen + _rank() * b + torch.arange(b, device=images.device)
            self.samples_seen += b * world
        image_ids = image_ids.to(images.device).long()
        with torch.no_grad():
            m.temp.clamp_(0.001, 0.5)
        losses: dict[str, torch.Tensor] = {}
        with m.autocast():
            image_embeds = m.vision.forward_features(images)
        need_feats = "itc" in objectives or "itm" in objectives
        if need_feats:
            text_embeds = m.encode_text_ids(input_ids, attention_mask)
            image_feat, text_feat = m.image_features(image_embeds), m.text_features(text_embeds)
        if "itc" in objectives:
            with torch.no_grad():
                self.momentum_update()
                image_feat_m, text_feat_m = self._momentum_features(images, input_ids, attention_mask)
                img_m_batch, txt_m_batch, idx_batch = gather(image_feat_m), gather(text_feat_m), gather(image_ids)
                img_m_all = torch.cat([img_m_batch, self.image_queue.clone()])
                txt_m_all = torch.cat([txt_m_batch, self.text_queue.clone()])
                idx_all = torch.cat([idx_batch, self.idx_queue.clone()])
            losses["itc"] = itc_loss(
                image_feat,
                text_feat,
                img_m_all,
                txt_m_all,
                image_feat_m,
                text_feat_m,
                image_ids,
                idx_all,
                m.temp,
                alpha,
            )
            self.enqueue(img_m_batch, txt_m_batch, idx_batch)
        if "itm" in objectives:
            losses["itm"] = self._itm(image_embeds, image_feat, text_feat, input_ids, attention_mask, image_ids)
        if "lm" in objectives:
            dec_ids = input_ids.clone()
            dec_ids[:, 0] = cfg.text.bos_token_id
            logits = m.lm_logits(image_embeds, dec_ids, attention_mask)
            losses["lm"] = lm_loss(logits, dec_ids, cfg.text.pad_token_id, prompt_length, cfg.label_smoothing)
        return losses

    def _itm(self, image_embeds, image_feat, text_feat, input_ids, attention_mask, image_ids):
        m = self.model
        with torch.no_grad():
            positive = image_ids[:, None] == image_ids[None, :]
            sim_i2t = image_feat @ text_feat.t() / m.temp
            if m.config.itm_negatives == "uniform":
                sim_i2t = torch.zeros_like(sim_i2t)  # every other image id alike
            neg_image, ok_t = sample_hard_negatives(sim_i2t.t(), positive)  # a negative image for each text
            neg_text, ok_i = sample_hard_negatives(sim_i2t, positive)  # a negative text for each image
        ids = torch.cat([input_ids, input_ids[ok_t], input_ids[neg_text[ok_i]]])
        mask = torch.cat([attention_mask, attention_mask[ok_t], attention_mask[neg_text[ok_i]]])
        imgs = torch.cat([image_embeds, image_embeds[neg_image[ok_t]], image_embeds[ok_i]])
        logits = m.itm_logits(imgs, ids, mask)
        b = input_ids.shape[0]
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:b] = 1
        return F.cross_entropy(logits, labels)
