"""BlipModel: the ViT image encoder, the MED text transformer, ITC projections and the ITM head.

Inference entry points take normalised float images [B, 3, H, W] and lists of strings; the ``*_embeds``
and ``*_ids`` variants take tensors for callers (pipelines, losses) that batch and cache themselves.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .bert import load_bert_into_med
from .checkpoint import load_pretrained, save_pretrained
from .config import BeamRule, BlipConfig
from .generation import beam_search, nucleus_sample
from .med import MED
from .registry import register_model
from .tokenizer import BlipTokenizer
from .vision import build_vit


class BlipBase(nn.Module):
    """What every BLIP model (pre-training/retrieval/captioning, VQA, NLVR2) shares: a ViT, a tokenizer, a config,
    input checks, autocast and checkpoints. ``task`` names the model class in its checkpoint."""

    task = "pretrain"

    def __init__(self, config: BlipConfig, tokenizer: BlipTokenizer | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.vocab_size != config.text.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but config.text.vocab_size is {config.text.vocab_size}"
            )
        self.vision = build_vit(config.vision)
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for autocast at inference
        self.max_text_length = 35

    # --- construction / persistence (see checkpoint.py) ------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> BlipBase:
        """Our checkpoint directory, a Hugging Face BLIP directory, or an official BLIP ``.pth``. A head's class
        (``BlipVQA``, ``BlipNLVR``) also starts from a pre-trained model's checkpoint (``from_blip``)."""
        model = load_pretrained(path, **kwargs)
        if isinstance(model, cls):
            return model
        if isinstance(model, BlipModel) and hasattr(cls, "from_blip"):
            return cls.from_blip(model)
        raise ValueError(f"{path} holds a {model.task!r} model ({type(model).__name__}), not a {cls.__name__}")

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Writes config.json, model.safetensors and tokenizer.json; returns the checkpoint's content hash."""
        return save_pretrained(self, directory)

    def take_settings(self, other: BlipBase) -> BlipBase:
        """Device, mode and inference settings of the model this one was built from (``from_blip``)."""
        self.amp_dtype, self.max_text_length = other.amp_dtype, other.max_text_length
        return self.to(other.device).train(other.training)

    @property
    def device(self) -> torch.device:
        return self.vision.pos_embed.device

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- inputs ---------------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be normalised floats, got dtype {images.dtype}")
        p = self.config.vision.patch_size
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(
                f"image height and width must be multiples of the patch size {p}, got {list(images.shape[2:])}"
            )
        dtype = self.vision.pos_embed.dtype
        return images.to(self.device, dtype=dtype if self.amp_dtype is None else images.dtype)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; pass token ids or attach one (model.tokenizer = ...)")
        if isinstance(texts, str):  # else its characters would be taken for texts ("texts[1] is empty")
            raise TypeError("texts must be a sequence of strings, not one string")
        for i, t in enumerate(texts):
            if isinstance(t, str) and not t.strip():
                raise ValueError(f"texts[{i}] is empty")
        ids, mask = self.tokenizer(texts, max_length=max_length or self.max_text_length)
        return ids.to(self.device), mask.to(self.device)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, 1 + patches, vision width], [CLS] first."""
        with self.autocast():
            return self.vision.forward_features(self.check_images(images))


@register_model
class BlipModel(BlipBase):
    """Pre-training, retrieval (ITC + ITM) and captioning: the model CapFilt's captioner and filter are."""

    def __init__(self, config: BlipConfig, tokenizer: BlipTokenizer | None = None):
        super().__init__(config, tokenizer)
        vw, tw = config.vision.width, config.text.width
        self.text = MED(config.text, vision_width=vw, sharing=config.sharing)
        self.vision_proj = nn.Linear(vw, config.embed_dim)
        self.text_proj = nn.Linear(tw, config.embed_dim)
        self.itm_head = nn.Linear(tw, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        init = partial(init_bert, std=config.text.initializer_range)
        for module in (self.text, self.vision_proj, self.text_proj, self.itm_head):
            module.apply(init)

    def init_text_from_bert(self, directory: str | os.PathLike) -> None:
        """Initialise the text transformer from a Hugging Face BERT directory (config.json + safetensors/bin)."""
        load_bert_into_med(self.text, directory)

    # --- encoders -------------------------------------------------------------------------------
    def encode_text_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unimodal text encoder ([CLS] first, no image): hidden states [B, T, text width]."""
        with self.autocast():
            return self.text.encode(input_ids, attention_mask)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_text_ids(*self.tokenize(texts))

    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC features of image tokens."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_embeds[:, 0]).float(), dim=-1)

    def grounded_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The image-grounded encoder reads ``[ENC]`` where the unimodal encoder reads ``[CLS]``."""
        ids = input_ids.clone()
        ids[:, 0] = self.config.text.enc_token_id
        return ids

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ITM logits [B_text, 2]. ``image_embeds`` may hold fewer rows than texts when each image has several
        consecutive texts (B_text = B_img * k): the image is then encoded and projected once for all of them."""
        with self.autocast():
            h = self.text.encode(self.grounded_ids(input_ids), attention_mask, image_embeds=image_embeds)
            return self.itm_head(h[:, 0]).float()

    # --- the stable inference API ---------------------------------------------------------------
    @torch.no_grad()
    def itm_score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """P(match) for each (image, text) pair, one text per image: [B]."""
        if len(texts) != len(images):
            raise ValueError(f"itm_score takes one text per image: {len(images)} images, {len(texts)} texts")
        ids, mask = self.tokenize(texts)
        return self.itm_logits(self.encode_image(images), ids, mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def itc_similarity(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of every image with every text: [B_img, B_text]."""
        img = self.image_features(self.encode_image(images))
        txt = self.text_features(self.encode_text(texts))
        return img @ txt.t()

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        *,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float | None = None,
        top_k: int = 0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        prompt: str | None = None,
        seeds: Sequence[int] | None = None,
        beam_rule: BeamRule | None = None,
    ) -> list[str] | list[list[str]]:
        """Captions. Beam search by default; nucleus sampling when ``top_p`` is given (``seeds``: one per image,
        so an image gets the same caption whatever batch it is in). Lengths count tokens as the official code
        does: ``[DEC]`` and the prompt included. With ``num_return_sequences`` > 1 each image gets a list.
        ``beam_rule``: the beam-search rule, None for the model's own (``config.beam_rule``)."""
        if self.tokenizer is None:
            raise RuntimeError("generate needs a tokenizer")
        prompt = self.config.prompt if prompt is None else prompt
        image_embeds = self.encode_image(images)
        ids, _ = self.tokenizer([prompt], add_sep=False)
        ids[:, 0] = self.config.text.bos_token_id
        prompt_ids = ids.to(self.device)
        common = dict(
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            eos_token_id=self.config.text.sep_token_id,
            pad_token_id=self.config.text.pad_token_id,
        )
        with self.autocast():
            if top_p is not None:
                out = nucleus_sample(
                    self.text,
                    image_embeds,
                    prompt_ids,
                    top_p=top_p,
                    top_k=top_k,
                    temperature=temperature,
                    num_return_sequences=num_return_sequences,
                    seeds=seeds,
                    **common,
                )
            else:
                out = beam_search(
                    self.text,
                    image_embeds,
                    prompt_ids,
                    num_beams=num_beams,
                    num_return_sequences=num_return_sequences,
                    beam_rule=self.config.beam_rule if beam_rule is None else beam_rule,
                    **common,
                )
        texts = self.tokenizer.decode_batch(out[:, prompt_ids.shape[1] :].tolist())
        texts = [t.strip() for t in texts]
        if num_return_sequences == 1:
            return texts
        k = num_return_sequences
        return [texts[i * k : (i + 1) * k] for i in range(len(images))]

    def generate_ids(self, images: torch.Tensor, prompt_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Token ids [B * num_return_sequences, T] including the prompt (parity tests, pipelines)."""
        with torch.no_grad(), self.autocast():
            image_embeds = self.encode_image(images)
            kwargs.setdefault("eos_token_id", self.config.text.sep_token_id)
            kwargs.setdefault("pad_token_id", self.config.text.pad_token_id)
            beam_rule = kwargs.pop("beam_rule", None)
            if kwargs.get("top_p") is not None:
                return nucleus_sample(self.text, image_embeds, prompt_ids.to(self.device), **kwargs)
            kwargs.pop("top_p", None)
            kwargs["beam_rule"] = self.config.beam_rule if beam_rule is None else beam_rule
            return beam_search(self.text, image_embeds, prompt_ids.to(self.device), **kwargs)

    def lm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decoder logits [B, T, V] for ``[DEC]``-first ids (teacher forcing)."""
        with self.autocast():
            return self.text.decode(input_ids, attention_mask, image_embeds).float()


def init_bert(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) weights (BERT's initializer_range, 0.02), zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
