"""BLIP's captioner (image-grounded decoder) and filter (ITM head and ITC features): the CapFilt of the paper.
Checkpoints default to round K's fine-tunes, ``<root>/round=K/{captioner,filter}/model``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from .models import CapfiltError, Captioner, ModelRef, Scorer, content_id, register_captioner, register_scorer
from .pixels import blip_pixels


def checkpoint_image_size(local_path: str) -> int:
    """The input size a checkpoint was trained at: its config.json (ours or Hugging Face's), else by loading it."""
    cfg = os.path.join(local_path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            meta = json.load(f)
        for vision in ((meta.get("config") or {}).get("vision"), meta.get("vision_config")):
            if isinstance(vision, dict) and isinstance(vision.get("image_size"), int):
                return vision["image_size"]
    from blip_core import BlipModel

    return BlipModel.from_pretrained(local_path).config.vision.image_size


def checkpoint_url(cfg, root: str, round: int, role: str) -> str:
    """``capfilt.<role>`` or round K's committed fine-tune; fails when there is none."""
    given = getattr(cfg.capfilt, role)
    if given is None:
        job = storage.RunRoot(root).round(round, role)
        if not storage.is_committed(job):
            raise CapfiltError(
                f"no committed {role} for round {round} at {job}: run "
                f"`capfilt finetune --round {round} --role {role}` first, or set capfilt.{role}"
            )
        given = storage.join(job, "model")
    if not storage.exists(given):
        raise CapfiltError(f"capfilt.{role}: no checkpoint at {given}")
    return given


def resolve_blip(cls: type, kind: str, url: str, image_size: int | None) -> ModelRef:
    with storage.local_copy(url) as path:
        return ModelRef(kind, cls, url, content_id(path), blip_pixels(image_size or checkpoint_image_size(path)))


def load_blip(ref: ModelRef, settings: Any, device: Any):
    """The checkpoint at the input size, on ``device``, autocast to ``capfilt.amp`` on a GPU."""
    import torch

    from ..modeling import load_model

    assert ref.url is not None, "resolve_blip always names the checkpoint"
    model = load_model(ref.url, image_size=ref.pixels.size).eval().to(device)
    if device.type == "cuda" and settings.amp != "none":
        model.amp_dtype = torch.bfloat16 if settings.amp == "bf16" else torch.float16
    return model


@register_captioner("blip")
class BlipCaptioner(Captioner):
    """Nucleus sampling (the paper) or beam search from BLIP's image-grounded decoder."""

    @classmethod
    def resolve(cls, cfg, root: str, round: int) -> ModelRef:
        return resolve_blip(cls, "blip", checkpoint_url(cfg, root, round, "captioner"), cfg.capfilt.image_size)

    def __init__(self, ref: ModelRef, settings, device):
        super().__init__(ref, settings, device)
        self.model = load_blip(ref, settings, device)

    def caption(self, images, seeds: Sequence[int]) -> list[list[str]]:
        import torch

        s, k = self.settings, self.settings.num_samples
        common = dict(
            max_length=s.max_length,
            min_length=s.min_length,
            repetition_penalty=s.repetition_penalty,
            num_return_sequences=k,
            prompt=s.prompt,
        )
        with torch.inference_mode():
            if s.method == "nucleus":
                out = self.model.generate(images, top_p=s.top_p, seeds=list(seeds), **common)
            else:
                out = self.model.generate(images, num_beams=s.num_beams, **common)
        return [[t] for t in out] if k == 1 else out


@register_scorer("blip_itm")
class BlipFilter(Scorer):
    """The filter: ITM P(match) and ITC cosine, each image encoded once for all its texts. Always runs, last;
    ``capfilt.itm_threshold`` is its keep rule (see ``rows.py``)."""

    columns = (pa.field("itm_score", pa.float32()), pa.field("itc_score", pa.float32()))

    @classmethod
    def resolve(cls, cfg, root: str, round: int, section=None) -> ModelRef:
        return resolve_blip(cls, "blip_itm", checkpoint_url(cfg, root, round, "filter"), cfg.capfilt.image_size)

    def __init__(self, ref: ModelRef, settings, device):
        super().__init__(ref, settings, device)
        self.model = load_blip(ref, settings, device)

    def score(self, images, texts: list[str], scored: list[bool]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        m, mb = self.model, len(images)
        per = len(texts) // mb
        texts = [t if ok else "." for t, ok in zip(texts, scored)]
        width = m.max_text_length
        ids, mask = m.tokenizer(texts, max_length=width)
        ids = F.pad(ids, (0, width - ids.shape[1]), value=m.config.text.pad_token_id).to(self.device)
        mask = F.pad(mask, (0, width - mask.shape[1]), value=0).to(self.device)
        with torch.inference_mode():
            image_embeds = m.encode_image(images)  # once per image, for all its texts
            itm = m.itm_logits(image_embeds, ids, mask).softmax(-1)[:, 1]
            img_feat = m.image_features(image_embeds)
            txt_feat = m.text_features(m.encode_text_ids(ids, mask))
            itc = (txt_feat.view(mb, per, -1) * img_feat[:, None]).sum(-1)
        return {"itm_score": itm.view(mb, per).float().cpu().numpy(), "itc_score": itc.float().cpu().numpy()}
