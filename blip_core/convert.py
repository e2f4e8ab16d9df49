"""Importers into our checkpoint format: Hugging Face BLIP directories, official salesforce/BLIP ``.pth`` files,
and Hugging Face BERT weights for the text transformer.

Every importer works the same way: translate the source's names into ours (dropping what inference never uses:
momentum encoders, feature queues, ``position_ids`` buffers), infer a ``BlipConfig`` from the source's config and
the tensors' shapes, build the model and copy the tensors in. A shape that does not fit is an error naming both
keys and both shapes; a source key we cannot place is an error (a checkpoint of another architecture must not load
half-way); a part of our model the source lacks keeps its initialisation and is reported with a logged warning.

Semantics worth knowing (both sources follow the official code except where noted):
- the official ViT's LayerNorm eps is 1e-6; Hugging Face's ``BlipVisionConfig`` defaults to 1e-5 and its converted
  checkpoints keep that, so each import keeps the eps of its source;
- the official image-grounded encoder reads ``[ENC]`` first; Hugging Face's ``BlipForImageTextRetrieval`` feeds the
  ids it is given (``[CLS]`` from its processor). ``BlipModel.itm_logits`` always substitutes ``[ENC]``, as the paper;
- beam search: an official import uses the rule of transformers 4.15, which the official code pins, so that its
  published captions reproduce (``BlipConfig.beam_rule``); a Hugging Face import uses today's transformers' rule;
- a captioning checkpoint has no text encoder and a retrieval checkpoint no decoder: with the default sharing
  (``all_but_sa``) a captioner's cross-attention, FFN and embeddings fill the shared modules, and its encoder
  self-attention stays at initialisation (reported).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .bert import LM_HEAD, bert_text_key
from .config import BlipConfig
from .registry import model_class
from .tokenizer import BlipTokenizer
from .weights import read_hf_weights, torch_load_weights_only

logger = logging.getLogger(__name__)

# --- name tables ---------------------------------------------------------------------------------------------
# Hugging Face BlipVisionModel -> timm VisionTransformer (our ``vision``).
_HF_VISION = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
_HF_VISION_LAYER = {
    "layer_norm1": "norm1",
    "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HEADS = ("vision_proj", "text_proj", "itm_head")
_HF_ARCHITECTURES = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval")
_OFFICIAL_HEAD_DIM = 64  # ViT-B/16 (12 heads), ViT-L/16 (16 heads) and BERT-base (12 heads) all use 64-d heads


# --- loading translated tensors into a model ------------------------------------------------------------------
def _assign(model: torch.nn.Module, state: Mapping[str, torch.Tensor], origin: Mapping[str, str], source: str) -> None:
    """Copy ``state`` (our names) into ``model``; warn about every tensor of the model the source did not provide.

    Shared modules are reachable under several names; one tensor is written once per name, so two source keys
    that land on one shared tensor must agree."""
    targets = model.state_dict(keep_vars=True)
    written: dict[int, str] = {}
    with torch.no_grad():
        for name, value in state.items():
            if name not in targets:  # a bug in a name table, not in the checkpoint
                raise KeyError(f"internal: {origin.get(name, name)} translated to unknown parameter {name}")
            target = targets[name]
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(
                    f"{source}: {origin.get(name, name)} has shape {tuple(value.shape)} but {name} of the model "
                    f"built from its config has shape {tuple(target.shape)}: is this a checkpoint of another architecture?"
                )
            if id(target) in written and not torch.equal(target, value.to(target.dtype)):
                raise ValueError(
                    f"{source}: {origin.get(name, name)} and {written[id(target)]} fill one shared tensor ({name}) "
                    "with different values"
                )
            target.copy_(value)
            written.setdefault(id(target), origin.get(name, name))
    seen: set[int] = set()
    missing = []
    for name, target in targets.items():
        if id(target) in seen:
            continue
        seen.add(id(target))
        if id(target) not in written:
            missing.append(name)
    if missing:
        logger.warning(
            "%s: %d tensors are not in the checkpoint and keep their initialisation: %s",
            source,
            len(missing),
            ", ".join(_summarise(missing)),
        )


def _summarise(names: Iterable[str]) -> list[str]:
    """``text.encoder.0.self_attn.q.weight``, ``...1...`` -> ``text.encoder.*.self_attn.q``: a readable log line."""
    out: list[str] = []
    for n in names:
        n = re.sub(r"\.\d+(?=\.)", ".*", n)
        n = re.sub(r"\.(weight|bias)$", "", n)
        if n not in out:
            out.append(n)
    return out


def _reject_unknown(unknown: list[str], source: str, what: str) -> None:
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise ValueError(f"{source} is not {what}: it holds keys this importer cannot place: {shown}")


def _layer_count(keys: Iterable[str], pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _lm_head_tied(state: Mapping[str, torch.Tensor]) -> bool:
    """Tie the LM head to the decoder's word embeddings unless the checkpoint holds a different head matrix."""
    head = state.get("text.lm_head.decoder.weight")
    if head is None:
        return True
    word = state.get("text.decoder_embeddings.word.weight", state.get("text.embeddings.word.weight"))
    return word is not None and word.shape == head.shape and torch.equal(word, head)


