"""The LAION-style CLIP score: cosine similarity of open_clip image and text embeddings, from any open_clip
architecture and a local checkpoint (nothing is downloaded). Enabled by a ``capfilt.scorers.clip`` section."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from .. import storage
from .models import CapfiltError, ModelRef, Scorer, content_id, register_scorer
from .pixels import PixelSpec


class ClipOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("ViT-B-32", description="open_clip architecture name")
    checkpoint: str = Field(description="weights file (.safetensors/.bin/.pt, any fsspec URL)")
    model_config_file: str | None = Field(None, description="JSON config of a custom architecture named `model`")


def register_architecture(model_config_file: str | None) -> None:
    """Make a custom architecture's JSON known to open_clip (it names the architecture after the file)."""
    if not model_config_file:
        return
    import open_clip

    with storage.local_copy(model_config_file) as path:
        name = storage.basename(model_config_file)
        if os.path.basename(path) != name:
            d = tempfile.mkdtemp(prefix="capfilt-clipcfg-")
            shutil.copy(path, os.path.join(d, name))
            path = os.path.join(d, name)
        open_clip.add_model_config(path)


def clip_pixels(model: str, model_config_file: str | None) -> PixelSpec:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    register_architecture(model_config_file)
    mcfg = open_clip.get_model_config(model)
    if mcfg is None:
        raise CapfiltError(
            f"capfilt.scorers.clip.model: open_clip has no architecture {model!r} "
            "(set capfilt.scorers.clip.model_config_file for a custom one)"
        )
    size = mcfg.get("vision_cfg", {}).get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    return PixelSpec("clip", size, tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD))


@register_scorer("clip")
class ClipScorer(Scorer):
    columns = (pa.field("clip_score", pa.float32()),)
    packages = ("open_clip_torch",)

    @classmethod
    def resolve(cls, cfg, root: str, round: int, section) -> ModelRef:
        try:
            opts = ClipOptions(**(section.model_extra or {}))
        except ValueError as err:
            raise CapfiltError(f"capfilt.scorers.clip: {err}") from None
        if not storage.exists(opts.checkpoint):
            raise CapfiltError(f"capfilt.scorers.clip.checkpoint: no file at {opts.checkpoint}")
        pixels = clip_pixels(opts.model, opts.model_config_file)
        with storage.local_copy(opts.checkpoint) as path:
            ident = content_id(path)
        return ModelRef("clip", cls, opts.checkpoint, ident, pixels, opts.model_dump())

    def __init__(self, ref: ModelRef, settings, device):
        import open_clip

        super().__init__(ref, settings, device)
        register_architecture(ref.options["model_config_file"])
        assert ref.url is not None, "resolve always names the checkpoint"
        with storage.local_copy(ref.url) as path:
            self.model = open_clip.create_model(ref.options["model"], pretrained=path, device=device).eval()
        self.tokenizer = open_clip.get_tokenizer(ref.options["model"])

    def score(self, images, texts: list[str], scored: list[bool]) -> dict[str, np.ndarray]:
        import torch

        mb = len(images)
        with torch.inference_mode():
            img = self.model.encode_image(images, normalize=True).float()
            txt = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()
            cos = (txt.view(mb, len(texts) // mb, -1) * img[:, None]).sum(-1).cpu().numpy()
        return {"clip_score": cos}
