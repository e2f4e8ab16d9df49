"""blip_core: BLIP (Li et al., 2022) in pure PyTorch: ViT (timm) + the MED text transformer, losses, generation."""
from .checkpoint import checkpoint_id
from .config import BlipConfig, TextConfig, VisionConfig
from .losses import BlipLosses, alpha_at
from .model import BlipModel
from .tokenizer import BlipTokenizer

__all__ = ["BlipConfig", "BlipLosses", "BlipModel", "BlipTokenizer", "TextConfig", "VisionConfig", "alpha_at", "checkpoint_id"]