def _detect_sharing(enc: Mapping[str, torch.Tensor], dec: Mapping[str, torch.Tensor]) -> str:
    """Which of the paper's sharing schemes a checkpoint with both stacks used: the tensors that are equal."""

    def same(part: str) -> bool:
        keys = [k for k in dec if part in k]
        if not keys:
            return False
        for k in keys:
            ek = k.replace("text.decoder.", "text.encoder.").replace("text.decoder_embeddings.", "text.embeddings.")
            if ek not in enc or enc[ek].shape != dec[k].shape or not torch.equal(enc[ek], dec[k]):
                return False
        return True

    if not (same("decoder_embeddings.") and same(".ffn.")):
        return "none"
    sa, ca = same(".self_attn."), same(".cross_attn.")
    return {(True, True): "all", (False, True): "all_but_sa", (True, False): "all_but_ca", (False, False): "none"}[
        (sa, ca)
    ]


def _tokenizer_for(vocab_size: int, source: str) -> BlipTokenizer | None:
    """bert-base-uncased + [DEC]/[ENC] (what every official checkpoint was trained with), when its size fits."""
    if vocab_size != 30524:
        logger.warning(
            "%s: vocabulary of %d ids is not bert-base-uncased + [DEC]/[ENC]; loading without a tokenizer",
            source,
            vocab_size,
        )
        return None
    try:
        return BlipTokenizer.bert_base_uncased()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        logger.warning("%s: loading without a tokenizer (%s)", source, err)
        return None


# --- Hugging Face BLIP ---------------------------------------------------------------------------------------
def load_hf_blip(directory: str | os.PathLike):
    """A ``BlipModel`` from a Hugging Face ``BlipForConditionalGeneration`` / ``BlipForImageTextRetrieval`` directory."""
    d = Path(directory)
    source = f"Hugging Face BLIP checkpoint {d}"
    hf = json.loads((d / "config.json").read_text())
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "blip" or (archs and not any(a in _HF_ARCHITECTURES for a in archs)):
        raise ValueError(
            f"{d} holds a {hf.get('model_type')!r} model ({', '.join(archs) or 'no architectures listed'}); "
            f"only BLIP's {' and '.join(_HF_ARCHITECTURES)} can be imported"
        )
    raw = read_hf_weights(d)
    state, origin, unknown = {}, {}, []
    for key, value in raw.items():
        ours = _hf_key(key)
        if ours == "":
            continue
        if ours is None:
            unknown.append(key)
            continue
        if key.endswith("cls.predictions.bias") and "text_decoder.cls.predictions.decoder.bias" in raw:
            continue  # the head's forward adds decoder.bias; ``bias`` is only its tied alias (or, untied, unused)
        state[ours], origin[ours] = value, key
    _reject_unknown(unknown, source, "a BLIP captioning or retrieval model")
    if not any(k.startswith("vision.") for k in state) or not any(k.startswith("text.") for k in state):
        raise ValueError(f"{source} lacks a vision model or a text model")

    tc, vc = hf.get("text_config") or {}, hf.get("vision_config") or {}
    for side, c in (("text", tc), ("vision", vc)):
        if c.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: {side}_config.hidden_act={c['hidden_act']!r}; only 'gelu' is supported")
    tok = None
    if (d / "tokenizer.json").exists() or (d / "vocab.txt").exists():
        tok = BlipTokenizer.from_pretrained(d)
    vocab = tc.get("vocab_size", 30524)
    if tok is not None and tok.vocab_size != vocab:
        logger.warning(
            "%s: tokenizer has %d ids but the model %d; loading without the tokenizer", source, tok.vocab_size, vocab
        )
        tok = None
    ids = {
        "pad_token_id": tc.get("pad_token_id", 0),
        "sep_token_id": tc.get("sep_token_id", 102),
        "bos_token_id": tc.get("bos_token_id", 30522),  # BlipForConditionalGeneration.decoder_input_ids
    }
    if tok is not None:
        ids["cls_token_id"], ids["enc_token_id"] = tok.token_id("[CLS]"), tok.token_id("[ENC]")
    else:  # bert-base-uncased's [CLS]; [ENC] follows [DEC] in every BLIP vocabulary
        ids["cls_token_id"], ids["enc_token_id"] = 101, ids["bos_token_id"] + 1
    for name, value in ids.items():
        if value is None or not 0 <= value < vocab:
            raise ValueError(
                f"{source}: cannot determine text.{name} ({value}) within the vocabulary of {vocab}; add tokenizer files"
            )

    text_depth = tc.get("num_hidden_layers", 12)
    for stack in ("encoder", "decoder"):
        n = _layer_count(state, rf"text\.{stack}\.(\d+)\.")
        if n and n != text_depth:
            raise ValueError(
                f"{source}: text_config.num_hidden_layers is {text_depth} but the checkpoint has {n} text layers"
            )
    vision_depth = vc.get("num_hidden_layers", 12)
    n = _layer_count(state, r"vision\.blocks\.(\d+)\.")
    if n != vision_depth:
        raise ValueError(
            f"{source}: vision_config.num_hidden_layers is {vision_depth} but the checkpoint has {n} vision layers"
        )
    width = vc.get("hidden_size", 768)
    image_size, patch_size = vc.get("image_size", 384), vc.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
        raise ValueError(
            f"{source}: only square images and patches are supported (image_size={image_size}, patch_size={patch_size})"
        )
    config = BlipConfig.from_dict(
        {
            "vision": {
                "image_size": image_size,
                "patch_size": patch_size,
                "width": width,
                "depth": vision_depth,
                "heads": vc.get("num_attention_heads", 12),
                "mlp_ratio": vc.get("intermediate_size", 3072) / width,
                "layer_norm_eps": vc.get("layer_norm_eps", 1e-5),
            },
            "text": {
                "vocab_size": vocab,
                "width": tc.get("hidden_size", 768),
                "depth": text_depth,
                "heads": tc.get("num_attention_heads", 8),
                "intermediate_size": tc.get("intermediate_size", 3072),
                "max_positions": tc.get("max_position_embeddings", 512),
                "layer_norm_eps": tc.get("layer_norm_eps", 1e-12),
                "tie_word_embeddings": _lm_head_tied(state),
                **ids,
            },
            "embed_dim": hf.get("image_text_hidden_size", 256),
            "beam_rule": "transformers",  # these checkpoints caption with today's transformers' beam search
        }
    )
    model = model_class("pretrain")(config, tok)  # BlipModel, registered by model.py
    _assign(model, state, origin, source)
    logger.info("imported %s (%s)", source, ", ".join(archs) or "BLIP")
    return model


