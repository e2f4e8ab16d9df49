"""Model configuration: one validated object that names every architectural choice.

Unknown keys are errors (a typo must not silently build a different model), and the config travels
with every checkpoint as ``config.json``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

# The paper's Table 3 alternatives for sharing parameters between the text encoder and decoder.
Sharing = Literal["all", "all_but_sa", "all_but_ca", "none"]
# How beam search scores a finished caption and when it stops (see ``BlipConfig.beam_rule``, generation.py).
BeamRule = Literal["transformers", "transformers-4.15"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionConfig(_Strict):
    image_size: int = Field(224, ge=16)
    patch_size: int = Field(16, ge=1)
    width: int = Field(768, ge=8)
    depth: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    grad_checkpointing: bool = False
    # How the patch position table starts (a pretrained checkpoint replaces it either way). "sincos": fixed 2-D
    # sine-cosine values (MAE, MoCo v3), still trained. "normal": timm's N(0, 0.02). Trained from scratch, a ViT
    # started at "normal" never learned where an object is: a tiny ViT classifying the synthetic world's positions
    # stayed at chance (20%) after 300 steps, and 3,000 pre-training steps left captioner and ITM guessing left,
    # right, top, bottom and centre at random; started at "sincos" it reaches 98% in 200 steps.
    pos_embed_init: Literal["sincos", "normal"] = "sincos"

    @model_validator(mode="after")
    def _check(self) -> VisionConfig:
        if self.width % self.heads:
            raise ValueError(f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
        if self.pos_embed_init == "sincos" and self.width % 4:
            raise ValueError(f"vision.width ({self.width}) must be a multiple of 4 for pos_embed_init 'sincos'")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size ({self.image_size}) must be a multiple of vision.patch_size ({self.patch_size})"
            )
        return self


class TextConfig(_Strict):
    vocab_size: int = Field(30524, ge=8)
    width: int = Field(768, ge=8)
    depth: int = Field(12, ge=1)
    heads: int = Field(12, ge=1)
    intermediate_size: int = Field(3072, ge=8)
    max_positions: int = Field(512, ge=8)
    layer_norm_eps: float = 1e-12
    dropout: float = Field(0.0, ge=0, lt=1)
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 30522  # [DEC]
    enc_token_id: int = 30523  # [ENC]
    tie_word_embeddings: bool = True  # LM head weight = decoder word embeddings, as BLIP's BertLMHeadModel
    # Std of the N(0, std) initial weights of the text transformer, the ITC projections and the ITM head (BERT's
    # initializer_range). BERT's 0.02 suits its width 768 (a linear layer's gain 0.02 * sqrt(768) ~ 0.55); at a
    # tiny width it leaves the residual branches so small that [CLS]/[ENC] come out the same for every text and
    # image, and ITC/ITM never leave chance (use ~1/sqrt(width) there; the shipped tiny run configs do).
    initializer_range: float = Field(0.02, gt=0)
    grad_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.width % self.heads:
            raise ValueError(f"text.width ({self.width}) must be divisible by text.heads ({self.heads})")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "enc_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"text.{name} ({getattr(self, name)}) is outside the vocabulary (size {self.vocab_size})"
                )
        return self


class BlipConfig(_Strict):
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = Field(256, ge=1)  # ITC projection size
    sharing: Sharing = "all_but_sa"
    queue_size: int = Field(57600, ge=0)
    momentum: float = Field(0.995, ge=0, le=1)
    alpha: float = Field(0.4, ge=0, le=1)  # momentum-distillation weight
    temp: float = Field(0.07, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # How ITM picks the one negative text per image and the one negative image per text (never one with the same
    # image id): "hard" (the paper) samples in proportion to the contrastive similarity; "uniform" samples every other
    # image of the batch alike. Hard negatives need an encoder that can already tell near-identical captions apart:
    # a tiny model trained from scratch for a few hundred steps on randomly cropped images could not (the demo world,
    # session 3: ITM stayed at the prior of 1 match : 2 non-matches, ~0.64, and the filter kept almost nothing). On
    # whole images for ~3,000 steps (flows/configs/full.yaml) they work, and beat uniform ones (docs/EXPERIMENTS.md).
    itm_negatives: Literal["hard", "uniform"] = "hard"
    prompt: str = "a picture of "
    # The beam-search rule ``generate`` uses unless told otherwise (generation.py has both in full). "transformers":
    # today's transformers, what Hugging Face BLIP checkpoints are used with (a finished caption's log-likelihood is
    # divided by its generated tokens, [SEP] included). "transformers-4.15": the rule of transformers 4.15, which the
    # official salesforce/BLIP code pins, set by an official .pth import so that published BLIP captions reproduce
    # (divided by its whole length, [DEC] and the prompt included, [SEP] not): it stops some captions at [SEP] where
    # "transformers" runs on to max_length. Left out of config.json at its default, so the checkpoints (and ids) of
    # models that never set it stay what they were.
    beam_rule: BeamRule = "transformers"

    @model_serializer(mode="wrap")
    def _omit_default_beam_rule(self, handler):
        data = handler(self)
        if isinstance(data, dict) and self.beam_rule == "transformers":
            data.pop("beam_rule", None)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BlipConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"invalid BLIP config: {explain_validation_error(err)}") from None

    @classmethod
    def preset(cls, name: str, **overrides) -> BlipConfig:
        """Named architectures: 'base' (ViT-B/16 + BERT-base), 'large' (ViT-L/16 + BERT-base), 'tiny' (tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        data = _merge(PRESETS[name], overrides)
        return cls.from_dict(data)


def explain_validation_error(err: ValidationError) -> str:
    """One line naming every bad field by its dotted path (used by the run config too)."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESETS: dict[str, dict] = {
    "base": {"vision": {"width": 768, "depth": 12, "heads": 12}},
    "large": {"vision": {"width": 1024, "depth": 24, "heads": 16, "grad_checkpointing": True}},
    "tiny": {
        "vision": {"image_size": 64, "patch_size": 16, "width": 64, "depth": 2, "heads": 2},
        "text": {"width": 64, "depth": 2, "heads": 2, "intermediate_size": 128, "max_positions": 64},
        "embed_dim": 32,
        "queue_size": 64,
    },
}
