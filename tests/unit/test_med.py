"""The MED text transformer: causality, parameter sharing (Table 3 of the paper), encoder modes, padding,
and the checkpoint round trip of every sharing strategy."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from blip_helpers import SHARINGS, images, make_model, tokenizer  # noqa: F401  (fixtures)

from blip_core import BlipModel, checkpoint_id

# which sub-modules the decoder takes from the encoder, per strategy (paper, Table 3)
SHARED = {
    "all": {"embeddings": True, "self_attn": True, "cross_attn": True, "ffn": True},
    "all_but_sa": {"embeddings": True, "self_attn": False, "cross_attn": True, "ffn": True},
    "all_but_ca": {"embeddings": True, "self_attn": True, "cross_attn": False, "ffn": True},
    "none": {"embeddings": False, "self_attn": False, "cross_attn": False, "ffn": False},
}


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> list[bool]:
    pa, pb = list(a.parameters()), list(b.parameters())
    assert len(pa) == len(pb) and pa
    return [x is y for x, y in zip(pa, pb)]


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter distinct random values (fresh models have zero biases and unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("sharing", SHARINGS)
def test_decoder_is_causal(make_model, sharing):
    model = make_model(sharing=sharing)
    _perturb(model)
    img = model.encode_image(images(2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, model.config.text.vocab_size, (2, 9), generator=g)
    ids[:, 0] = model.config.text.bos_token_id
    with torch.no_grad():
        base = model.lm_logits(img, ids)
        for j in (1, 4, 8):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 7) % model.config.text.vocab_size
            out = model.lm_logits(img, changed)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(out[:, j], base[:, j], atol=1e-4), "a token must change its own position's logits"


@pytest.mark.parametrize("sharing", SHARINGS)
def test_sharing_is_by_parameter_identity(make_model, sharing):
    model = make_model(sharing=sharing)
    med = model.text
    expect = SHARED[sharing]
    assert med.sharing == sharing
    emb = _same_tensors(med.embeddings, med.decoder_embeddings)
    assert all(emb) if expect["embeddings"] else not any(emb)
    for enc, dec in zip(med.encoder, med.decoder, strict=True):
        for name in ("self_attn", "cross_attn", "ffn"):
            same = _same_tensors(getattr(enc, name), getattr(dec, name))
            assert all(same) if expect[name] else not any(same), (sharing, name)
    # a shared tensor is one tensor: the model's unique parameter count matches the strategy
    per_layer = {
        name: sum(p.numel() for p in getattr(med.encoder[0], name).parameters())
        for name in ("self_attn", "cross_attn", "ffn")
    }
    emb_size = sum(p.numel() for p in med.embeddings.parameters())
    own = sum(per_layer[n] for n in per_layer if not expect[n]) * len(med.decoder)
    own += 0 if expect["embeddings"] else emb_size
    head = sum(p.numel() for p in med.lm_head.parameters() if p is not med.decoder_embeddings.word.weight)
    total = sum(p.numel() for p in med.parameters())
    encoder_side = emb_size + sum(p.numel() for p in med.encoder.parameters())
    assert total == encoder_side + own + head


@pytest.mark.parametrize("sharing", SHARINGS)
def test_lm_head_tied_to_decoder_word_embeddings(make_model, sharing):
    tied = make_model(sharing=sharing).text
    assert tied.lm_head.decoder.weight is tied.decoder_embeddings.word.weight
    if sharing == "none":
        assert tied.lm_head.decoder.weight is not tied.embeddings.word.weight
    untied = make_model(sharing=sharing, text={"tie_word_embeddings": False}).text
    assert untied.lm_head.decoder.weight is not untied.decoder_embeddings.word.weight
    assert untied.lm_head.decoder.weight is not untied.embeddings.word.weight


def test_shared_weight_update_reaches_both_stacks(make_model):
    """Training the encoder's FFN (shared under 'all_but_sa') changes the decoder's output, and vice versa
    for the decoder's own self-attention, which the encoder must not see."""
    model = make_model(sharing="all_but_sa")
    _perturb(model)
    ids, mask = model.tokenize(["a red square on the left"])
    img = model.encode_image(images(1))
    with torch.no_grad():
        enc0, dec0 = model.text.encode(ids, mask), model.lm_logits(img, ids, mask)
        model.text.encoder[0].ffn.fc1.weight.mul_(1.5)
        enc1, dec1 = model.text.encode(ids, mask), model.lm_logits(img, ids, mask)
        assert not torch.allclose(enc0, enc1) and not torch.allclose(dec0, dec1)
        model.text.decoder[0].self_attn.q.weight.mul_(1.5)
        torch.testing.assert_close(model.text.encode(ids, mask), enc1)
        assert not torch.allclose(model.lm_logits(img, ids, mask), dec1)


