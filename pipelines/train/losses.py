"""What a job's objectives train: the shared fine-tune's loss module and the freezing of parameters that no
objective reaches (so DDP needs no unused-parameter search)."""

from __future__ import annotations

import torch

from blip_core import BlipLosses, BlipModel


class SeparateLMLosses(torch.nn.Module):
    """``BlipLosses`` for the shared fine-tune: LM on the prompted caption and ITC + ITM on the caption alone,
    in one forward, so DDP sees one forward per backward. The image is encoded once per call (twice a step)."""

    def __init__(self, losses: BlipLosses):
        super().__init__()
        self.losses = losses

    def forward(
        self,
        images,
        input_ids,
        attention_mask,
        *,
        lm_input_ids,
        lm_attention_mask,
        objectives,
        prompt_length: int = 0,
        **kw,
    ) -> dict[str, torch.Tensor]:
        # LM first: every BlipLosses call clamps the temperature in place, and the ITC loss keeps it for backward.
        out = {}
        if "lm" in objectives:
            out = self.losses(
                images, lm_input_ids, lm_attention_mask, objectives=("lm",), prompt_length=prompt_length, **kw
            )
        rest = [o for o in objectives if o != "lm"]
        if rest:
            out.update(self.losses(images, input_ids, attention_mask, objectives=rest, **kw))
        return out


def freeze_unused(model: BlipModel, objectives: tuple[str, ...]) -> int:
    """Freeze the parameters that ``objectives`` never reach, found by one backward pass of the objectives'
    model functions on a dummy batch (no state of ``BlipLosses`` is touched); returns how many were frozen."""
    cfg = model.config
    size = cfg.vision.image_size
    images = torch.zeros(2, 3, size, size, device=model.device)
    t = cfg.text
    ids = torch.tensor(
        [[t.cls_token_id, t.sep_token_id, t.pad_token_id], [t.cls_token_id, t.sep_token_id, t.sep_token_id]],
        device=model.device,
    )
    mask = (ids != t.pad_token_id).long()
    model.zero_grad(set_to_none=True)
    image_embeds = model.vision.forward_features(images)
    total = image_embeds.float().sum() * 0
    if "itc" in objectives or "itm" in objectives:
        text_embeds = model.encode_text_ids(ids, mask)
        total = total + (model.image_features(image_embeds) @ model.text_features(text_embeds).t() / model.temp).sum()
    if "itm" in objectives:
        total = total + model.itm_logits(image_embeds, ids, mask).sum()
    if "lm" in objectives:
        dec = ids.clone()
        dec[:, 0] = t.bos_token_id
        total = total + model.lm_logits(image_embeds, dec, mask).sum()
    total.backward()
    frozen = 0
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen += 1
    model.zero_grad(set_to_none=True)
    return frozen
