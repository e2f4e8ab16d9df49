"""BERT checkpoints and the MED: the names of a BERT-style text model's weights in ours, a ``TextConfig`` from a
BERT directory, and initialising the MED's text transformer from it (as BLIP's pre-training starts from
bert-base-uncased)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .weights import read_hf_weights

logger = logging.getLogger(__name__)

# A BERT-style layer (official med.py, Hugging Face BlipText*, BertModel) -> our TextLayer.
BERT_LAYER = {
    "attention.self.query": "self_attn.q",
    "attention.self.key": "self_attn.k",
    "attention.self.value": "self_attn.v",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.q",
    "crossattention.self.key": "cross_attn.k",
    "crossattention.self.value": "cross_attn.v",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate.dense": "ffn.fc1",
    "output.dense": "ffn.fc2",
    "output.LayerNorm": "ffn.norm",
}
BERT_EMBEDDINGS = {"word_embeddings": "word", "position_embeddings": "position", "LayerNorm": "norm"}
LM_HEAD = {
    "cls.predictions.transform.dense.weight": "dense.weight",
    "cls.predictions.transform.dense.bias": "dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "norm.bias",
    "cls.predictions.decoder.weight": "decoder.weight",
    "cls.predictions.decoder.bias": "decoder.bias",
    "cls.predictions.bias": "decoder.bias",
}


def bert_text_key(key: str, stack: str) -> str | None:
    """Our name for a key of a BERT-style text model (relative to the model, e.g. ``encoder.layer.3.output.dense.weight``).

    ``stack`` is ``"encoder"`` or ``"decoder"``: which of our two layer stacks (and embeddings) it belongs to.
    Returns None for a key that is not a weight of ours (buffers, token types, pooler): callers decide."""
    emb = "embeddings" if stack == "encoder" else "decoder_embeddings"
    m = re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", key)
    if m and m.group(1) in BERT_EMBEDDINGS:
        return f"text.{emb}.{BERT_EMBEDDINGS[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.([\w.]+)\.(weight|bias)", key)
    if m and m.group(2) in BERT_LAYER:
        return f"text.{stack}.{m.group(1)}.{BERT_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def _bert_config(directory: Path) -> dict:
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") not in ("bert", None) and not any(
        a.startswith("Bert") for a in cfg.get("architectures", [])
    ):
        raise ValueError(f"{directory} holds a {cfg.get('model_type')!r} model, not BERT")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{directory}: hidden_act={cfg['hidden_act']!r}; the MED uses exact GELU")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"{directory}: position_embedding_type={cfg['position_embedding_type']!r}; only 'absolute' is supported"
        )
    return cfg


def text_config_from_bert(directory: str | os.PathLike) -> dict:
    """A ``TextConfig`` dict matching a BERT directory: its sizes, plus ``[DEC]`` and ``[ENC]`` appended to its vocabulary.

    ``BlipConfig.from_dict({"text": text_config_from_bert(d), ...})`` then takes ``load_bert_into_med`` exactly."""
    d = Path(directory)
    cfg = _bert_config(d)
    vocab = cfg.get("vocab_size", 30522)
    specials = {"[CLS]": 101, "[SEP]": 102}
    if (d / "vocab.txt").exists():
        with open(d / "vocab.txt", encoding="utf-8") as f:
            index = {line.rstrip("\n"): i for i, line in enumerate(f)}
        specials = {t: index.get(t, specials[t]) for t in specials}
    return {
        "vocab_size": vocab + 2,
        "width": cfg.get("hidden_size", 768),
        "depth": cfg.get("num_hidden_layers", 12),
        "heads": cfg.get("num_attention_heads", 12),
        "intermediate_size": cfg.get("intermediate_size", 3072),
        "max_positions": cfg.get("max_position_embeddings", 512),
        "layer_norm_eps": cfg.get("layer_norm_eps", 1e-12),
        "pad_token_id": cfg.get("pad_token_id", 0) or 0,
        "cls_token_id": specials["[CLS]"],
        "sep_token_id": specials["[SEP]"],
        "bos_token_id": vocab,
        "enc_token_id": vocab + 1,
    }


def load_bert_into_med(med, directory: str | os.PathLike) -> None:
    """Initialise the MED's text transformer from a Hugging Face BERT directory, as BLIP's pre-training does from
    bert-base-uncased: embeddings, self-attention and FFN of every layer (encoder, and decoder where not shared),
    the MLM transform and bias for the LM head when present. Cross-attention stays freshly initialised.

    BLIP has no token-type table: ``token_type_embeddings[0]`` is folded into the position table, so the unimodal
    encoder computes exactly what ``BertModel`` computes for single-segment input."""
    d = Path(directory)
    source = f"BERT checkpoint {d}"
    cfg = _bert_config(d)
    raw = read_hf_weights(d)
    state = {}
    for k, v in raw.items():  # BertForPreTraining nests the encoder under ``bert.``; old TF ports say gamma/beta
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        state[k.removeprefix("bert.")] = v
    tc = med.cfg
    expected = {
        "hidden_size": tc.width,
        "num_hidden_layers": tc.depth,
        "num_attention_heads": tc.heads,
        "intermediate_size": tc.intermediate_size,
    }
    wrong = {k: (cfg.get(k), v) for k, v in expected.items() if cfg.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: BERT {a} vs text config {b}" for k, (a, b) in wrong.items())
        raise ValueError(
            f"{source} does not fit the text transformer ({detail}); build the config with text_config_from_bert()"
        )

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"{source} lacks {key}")
        return state[key]

    word = take("embeddings.word_embeddings.weight")
    pos = take("embeddings.position_embeddings.weight").clone()
    if "embeddings.token_type_embeddings.weight" in state:
        pos += state["embeddings.token_type_embeddings.weight"][0]
    n_vocab, n_pos = word.shape[0], min(pos.shape[0], tc.max_positions)
    if n_vocab > tc.vocab_size:
        raise ValueError(f"{source}: its {n_vocab}-token vocabulary does not fit text.vocab_size={tc.vocab_size}")
    if tc.max_positions > pos.shape[0]:
        logger.warning(
            "%s: positions %d..%d are not in BERT and keep their initialisation",
            source,
            pos.shape[0],
            tc.max_positions - 1,
        )
    with torch.no_grad():
        embeddings = [med.embeddings] + (
            [med.decoder_embeddings] if med.decoder_embeddings is not med.embeddings else []
        )
        for e in embeddings:
            e.word.weight[:n_vocab].copy_(word)
            e.position.weight[:n_pos].copy_(pos[:n_pos])
            e.norm.weight.copy_(take("embeddings.LayerNorm.weight"))
            e.norm.bias.copy_(take("embeddings.LayerNorm.bias"))
        for i in range(tc.depth):
            for layer in (med.encoder[i], med.decoder[i]):  # a shared module is simply written twice
                for src, ours in BERT_LAYER.items():
                    if src.startswith("crossattention"):
                        continue
                    module = layer.get_submodule(ours)
                    module.weight.copy_(take(f"encoder.layer.{i}.{src}.weight"))
                    module.bias.copy_(take(f"encoder.layer.{i}.{src}.bias"))
        head = [k for k in LM_HEAD if k in state and k.startswith("cls.predictions.transform")]
        for k in head:
            med.lm_head.get_parameter(LM_HEAD[k]).copy_(state[k])
        bias = state.get("cls.predictions.bias", state.get("cls.predictions.decoder.bias"))
        if bias is not None:
            med.lm_head.decoder.bias[:n_vocab].copy_(bias)
        if (
            "cls.predictions.decoder.weight" in state
            and med.lm_head.decoder.weight is not med.decoder_embeddings.word.weight
        ):
            med.lm_head.decoder.weight[:n_vocab].copy_(state["cls.predictions.decoder.weight"])
    logger.info(
        "initialised the text transformer from %s (%d layers%s); cross-attention stays at its initialisation",
        source,
        tc.depth,
        ", MLM head" if head else "",
    )
