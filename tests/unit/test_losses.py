"""BLIP's pre-training objectives: queues, momentum encoders, ITC targets, hard negatives, LM loss, temperature,
the distillation ramp and where each objective's gradient goes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blip_helpers import images, make_model, tokenizer  # noqa: F401  (fixtures)

from blip_core import BlipLosses, alpha_at
from blip_core.losses import itc_loss, lm_loss, sample_hard_negatives

TEXTS = [
    "a red square on the left",
    "a blue circle on the right",
    "a green triangle on the top",
    "a yellow square on the bottom",
    "a red circle on the top",
    "two cats sleeping on a mat",
]


def _batch(model, n: int, seed: int = 0):
    ids, mask = model.tokenize(TEXTS[:n])
    return images(n, seed=seed), ids, mask


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# --- queues ------------------------------------------------------------------------------------------
def test_queue_wraps_around_when_size_is_not_a_multiple_of_the_batch(make_model):
    losses = BlipLosses(make_model(queue_size=12))
    d = losses.model.config.embed_dim
    batches = [(_unit(5, d, s), _unit(5, d, 100 + s), torch.arange(5) + 10 * s) for s in range(3)]
    for k, (img, txt, idx) in enumerate(batches):
        losses.enqueue(img, txt, idx)
        assert int(losses.queue_ptr) == (5 * (k + 1)) % 12
    # third batch went to slots 10, 11, 0, 1, 2; the second one still fills 5..9, the first survives in 3, 4
    slots = [10, 11, 0, 1, 2]
    img, txt, idx = batches[2]
    assert torch.equal(losses.image_queue[slots], img)
    assert torch.equal(losses.text_queue[slots], txt)
    assert torch.equal(losses.idx_queue[slots], idx)
    assert torch.equal(losses.idx_queue[5:10], batches[1][2])
    assert torch.equal(losses.idx_queue[3:5], batches[0][2][3:])
    assert torch.equal(losses.image_queue[3:5], batches[0][0][3:])


def test_enqueue_more_than_the_queue_holds_keeps_the_newest(make_model):
    losses = BlipLosses(make_model(queue_size=12))
    d = losses.model.config.embed_dim
    losses.enqueue(_unit(7, d, 0), _unit(7, d, 1), torch.arange(7))
    assert int(losses.queue_ptr) == 7
    img, txt, idx = _unit(30, d, 2), _unit(30, d, 3), torch.arange(100, 130)
    losses.enqueue(img, txt, idx)
    # the last 12 rows, in order, starting at the pointer; the pointer ends where it started (7 + 12 = 7 mod 12)
    order = [(7 + i) % 12 for i in range(12)]
    assert int(losses.queue_ptr) == 7
    assert torch.equal(losses.idx_queue[order], idx[-12:])
    assert torch.equal(losses.image_queue[order], img[-12:])
    assert torch.equal(losses.text_queue[order], txt[-12:])


def test_queue_starts_empty_of_ids_and_normalised(make_model):
    losses = BlipLosses(make_model(queue_size=12))
    assert losses.idx_queue.eq(-100).all()
    torch.testing.assert_close(losses.image_queue.norm(dim=1), torch.ones(12))
    torch.testing.assert_close(losses.text_queue.norm(dim=1), torch.ones(12))


def test_forward_enqueues_momentum_features_and_ids(make_model):
    losses = BlipLosses(make_model(queue_size=12)).train()
    imgs, ids, mask = _batch(losses.model, 5)
    out = losses(imgs, ids, mask, image_ids=torch.tensor([4, 4, 9, 1, 2]), objectives=("itc",))
    assert set(out) == {"itc"}
    assert int(losses.queue_ptr) == 5
    assert losses.idx_queue[:5].tolist() == [4, 4, 9, 1, 2] and losses.idx_queue[5:].eq(-100).all()
    img_m, txt_m = losses._momentum_features(imgs, ids, mask)  # the momentum model after this step's update
    torch.testing.assert_close(losses.image_queue[:5], img_m)
    torch.testing.assert_close(losses.text_queue[:5], txt_m)
    # without image ids every sample is its own image, with ids that never repeat across steps
    losses(imgs, ids, mask, objectives=("itc",))
    losses(imgs, ids, mask, objectives=("itc",))
    assert losses.idx_queue[5:10].tolist() == [0, 1, 2, 3, 4]
    assert losses.idx_queue[[10, 11, 0, 1, 2]].tolist() == [5, 6, 7, 8, 9]
    assert int(losses.queue_ptr) == 3


def test_zero_size_queue_works(make_model):
    losses = BlipLosses(make_model(queue_size=0)).train()
    imgs, ids, mask = _batch(losses.model, 3)
    out = losses(imgs, ids, mask)
    assert all(torch.isfinite(v) for v in out.values())
    assert losses.image_queue.shape[0] == 0


# --- momentum encoders --------------------------------------------------------------------------------
MOMENTUM_OF = {  # momentum module -> the online module it shadows
    "vision_m": "model.vision",
    "vision_proj_m": "model.vision_proj",
    "text_embeddings_m": "model.text.embeddings",
    "text_encoder_m": "model.text.encoder",
    "text_proj_m": "model.text_proj",
}


def _momentum_pairs(losses: BlipLosses) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    online = dict(losses.named_parameters(remove_duplicate=False))
    pairs = []
    for name, p in losses.named_parameters():
        head, _, rest = name.partition(".")
        if head in MOMENTUM_OF:
            pairs.append((name, p, online[f"{MOMENTUM_OF[head]}.{rest}"]))
    return pairs


@pytest.mark.parametrize("sharing", ["all_but_sa", "all"])
def test_momentum_covers_exactly_the_unimodal_pathway(make_model, sharing):
    losses = BlipLosses(make_model(sharing=sharing))
    pairs = _momentum_pairs(losses)
    shadowed = {id(online) for _, _, online in pairs}
    model_params = dict(losses.model.named_parameters())
    for name, p in model_params.items():
        unimodal = name.startswith(("vision.", "vision_proj.", "text.embeddings.", "text_proj.")) or (
            name.startswith("text.encoder.") and (".self_attn." in name or ".ffn." in name)
        )
        assert (id(p) in shadowed) == unimodal, name
    assert not any("cross_attn" in n or "decoder" in n or "itm_head" in n or "lm_head" in n for n, _, _ in pairs)
    for name, shadow, online in pairs:
        assert not shadow.requires_grad, name
        assert shadow is not online and torch.equal(shadow, online), name  # a copy, equal at the start
    # every momentum parameter is paired (none is left without an online counterpart)
    momentum_params = [n for n, _ in losses.named_parameters() if n.partition(".")[0] in MOMENTUM_OF]
    assert len(momentum_params) == len(pairs)


def test_momentum_update_is_an_exact_moving_average(make_model):
    m = 0.75
    losses = BlipLosses(make_model(momentum=m))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in losses.model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    pairs = _momentum_pairs(losses)
    before_shadow = [s.clone() for _, s, _ in pairs]
    before_online = {n: p.clone() for n, p in losses.model.named_parameters()}
    losses.momentum_update()
    for (name, shadow, online), old in zip(pairs, before_shadow):
        torch.testing.assert_close(shadow, m * old + (1 - m) * online, rtol=1e-6, atol=1e-7, msg=name)
    for n, p in losses.model.named_parameters():
        assert torch.equal(p, before_online[n]), f"the online model must not move: {n}"
    # the ITC forward makes exactly one update before computing the momentum features
    before_shadow = [s.clone() for _, s, _ in pairs]
    imgs, ids, mask = _batch(losses.model, 2)
    losses.train()(imgs, ids, mask, objectives=("itc",))
    for (name, shadow, online), old in zip(pairs, before_shadow):
        torch.testing.assert_close(shadow, m * old + (1 - m) * online, rtol=1e-6, atol=1e-7, msg=name)


def test_momentum_features_ignore_cross_attention(make_model):
    losses = BlipLosses(make_model())
    imgs, ids, mask = _batch(losses.model, 3)
    before = losses._momentum_features(imgs, ids, mask)
    with torch.no_grad():
        for layer in losses.model.text.encoder:
            for p in layer.cross_attn.parameters():
                p.normal_()
    losses.momentum_update()
    after = losses._momentum_features(imgs, ids, mask)
    torch.testing.assert_close(after, before)


# --- ITC --------------------------------------------------------------------------------------------
def test_itc_targets_every_caption_of_the_image_including_the_queue():
    d = 8
    img, txt = _unit(3, d, 0), _unit(3, d, 1)
    img_all, txt_all = _unit(7, d, 2), _unit(7, d, 3)  # 3 batch columns + 4 queue columns
    idx = torch.tensor([5, 5, 8])
    idx_all = torch.tensor([5, 5, 8, 5, -100, 8, 2])
    temp = torch.tensor(0.1)
    targets = torch.tensor(
        [
            [1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0],
            [1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0],
            [0, 0, 1 / 2, 0, 0, 1 / 2, 0],
        ]
    )
    expect_i2t = -(F.log_softmax(img @ txt_all.t() / temp, 1) * targets).sum(1).mean()
    expect_t2i = -(F.log_softmax(txt @ img_all.t() / temp, 1) * targets).sum(1).mean()
    got = itc_loss(img, txt, img_all, txt_all, img_all[:3], txt_all[:3], idx, idx_all, temp, alpha=0.0)
    torch.testing.assert_close(got, (expect_i2t + expect_t2i) / 2)

    # momentum distillation mixes the momentum model's softmax in: the loss is linear in alpha
    def at(a):
        return itc_loss(img, txt, img_all, txt_all, img_all[:3], txt_all[:3], idx, idx_all, temp, alpha=a)

    soft_i2t = F.softmax(img_all[:3] @ txt_all.t() / temp, 1)
    soft_t2i = F.softmax(txt_all[:3] @ img_all.t() / temp, 1)
    expect_soft = (
        -(F.log_softmax(img @ txt_all.t() / temp, 1) * soft_i2t).sum(1).mean()
        - (F.log_softmax(txt @ img_all.t() / temp, 1) * soft_t2i).sum(1).mean()
    ) / 2
    torch.testing.assert_close(at(1.0), expect_soft)
    torch.testing.assert_close(at(0.4), 0.6 * at(0.0) + 0.4 * at(1.0))


def test_itc_forward_uses_queue_ids_as_positives(make_model):
    losses = BlipLosses(make_model(queue_size=12)).train()
    model = losses.model
    imgs, ids, mask = _batch(model, 4)
    image_ids = torch.tensor([3, 3, 7, 9])
    with torch.no_grad():
        losses.idx_queue.copy_(torch.tensor([3, -100, 7, 3, 11, 12, 13, 9, 14, 15, 16, 17]))
        losses.queue_ptr.fill_(0)
    queue_img, queue_txt, queue_idx = losses.image_queue.clone(), losses.text_queue.clone(), losses.idx_queue.clone()
    got = losses(imgs, ids, mask, image_ids=image_ids, alpha=0.0, objectives=("itc",))["itc"]
    # the batch's momentum features are now in queue slots 0..3
    img_m_all = torch.cat([losses.image_queue[:4], queue_img])
    txt_m_all = torch.cat([losses.text_queue[:4], queue_txt])
    idx_all = torch.cat([image_ids, queue_idx])
    with torch.no_grad():
        img_f = model.image_features(model.encode_image(imgs))
        txt_f = model.text_features(model.encode_text_ids(ids, mask))
    pos = torch.zeros(4, 16)
    for i, a in enumerate(image_ids.tolist()):
        for j, b in enumerate(idx_all.tolist()):
            pos[i, j] = float(a == b)
    assert pos.sum(1).tolist() == [4, 4, 2, 2]  # e.g. image 3: two batch captions + two queued ones
    targets = pos / pos.sum(1, keepdim=True)
    temp = model.temp.detach()
    expect = (
        -(F.log_softmax(img_f @ txt_m_all.t() / temp, 1) * targets).sum(1).mean()
        - (F.log_softmax(txt_f @ img_m_all.t() / temp, 1) * targets).sum(1).mean()
    ) / 2
    torch.testing.assert_close(got.detach(), expect, rtol=1e-5, atol=1e-5)


# --- ITM hard negatives ---------------------------------------------------------------------------------
def test_hard_negatives_never_pick_a_positive():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(2, 9, (1,), generator=g))
        ids = torch.randint(0, max(1, n // 2), (n,), generator=g)  # several samples per image
        positive = ids[:, None] == ids[None, :]
        sim = torch.randn(n, n, generator=g) * 5
        sim = sim + positive.float() * 50  # positives are by far the most similar: the tempting wrong answer
        torch.manual_seed(trial)
        pick, valid = sample_hard_negatives(sim, positive)
        assert torch.equal(valid, (~positive).any(1))
        rows = valid.nonzero().squeeze(1)
        assert not positive[rows, pick[rows]].any(), (ids, pick)


def test_hard_negatives_follow_similarity():
    sim = torch.tensor([[9.0, 2.0, 1.0, 0.0]])
    positive = torch.tensor([[True, False, False, False]])
    torch.manual_seed(0)
    counts = torch.bincount(
        torch.stack([sample_hard_negatives(sim, positive)[0] for _ in range(400)]).squeeze(1), minlength=4
    )
    assert counts[0] == 0 and counts[1] > counts[2] > counts[3] > 0  # expected about 266, 98, 36


def test_hard_negatives_when_every_sample_shares_one_image():
    positive = torch.ones(4, 4, dtype=torch.bool)
    _, valid = sample_hard_negatives(torch.randn(4, 4), positive)
    assert not valid.any()


def _spy_itm(model):
    calls = []
    real = model.itm_logits

    def spy(image_embeds, input_ids, attention_mask=None):
        calls.append((image_embeds.detach().clone(), input_ids.clone()))
        return real(image_embeds, input_ids, attention_mask)

    model.itm_logits = spy
    return calls


@pytest.mark.parametrize("image_ids", [[0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 2], [2, 2, 2, 2, 2, 3], [7, 7, 7, 7, 7, 7]])
def test_itm_pairs_negatives_only_across_image_ids(make_model, image_ids):
    losses = BlipLosses(make_model()).train()
    model = losses.model
    imgs, ids, mask = _batch(model, 6)
    image_ids = torch.tensor(image_ids)
    with torch.no_grad():
        embeds = model.encode_image(imgs)
    for trial in range(10):
        calls = _spy_itm(model)
        torch.manual_seed(trial)
        out = losses(imgs, ids, mask, image_ids=image_ids, objectives=("itm",))
        assert set(out) == {"itm"} and torch.isfinite(out["itm"])
        ((pair_imgs, pair_ids),) = calls
        img_of = [int((embeds - e).abs().amax(dim=(1, 2)).argmin()) for e in pair_imgs]
        txt_of = [int((ids == t).all(1).float().argmax()) for t in pair_ids]
        assert img_of[:6] == list(range(6)) and txt_of[:6] == list(range(6))  # the positives first
        has_negative = [(image_ids != image_ids[i]).any().item() for i in range(6)]
        assert len(img_of) == 6 + 2 * sum(has_negative)  # one negative image per text, one negative text per image
        for i, t in zip(img_of[6:], txt_of[6:]):
            assert image_ids[i] != image_ids[t], (image_ids.tolist(), i, t)
        del model.itm_logits


def test_itm_uniform_negatives_ignore_similarity(make_model, monkeypatch):
    import blip_core.losses as losses_module

    seen, real = [], losses_module.sample_hard_negatives

    def spy(sim, positive):
        seen.append(sim.clone())
        return real(sim, positive)

    monkeypatch.setattr(losses_module, "sample_hard_negatives", spy)
    for mode in ("hard", "uniform"):
        seen.clear()
        losses = BlipLosses(make_model(itm_negatives=mode)).train()
        imgs, ids, mask = _batch(losses.model, 6)
        out = losses(imgs, ids, mask, image_ids=torch.tensor([0, 0, 1, 2, 3, 4]), objectives=("itm",))
        assert torch.isfinite(out["itm"]) and len(seen) == 2  # a negative image per text, a negative text per image
        assert all(bool((s == 0).all()) == (mode == "uniform") for s in seen), mode


# --- LM -----------------------------------------------------------------------------------------------
def _ignored_positions(input_ids, pad, prompt_length):
    """Logit positions whose next token is padding or part of the prompt, plus the last position."""
    ignored = torch.zeros(input_ids.shape, dtype=torch.bool)
    ignored[:, -1] = True
    nxt = input_ids[:, 1:]
    ignored[:, :-1] = (nxt == pad) | (torch.arange(1, input_ids.shape[1]) < prompt_length)[None, :]
    return ignored


def test_lm_loss_ignores_padding_and_prompt_and_smooths_labels():
    pad, V = 0, 11
    input_ids = torch.tensor([[9, 3, 4, 5, 6, 2, 0, 0], [9, 3, 4, 7, 8, 5, 6, 2]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, V, generator=g)
    for prompt_length in (0, 3):
        ignored = _ignored_positions(input_ids, pad, prompt_length)
        base = lm_loss(logits, input_ids, pad, prompt_length, label_smoothing=0.1)
        noisy = logits.clone()
        noisy[ignored] = torch.randn(int(ignored.sum()), V, generator=g) * 10
        torch.testing.assert_close(lm_loss(noisy, input_ids, pad, prompt_length, label_smoothing=0.1), base)
        for r, t in (~ignored).nonzero().tolist():
            poked = logits.clone()
            poked[r, t] += torch.randn(V, generator=g)
            assert not torch.isclose(lm_loss(poked, input_ids, pad, prompt_length, label_smoothing=0.1), base)
        # the value: (1 - eps) * NLL + eps * mean over the vocabulary of -log p, averaged over kept positions
        logp = F.log_softmax(logits, -1)
        terms = []
        for r, t in (~ignored).nonzero().tolist():
            target = int(input_ids[r, t + 1])
            terms.append(0.9 * -logp[r, t, target] + 0.1 * -logp[r, t].mean())
        torch.testing.assert_close(base, torch.stack(terms).mean())
    assert input_ids[0, 6] == pad  # the caller's ids are untouched by the masking
    assert not torch.isclose(lm_loss(logits, input_ids, pad, label_smoothing=0.0), lm_loss(logits, input_ids, pad))


def test_lm_objective_uses_label_smoothing_and_prompt_length(make_model):
    losses = BlipLosses(make_model()).train()
    model = losses.model
    assert model.config.label_smoothing == 0.1
    with torch.no_grad():  # far from uniform, so that smoothing makes a visible difference
        model.text.lm_head.decoder.bias.copy_(
            3 * torch.randn(model.text.lm_head.decoder.bias.shape, generator=torch.Generator().manual_seed(0))
        )
    imgs, ids, mask = _batch(model, 3)
    dec = ids.clone()
    dec[:, 0] = model.config.text.bos_token_id
    with torch.no_grad():
        logits = model.lm_logits(model.encode_image(imgs), dec, mask)
    for prompt_length in (0, 3):
        got = losses(imgs, ids, mask, objectives=("lm",), prompt_length=prompt_length)["lm"]
        torch.testing.assert_close(
            got.detach(), lm_loss(logits, dec, model.config.text.pad_token_id, prompt_length, 0.1)
        )
        assert abs(got.item() - lm_loss(logits, dec, model.config.text.pad_token_id, prompt_length, 0.0).item()) > 0.05


# --- temperature, alpha ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("start", "clamped"), [(2.0, 0.5), (1e-6, 0.001), (0.07, 0.07)])
def test_temperature_is_clamped(make_model, start, clamped):
    losses = BlipLosses(make_model()).train()
    with torch.no_grad():
        losses.model.temp.fill_(start)
    imgs, ids, mask = _batch(losses.model, 2)
    losses(imgs, ids, mask, objectives=("itc",))
    assert losses.model.temp.item() == pytest.approx(clamped)


def test_alpha_ramps_over_the_first_epoch():
    assert alpha_at(0.4, epoch=0, step=0, steps_per_epoch=100) == 0.0
    assert alpha_at(0.4, epoch=0, step=25, steps_per_epoch=100) == pytest.approx(0.1)
    assert alpha_at(0.4, epoch=0, step=50, steps_per_epoch=100) == pytest.approx(0.2)
    assert alpha_at(0.4, epoch=0, step=100, steps_per_epoch=100) == pytest.approx(0.4)
    assert alpha_at(0.4, epoch=0, step=150, steps_per_epoch=100) == pytest.approx(0.4)
    assert alpha_at(0.4, epoch=1, step=0, steps_per_epoch=100) == pytest.approx(0.4)
    assert alpha_at(0.4, epoch=3, step=7, steps_per_epoch=100) == pytest.approx(0.4)
    ramp = [alpha_at(0.4, 0, s, 10) for s in range(11)]
    assert ramp == sorted(ramp)


# --- objectives and gradients ------------------------------------------------------------------------------------
def _grad_reaches(model, prefix_or_param) -> bool:
    params = (
        [prefix_or_param]
        if isinstance(prefix_or_param, torch.Tensor)
        else [p for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefix_or_param)]
    )
    assert params, prefix_or_param
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_unknown_objective_is_an_error(make_model):
    losses = BlipLosses(make_model())
    imgs, ids, mask = _batch(losses.model, 2)
    with pytest.raises(ValueError, match="itx"):
        losses(imgs, ids, mask, objectives=("itc", "itx"))


def test_each_objective_returns_separately_and_reaches_the_right_parameters(make_model):
    losses = BlipLosses(make_model(sharing="all_but_sa")).train()
    model = losses.model
    imgs, ids, mask = _batch(model, 4)
    out = losses(imgs, ids, mask, image_ids=torch.tensor([0, 0, 1, 2]))
    assert set(out) == {"itc", "itm", "lm"} and all(v.dim() == 0 and torch.isfinite(v) for v in out.values())

    where = {  # parameter group -> reached by (itc, itm, lm)
        "vision.": (True, True, True),
        "vision_proj.": (True, False, False),
        "text_proj.": (True, False, False),
        "temp": (True, False, False),
        "text.embeddings.": (True, True, True),
        "text.encoder.0.self_attn.": (True, True, False),  # the decoder's self-attention is its own here
        "text.decoder.0.self_attn.": (False, False, True),
        "text.encoder.0.cross_attn.": (False, True, True),  # shared with the decoder
        "text.encoder.1.ffn.": (True, True, True),
        "itm_head.": (False, True, False),
        "text.lm_head.dense.": (False, False, True),
    }
    for k, objective in enumerate(("itc", "itm", "lm")):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = losses(imgs, ids, mask, image_ids=torch.tensor([0, 0, 1, 2]), objectives=(objective,))
        assert set(loss) == {objective}
        loss[objective].backward()
        for group, reached in where.items():
            assert _grad_reaches(model, group) == reached[k], (objective, group)
        assert all(p.grad is None for n, p in losses.named_parameters() if n.partition(".")[0] in MOMENTUM_OF)


def test_gradient_checkpointing_changes_nothing_but_memory(make_model):
    results = []
    for on in (False, True):
        losses = BlipLosses(make_model(text={"grad_checkpointing": on}, vision={"grad_checkpointing": on})).train()
        imgs, ids, mask = _batch(losses.model, 3)
        torch.manual_seed(1)
        out = losses(imgs, ids, mask, image_ids=torch.tensor([0, 1, 1]))
        sum(out.values()).backward()
        results.append((out, {n: p.grad for n, p in losses.model.named_parameters() if p.grad is not None}))
    (out0, g0), (out1, g1) = results
    for k in out0:
        torch.testing.assert_close(out1[k], out0[k])
    assert g0.keys() == g1.keys() and len(g0) > 50
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)