def _hf_key(key: str) -> str | None:
    """Our name for a Hugging Face BLIP key; "" for keys to drop; None for keys we cannot place."""
    if key.endswith("position_ids"):
        return ""
    if key.startswith("vision_model."):
        rest = key[len("vision_model.") :]
        if rest in _HF_VISION:
            return "vision." + _HF_VISION[rest]
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.([\w.]+)\.(weight|bias)", rest)
        if m and m.group(2) in _HF_VISION_LAYER:
            return f"vision.blocks.{m.group(1)}.{_HF_VISION_LAYER[m.group(2)]}.{m.group(3)}"
        return None
    if key.startswith("text_encoder."):
        return bert_text_key(key[len("text_encoder.") :], "encoder")
    if key.startswith("text_decoder.bert."):
        return bert_text_key(key[len("text_decoder.bert.") :], "decoder")
    if key.startswith("text_decoder.cls."):
        rest = key[len("text_decoder.") :]
        return "text.lm_head." + LM_HEAD[rest] if rest in LM_HEAD else None
    head = key.split(".", 1)[0]
    if head in _HEADS and key.rsplit(".", 1)[-1] in ("weight", "bias"):
        return key
    return None


# --- official salesforce/BLIP .pth ----------------------------------------------------------------------------
def load_official_pth(path: str | os.PathLike):
    """A ``BlipModel`` from an official BLIP checkpoint: pre-trained (model_base/large.pth), captioning
    (model*_caption*.pth, model_base_capfilt_large.pth) or retrieval (model*_retrieval_*.pth)."""
    p = Path(path)
    source = f"official BLIP checkpoint {p}"
    ckpt = torch_load_weights_only(p)
    raw = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{p} is not a BLIP checkpoint: expected a state dict (or a dict with one under 'model')")
    enc, dec, other, origin, unknown = {}, {}, {}, {}, []
    for key, value in raw.items():
        key = key.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
        ours, part = _official_key(key)
        if part == "drop":
            continue
        if ours is None:
            unknown.append(key)
            continue
        bucket = {"encoder": enc, "decoder": dec}.get(part, other)
        if ours in bucket and not torch.equal(bucket[ours], value):
            raise ValueError(f"{source}: {key} and {origin[ours]} should be one tensor but differ")
        bucket[ours], origin[ours] = value, key
    _reject_unknown(unknown, source, "a BLIP pre-training, captioning or retrieval model")
    if "vision.pos_embed" not in other or not (enc or dec):
        raise ValueError(
            f"{p} is not a BLIP checkpoint: it lacks visual_encoder.* or text_encoder.* / text_decoder.* weights"
        )
    sharing = _detect_sharing(enc, dec) if enc and dec else "all_but_sa"
    if sharing == "none":
        logger.warning(
            "%s: its text encoder and decoder share no weights. Official pre-trained checkpoints share all but "
            "self-attention; a VQA checkpoint looks like this, and its decoder attends to the question's encoding, "
            "not to the image: this import treats the decoder as an image captioner",
            source,
        )
    state = {**enc, **dec, **other}
    try:
        config = official_config(state, sharing)
    except KeyError as err:
        raise ValueError(f"{source} is incomplete: it lacks {err.args[0]} (our name)") from None
    model = model_class("pretrain")(config, _tokenizer_for(config.text.vocab_size, source))  # BlipModel
    _assign(model, state, origin, source)
    kind = "pre-trained" if enc and dec else "captioning" if dec else "retrieval"
    logger.info(
        "imported %s: %s, ViT %s/%d at %d px, sharing %s",
        source,
        kind,
        "L" if config.vision.width == 1024 else "B",
        config.vision.patch_size,
        config.vision.image_size,
        sharing,
    )
    return model


