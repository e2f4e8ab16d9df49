"""The image encoder's patch position table: where it starts, and that a ViT trained from scratch learns positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers import build_sincos2d_pos_embed

from blip_core import BlipConfig
from blip_core.transforms import eval_transform
from blip_core.vision import build_vit
from pipelines.world import POSITIONS, render_image, sample_facts


def test_sincos_start_fills_the_patch_rows_and_normal_is_timms():
    cfg = BlipConfig.preset("tiny", vision={"patch_size": 8}).vision
    assert cfg.pos_embed_init == "sincos"
    vit = build_vit(cfg)
    assert torch.equal(vit.pos_embed[0, 1:].detach(), build_sincos2d_pos_embed([8, 8], cfg.width))
    assert vit.pos_embed.requires_grad  # a start, not a frozen table
    torch.manual_seed(0)
    normal = build_vit(cfg.model_copy(update={"pos_embed_init": "normal"}))
    assert normal.pos_embed[0, 1:].std() < 0.03


def test_sincos_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="multiple of 4"):
        BlipConfig.preset("tiny", vision={"width": 66, "heads": 2})
    BlipConfig.preset("tiny", vision={"width": 66, "heads": 2, "pos_embed_init": "normal"})


def _single_objects(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic world's one-object images (random shape, colour, size, background) and their positions."""
    rng = np.random.default_rng(seed)
    tf = eval_transform(64)
    images, labels = [], []
    while len(images) < n:
        facts = sample_facts(rng)
        if facts["layout"] != "single":
            continue
        images.append(tf(render_image(facts, 64, rng)))
        labels.append(POSITIONS.index(facts["position"]))
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.slow
def test_vit_trained_from_scratch_learns_where_the_object_is():
    """Session 8 found captioner and ITM guessing positions at random after 3,000 pre-training steps: from timm's
    N(0, 0.02) start this classifier stays at chance (20%) for 300 steps. From sine-cosine it must learn fast."""
    torch.manual_seed(0)
    x, y = _single_objects(1200, seed=0)
    x_test, y_test = _single_objects(200, seed=1)
    vit = build_vit(BlipConfig.preset("tiny", vision={"patch_size": 8}).vision)
    head = torch.nn.Linear(vit.embed_dim, len(POSITIONS))
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=1e-3, weight_decay=0.05)
    for _ in range(250):
        idx = torch.randint(len(x), (64,))
        loss = torch.nn.functional.cross_entropy(head(vit.forward_features(x[idx])[:, 0]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (head(vit.forward_features(x_test)[:, 0]).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9, f"held-out position accuracy {accuracy:.2f} after 250 steps (chance 0.2)"
