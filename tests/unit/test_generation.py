"""Caption decoding: seeded sampling independent of batch composition, beam ordering, length limits counted as
the official BLIP code counts them, repetition penalty, greedy decoding against a cache-free reference, and the two
beam-search rules (today's transformers; transformers 4.15, which the official BLIP code runs on)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

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


# --- beam-search rules: today's transformers vs transformers 4.15 (the official BLIP code) -----------------------
# A decoder whose next-token distribution depends only on the last token: every score below is exact.
PAD, SEP, A, B, C, DEC, P, Q = range(8)
RULES = ("transformers", "transformers-4.15")


def _row(**p: float) -> list[float]:
    ids = dict(PAD=PAD, SEP=SEP, A=A, B=B, C=C, DEC=DEC, P=P, Q=Q)
    out = [0.0] * 8
    for name, prob in p.items():
        out[ids[name]] = prob
    assert abs(sum(out) - 1.0) < 1e-12
    return out


_FLAT = _row(A=0.2, B=0.2, C=0.2, SEP=0.2, PAD=0.1, DEC=0.05, P=0.03, Q=0.02)
_RARE = dict(PAD=0.004, DEC=0.003, P=0.002, Q=0.001)
# TABLE[last token][next token]; the prompt is [DEC] P P P, so the first caption token follows P
TABLE = torch.tensor(
    [
        _FLAT,  # after PAD (never)
        _FLAT,  # after SEP (never)
        _row(SEP=0.9, A=0.03, B=0.03, C=0.03, **_RARE),  # after A: stop
        _row(B=0.92, SEP=0.03, A=0.02, C=0.02, **_RARE),  # after B: B again
        _row(C=0.5, SEP=0.3, A=0.1, B=0.09, **_RARE),  # after C
        _FLAT,  # after DEC (never: the prompt follows it)
        _row(A=0.5, B=0.3, C=0.15, SEP=0.04, **_RARE),  # after P: the first caption token
        _FLAT,  # after Q
    ],
    dtype=torch.float64,
)
TABLE_PROMPT = torch.tensor([[DEC, P, P, P]])
TABLE_KW = dict(num_beams=2, max_length=8, min_length=0, eos_token_id=SEP, pad_token_id=PAD)
SHORT = [DEC, P, P, P, A, SEP]  # "A", stopped at [SEP]
LONG = [DEC, P, P, P, B, B, B, B]  # "B B B B", run on to max_length


class TableDecoder:
    """Stands in for the MED in ``beam_search``: its "cache" is the tokens so far, which beam search reorders as a
    real one; the logits are log TABLE[last token]."""

    def __init__(self, table: torch.Tensor = TABLE):
        self.log_table = table.log().float()
        self.cfg = SimpleNamespace(max_positions=64)

    def image_kv(self, image_embeds):
        return None

    def decode_step(self, ids, image_kv, past, context_mask):
        seen = ids if past is None else torch.cat([past[0][0], ids], dim=1)
        return self.log_table[seen[:, -1]], [(seen, seen)]


def table_beam_search(beam_rule: str, num_return_sequences: int = 1) -> list[list[int]]:
    from blip_core.generation import beam_search

    out = beam_search(
        TableDecoder(),
        torch.zeros(1, 1, 1),
        TABLE_PROMPT,
        num_return_sequences=num_return_sequences,
        beam_rule=beam_rule,
        **TABLE_KW,
    )
    return [row[: row.index(SEP) + 1] if SEP in row else row for row in out.tolist()]


def test_beam_rules_differ_on_a_constructed_case():
    """Two beams, prompt [DEC] P P P (4 tokens), max_length 8 (4 caption tokens). After P: A 0.5, B 0.3; after A:
    [SEP] 0.9; after B: B 0.92. The short caption "A [SEP]" has log-probability S = ln 0.5 + ln 0.9 = -0.799, the
    long one "B B B B", which never stops, S = ln 0.3 + 3 ln 0.92 = -1.454; both rules keep "B ..." running to
    max_length (the other finished caption, "A A [SEP]", is far worse under both).

    - today's transformers (``_update_finished_beams``: divide by the generated tokens, [SEP] included, prompt not;
      at max_length the best num_beams candidates finish the same way): short -0.799 / 2 = -0.399, long
      -1.454 / 4 = -0.363: the long caption wins.
    - transformers 4.15 (``BeamHypotheses.add``: divide by the whole sequence, [DEC] and the prompt included, [SEP]
      not; ``BeamSearchScorer.finalize`` adds the beams still running at max_length, divided by max_length):
      short -0.799 / 5 = -0.160, long -1.454 / 8 = -0.182: the short caption wins; the search (``is_done``) never
      stops before max_length (the worst finished caption, "A A [SEP]" at -4.31 / 6, stays below the best
      candidate of each step divided by its length).

    So the official code stops this caption at [SEP] where today's transformers runs on to max_length. Both outcomes
    were checked against the real code (transformers 4.15 and the installed one) on this table; tests/unit/
    test_hf_parity.py repeats it for the installed transformers."""
    assert table_beam_search("transformers") == [LONG]
    assert table_beam_search("transformers-4.15") == [SHORT]
    # both keep both captions, in opposite order
    assert table_beam_search("transformers", num_return_sequences=2) == [LONG, SHORT]
    assert table_beam_search("transformers-4.15", num_return_sequences=2) == [SHORT, LONG]
    s_short, s_long = math.log(0.5) + math.log(0.9), math.log(0.3) + 3 * math.log(0.92)
    assert s_long / 4 > s_short / 2 and s_short / 5 > s_long / 8


def _reference_beam_search_4_15(model, imgs, prompt, *, num_beams, max_length, min_length, repetition_penalty=1.0):
    """transformers 4.15's beam search written out plainly, one image at a time, rerunning the whole sequence at every
    step (no cache, no batching): the 2 * num_beams best continuations in order; one ending in [SEP] among the first
    num_beams becomes a finished caption scored sum / (its length without [SEP]) (length penalty 1); the first
    num_beams others keep running; the image is done when it has num_beams finished captions and the worst is no
    worse than the step's best continuation / the length before the step; beams running at max_length join the
    finished ones, scored sum / max_length. Returns every image's finished captions, best first."""
    eos = model.config.text.sep_token_id
    results = []
    with torch.no_grad():
        for i in range(imgs.shape[0]):
            emb = model.encode_image(imgs[i : i + 1]).expand(num_beams, -1, -1)
            beams = [prompt[0].tolist()] * num_beams
            sums = [0.0] + [-1.0e9] * (num_beams - 1)
            finished: list[tuple[float, list[int]]] = []
            done = False
            while True:
                length = len(beams[0])
                logp = F.log_softmax(model.lm_logits(emb, torch.tensor(beams))[:, -1].float(), -1)
                if length < min_length:
                    logp[:, eos] = -float("inf")
                for r, seq in enumerate(beams):
                    for t in set(seq):
                        v = logp[r, t]
                        logp[r, t] = v * repetition_penalty if v < 0 else v / repetition_penalty
                total = (logp + torch.tensor(sums)[:, None]).view(-1)
                top = total.topk(2 * num_beams)
                vocab = logp.shape[1]
                next_beams, next_sums = [], []
                for rank, (s, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    b, t = divmod(idx, vocab)
                    if t == eos:
                        if rank < num_beams:
                            finished.append((s / length, beams[b] + [eos]))
                    elif len(next_beams) < num_beams:
                        next_beams.append(beams[b] + [t])
                        next_sums.append(s)
                finished = sorted(finished, key=lambda h: -h[0])[:num_beams]
                done = len(finished) == num_beams and finished[-1][0] >= top.values[0].item() / length
                beams, sums = next_beams, next_sums
                if done or len(beams[0]) >= max_length:
                    break
            if not done:
                finished += [(s / len(seq), seq) for s, seq in zip(sums, beams)]
                finished = sorted(finished, key=lambda h: -h[0])[:num_beams]
            results.append([seq for _, seq in finished])
    return results


def _spread(m):
    """Weights further from initialisation than ``model``'s and [SEP] likely: captions of several lengths, on which
    the two rules disagree now and then."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.text.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        m.text.lm_head.decoder.bias[m.config.text.sep_token_id] += 2.5
    return m


@pytest.fixture
def spread_model(make_model):
    return _spread(make_model(seed=1))


@pytest.mark.parametrize(
    "num_beams, max_length, min_length, prompt, repetition_penalty",
    [(3, 14, 5, "a picture of ", 1.0), (3, 16, 1, "", 1.0), (2, 12, 6, "a picture of ", 1.0), (4, 10, 3, "", 1.5)],
)
def test_transformers_4_15_rule_equals_a_step_by_step_reference(
    spread_model, num_beams, max_length, min_length, prompt, repetition_penalty
):
    """The batched, cached "transformers-4.15" beam search against the plain reference above: every image's
    num_beams finished captions in order (the reference gave the tokens of transformers 4.15 running the official
    BLIP decoder, med.py, on 432 hypotheses of random models). Today's rule gives other captions here."""
    model = spread_model
    imgs, bos = images(6, seed=9), _bos(model, prompt)
    kw = dict(num_beams=num_beams, max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty)
    ref = [seq for hyps in _reference_beam_search_4_15(model, imgs, bos, **kw) for seq in hyps]
    eos, plen = model.config.text.sep_token_id, bos.shape[1]
    rows = {}
    for rule in RULES:
        got = model.generate_ids(imgs, bos, num_return_sequences=num_beams, beam_rule=rule, **kw).tolist()
        rows[rule] = [r[: r.index(eos, plen) + 1] if eos in r[plen:] else r for r in got]
    assert rows["transformers-4.15"] == ref
    assert rows["transformers"] != ref, "the test wants a case where the rules differ"
    assert any(len(seq) < max_length for seq in ref), "the test wants captions that stop at [SEP]"


def test_generate_uses_the_models_beam_rule_unless_told(make_model):
    """``config.beam_rule`` is the model's default (today's transformers unless set); ``beam_rule=`` overrides it per
    call; greedy decoding and sampling are the same under both."""
    ours, official = _spread(make_model(seed=1)), _spread(make_model(seed=1, beam_rule="transformers-4.15"))
    assert ours.config.beam_rule == "transformers" and official.config.beam_rule == "transformers-4.15"
    imgs = images(6, seed=9)
    kw = dict(num_beams=3, max_length=14, min_length=5)
    today, old = ours.generate(imgs, **kw), official.generate(imgs, **kw)
    assert today != old  # the same weights, another rule
    assert ours.generate(imgs, beam_rule="transformers-4.15", **kw) == old
    assert official.generate(imgs, beam_rule="transformers", **kw) == today
    bos = _bos(ours, "a picture of ")
    assert torch.equal(
        official.generate_ids(imgs, bos, **kw), ours.generate_ids(imgs, bos, beam_rule="transformers-4.15", **kw)
    )
    for other in (dict(num_beams=1), dict(top_p=0.9, seeds=[1, 2, 3, 4, 5, 6])):
        assert official.generate(imgs, max_length=14, min_length=5, **other) == ours.generate(
            imgs, max_length=14, min_length=5, **other
        )
    with pytest.raises(ValueError, match="beam_rule"):
        ours.generate(imgs, beam_rule="official", **kw)


def test_beam_rule_travels_with_the_checkpoint(make_model, tmp_path):
    """Saved when set, left out of config.json at its default (so checkpoints and their ids that never set it stay
    byte for byte what they were), and a config.json without it loads with today's rule."""
    from blip_core import BlipConfig, BlipModel

    make_model(seed=3).save_pretrained(tmp_path / "default")
    meta = json.loads((tmp_path / "default" / "config.json").read_text())
    assert set(meta["config"]) == set(BlipConfig.model_fields) - {"beam_rule"}  # the keys of every earlier config.json
    assert BlipModel.from_pretrained(tmp_path / "default").config.beam_rule == "transformers"

    official = make_model(seed=3, beam_rule="transformers-4.15")
    official.save_pretrained(tmp_path / "official")
    meta = json.loads((tmp_path / "official" / "config.json").read_text())
    assert meta["config"]["beam_rule"] == "transformers-4.15"
    assert BlipModel.from_pretrained(tmp_path / "official").config.beam_rule == "transformers-4.15"
    assert BlipModel.from_pretrained(tmp_path / "official", image_size=64).config.beam_rule == "transformers-4.15"
    with pytest.raises(ValueError, match="beam_rule"):
        BlipConfig.preset("tiny", beam_rule="blip")
