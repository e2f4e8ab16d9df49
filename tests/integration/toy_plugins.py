"""A toy scorer and a toy captioner, registered through caption-filter's seams as a user's plugin module would
be (``capfilt.plugins: [toy_plugins]``): what the tests check is that a model written outside
``pipelines/capfilt`` needs nothing but its own file and the config."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.capfilt import Captioner, ModelRef, PixelSpec, Scorer, register_captioner, register_scorer

PIXELS = PixelSpec("blip", 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # x / 255: the plain colour values


@register_scorer("brightness")
class Brightness(Scorer):
    """The mean of an image's colour values in [0, 1]; the same for each of its texts."""

    columns = (pa.field("brightness", pa.float32()),)

    @classmethod
    def resolve(cls, cfg, root, round, section) -> ModelRef:
        return ModelRef("brightness", cls, None, "brightness-v1", PIXELS)

    def score(self, images, texts, scored):
        per = len(texts) // len(images)
        mean = images.mean(dim=(1, 2, 3)).cpu().numpy()
        return {"brightness": np.repeat(mean[:, None], per, axis=1)}


COLOURS = ("red", "green", "blue")


def dominant_colour(pixels: np.ndarray) -> str:
    """The channel with the largest mean of a float [3, H, W] or uint8 [H, W, 3] image."""
    means = pixels.reshape(3, -1).mean(1) if pixels.shape[0] == 3 else pixels.reshape(-1, 3).mean(0)
    return COLOURS[int(np.argmax(means))]


@register_captioner("toy_colour")
class ColourCaptioner(Captioner):
    """ "a mostly <colour> picture", once per requested sample."""

    @classmethod
    def resolve(cls, cfg, root, round) -> ModelRef:
        return ModelRef("toy_colour", cls, None, "toy-colour-v1", PIXELS)

    def caption(self, images, seeds):
        k = self.settings.num_samples
        return [[f"a mostly {dominant_colour(img.cpu().numpy())} picture"] * k for img in images]
