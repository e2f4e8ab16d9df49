"""Checkpoint directories: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``, identified by content hash.

``load_pretrained`` also recognises a Hugging Face BLIP directory and an official BLIP ``.pth`` and converts
them (see convert.py). Nothing is ever unpickled beyond tensors (``torch.load(weights_only=True)``). The class
of a checkpoint's ``task`` comes from ``registry`` (the models build on this module, not the other way round).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from .config import BlipConfig
from .convert import load_hf_blip, load_official_pth
from .registry import model_class
from .tokenizer import BlipTokenizer
from .vision import interpolate_pos_embed

FORMAT = "capfilt-blip"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(model, directory: str | os.PathLike) -> str:
    """Write the checkpoint atomically (a temp dir renamed into place) and return its content hash."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the renamed checkpoint private to this user
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": model.task, "config": model.config.model_dump()}
    (tmp / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file(_unaliased_state(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
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


def _unaliased_state(model) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once, under its first name (encoder before decoder, embeddings
    before the tied LM head). safetensors' ``save_model`` records the dropped aliases in the file's metadata in
    an order that changes from call to call, so equal weights gave different bytes and different ids."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else (name,)
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _rmtree(p: Path) -> None:
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


def load_pretrained(
    path: str | os.PathLike, *, image_size: int | None = None, map_location: str | torch.device = "cpu"
):
    """Load any supported checkpoint; ``image_size`` resizes the ViT's position table (e.g. 224 -> 384)."""

    p = Path(path)
    if p.is_file() and p.suffix in (".pth", ".pt", ".bin"):
        model = load_official_pth(p)
    elif p.is_dir() and (p / CONFIG).exists():
        try:
            meta = json.loads((p / CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{p / CONFIG} is not valid JSON: {err}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{p / CONFIG} must hold a JSON object, not {type(meta).__name__}")
        if meta.get("format") == FORMAT:
            if meta.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(f"{p} was written by a newer capfilt (format_version {meta['format_version']})")
            if not isinstance(meta.get("config"), dict):
                raise ValueError(f"{p / CONFIG} has no 'config' object")
            try:
                config = BlipConfig.from_dict(meta["config"])
            except ValueError as err:
                raise ValueError(f"{p / CONFIG}: {err}") from None
            tok = BlipTokenizer.from_pretrained(p) if (p / "tokenizer.json").exists() else None
            try:
                cls = model_class(meta.get("task", "pretrain"))
            except ValueError as err:  # unknown task: name the file
                raise ValueError(f"{p / CONFIG}: {err}") from None
            model = cls(config, tok)
            if not (p / WEIGHTS).is_file():
                raise FileNotFoundError(f"{p} has {CONFIG} but no {WEIGHTS}")
            try:
                missing, unexpected = load_model(model, str(p / WEIGHTS), strict=False)
            except (RuntimeError, SafetensorError) as err:  # shapes of another architecture, a corrupt file
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                shown = "; ".join(lines[1:4] if len(lines) > 1 else lines)
                more = f" (and {len(lines) - 4} more)" if len(lines) > 4 else ""
                raise ValueError(f"{p / WEIGHTS} does not match {p / CONFIG}: {shown}{more}") from None
            if missing or unexpected:
                raise ValueError(
                    f"{p} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        elif meta.get("model_type") == "blip" or any(a.startswith("Blip") for a in meta.get("architectures", [])):
            model = load_hf_blip(p)
        else:
            raise ValueError(
                f"{p} is not a BLIP checkpoint (config.json has neither format={FORMAT!r} nor model_type='blip')"
            )
    elif not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p}")
    else:
        raise ValueError(f"{p} is neither a checkpoint directory (with {CONFIG}) nor a .pth file")
    if image_size is not None and image_size != model.config.vision.image_size:
        model = resize_image(model, image_size)
    return model.to(map_location).eval()


def resize_image(model, image_size: int):
    """A copy of ``model`` for another input resolution, with its position embeddings interpolated."""
    cfg = model.config.model_copy(update={"vision": model.config.vision.model_copy(update={"image_size": image_size})})
    cfg = BlipConfig.from_dict(cfg.model_dump())
    state = model.state_dict()
    state["vision.pos_embed"] = interpolate_pos_embed(state["vision.pos_embed"], image_size, cfg.vision.patch_size)
    new = type(model)(cfg, model.tokenizer)
    new.load_state_dict(state)
    return new
