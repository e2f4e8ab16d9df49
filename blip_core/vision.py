"""The image encoder: a timm Vision Transformer returning all tokens ([CLS] first), final LayerNorm applied."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .config import VisionConfig


def build_vit(cfg: VisionConfig) -> VisionTransformer:
    vit = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        drop_path_rate=cfg.drop_path_rate,
        num_classes=0,
        global_pool="",
        # Any resolution that is a multiple of the patch size works; positions are interpolated on the fly.
        dynamic_img_size=True,
    )
    if cfg.pos_embed_init == "sincos":
        side = cfg.image_size // cfg.patch_size
        with torch.no_grad():  # the patch rows; [CLS]'s row keeps timm's start
            vit.pos_embed[0, 1:] = build_sincos2d_pos_embed([side, side], cfg.width)
    if cfg.grad_checkpointing:
        vit.set_grad_checkpointing(True)
    return vit


def interpolate_pos_embed(pos_embed: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """Resample a [1, 1 + n*n, D] position table to another resolution (224 pre-training -> 384 fine-tuning)."""
    side = image_size // patch_size
    if pos_embed.shape[1] == 1 + side * side:
        return pos_embed
    # Plain bicubic, as the official BLIP code and transformers do: timm's default antialiased bicubic uses another
    # kernel (a=-0.5, not -0.75) and moves the table by up to ~0.2 even when upsampling.
    return resample_abs_pos_embed(pos_embed, new_size=[side, side], num_prefix_tokens=1, antialias=False)
