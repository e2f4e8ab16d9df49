"""Image inputs as BLIP's code prepares them: decoding, training augmentation, evaluation resize, normalisation.

The model library owns its input normalisation so that every caller (training, CapFilt inference, evaluation,
a researcher's notebook) feeds the model the same statistics. Pure torchvision on PIL images.

Randomness comes from torch's global generator only, so a caller can make one sample's augmentation
reproducible with ``torch.manual_seed`` (the training stream seeds per sample key).
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

# CLIP's statistics, which BLIP inherits (BLIP/data/__init__.py).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's RandomAugment(2, 5, isPIL=True, augs=[...]) op list, in the paper code's order.
BLIP_AUG_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
# Ops that could be excluded by a world that is sensitive to geometry beyond left/right. None of BLIP's ops
# mirrors the image (only RandomHorizontalFlip does), so ``hflip=False`` alone keeps "left" meaning left.
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class CorruptImageError(ValueError):
    """Bytes that are not a decodable image: readers skip and count these rather than crash a stage.

    ``reason`` is the decoder's complaint alone, the same for every file that fails the same way (to count them by).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` into an upright 8-bit RGB PIL image, or raise CorruptImageError saying why.

    Every photograph lands as a viewer shows it: the EXIF orientation is applied (phones store portraits as
    landscape pixels plus a tag); 16-bit and 32-bit samples (PNG/TIFF modes ``I;16``, ``I``, ``F``) are scaled to
    8 bits instead of clipped; transparency (RGBA, LA, PA, a palette's transparent index) is composited on white,
    as img2dataset does at ingestion; CMYK, YCbCr, 1-bit, grayscale and palette images are converted to RGB; an
    animated GIF or WebP, or a multi-page TIFF, gives its first frame. ``load()`` forces the whole decode so that a
    truncated JPEG fails here, not later inside a transform; a decompression bomb (over twice PIL's
    ``MAX_IMAGE_PIXELS``, ~179 MP) is refused.
    """
    if not data:
        raise CorruptImageError("empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        reason = re.sub(r" <[^<>]* at 0x[0-9a-fA-F]+>", "", str(err))  # PIL names its file object by address
        head = data[:16]
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes, starts {head!r}): {reason}", reason) from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth grayscale image (``I;16*``, ``I``, ``F``) scaled to mode ``L``. 16-bit samples map 65535 to
    255; ``I`` and ``F`` hold whatever their file stored, so their range decides: values within 0..1 (float) are
    fractions, within 0..255 already 8-bit, within 0..65535 16-bit, anything else is stretched min..max."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale, low = 255 / 65535, 0.0
    else:
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if low >= 0 and high <= 1 and img.mode == "F":
            scale, low = 255.0, 0.0
        elif low >= 0 and high <= 255:
            scale, low = 1.0, 0.0
        elif low >= 0 and high <= 65535:
            scale, low = 255 / 65535, 0.0
        else:
            scale = 255 / (high - low) if high > low else 0.0
    return Image.fromarray(np.clip(np.rint((a - low) * scale), 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # no copy of a decoded RGB picture


class RandomAugment:
    """BLIP's RandomAugment (transform/randaugment.py) on PIL images.

    Picks ``num_ops`` ops uniformly with replacement and applies each with probability 0.5 at a fixed
    ``magnitude`` on BLIP's 0..10 scale: shear 0.03/level, translate 1 px/level, rotate 3 deg/level (random
    sign), brightness/sharpness factor 0.1 + 0.18/level (1.0, i.e. unchanged, at BLIP's magnitude 5).
    Fill for uncovered pixels is BLIP's (128, 128, 128).
    """

    MAX_LEVEL = 10.0
    FILL = (128, 128, 128)

    def __init__(self, num_ops: int = 2, magnitude: int = 5, ops: Sequence[str] = BLIP_AUG_OPS):
        unknown = set(ops) - set(BLIP_AUG_OPS)
        if unknown:
            raise ValueError(f"unknown augmentation ops {sorted(unknown)}; choose from {list(BLIP_AUG_OPS)}")
        if not ops:
            raise ValueError("RandomAugment needs at least one op")
        self.num_ops, self.magnitude, self.ops = num_ops, magnitude, tuple(ops)

    def _signed(self, scale: float) -> float:
        v = self.magnitude / self.MAX_LEVEL * scale
        return -v if torch.rand(()) < 0.5 else v

    def _apply(self, name: str, img: Image.Image) -> Image.Image:
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name in ("Brightness", "Sharpness"):
            factor = self.magnitude / self.MAX_LEVEL * 1.8 + 0.1
            return F.adjust_brightness(img, factor) if name == "Brightness" else F.adjust_sharpness(img, factor)
        if name in ("ShearX", "ShearY"):
            deg = math.degrees(math.atan(self._signed(0.3)))
            shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
            return F.affine(
                img,
                angle=0.0,
                translate=[0, 0],
                scale=1.0,
                shear=shear,
                interpolation=InterpolationMode.NEAREST,
                fill=list(self.FILL),
            )
        if name in ("TranslateX", "TranslateY"):
            px = int(round(self._signed(10.0)))
            shift = [px, 0] if name == "TranslateX" else [0, px]
            return F.affine(
                img,
                angle=0.0,
                translate=shift,
                scale=1.0,
                shear=[0.0, 0.0],
                interpolation=InterpolationMode.NEAREST,
                fill=list(self.FILL),
            )
        if name == "Rotate":
            return F.rotate(img, self._signed(30.0), interpolation=InterpolationMode.NEAREST, fill=list(self.FILL))
        raise ValueError(name)

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.ops), (self.num_ops,)).tolist()
        for i in picks:
            if torch.rand(()) < 0.5:
                img = self._apply(self.ops[i], img)
        return img

    def __repr__(self) -> str:
        return f"RandomAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, ops={list(self.ops)})"


def normalize() -> T.Normalize:
    return T.Normalize(MEAN, STD)


def train_transform(
    image_size: int,
    hflip: bool = True,
    randaugment: bool = True,
    aug_ops: Sequence[str] = BLIP_AUG_OPS,
    random_crop: bool = True,
) -> T.Compose:
    """BLIP's pre-training/fine-tuning augmentation (BLIP/data/__init__.py).

    ``hflip=False`` for worlds whose captions say left/right: a mirrored image would contradict its caption.
    ``random_crop=False`` resizes the whole image instead of BLIP's random crop of 50-100% of its area, for worlds
    whose captions state positions, counts and sizes: a crop moves, cuts away and enlarges the objects.
    ``aug_ops`` narrows the RandomAugment op list (e.g. without GEOMETRIC_OPS).
    """
    steps: list = [
        T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC)
        if random_crop
        else T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if randaugment:
        steps.append(RandomAugment(2, 5, aug_ops))
    steps += [T.ToTensor(), normalize()]
    return T.Compose(steps)


def eval_transform(image_size: int) -> T.Compose:
    """Resize to a square (no crop, as BLIP evaluates), then normalise."""
    return T.Compose(
        [
            T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            normalize(),
        ]
    )


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 1] pixels, for looking at what the model saw."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * std + mean
