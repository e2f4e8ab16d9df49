"""How a model wants its pixels: resized to uint8 ``[H, W, 3]`` in the decode task, normalised on the model's
device in the actor (uint8 crosses process and device boundaries: 4x less than floats)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PixelSpec:
    """One model's input: ``kind`` picks the resize (``blip``: square bicubic, as ``blip_core.transforms.
    eval_transform``; ``clip``: open_clip's eval transform), then ``(x / 255 - mean) / std``."""

    kind: str
    size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    @property
    def column(self) -> str:
        """The decode task's column of these pixels (models with the same resize share it)."""
        return f"px_{self.kind}_{self.size}"


def blip_pixels(size: int) -> PixelSpec:
    """BLIP's eval input at ``size`` px (ImageNet-style mean/std of ``blip_core.transforms``)."""
    from blip_core.transforms import MEAN, STD

    return PixelSpec("blip", size, tuple(MEAN), tuple(STD))


def pil_transform(spec: PixelSpec):
    """The PIL part of a model's eval transform (everything before ToTensor)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if spec.kind == "blip":  # == blip_core.transforms.eval_transform up to ToTensor
        return T.Resize((spec.size, spec.size), interpolation=InterpolationMode.BICUBIC)
    import open_clip

    full = open_clip.image_transform(
        spec.size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
    )
    steps = []
    for t in full.transforms:
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    return T.Compose(steps)


def to_tensor(pixels: np.ndarray, spec: PixelSpec, n_total: int, device):
    """uint8 [n, H, W, 3] -> normalised float [n_total, 3, H, W] on ``device`` (rows beyond n are blank padding).
    The same arithmetic as torchvision's ToTensor + Normalize."""
    import torch

    x = torch.zeros((n_total, spec.size, spec.size, 3), dtype=torch.uint8)
    x[: len(pixels)] = torch.from_numpy(np.ascontiguousarray(pixels))
    x = x.to(device).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
