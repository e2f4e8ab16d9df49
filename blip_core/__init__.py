"""blip_core: BLIP (Li et al., 2022) in pure PyTorch: ViT (timm) + the MED text transformer, losses, generation,
and the downstream heads (VQA, NLVR2; zero-shot video retrieval uses BlipModel itself, see video.py)."""

from .checkpoint import checkpoint_id
from .config import BlipConfig, TextConfig, VisionConfig
from .losses import BlipLosses, alpha_at
from .model import BlipModel  # model, nlvr, vqa: importing them registers their classes (registry.py)
from .nlvr import BlipNLVR
from .tokenizer import BlipTokenizer
from .vqa import BlipVQA

__all__ = [
    "BlipConfig",
    "BlipLosses",
    "BlipModel",
    "BlipNLVR",
    "BlipTokenizer",
    "BlipVQA",
    "TextConfig",
    "VisionConfig",
    "alpha_at",
    "checkpoint_id",
]
