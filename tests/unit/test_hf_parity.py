"""Numerical parity with transformers' BLIP: a Hugging Face checkpoint imported with ``BlipModel.from_pretrained``
computes the same ITM probabilities, ITC similarities and LM logits (float32, max abs diff <= 1e-4) and decodes
the same greedy and beam-search tokens. Random, seeded weights from small configs; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from blip_checkpoints import CLS, DEC, ENC, IMAGE, PAD, SEP, VOCAB, hf_bert_tokenizer, hf_config, randomize  # noqa: E402
from transformers import (  # noqa: E402
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
)

from blip_core import BlipModel, BlipTokenizer  # noqa: E402

ATOL = 1e-4


def build(cls, tmp_path, seed: int, **config):
    torch.manual_seed(seed)
    hf = cls(hf_config(**config)).eval()
    randomize(hf, seed)
    if cls is BlipForConditionalGeneration:
        with torch.no_grad():  # make [SEP] a likely token, so beams finish at different lengths
            hf.text_decoder.cls.predictions.bias[SEP] += 1.5
    hf.save_pretrained(tmp_path)
    return hf, BlipModel.from_pretrained(tmp_path)


def texts(batch: int = 3, length: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] w1 .. wn [SEP], right-padded: row 1 is shorter than the others."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(103, DEC, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    ids[1, 5], ids[1, 6:], mask[1, 6:] = SEP, PAD, 0
    return ids, mask


def images(batch: int, seed: int = 0, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def until_eos(seqs: torch.Tensor, prompt_len: int) -> list[list[int]]:
    """Each row up to its first [SEP] after the prompt. transformers pads finished beams with [SEP] when the pad
    id is 0 (``pad_token_id or eos_token_id``), we pad with [PAD]; what comes after the first [SEP] is padding."""
    rows = []
    for row in seqs.tolist():
        end = next((i + 1 for i in range(prompt_len, len(row)) if row[i] == SEP), len(row))
        rows.append(row[:end])
    return rows


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    return build(BlipForImageTextRetrieval, tmp_path_factory.mktemp("hf_retrieval"), seed=1)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return build(BlipForConditionalGeneration, tmp_path_factory.mktemp("hf_caption"), seed=2)


def test_config_follows_the_hf_config(retrieval, captioner):
    for _, ours in (retrieval, captioner):
        v, t = ours.config.vision, ours.config.text
        assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio) == (IMAGE, 16, 48, 2, 3, 2.0)
        assert v.layer_norm_eps == 1e-5  # transformers' BlipVisionConfig default, not the official 1e-6
        assert (t.vocab_size, t.width, t.depth, t.heads, t.intermediate_size, t.max_positions) == (
            VOCAB,
            32,
            2,
            2,
            64,
            40,
        )
        assert t.layer_norm_eps == 1e-12
        assert (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.bos_token_id, t.enc_token_id) == (
            PAD,
            CLS,
            SEP,
            DEC,
            ENC,
        )
        assert t.tie_word_embeddings and ours.config.sharing == "all_but_sa" and ours.config.embed_dim == 16
        assert ours.config.beam_rule == "transformers"  # today's beam search, which the tests below compare
        assert not ours.training


def test_itm_probabilities_match(retrieval):
    hf, ours = retrieval
    ids, mask = texts()
    pixels = images(3)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC  # the image-grounded encoder reads [ENC], as in the paper; ours substitutes it itself
    with torch.no_grad():
        theirs = hf(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask).itm_score.softmax(-1)
        mine = ours.itm_logits(ours.encode_image(pixels), ids, mask).softmax(-1)
    assert (theirs - mine).abs().max() <= ATOL
    assert theirs[:, 1].std() > 0.01  # the probabilities differ between pairs: the comparison means something


def test_itc_similarities_match(retrieval):
    hf, ours = retrieval
    ids, mask = texts(seed=1)
    pixels = images(4, seed=1)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        mine = ours.image_features(ours.encode_image(pixels)) @ ours.text_features(ours.encode_text_ids(ids, mask)).t()
    assert mine.shape == theirs.shape == (4, 3)
    assert (theirs - mine).abs().max() <= ATOL


def test_lm_logits_match(captioner):
    hf, ours = captioner
    ids, mask = texts(seed=2)
    ids[:, 0] = DEC
    pixels = images(3, seed=2)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        mine = ours.lm_logits(ours.encode_image(pixels), ids, mask)
    assert mine.shape == theirs.shape == (3, ids.shape[1], VOCAB)
    assert (theirs - mine).abs().max() <= ATOL


@pytest.mark.parametrize(
    "num_beams, num_return_sequences, repetition_penalty",
    [(1, 1, 1.0), (3, 1, 1.0), (3, 2, 1.0), (4, 1, 1.3)],
)
def test_generation_matches(captioner, num_beams, num_return_sequences, repetition_penalty):
    hf, ours = captioner
    pixels = images(6, seed=3)
    # transformers' BLIP generate sets the first prompt token to [DEC] and drops the trailing [SEP] itself;
    # we are handed the effective prompt directly.
    hf_prompt = torch.tensor([[CLS, 110, 111, 112, SEP]])
    prompt = torch.tensor([[DEC, 110, 111, 112]])
    kwargs = dict(
        num_beams=num_beams,
        max_length=14,
        min_length=7,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
    )
    theirs = hf.generate(pixel_values=pixels, input_ids=hf_prompt.repeat(6, 1), **kwargs)
    mine = ours.generate_ids(pixels, prompt, **kwargs)
    assert until_eos(mine, 4) == until_eos(theirs, 4)
    lengths = [len(r) for r in until_eos(mine, 4)]
    assert min(lengths) >= 7 and max(lengths) <= 14
    assert min(lengths) < 14  # some captions stopped at [SEP]: the finished-hypothesis logic was exercised


def test_the_official_beam_rule_is_not_todays(captioner):
    """The rule of an official .pth import (transformers 4.15's, which the official code pins) on the same weights:
    today's rule keeps matching transformers' generate, the official one stops some captions earlier at [SEP]."""
    hf, ours = captioner
    pixels = images(6, seed=3)
    kwargs = dict(num_beams=3, max_length=20, min_length=5)
    theirs = until_eos(
        hf.generate(pixel_values=pixels, input_ids=torch.tensor([[CLS, 110, 111, 112, SEP]] * 6), **kwargs), 4
    )
    prompt = torch.tensor([[DEC, 110, 111, 112]])
    assert until_eos(ours.generate_ids(pixels, prompt, beam_rule="transformers", **kwargs), 4) == theirs
    official = until_eos(ours.generate_ids(pixels, prompt, beam_rule="transformers-4.15", **kwargs), 4)
    differ = [i for i in range(6) if official[i] != theirs[i]]
    assert differ and all(len(official[i]) < len(theirs[i]) for i in differ), (official, theirs)


def test_constructed_beam_case_matches_transformers_generate():
    """tests/unit/test_generation.py's constructed case (a decoder whose next token depends on the last one only):
    transformers' own beam search returns what our "transformers" rule returns, not what the 4.15 rule does."""
    import test_generation as case
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class TableLM(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids=None, **kwargs):
            return CausalLMOutput(logits=case.TABLE.log().float()[input_ids])

        def prepare_inputs_for_generation(self, input_ids, **kwargs):
            return {"input_ids": input_ids}

    lm = TableLM(PretrainedConfig(vocab_size=8, pad_token_id=case.PAD, eos_token_id=case.SEP)).eval()
    for k in (1, 2):
        theirs = lm.generate(
            input_ids=case.TABLE_PROMPT, num_return_sequences=k, use_cache=False, do_sample=False, **case.TABLE_KW
        )
        rows = [r[: r.index(case.SEP) + 1] if case.SEP in r else r for r in theirs.tolist()]
        assert rows == case.table_beam_search("transformers", num_return_sequences=k)
        assert rows != case.table_beam_search("transformers-4.15", num_return_sequences=k)
    assert rows == [case.LONG, case.SHORT]


def test_untied_lm_head(tmp_path):
    hf, ours = build(BlipForConditionalGeneration, tmp_path, seed=4, tie=False)
    assert not ours.config.text.tie_word_embeddings
    assert not torch.equal(ours.text.lm_head.decoder.weight, ours.text.decoder_embeddings.word.weight)
    ids, mask = texts(seed=4)
    ids[:, 0] = DEC
    pixels = images(3, seed=4)
    with torch.no_grad():
        theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        mine = ours.lm_logits(ours.encode_image(pixels), ids, mask)
    assert (theirs - mine).abs().max() <= ATOL


@pytest.fixture(scope="module")
def bert_tokenizer_hf():
    return hf_bert_tokenizer()


def test_real_bert_tokenizer_end_to_end(tmp_path, bert_tokenizer_hf):
    """A checkpoint with the real vocabulary and its tokenizer files: ids, captions and ITM agree with transformers."""
    hf_tok = bert_tokenizer_hf
    hf_cap, cap = None, None
    for cls, sub in ((BlipForConditionalGeneration, "caption"), (BlipForImageTextRetrieval, "retrieval")):
        torch.manual_seed(5)
        hf = cls(hf_config(vocab_size=30524, bos=30522)).eval()
        randomize(hf, 5)
        hf.save_pretrained(tmp_path / sub)
        hf_tok.save_pretrained(tmp_path / sub)
        ours = BlipModel.from_pretrained(tmp_path / sub)
        assert isinstance(ours.tokenizer, BlipTokenizer)
        t = ours.config.text
        assert (t.cls_token_id, t.sep_token_id, t.bos_token_id, t.enc_token_id) == (101, 102, 30522, 30523)
        if cls is BlipForConditionalGeneration:
            hf_cap, cap = hf, ours
        else:
            hf_ret, ret = hf, ours

    pixels = images(3, seed=5)
    prompt = "a picture of "
    hf_prompt = hf_tok([prompt] * 3, return_tensors="pt").input_ids
    ours_prompt, _ = cap.tokenizer([prompt], add_sep=False)
    ours_prompt[:, 0] = 30522
    effective = hf_prompt[:1, :-1].clone()
    effective[:, 0] = 30522
    assert torch.equal(ours_prompt, effective)
    plen = ours_prompt.shape[1]
    kwargs = dict(num_beams=3, max_length=12, min_length=6)
    theirs = hf_cap.generate(pixel_values=pixels, input_ids=hf_prompt.clone(), **kwargs)
    mine = cap.generate_ids(pixels, ours_prompt, **kwargs)
    assert until_eos(mine, plen) == until_eos(theirs, plen)
    captions = cap.generate(pixels, prompt=prompt, **kwargs)
    assert captions == [c.strip() for c in hf_tok.batch_decode(theirs[:, plen:], skip_special_tokens=True)]

    sentences = ["a dog running on the beach", "two red squares", "an empty street at night"]
    enc = hf_tok(sentences, padding=True, return_tensors="pt")
    assert torch.equal(ret.tokenize(sentences)[0], enc.input_ids)
    enc_ids = enc.input_ids.clone()
    enc_ids[:, 0] = 30523
    with torch.no_grad():
        theirs = hf_ret(input_ids=enc_ids, pixel_values=pixels, attention_mask=enc.attention_mask).itm_score.softmax(
            -1
        )[:, 1]
    assert (ret.itm_score(pixels, sentences) - theirs).abs().max() <= ATOL


def test_position_interpolation_matches_hf(retrieval, tmp_path):
    """``from_pretrained(..., image_size=96)`` resamples the position table as transformers'
    ``interpolate_pos_encoding`` (and the official ``interpolate_pos_embed``) do: plain bicubic."""
    hf, _ = retrieval
    hf.save_pretrained(tmp_path)
    big = BlipModel.from_pretrained(tmp_path, image_size=96)
    pixels = images(2, seed=6, size=96)
    ids, mask = texts(batch=2, seed=6)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC
    with torch.no_grad():
        theirs = hf.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        mine = big.encode_image(pixels)
        itm_theirs = hf(
            input_ids=enc_ids, pixel_values=pixels, attention_mask=mask, interpolate_pos_encoding=True
        ).itm_score
        itm_mine = big.itm_logits(mine, ids, mask)
    assert mine.shape == theirs.shape == (2, 1 + 36, 48)
    assert (theirs - mine).abs().max() <= ATOL
    assert (itm_theirs.softmax(-1) - itm_mine.softmax(-1)).abs().max() <= ATOL
