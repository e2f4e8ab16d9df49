"""Weights on disk: a Hugging Face directory's tensors (safetensors, sharded or not, or ``pytorch_model.bin``) and
PyTorch checkpoints read weights-only (a pickle that needs code is refused, never run)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


def torch_load_weights_only(path: Path) -> dict:
    """Tensors and plain containers only (``weights_only``): a pickle that needs code is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError...
        raise ValueError(
            f"{path} is not a weights-only PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "refusing to unpickle anything but tensors"
        ) from None


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / "model.safetensors").exists():
        return load_file(str(directory / "model.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(directory / shard)))
        return state
    if (directory / "pytorch_model.bin").exists():
        state = torch_load_weights_only(directory / "pytorch_model.bin")
        if not isinstance(state, Mapping):
            raise ValueError(f"{directory / 'pytorch_model.bin'} does not hold a state dict")
        return dict(state)
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}")