@pytest.mark.parametrize("sharing", ["all", "all_but_sa"])
def test_unimodal_encoder_ignores_images_grounded_encoder_depends_on_them(make_model, sharing):
    model = make_model(sharing=sharing)
    _perturb(model)
    ids, mask = model.tokenize(["a red square on the left", "a blue circle"])
    with torch.no_grad():
        text0 = model.encode_text_ids(ids, mask)
        feat0 = model.text_features(text0)
        # no cross-attention in the unimodal pass: scrambling every cross-attention weight changes nothing
        for layer in model.text.encoder:
            for p in layer.cross_attn.parameters():
                p.copy_(torch.randn_like(p))
        torch.testing.assert_close(model.encode_text_ids(ids, mask), text0, rtol=0, atol=0)
        torch.testing.assert_close(
            model.text_features(model.encode_text(["a red square on the left", "a blue circle"])), feat0
        )

        # the grounded encoder reads [ENC] and attends to the image: other images, other outputs
        a, b = model.encode_image(images(2, seed=1)), model.encode_image(images(2, seed=2))
        grounded_a = model.text.encode(model.grounded_ids(ids), mask, image_embeds=a)
        grounded_b = model.text.encode(model.grounded_ids(ids), mask, image_embeds=b)
        assert not torch.allclose(grounded_a, grounded_b, atol=1e-4)
        assert not torch.allclose(model.itm_logits(a, ids, mask), model.itm_logits(b, ids, mask), atol=1e-5)
        # same image -> same output (no hidden state between calls)
        torch.testing.assert_close(model.text.encode(model.grounded_ids(ids), mask, image_embeds=a), grounded_a)


def test_grounded_encoder_uses_enc_token(make_model):
    model = make_model()
    ids, _ = model.tokenize(["a red square"])
    grounded = model.grounded_ids(ids)
    assert grounded[0, 0].item() == model.config.text.enc_token_id
    assert torch.equal(grounded[:, 1:], ids[:, 1:])
    assert ids[0, 0].item() == model.config.text.cls_token_id  # the caller's ids are untouched


@pytest.mark.parametrize("sharing", SHARINGS)
def test_padding_does_not_change_unpadded_outputs(make_model, sharing):
    model = make_model(sharing=sharing)
    _perturb(model)
    short = "a red square"
    long = "two cats sleeping on a mat on the left at night"
    ids1, mask1 = model.tokenize([short])
    ids2, mask2 = model.tokenize([short, long])
    n = ids1.shape[1]
    assert ids2.shape[1] > n and mask2[0, n:].eq(0).all()
    img = model.encode_image(images(1))
    img2 = img.expand(2, -1, -1)
    with torch.no_grad():
        # the garbage in padded slots must not matter either
        ids2_garbage = ids2.clone()
        ids2_garbage[0, n:] = 7
        for batch_ids in (ids2, ids2_garbage):
            torch.testing.assert_close(
                model.encode_text_ids(batch_ids, mask2)[:1, :n],
                model.encode_text_ids(ids1, mask1),
                atol=1e-5,
                rtol=1e-4,
            )
            torch.testing.assert_close(
                model.itm_logits(img2, batch_ids, mask2)[:1], model.itm_logits(img, ids1, mask1), atol=1e-5, rtol=1e-4
            )
            dec = batch_ids.clone()
            dec[:, 0] = model.config.text.bos_token_id
            dec1 = ids1.clone()
            dec1[:, 0] = model.config.text.bos_token_id
            torch.testing.assert_close(
                model.lm_logits(img2, dec, mask2)[:1, :n], model.lm_logits(img, dec1, mask1), atol=1e-5, rtol=1e-4
            )


def _outputs(model: BlipModel) -> dict[str, torch.Tensor]:
    imgs = images(2, seed=5)
    texts = ["a red square on the left", "a blue circle on the top"]
    ids, mask = model.tokenize(texts)
    with torch.no_grad():
        emb = model.encode_image(imgs)
        dec = ids.clone()
        dec[:, 0] = model.config.text.bos_token_id
        gen = model.generate_ids(
            imgs, torch.tensor([[model.config.text.bos_token_id]]), num_beams=2, max_length=8, min_length=3
        )
        return {
            "itm": model.itm_score(imgs, texts),
            "itc": model.itc_similarity(imgs, texts),
            "lm": model.lm_logits(emb, dec, mask),
            "gen": gen,
        }


@pytest.mark.parametrize("sharing", SHARINGS)
def test_save_load_round_trip(make_model, sharing, tmp_path):
    model = make_model(sharing=sharing)
    _perturb(model)
    cid = model.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    loaded = BlipModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    before, after = _outputs(model), _outputs(loaded)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # sharing survives loading: one tensor, not two equal copies
    for enc, dec in zip(loaded.text.encoder, loaded.text.decoder):
        assert (enc.ffn.fc1.weight is dec.ffn.fc1.weight) == SHARED[sharing]["ffn"]
        assert (enc.self_attn.q.weight is dec.self_attn.q.weight) == SHARED[sharing]["self_attn"]
        assert (enc.cross_attn.k.weight is dec.cross_attn.k.weight) == SHARED[sharing]["cross_attn"]
    assert loaded.text.lm_head.decoder.weight is loaded.text.decoder_embeddings.word.weight
    assert cid == checkpoint_id(tmp_path / "ckpt")


