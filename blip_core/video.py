"""Zero-shot video-text retrieval with an image model, as BLIP does: no video training at all.

A clip is ``num_frames`` frames sampled uniformly over its length. Each frame goes through the ViT alone; the
clip's ITC feature is the mean of its frames' projected ``[CLS]`` features, and for ITM re-ranking the
image-grounded encoder cross-attends to all frames' tokens concatenated (temporal order is ignored, as in the
paper). Clips are read from animated images (GIF, WebP, APNG), from a directory of frame images, or from any
container PyAV reads (mp4, webm) when ``av`` is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageSequence

from .model import BlipModel

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def uniform_frame_indices(n_frames: int, num_frames: int) -> list[int]:
    """The middle frame of each of ``num_frames`` equal segments (repeats when the clip is shorter)."""
    if n_frames < 1:
        raise ValueError("the clip has no frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return [min(int((i + 0.5) * n_frames / num_frames), n_frames - 1) for i in range(num_frames)]


def read_frames(path: str | os.PathLike, num_frames: int) -> list[Image.Image]:
    """``num_frames`` RGB frames sampled uniformly from a clip file or a directory of frames."""
    p = Path(path)
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not files:
            raise ValueError(f"{p} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return [Image.open(files[i]).convert("RGB") for i in uniform_frame_indices(len(files), num_frames)]
    if not p.is_file():
        raise FileNotFoundError(f"no video at {p}")
    try:
        with Image.open(p) as img:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(img)]
    except (OSError, ValueError):  # not an image PIL knows: try a video container
        frames = _read_container(p)
    return [frames[i] for i in uniform_frame_indices(len(frames), num_frames)]


def _natural(f: Path) -> list:
    """frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", f.name)]


def _read_container(p: Path) -> list[Image.Image]:
    try:
        import av  # only needed for video containers
    except ImportError:
        raise ValueError(
            f"{p} is not an animated image or a frame directory, and PyAV (pip install av) is not "
            "installed to read video containers"
        ) from None
    try:
        with av.open(str(p)) as container:
            return [frame.to_image() for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise ValueError(f"{p} is not a readable video: {err}") from None


def load_clip(
    path: str | os.PathLike, num_frames: int, transform: Callable[[Image.Image], torch.Tensor]
) -> torch.Tensor:
    """[num_frames, 3, H, W]: the sampled frames through the model's eval transform."""
    return torch.stack([transform(f) for f in read_frames(path, num_frames)])


@torch.no_grad()
def encode_video(model: BlipModel, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clips`` [B, F, 3, H, W] -> (frame tokens concatenated [B, F * tokens, vision width] for ITM,
    normalised clip ITC features [B, embed_dim]: the mean of the frames' projected [CLS])."""
    if clips.dim() != 5:
        raise ValueError(f"clips must have shape [B, frames, 3, H, W], got {list(clips.shape)}")
    b, f = clips.shape[:2]
    tokens = model.encode_image(clips.flatten(0, 1))
    proj = model.vision_proj(tokens[:, 0]).float().view(b, f, -1).mean(1)
    return tokens.view(b, f * tokens.shape[1], tokens.shape[2]), torch.nn.functional.normalize(proj, dim=-1)
