"""A tiny BLIP learns 16 synthetic image/caption pairs by heart with the three pre-training objectives:
every loss falls, greedy and beam search reproduce every caption, and ITM ranks each image's caption first."""

from __future__ import annotations

import itertools

import pytest
import torch

from blip_core import BlipConfig, BlipLosses, BlipModel, BlipTokenizer

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle")
SIDES = ("left", "right")
PROMPT = "a picture of "
STEPS = 400


def draw(colour: str, shape: str, side: str, size: int = 32) -> torch.Tensor:
    """A filled square or disc of one colour on a grey background, in the left or right half; normalised."""
    img = torch.full((3, size, size), 0.5)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cx, cy, r = (size // 4 if side == "left" else 3 * size // 4), size // 2, size // 5
    inside = (
        ((xx - cx).abs() <= r) & ((yy - cy).abs() <= r)
        if shape == "square"
        else (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    )
    for c, value in enumerate(COLOURS[colour]):
        img[c][inside] = value
    return (img - 0.5) / 0.25


def world() -> tuple[torch.Tensor, list[str]]:
    combos = list(itertools.product(COLOURS, SHAPES, SIDES))
    return torch.stack([draw(*c) for c in combos]), [f"a {c} {s} on the {side}" for c, s, side in combos]


@pytest.fixture
def one_thread():
    """Float results (hence the trajectory) must not depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_tiny_model_overfits_sixteen_pairs(one_thread):
    images, captions = world()
    assert len(set(captions)) == 16
    texts = [PROMPT + c for c in captions]
    tokenizer = BlipTokenizer.train(texts, vocab_size=60)
    config = BlipConfig.preset(
        "tiny",
        vision={"image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4},
        # BERT's N(0, 0.02) suits width 768; at width 64 it leaves attention near uniform for hundreds of steps
        # (ITM, which must compare text with image, learns last). A wider start lets the test stay short.
        text={
            "width": 64,
            "depth": 3,
            "heads": 4,
            "intermediate_size": 128,
            "max_positions": 32,
            "initializer_range": 0.05,
            **tokenizer.special_ids(),
        },
        embed_dim=32,
        queue_size=32,  # two batches: the queued captions of an image are positives through image_ids
        momentum=0.9,  # the paper's 0.995 is for 100k+ steps; 600 steps need a momentum model that keeps up
    )
    torch.manual_seed(0)
    model = BlipModel(config, tokenizer)
    losses = BlipLosses(model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    input_ids, attention_mask = tokenizer(texts)
    prompt_length = tokenizer([PROMPT], add_sep=False)[0].shape[1]  # [DEC] a picture of
    image_ids = torch.arange(16)

    history = []
    for _ in range(STEPS):
        out = losses(images, input_ids, attention_mask, image_ids=image_ids, prompt_length=prompt_length)
        assert set(out) == {"itc", "itm", "lm"}
        optimizer.zero_grad(set_to_none=True)
        sum(out.values()).backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})

    first, last = history[0], {k: sum(h[k] for h in history[-20:]) / 20 for k in history[0]}
    assert last["itc"] < 0.6 * first["itc"], (first, last)
    assert last["itm"] < 0.4 * first["itm"], (first, last)
    assert last["lm"] < 0.25 * first["lm"], (first, last)

    model.eval()
    assert model.generate(images, num_beams=1, max_length=20, min_length=5) == captions
    assert model.generate(images, num_beams=3, max_length=20, min_length=5) == captions
    assert model.generate(images) == captions  # the official defaults: beam 3, min_length 10 counting the prompt
    scores = torch.stack([model.itm_score(images[i : i + 1].expand(16, -1, -1, -1), texts) for i in range(16)])
    assert scores.argmax(1).tolist() == list(range(16)), scores