def _official_key(key: str) -> tuple[str | None, str]:
    """(our name, which part) for an official key; part ``drop`` for training-only state (momentum, queues)."""
    head = key.split(".", 1)[0]
    if (
        head.endswith("_m")
        or head.endswith("_queue")
        or head in ("queue_ptr", "ptr_queue")
        or key.endswith("position_ids")
    ):
        return None, "drop"
    if head == "visual_encoder":
        return "vision." + key[len("visual_encoder.") :], "vision"
    if head == "text_encoder":
        return bert_text_key(key[len("text_encoder.") :], "encoder"), "encoder"
    if key.startswith("text_decoder.bert."):
        return bert_text_key(key[len("text_decoder.bert.") :], "decoder"), "decoder"
    if key.startswith("text_decoder.cls."):
        rest = key[len("text_decoder.") :]
        return ("text.lm_head." + LM_HEAD[rest] if rest in LM_HEAD else None), "decoder"
    if head in _HEADS or key == "temp":
        return key, "heads"
    return None, "unknown"


def official_config(state: Mapping[str, torch.Tensor], sharing: str = "all_but_sa") -> BlipConfig:
    """The config of an official checkpoint, read off its tensors' shapes (our names; meta tensors will do)."""
    keys = list(state)
    vwidth = state["vision.cls_token"].shape[-1] if "vision.cls_token" in state else state["vision.pos_embed"].shape[-1]
    if "vision.patch_embed.proj.weight" not in state:
        raise ValueError("official BLIP checkpoint lacks visual_encoder.patch_embed.proj.weight")
    patch = state["vision.patch_embed.proj.weight"].shape[-1]
    side = int(round((state["vision.pos_embed"].shape[1] - 1) ** 0.5))
    if side * side != state["vision.pos_embed"].shape[1] - 1:
        raise ValueError(
            f"visual_encoder.pos_embed has {state['vision.pos_embed'].shape[1]} rows: not 1 + a square grid"
        )
    vdepth = _layer_count(keys, r"vision\.blocks\.(\d+)\.")
    stack = "encoder" if any(k.startswith("text.encoder.") for k in keys) else "decoder"
    emb = "embeddings" if stack == "encoder" else "decoder_embeddings"
    word = state[f"text.{emb}.word.weight"]
    twidth = word.shape[1]
    fc1 = state.get("vision.blocks.0.mlp.fc1.weight")
    config = BlipConfig.preset(
        "large" if vwidth == 1024 else "base",
        vision={
            "image_size": side * patch,
            "patch_size": patch,
            "width": vwidth,
            "depth": vdepth,
            "heads": max(1, vwidth // _OFFICIAL_HEAD_DIM),
            "mlp_ratio": (fc1.shape[0] / vwidth) if fc1 is not None else 4.0,
            "layer_norm_eps": 1e-6,
        },
        text={
            "vocab_size": word.shape[0],
            "width": twidth,
            "depth": _layer_count(keys, rf"text\.{stack}\.(\d+)\."),
            "heads": max(1, twidth // _OFFICIAL_HEAD_DIM),
            "intermediate_size": state[f"text.{stack}.0.ffn.fc1.weight"].shape[0],
            "max_positions": state[f"text.{emb}.position.weight"].shape[0],
            "layer_norm_eps": 1e-12,
            "tie_word_embeddings": _lm_head_tied(state),
        },
        embed_dim=state["vision_proj.weight"].shape[0] if "vision_proj.weight" in state else 256,
        sharing=sharing,
        prompt="a picture of ",
        beam_rule="transformers-4.15",  # the official code's captions come from transformers 4.15's beam search
    )
    return config