def test_checkpoint_id_is_a_content_hash(make_model, tmp_path):
    model = make_model()
    _perturb(model)
    first = model.save_pretrained(tmp_path / "a")
    assert first == model.save_pretrained(tmp_path / "b")  # same content, other place
    assert first == model.save_pretrained(tmp_path / "a")  # overwriting in place
    assert first == BlipModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "c")  # load + save
    assert len(first) == 16 and int(first, 16) >= 0
    with torch.no_grad():
        model.text.decoder[0].self_attn.v.bias[3] += 1e-3
    changed = model.save_pretrained(tmp_path / "a")
    assert changed != first and changed == checkpoint_id(tmp_path / "a")
    # the config is part of the content
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    meta["config"]["prompt"] = "a photo of "
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    assert checkpoint_id(tmp_path / "b") != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"


def test_checkpoint_directory_has_ordinary_permissions(make_model, tmp_path):
    """The directory is written as a temp dir and renamed: it must not keep the temp dir's private 0700 mode."""
    old = os.umask(0o022)
    try:
        make_model().save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755


def test_itm_with_several_texts_per_image_equals_repeating_the_image(make_model):
    """itm_logits folds k consecutive texts onto one image row instead of copying the image k times."""
    model = make_model()
    _perturb(model)
    texts = [
        "a red square",
        "a blue circle on the left",
        "two cats",
        "a green triangle",
        "an empty street at night",
        "a dog",
    ]
    ids, mask = model.tokenize(texts)
    with torch.no_grad():
        emb = model.encode_image(images(2))
        folded = model.itm_logits(emb, ids, mask)
        copied = model.itm_logits(emb.repeat_interleave(3, 0), ids, mask)
    torch.testing.assert_close(folded, copied, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(folded[:3], folded[3:], atol=1e-4)


def test_initializer_range_sets_the_text_sides_initial_std_and_keeps_tiny_text_features_apart():
    """BERT's std 0.02 at width 64 makes [CLS] the same for every text (ITC/ITM then stay at chance);
    ``text.initializer_range`` ~ 1/sqrt(width) keeps different captions apart from the first step."""
    from blip_core import BlipConfig, BlipModel, BlipTokenizer

    texts = ["a red circle on the left", "two small blue squares at the top", "nothing but a green triangle"]
    tok = BlipTokenizer.train(texts, vocab_size=80)

    def spread(std: float) -> float:
        torch.manual_seed(0)
        config = BlipConfig.preset("tiny", text={"initializer_range": std, **tok.special_ids()})
        model = BlipModel(config, tok).eval()
        assert abs(model.text_proj.weight.std().item() - std) < 0.25 * std
        with torch.no_grad():
            feats = model.text_features(model.encode_text(texts))
        sims = feats @ feats.T
        return 1 - sims[~torch.eye(len(texts), dtype=torch.bool)].max().item()

    assert spread(0.02) < 1e-3
    assert spread(0.125) > 20 * spread(0.02)


@pytest.mark.parametrize("texts_per_image", [1, 3])
def test_unprojected_cross_attention_equals_projecting_the_context(texts_per_image):
    """``attend_unprojected`` (the grounded encoder's path when few text tokens meet many image tokens) gives the
    cross-attention of projected keys and values, padded image tokens and several texts per image included."""
    from blip_core.med import Attention, padding_mask

    torch.manual_seed(0)
    attn = Attention(width=48, heads=4, context_width=40, eps=1e-12, dropout=0.0).eval()
    _perturb(attn)
    x, context = torch.randn(2 * texts_per_image, 5, 48), torch.randn(2, 50, 40)
    image_mask = torch.ones(2, 50, dtype=torch.long)
    image_mask[1, 30:] = 0
    mask = padding_mask(image_mask, x.dtype)
    projected, _ = attn.attend(x, mask, kv=attn.context_kv(context))
    unprojected, _ = attn.attend(x, mask, kv=context)
    torch.testing.assert_close(unprojected, projected, atol=1e-5, rtol=1e-5)
    assert attn.unprojected_is_cheaper(queries=5, context_tokens=50, context_width=40)
    # where each text is long against few image tokens, projecting once is cheaper
    assert not attn.unprojected_is_cheaper(queries=64, context_tokens=5, context_width=40)


def test_grounded_encoder_takes_the_unprojected_path_for_short_texts_on_many_image_tokens(make_model, monkeypatch):
    """At the benchmark's shape (short texts, 197 image tokens) ITM never projects the image tokens, and its scores
    are those of the projected path."""
    from blip_core.med import Attention

    model = make_model().eval()
    _perturb(model)
    ids, mask = model.tokenize(["a red square", "two blue circles on the left"])
    image_embeds = torch.randn(2, 197, model.config.vision.width)
    with torch.no_grad():
        fast = model.itm_logits(image_embeds, ids, mask)
        monkeypatch.setattr(Attention, "unprojected_is_cheaper", lambda self, *a: False)
        calls = []
        monkeypatch.setattr(
            Attention, "context_kv", lambda self, c: calls.append(1) or (self.split(self.k(c)), self.split(self.v(c)))
        )
        slow = model.itm_logits(image_embeds, ids, mask)
    assert calls, "the projected path ran"
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
