"""Resolved caption-filter settings for tests that need no checkpoint: BLIP's classes, fixed content ids, 32 px."""

from __future__ import annotations

from pipelines.capfilt import ModelRef, PixelSpec, Settings
from pipelines.capfilt.blip import BlipCaptioner, BlipFilter

PIXELS = PixelSpec("blip", 32, (0.5,) * 3, (0.25,) * 3)


def make_settings(
    where: str = "/x", *, num_samples: int = 2, scorers: list[ModelRef] | None = None, **over
) -> Settings:
    """``where``/cap and ``where``/filt as the checkpoints (real ones only where a test loads them)."""
    base = dict(
        round=1,
        seed=0,
        source="web",
        captioner=ModelRef("blip", BlipCaptioner, where + "/cap", "c" * 16, PIXELS),
        filter=ModelRef("blip_itm", BlipFilter, where + "/filt", "f" * 16, PIXELS),
        num_samples=num_samples,
        method="nucleus",
        top_p=0.9,
        num_beams=3,
        max_length=12,
        min_length=3,
        repetition_penalty=1.0,
        prompt=None,
        itm_threshold=0.5,
        keep_top_k_synthetic=None,
        max_text_chars=50,
        model_batch_size=4,
        amp="none",
        use_gpu=False,
        scorers=scorers or [],
    )
    return Settings(**(base | over))
