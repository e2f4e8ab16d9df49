"""A captioner and a filter that cost nothing, registered for benchmarks only (``capfilt.plugins: [zero_cost]``,
``capfilt.captioner_kind: zero``, ``capfilt.filter_kind: zero_itm``): with them a caption-filter run measures the
pipeline's own cost (reading, decoding, moving batches, writing and committing), not a model's."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

from pipelines.capfilt import Captioner, ModelRef, PixelSpec, Scorer, register_captioner, register_scorer

PIXELS = PixelSpec("blip", 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@register_captioner("zero")
class ZeroCaptioner(Captioner):
    """``num_samples`` fixed captions per image."""

    @classmethod
    def resolve(cls, cfg, root, round) -> ModelRef:
        return ModelRef("zero", cls, None, "zero-captioner-v1", PIXELS)

    def caption(self, images, seeds):
        k = self.settings.num_samples
        return [[f"a picture, sample {j}" for j in range(k)] for _ in range(len(images))]


@register_scorer("zero_itm")
class ZeroFilter(Scorer):
    """An ITM "probability" and ITC "cosine" from a checksum of the text: deterministic, spread over [0, 1)."""

    columns = (pa.field("itm_score", pa.float32()), pa.field("itc_score", pa.float32()))

    @classmethod
    def resolve(cls, cfg, root, round, section) -> ModelRef:
        return ModelRef("zero_itm", cls, None, "zero-filter-v1", PIXELS)

    def score(self, images, texts, scored):
        per = len(texts) // len(images)
        itm = np.array([zlib.crc32(t.encode()) / 2**32 for t in texts], dtype=np.float32).reshape(len(images), per)
        return {"itm_score": itm, "itc_score": 2 * itm - 1}
