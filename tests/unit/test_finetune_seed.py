"""The downstream fine-tunes (pipelines/downstream.py) are reproducible from their seed argument."""

from __future__ import annotations

import json

import torch
from blip_helpers import make_model, tokenizer  # noqa: F401  (fixtures)
from PIL import Image

from pipelines.downstream import finetune_nlvr

SENTENCES = ["a red square", "two cats sleeping on a mat on the left", "a blue circle on the top"]


def test_a_fine_tune_is_its_seeds_alone(make_model, tmp_path):
    """The heads a checkpoint lacks are built from the fine-tune's seed, not from whatever ran before it."""
    make_model().save_pretrained(tmp_path / "blip")
    rng = torch.Generator().manual_seed(3)
    for i in range(4):
        px = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(tmp_path / f"{i}.png")
    rows = [
        {"images": [f"{i}.png", f"{(i + 1) % 4}.png"], "sentence": SENTENCES[i % 3], "label": i % 2 == 0}
        for i in range(4)
    ]
    (tmp_path / "nlvr.json").write_text(json.dumps(rows))

    def fit(seed: int) -> str:
        torch.rand(int(torch.randint(1, 100, ()).item()))  # a different random state each time
        return finetune_nlvr(
            str(tmp_path / "blip"),
            str(tmp_path / "nlvr.json"),
            str(tmp_path),
            str(tmp_path / "out"),
            epochs=1,
            batch_size=2,
            lr=1e-3,
            augment=False,
            seed=seed,
        )["checkpoint_id"]

    assert fit(0) == fit(0) != fit(1)
