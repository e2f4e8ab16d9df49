"""Caption decoding: seeded sampling independent of batch composition, beam ordering, length limits counted as
the official BLIP code counts them, repetition penalty, and greedy decoding against a cache-free reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blip_helpers import images, make_model, tokenizer  # noqa: F401  (fixtures)

SEEDS = [11, 12, 13, 14, 15]


@pytest.fixture
def model(make_model):
    """A tiny model with some structure: random weights, EOS moderately likely, so lengths vary."""
    m = make_model(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.text.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.text.lm_head.decoder.bias[m.config.text.sep_token_id] += 2.5
    return m


def _bias(model, **token_bias: float) -> None:
    with torch.no_grad():
        for token, bias in token_bias.items():
            tid = model.config.text.sep_token_id if token == "EOS" else model.tokenizer.token_id(token)
            model.text.lm_head.decoder.bias[tid] += bias


def _bos(model, prompt: str = "") -> torch.Tensor:
    ids, _ = model.tokenizer([prompt], add_sep=False)
    ids[:, 0] = model.config.text.bos_token_id
    return ids


# --- sampling ------------------------------------------------------------------------------------------
def test_sampled_captions_do_not_depend_on_the_batch(model):
    imgs = images(5, seed=4)
    kw = dict(top_p=0.9, max_length=14, min_length=6)
    whole = model.generate(imgs, seeds=SEEDS, **kw)
    assert len(set(whole)) == 5, whole  # a random model samples different captions for different seeds
    alone = [model.generate(imgs[i : i + 1], seeds=[SEEDS[i]], **kw)[0] for i in range(5)]
    assert alone == whole
    perm = [3, 0, 4, 2, 1]
    shuffled = model.generate(imgs[perm], seeds=[SEEDS[i] for i in perm], **kw)
    assert shuffled == [whole[i] for i in perm]
    assert model.generate(imgs, seeds=SEEDS, **kw) == whole  # reruns too
    assert model.generate(imgs, seeds=[s + 100 for s in SEEDS], **kw) != whole  # the seed matters

    # several samples per image: a list per image, the first one is the single sample, all stable the same way
    multi = model.generate(imgs, seeds=SEEDS, num_return_sequences=3, **kw)
    assert [len(x) for x in multi] == [3] * 5
    assert [x[0] for x in multi] == whole
    assert all(len(set(x)) > 1 for x in multi), multi
    assert [
        model.generate(imgs[i : i + 1], seeds=[SEEDS[i]], num_return_sequences=3, **kw)[0] for i in range(5)
    ] == multi
    assert model.generate(imgs[perm], seeds=[SEEDS[i] for i in perm], num_return_sequences=3, **kw) == [
        multi[i] for i in perm
    ]


def test_sampling_needs_one_seed_per_image(model):
    with pytest.raises(ValueError, match="one seed per image"):
        model.generate(images(3), top_p=0.9, seeds=[1, 2])


def test_top_p_limits_the_nucleus(model):
    """With top_p tiny only the most likely token survives: sampling becomes greedy decoding."""
    imgs = images(3, seed=8)
    greedy = model.generate(imgs, num_beams=1, max_length=12, min_length=5)
    assert model.generate(imgs, top_p=1e-6, seeds=[1, 2, 3], max_length=12, min_length=5) == greedy


# --- beam search ------------------------------------------------------------------------------------------
def _sequence_scores(model, imgs, seqs, k, plen, eos):
    """Length-normalised log-likelihood of each returned sequence, by a full (cache-free) decoder pass."""
    with torch.no_grad():
        emb = model.encode_image(imgs).repeat_interleave(k, 0)
        logp = F.log_softmax(model.lm_logits(emb, seqs), -1)
    scores = []
    for r, seq in enumerate(seqs.tolist()):
        end = seq.index(eos, plen) + 1 if eos in seq[plen:] else len(seq)
        total = sum(logp[r, t - 1, seq[t]].item() for t in range(plen, end))
        scores.append(total / (end - plen))
    return torch.tensor(scores).view(-1, k)


def test_beam_search_returns_num_return_sequences_best_first(model):
    imgs = images(3, seed=5)
    bos = _bos(model)
    eos = model.config.text.sep_token_id
    seqs = model.generate_ids(imgs, bos, num_beams=4, num_return_sequences=4, max_length=10, min_length=1)
    assert seqs.shape[0] == 12 and seqs.shape[1] <= 10
    scores = _sequence_scores(model, imgs, seqs, 4, 1, eos)
    assert (scores[:, :-1] >= scores[:, 1:] - 1e-5).all(), scores
    for i in range(3):
        rows = [tuple(r) for r in seqs[4 * i : 4 * i + 4].tolist()]
        assert len(set(rows)) == 4  # four different hypotheses
    lengths = [(s == eos).nonzero()[0].item() + 1 if (s == eos).any() else len(s) for s in seqs]
    assert len(set(lengths)) > 1, "the test wants hypotheses of several lengths"
    # the best of four is the single answer, and every image gets the same answer whatever its batch
    best = model.generate_ids(imgs, bos, num_beams=4, max_length=10, min_length=1)
    top = seqs.view(3, 4, -1)[:, 0]
    assert torch.equal(best, top[:, : best.shape[1]]) and (top[:, best.shape[1] :] == 0).all()
    texts = model.generate(imgs, num_beams=4, num_return_sequences=4, max_length=10, min_length=1, prompt="")
    assert [len(t) for t in texts] == [4, 4, 4]
    assert [t[0] for t in texts] == model.generate(imgs, num_beams=4, max_length=10, min_length=1, prompt="")
    assert [
        model.generate(imgs[i : i + 1], num_beams=4, num_return_sequences=4, max_length=10, min_length=1, prompt="")[0]
        for i in range(3)
    ] == texts


def test_beam_search_rejects_more_sequences_than_beams(model):
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(images(1), num_beams=2, num_return_sequences=3)


# --- lengths ---------------------------------------------------------------------------------------------
DECODERS = {
    "greedy": dict(num_beams=1),
    "beam": dict(num_beams=3),
    "sample": dict(top_p=0.9, seeds=[1, 2]),
}


@pytest.mark.parametrize("decoder", DECODERS)
def test_min_length_counts_dec_and_prompt(model, decoder):
    _bias(model, EOS=100.0, red=50.0)  # EOS as soon as allowed, else "red"
    imgs = images(2)
    kw = DECODERS[decoder]
    prompt = "a picture of "
    plen = _bos(model, prompt).shape[1]
    assert plen == 4  # [DEC] a picture of
    for min_length in (0, 4, 5, 9):
        ids = model.generate_ids(imgs, _bos(model, prompt), min_length=min_length, max_length=20, **kw)
        eos_at = [row.tolist().index(model.config.text.sep_token_id) for row in ids]
        assert eos_at == [max(min_length, plen)] * 2, (min_length, ids)
        texts = model.generate(imgs, min_length=min_length, max_length=20, prompt=prompt, **kw)
        assert texts == [" ".join(["red"] * max(0, min_length - plen))] * 2


@pytest.mark.parametrize("decoder", DECODERS)
def test_max_length_counts_dec_and_prompt(model, decoder):
    _bias(model, EOS=-100.0, red=50.0)  # never stops on its own
    imgs = images(2)
    kw = DECODERS[decoder]
    for prompt, max_length in (("", 6), ("a picture of ", 6), ("a picture of ", 12)):
        plen = _bos(model, prompt).shape[1]
        ids = model.generate_ids(imgs, _bos(model, prompt), min_length=0, max_length=max_length, **kw)
        assert ids.shape == (2, max_length)
        assert torch.equal(ids[:, :plen], _bos(model, prompt).expand(2, -1))
        texts = model.generate(imgs, min_length=0, max_length=max_length, prompt=prompt, **kw)
        assert texts == [" ".join(["red"] * (max_length - plen))] * 2
    with pytest.raises(ValueError, match="max_length"):
        model.generate(imgs, max_length=4, prompt="a picture of ", **kw)


def test_default_lengths_are_the_official_ones(model):
    _bias(model, EOS=100.0, red=50.0)
    caption = model.generate(images(1))[0]  # beam 3, min_length 10 with "[DEC] a picture of" counted
    assert caption == " ".join(["red"] * 6)
    _bias(model, EOS=-200.0)
    assert model.generate(images(1))[0] == " ".join(["red"] * 26)  # max_length 30


# --- repetition penalty ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", DECODERS)
def test_repetition_penalty_changes_the_output(model, decoder):
    _bias(model, EOS=-100.0, circle=8.0, square=7.0)
    imgs, bos = images(2), _bos(model)
    circle, square = model.tokenizer.token_id("circle"), model.tokenizer.token_id("square")
    kw = dict(DECODERS[decoder], max_length=8, min_length=0)
    plain = model.generate_ids(imgs, bos, **kw)[:, 1:]
    # beam search penalises log-probabilities (as transformers does): p(circle) = 0.7 needs a strong penalty
    penalised = model.generate_ids(imgs, bos, repetition_penalty=10.0, **kw)[:, 1:]
    assert not torch.equal(plain, penalised)
    assert model.generate(imgs, prompt="", **kw) != model.generate(imgs, prompt="", repetition_penalty=10.0, **kw)
    if decoder == "sample":
        return
    assert (plain == circle).all()
    assert (penalised == square).any(1).all() and ((penalised == circle).sum(1) < 7).all()
    if decoder == "greedy":  # circle's logit 8 / 10 after one use loses to square's 7
        assert (penalised[:, 0] == circle).all() and (penalised[:, 1] == square).all()


# --- greedy ---------------------------------------------------------------------------------------------
def _reference_greedy(model, imgs, bos, max_length, min_length):
    """Argmax decoding that reruns the whole sequence every step: no cache, no folding, no batching tricks."""
    eos, pad = model.config.text.sep_token_id, model.config.text.pad_token_id
    rows = []
    with torch.no_grad():
        for i in range(imgs.shape[0]):
            emb = model.encode_image(imgs[i : i + 1])
            seq = bos.clone()
            while seq.shape[1] < max_length:
                logits = model.lm_logits(emb, seq)[0, -1]
                if seq.shape[1] < min_length:
                    logits[eos] = -float("inf")
                seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
                if seq[0, -1] == eos:
                    break
            rows.append(seq[0])
    width = max(len(r) for r in rows)
    return torch.stack([F.pad(r, (0, width - len(r)), value=pad) for r in rows])


def test_greedy_equals_beam_search_with_one_beam_and_the_reference(model):
    imgs = images(4, seed=6)
    for prompt in ("", "a picture of "):
        bos = _bos(model, prompt)
        ref = _reference_greedy(model, imgs, bos, max_length=12, min_length=6)
        assert (ref == model.config.text.sep_token_id).any(), "the test wants some captions to stop early"
        got = model.generate_ids(imgs, bos, num_beams=1, max_length=12, min_length=6)
        assert torch.equal(got[:, : ref.shape[1]], ref) and (got[:, ref.shape[1] :] == 0).all()
        texts = model.generate(imgs, num_beams=1, max_length=12, min_length=6, prompt=prompt)
        assert texts == [t.strip() for t in model.tokenizer.decode_batch(ref[:, bos.shape[1] :].tolist())]


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 30.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 1.0])
def test_nucleus_threshold_keeps_the_same_set_as_a_full_sort(scale, top_p):
    """The head and binned paths give the smallest top set reaching top_p, as a full sort does (flat to peaked
    rows mixed in one batch)."""
    from blip_core.generation import _threshold_from_descending, nucleus_threshold

    g = torch.Generator().manual_seed(int(scale * 10) + int(top_p * 100))
    logits = torch.randn(16, 5000, generator=g) * scale
    logits[:4] += torch.rand(4, 1, generator=g) * 20  # a few rows dominated by one token
    ordered = logits.sort(-1, descending=True).values
    probs = torch.softmax(ordered.double(), -1)
    ref = _threshold_from_descending(ordered, probs, top_p, 0) if top_p < 1 else ordered[:, -1:]  # 1.0: every token
    got = nucleus_threshold(logits, top_p, bins=256)
    assert torch.equal(logits >= got, logits >= ref)
    kept = (logits >= got).double() * torch.softmax(logits.double(), -1)
    assert bool((kept.sum(-1) >= top_p - 1e-9).all())
