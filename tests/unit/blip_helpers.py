"""Helpers shared by the blip_core unit tests: a small trained vocabulary and tiny models built from it.

A plain module (not conftest.py) so that test files say where their fixtures come from:
``from blip_helpers import tokenizer, make_model``."""

from __future__ import annotations

import pytest
import torch

from blip_core import BlipConfig, BlipModel, BlipTokenizer

SHARINGS = ("all", "all_but_sa", "all_but_ca", "none")

CORPUS = [
    f"a {colour} {shape} on the {side}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("square", "circle", "triangle")
    for side in ("left", "right", "top", "bottom")
] + ["a picture of a dog", "two cats sleeping on a mat", "an empty street at night"]


@pytest.fixture(scope="session")
def tokenizer() -> BlipTokenizer:
    return BlipTokenizer.train(CORPUS, vocab_size=120)


def tiny_config(tokenizer: BlipTokenizer, **overrides) -> BlipConfig:
    """The 'tiny' preset at 32 px / patch 8, with the ids of ``tokenizer``; ``overrides`` as in ``preset``."""
    base = {
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
        "text": {
            "width": 32,
            "depth": 2,
            "heads": 2,
            "intermediate_size": 64,
            "max_positions": 40,
            **tokenizer.special_ids(),
        },
        "embed_dim": 16,
        "queue_size": 12,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return BlipConfig.preset("tiny", **base)


@pytest.fixture
def make_model(tokenizer):
    """``make_model(seed=0, **config_overrides)``: a tiny model in eval mode, deterministic in ``seed``."""

    def build(seed: int = 0, **overrides) -> BlipModel:
        torch.manual_seed(seed)
        return BlipModel(tiny_config(tokenizer, **overrides), tokenizer).eval()

    return build


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
