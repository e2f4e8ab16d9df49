"""Writers of BLIP checkpoints in the two foreign formats, shared by the importers' unit tests and the curate flow's
end-to-end test: the official salesforce/BLIP ``.pth`` layout (``official_state`` of a ``source_model``) and
Hugging Face BLIP directories (``hf_config``, ``randomize`` and ``hf_bert_tokenizer``, written with transformers'
``save_pretrained``). A plain module (not conftest.py), importable from every test directory."""

from __future__ import annotations

import torch

from blip_core import BlipConfig, BlipModel
from blip_core.tokenizer import BlipTokenizer, minilm_dir

# --- writing official-format checkpoints from one of our models ---------------------------------------------
# The official names, spelled out independently of blip_core.convert: models/vit.py (timm names) and
# models/med.py (BERT names) of github.com/salesforce/BLIP.
OFFICIAL_LAYER = {
    "self_attn.q": "attention.self.query",
    "self_attn.k": "attention.self.key",
    "self_attn.v": "attention.self.value",
    "self_attn.out": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "cross_attn.q": "crossattention.self.query",
    "cross_attn.k": "crossattention.self.key",
    "cross_attn.v": "crossattention.self.value",
    "cross_attn.out": "crossattention.output.dense",
    "cross_attn.norm": "crossattention.output.LayerNorm",
    "ffn.fc1": "intermediate.dense",
    "ffn.fc2": "output.dense",
    "ffn.norm": "output.LayerNorm",
}
OFFICIAL_EMBEDDINGS = {"word": "word_embeddings", "position": "position_embeddings", "norm": "LayerNorm"}


def official_bert(model: BlipModel, stack: str, prefix: str) -> dict[str, torch.Tensor]:
    med = model.text
    out = {f"{prefix}embeddings.position_ids": torch.arange(med.cfg.max_positions)[None]}  # a persistent buffer there
    emb = med.embeddings if stack == "encoder" else med.decoder_embeddings
    for ours, theirs in OFFICIAL_EMBEDDINGS.items():
        for p in ("weight", "bias"):
            t = getattr(getattr(emb, ours), p, None)
            if t is not None:
                out[f"{prefix}embeddings.{theirs}.{p}"] = t.detach().clone()
    for i, layer in enumerate(getattr(med, stack)):
        for ours, theirs in OFFICIAL_LAYER.items():
            module = layer.get_submodule(ours)
            out[f"{prefix}encoder.layer.{i}.{theirs}.weight"] = module.weight.detach().clone()
            out[f"{prefix}encoder.layer.{i}.{theirs}.bias"] = module.bias.detach().clone()
    return out


def official_state(model: BlipModel, kind: str) -> dict[str, torch.Tensor]:
    """What BLIP_Pretrain / BLIP_Retrieval / BLIP_Decoder.state_dict() holds, momentum copies and queues included."""
    sd: dict[str, torch.Tensor] = {}
    vision = {f"visual_encoder.{k}": v.detach().clone() for k, v in model.vision.state_dict().items()}
    sd.update(vision)
    heads = {
        f"{n}.{p}": getattr(getattr(model, n), p).detach().clone()
        for n in ("vision_proj", "text_proj", "itm_head")
        for p in ("weight", "bias")
    }
    if kind in ("pretrain", "retrieval"):
        sd.update(official_bert(model, "encoder", "text_encoder."))
        sd.update(heads)
        sd["temp"] = model.temp.detach().clone()
        # momentum encoders (deliberately different values) and queues: training state that must be ignored
        sd.update({k.replace("visual_encoder.", "visual_encoder_m."): v + 1 for k, v in vision.items()})
        sd.update(
            {
                k.replace("text_encoder.", "text_encoder_m."): v + 1
                for k, v in official_bert(model, "encoder", "text_encoder.").items()
            }
        )
        sd.update({k.replace("_proj.", "_proj_m."): v + 1 for k, v in heads.items() if "_proj." in k})
        e = model.config.embed_dim
        sd.update(image_queue=torch.randn(e, 8), text_queue=torch.randn(e, 8))
    if kind == "pretrain":
        sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    if kind == "retrieval":
        sd.update(idx_queue=torch.full((1, 8), -100), ptr_queue=torch.zeros(1, dtype=torch.long))
    if kind in ("pretrain", "caption"):
        sd.update(official_bert(model, "decoder", "text_decoder.bert."))
        head = model.text.lm_head
        sd["text_decoder.cls.predictions.transform.dense.weight"] = head.dense.weight.detach().clone()
        sd["text_decoder.cls.predictions.transform.dense.bias"] = head.dense.bias.detach().clone()
        sd["text_decoder.cls.predictions.transform.LayerNorm.weight"] = head.norm.weight.detach().clone()
        sd["text_decoder.cls.predictions.transform.LayerNorm.bias"] = head.norm.bias.detach().clone()
        sd["text_decoder.cls.predictions.bias"] = head.decoder.bias.detach().clone()
        sd["text_decoder.cls.predictions.decoder.bias"] = head.decoder.bias.detach().clone()  # the alias med.py makes
        sd["text_decoder.cls.predictions.decoder.weight"] = head.decoder.weight.detach().clone()
    return sd


def source_model(seed: int = 0, sharing: str = "all_but_sa", image_size: int = 32) -> BlipModel:
    """A small model shaped like the official ones: 64-d attention heads, bert-base-uncased vocabulary."""
    cfg = BlipConfig.from_dict(
        {
            "vision": {
                "image_size": image_size,
                "patch_size": 16,
                "width": 128,
                "depth": 2,
                "heads": 2,
                "mlp_ratio": 2.0,
            },
            "text": {"width": 128, "depth": 2, "heads": 2, "intermediate_size": 256, "max_positions": 40},
            "embed_dim": 32,
            "sharing": sharing,
            "queue_size": 8,
        }
    )
    torch.manual_seed(seed)
    model = BlipModel(cfg, BlipTokenizer.bert_base_uncased()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "temp":
                p.fill_(0.05)
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


# A small vocabulary laid out like BLIP's: bert-base-uncased's [PAD]/[CLS]/[SEP] ids, then [DEC], [ENC] last.
VOCAB, PAD, CLS, SEP, DEC, ENC = 120, 0, 101, 102, 118, 119
IMAGE = 48


def hf_config(vocab_size: int = VOCAB, bos: int = DEC, tie: bool = True):
    """transformers' ``BlipConfig`` of a small BLIP."""
    from transformers import BlipConfig as HFBlipConfig

    # Vision and text widths differ (48 vs 32) so cross-attention's key/value shapes are exercised; the ViT's MLP
    # ratio is 2, not 4.
    return HFBlipConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            bos_token_id=bos,
            sep_token_id=SEP,
            pad_token_id=PAD,
            tie_word_embeddings=tie,
        ),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            image_size=IMAGE,
            patch_size=16,
        ),
        image_text_hidden_size=16,
        tie_word_embeddings=tie,
    )


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' near-zero init, so that every part matters and logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name.lower():
                centre = 1.0 if name.endswith("weight") else 0.0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def hf_bert_tokenizer():
    """transformers' tokenizer of a Hub BLIP checkpoint: bert-base-uncased + bos [DEC] + [ENC], from local files."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(minilm_dir()))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert (len(tok), tok.bos_token_id, tok.convert_tokens_to_ids("[ENC]")) == (30524, 30522, 30523)
    return tok
