"""Checkpoint directories: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``, identified by content hash.

``load_pretrained`` also recognises a Hugging Face BLIP directory and an official BLIP ``.pth`` and converts
them (see convert.py). Nothing is ever unpickled beyond tensors (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import BlipConfig
from .tokenizer import BlipTokenizer

FORMAT = "capfilt-blip"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model, directory: str | os.PathLike) -> str:
    """Write the checkpoint atomically (a temp dir renamed into place) and return its content hash."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.model_dump()}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(tmp)
    if d.exists():
        old = d.with_name(d.name + ".old")
        os.replace(d, old)
        os.replace(tmp, d)
        _rmtree(old)
    else:
        os.replace(tmp, d)
    return checkpoint_id(d)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def checkpoint_id(directory: str | os.PathLike) -> str:
    """Content hash of a checkpoint (config + weights): equal weights give equal ids wherever they live."""
    d = Path(directory)
    h = hashlib.sha256()
    for name in (CONFIG, WEIGHTS):
        with open(d / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_pretrained(path: str | os.PathLike, *, image_size: int | None = None, map_location: str | torch.device = "cpu"):
    """Load any supported checkpoint; ``image_size`` resizes the ViT's position table (e.g. 224 -> 384)."""
    from .model import BlipModel

    p = Path(path)
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin"):
        from .convert import load_official_pth

        model = load_official_pth(p)
    elif p.is_dir() and (p / CONFIG).exists():
        meta = json.loads((p / CONFIG).read_text())
        if meta.get("format") == FORMAT:
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{p} was written by a newer capfilt (format_version {meta['format_version']})")
            config = BlipConfig.from_dict(meta["config"])
            tok = BlipTokenizer.from_pretrained(p) if (p / "tokenizer.json").exists() else None
            model = BlipModel(config, tok)
            missing, unexpected = load_model(model, str(p / WEIGHTS), strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"{p} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        elif meta.get("model_type") == "blip" or any(a.startswith("Blip") for a in meta.get("architectures", [])):
            from .convert import load_hf_blip

            model = load_hf_blip(p)
        else:
            raise ValueError(f"{p} is not a BLIP checkpoint (config.json has neither format={FORMAT!r} nor model_type='blip')")
    elif not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    else:
        raise ValueError(f"{p} is neither a checkpoint directory (with {CONFIG}) nor a .pth file")
    if image_size is not None and image_size != model.config.vision.image_size:
        model = resize_image(model, image_size)
    return model.to(map_location).eval()


def resize_image(model, image_size: int):
    """A copy of ``model`` for another input resolution, with its position embeddings interpolated."""
    from .model import BlipModel
    from .vision import interpolate_pos_embed

    cfg = model.config.model_copy(update={"vision": model.config.vision.model_copy(update={"image_size": image_size})})
    cfg = BlipConfig.from_dict(cfg.model_dump())
    state = model.state_dict()
    state["vision.pos_embed"] = interpolate_pos_embed(state["vision.pos_embed"], image_size, cfg.vision.patch_size)
    new = BlipModel(cfg, model.tokenizer)
    new.load_state_dict(state)
    return new
