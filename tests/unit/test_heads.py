"""The downstream heads built on a pre-trained BlipModel: VQA (question encoder + answer decoder), NLVR2 (twin
cross-attention), zero-shot video retrieval (frame sampling, clip encoding), their checkpoints, and the
context mask that VQA threads through the MED decoder and beam search."""

from __future__ import annotations

import json

import pytest
import torch
from blip_helpers import SHARINGS, images, make_model, tokenizer  # noqa: F401  (fixtures)
from PIL import Image

from blip_core import BlipModel, BlipNLVR, BlipVQA
from blip_core.checkpoint import load_pretrained
from blip_core.med import padding_mask
from blip_core.transforms import eval_transform
from blip_core.video import encode_video, load_clip, read_frames, uniform_frame_indices

TOL = dict(atol=1e-5, rtol=1e-5)

# Questions of different token lengths, so that a batch pads all but the longest.
QUESTIONS = ["a red square", "two cats sleeping on a mat on the left at night", "a blue circle on the top"]
ANSWERS = ["red", "blue circle", "two cats sleeping", "yes", "a dog", "green triangle on the right"]


def _perturb(module: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Give every parameter distinct random values (fresh models have zero biases and unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def make_pretrained(make_model):
    """``make_pretrained(sharing=...)``: a tiny "pre-trained" model whose text side is far from its init (std 0.2
    weights, perturbed biases and norms), so padded question tokens, images and answers all change the outputs."""

    def build(seed: int = 0, **overrides) -> BlipModel:
        m = make_model(seed=seed, text={"initializer_range": 0.2}, **overrides)
        _perturb(m, seed + 1)
        return m

    return build


@pytest.fixture
def pretrained(make_pretrained) -> BlipModel:
    return make_pretrained()


def _grounded(model: BlipModel, imgs: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-trained model's image-grounded encoder ([ENC] first): hidden states and mask."""
    ids, mask = model.tokenize(texts)
    with torch.no_grad():
        return model.text.encode(model.grounded_ids(ids), mask, image_embeds=model.encode_image(imgs)), mask


# === NLVR2 ===============================================================================================
def _nlvr_hidden(nlvr: BlipNLVR, images0: torch.Tensor, images1: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """BlipNLVR.logits up to (not including) cls_head: the hidden states [B, T, W]."""
    ids, mask = nlvr.tokenize(texts)
    ids[:, 0] = nlvr.config.text.enc_token_id
    with torch.no_grad():
        img0, img1 = nlvr.encode_image(images0), nlvr.encode_image(images1)
        x = nlvr.embeddings(ids)
        m = padding_mask(mask, x.dtype)
        for layer in nlvr.layers:
            twin = layer.cross_attn
            x = layer(x, m, twin.image0.context_kv(img0), twin.image1.context_kv(img1))
    return x


def _average_merges(nlvr: BlipNLVR) -> BlipNLVR:
    """Set every learned merge to the average of its two branches (BLIP initialises them at random)."""
    with torch.no_grad():
        for layer in nlvr.layers:
            merge = layer.cross_attn.merge
            if merge is not None:
                half = torch.eye(merge.weight.shape[0]) / 2
                merge.weight.copy_(torch.cat([half, half], 1))
                merge.bias.zero_()
    return nlvr


@pytest.mark.parametrize("sharing", SHARINGS)
def test_nlvr_from_blip_with_one_image_twice_is_the_pretrained_grounded_encoder(make_pretrained, sharing):
    """Both cross-attention branches start as the pre-trained one, so once the learned merges are the average, the
    same image on both sides gives exactly the pre-trained image-grounded encoder's states."""
    model = make_pretrained(sharing=sharing)
    nlvr = BlipNLVR.from_blip(model).eval()
    depth, w = model.config.text.depth, model.config.text.width
    # the first half of the layers average, the second half merge with a linear layer, random at first (BLIP)
    assert [layer.cross_attn.merge is not None for layer in nlvr.layers] == [i >= depth // 2 for i in range(depth)]
    half = torch.eye(w) / 2
    for layer in nlvr.layers[depth // 2 :]:
        assert not torch.allclose(layer.cross_attn.merge.weight, torch.cat([half, half], 1))
    _average_merges(nlvr)
    imgs = images(3, seed=7)
    ref, mask = _grounded(model, imgs, QUESTIONS)
    assert not mask.all()  # padding in the batch
    hidden = _nlvr_hidden(nlvr, imgs, imgs, QUESTIONS)
    torch.testing.assert_close(hidden[:, 0], ref[:, 0], **TOL)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref[real], **TOL)  # every real token, not only [ENC]
    with torch.no_grad():
        logits = nlvr.logits(imgs, imgs, QUESTIONS)
        torch.testing.assert_close(logits, nlvr.cls_head(hidden[:, 0]), **TOL)  # _nlvr_hidden replicates logits
        torch.testing.assert_close(logits, nlvr.cls_head(ref[:, 0]), **TOL)


def test_nlvr_image_order_matters_only_once_the_branches_differ(pretrained):
    """With averaged merges, ``from_blip``'s two branches are one function, so swapping the images changes
    nothing. Once image1's cross-attention or a merge differs (BLIP's random merge does from the start), the two
    sides are distinguishable and the swap matters."""
    nlvr = _average_merges(BlipNLVR.from_blip(pretrained).eval())
    a, b = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        ab, ba, aa = nlvr.logits(a, b, QUESTIONS), nlvr.logits(b, a, QUESTIONS), nlvr.logits(a, a, QUESTIONS)
        assert (ab - aa).abs().max() > 1e-3  # the second image is used at all
        torch.testing.assert_close(ab, ba, **TOL)  # symmetric

        for part in ("image1", "merge", "random merge"):
            fresh = BlipNLVR.from_blip(pretrained).eval()
            if part != "random merge":
                _average_merges(fresh)
            for i, layer in enumerate(fresh.layers):
                if part == "image1":
                    _perturb(layer.cross_attn.image1, seed=10 + i, scale=0.2)
                elif part == "merge" and layer.cross_attn.merge is not None:
                    _perturb(layer.cross_attn.merge, seed=10 + i, scale=0.2)
            ab, ba = fresh.logits(a, b, QUESTIONS), fresh.logits(b, a, QUESTIONS)
            assert (ab - ba).abs().max() > 1e-3, part

        # loss and predictions follow the logits
        labels = [True, False, True]
        expected = torch.nn.functional.cross_entropy(ab, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(fresh.loss(a, b, QUESTIONS, labels), expected, **TOL)
    assert fresh.predict(a, b, QUESTIONS) == ab.argmax(-1).bool().tolist()
    with pytest.raises(ValueError, match="pairs"):
        nlvr.logits(a, b[:2], QUESTIONS)


# === VQA: construction =====================================================================================
@pytest.mark.parametrize("sharing", SHARINGS)
def test_vqa_question_encoder_is_the_pretrained_grounded_encoder(make_pretrained, sharing):
    model = make_pretrained(sharing=sharing)
    vqa = BlipVQA.from_blip(model).eval()
    imgs = images(3, seed=3)
    ref, mask = _grounded(model, imgs, QUESTIONS)
    with torch.no_grad():
        states, smask = vqa.encode_question(imgs, QUESTIONS)
    assert torch.equal(smask, mask)
    torch.testing.assert_close(states[:, 0], ref[:, 0], **TOL)
    torch.testing.assert_close(states, ref, **TOL)
    torch.testing.assert_close(
        vqa.question_encoder.embeddings.word.weight, model.text.embeddings.word.weight, atol=0, rtol=0
    )


@pytest.mark.parametrize("sharing", SHARINGS)
def test_vqa_answer_decoder_is_the_pretrained_decoder(make_pretrained, sharing):
    """The answer decoder's weights are the pre-trained decoder stack's (its own causal self-attention, the
    cross-attention and feed-forward shared or not as ``sharing`` says, the decoder embeddings, the LM head)."""
    model = make_pretrained(sharing=sharing)
    vqa = BlipVQA.from_blip(model).eval()
    dec = vqa.answer_decoder
    for mine, theirs in zip(dec.decoder, model.text.decoder):
        for part in ("self_attn", "cross_attn", "ffn"):
            a, b = getattr(mine, part).state_dict(), getattr(theirs, part).state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (part, k)
    for mine, theirs in ((dec.decoder_embeddings, model.text.decoder_embeddings), (dec.lm_head, model.text.lm_head)):
        a, b = mine.state_dict(), theirs.state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # so, fed image tokens (text and vision widths are equal here), it is the pre-trained captioner
    imgs = images(2, seed=4)
    ids, mask = model.tokenize(["a red square", "two cats sleeping on a mat"])
    ids[:, 0] = model.config.text.bos_token_id
    with torch.no_grad():
        emb = model.encode_image(imgs)
        torch.testing.assert_close(dec.decode(ids, mask, emb), model.text.decode(ids, mask, emb), **TOL)


# === VQA: padding of the question ==========================================================================
def _alone_and_batched(vqa: BlipVQA, imgs: torch.Tensor):
    with torch.no_grad():
        batch = vqa.encode_question(imgs, QUESTIONS)
        alone = [vqa.encode_question(imgs[i : i + 1], QUESTIONS[i : i + 1]) for i in range(len(QUESTIONS))]
    assert not batch[1].all() and all(m.all() for _, m in alone)  # padded in the batch, not alone
    return batch, alone


def test_vqa_answer_log_likelihood_ignores_question_padding_one_answer_per_question(pretrained):
    vqa = BlipVQA.from_blip(pretrained).eval()
    (states, smask), alone = _alone_and_batched(vqa, images(3, seed=5))
    ids, mask = vqa._answer_ids(["two cats sleeping"] * 3)
    with torch.no_grad():
        batched = vqa.answer_log_likelihood(states, smask, ids, mask)
        single = torch.cat([vqa.answer_log_likelihood(s, m, ids[:1], mask[:1]) for s, m in alone])
        # the mask is what makes it so: without it the padded question gives another likelihood
        unmasked = vqa.answer_log_likelihood(states, torch.ones_like(smask), ids, mask)
    torch.testing.assert_close(batched, single, **TOL)
    assert (unmasked - single).abs().max() > 1e-3


def test_vqa_answer_log_likelihood_ignores_question_padding_several_answers_per_question(pretrained):
    """k answers per question share the question's states (B' = B / k, the folded cross-attention), as in
    ``rank_answers``: the padded question's mask must still apply."""
    vqa = BlipVQA.from_blip(pretrained).eval()
    (states, smask), alone = _alone_and_batched(vqa, images(3, seed=5))
    ids, mask = vqa._answer_ids(ANSWERS[:3])
    k = 3
    with torch.no_grad():
        shared = vqa.answer_log_likelihood(states, smask, ids.repeat(3, 1), mask.repeat(3, 1)).view(3, k)
        repeated = vqa.answer_log_likelihood(
            states.repeat_interleave(k, 0), smask.repeat_interleave(k, 0), ids.repeat(3, 1), mask.repeat(3, 1)
        ).view(3, k)
        single = torch.stack([vqa.answer_log_likelihood(s, m, ids, mask) for s, m in alone])
    torch.testing.assert_close(repeated, single, **TOL)  # one context row per answer: masked correctly
    torch.testing.assert_close(shared, single, **TOL)  # k answers per context row


def test_decode_step_context_mask_applies_to_beams_sharing_a_context(pretrained):
    """MED.decode_step with a [B', N] context mask and several sequences per context (beams) must equal the
    cache-free decoder over the unpadded context."""
    vqa = BlipVQA.from_blip(pretrained).eval()
    (states, smask), alone = _alone_and_batched(vqa, images(3, seed=5))
    med, bos = vqa.answer_decoder, vqa.config.text.bos_token_id
    with torch.no_grad():
        for beams in (1, 3):
            prompt = torch.full((3 * beams, 1), bos)
            got, _ = med.decode_step(prompt, med.image_kv(states), None, smask)
            want = torch.cat([med.decode(torch.full((beams, 1), bos), None, s)[:, -1] for s, _ in alone])
            torch.testing.assert_close(
                got, want, **TOL, msg=lambda m, beams=beams: f"{beams} sequences per context: {m}"
            )


def test_vqa_generated_answers_do_not_depend_on_the_batch(pretrained):
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(3, seed=6)
    for num_beams in (1, 3):
        batched = vqa.answer(imgs, QUESTIONS, num_beams=num_beams)
        alone = [vqa.answer(imgs[i : i + 1], QUESTIONS[i : i + 1], num_beams=num_beams)[0] for i in range(3)]
        assert batched == alone, num_beams
        assert all(isinstance(a, str) for a in batched)


def test_vqa_generates_answers_by_the_models_beam_rule(pretrained, monkeypatch):
    """An official VQA checkpoint answers with the official code's beam search (transformers 4.15's rule), as its
    captioners caption with it: the head passes its config's rule to the search."""
    import blip_core.vqa as vqa_module

    seen = []
    search = vqa_module.beam_search
    monkeypatch.setattr(vqa_module, "beam_search", lambda *a, **kw: seen.append(kw["beam_rule"]) or search(*a, **kw))
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(2, seed=3)
    default = vqa.answer(imgs, QUESTIONS[:2], num_beams=3)
    vqa.config = vqa.config.model_copy(update={"beam_rule": "transformers-4.15"})
    official = vqa.answer(imgs, QUESTIONS[:2], num_beams=3)
    assert seen == ["transformers", "transformers-4.15"]
    assert all(isinstance(a, str) for a in default + official)


WORDS = [
    "red",
    "green",
    "blue",
    "yellow",
    "square",
    "circle",
    "triangle",
    "left",
    "right",
    "top",
    "bottom",
    "dog",
    "cats",
    "mat",
    "night",
    "street",
    "empty",
    "picture",
]


def test_vqa_ranked_answers_do_not_depend_on_the_batch(pretrained):
    """Many one-word candidates: close log-likelihoods, so a padded question's unmasked pad tokens flip choices
    (these images and candidates do flip when the mask is lost)."""
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(3, seed=0)
    for answer_list in (WORDS, ANSWERS):
        for k in (1, 4, len(answer_list)):
            batched = vqa.answer(imgs, QUESTIONS, answer_list=answer_list, k=k)
            alone = [
                vqa.answer(imgs[i : i + 1], QUESTIONS[i : i + 1], answer_list=answer_list, k=k)[0] for i in range(3)
            ]
            assert batched == alone, (k, answer_list)
            assert set(batched) <= set(answer_list)


# === VQA: ranking ==========================================================================================
def _all_log_likelihoods(vqa: BlipVQA, states, smask, answer_list) -> torch.Tensor:
    """[B, len(answer_list)] answer log-likelihoods, one context row per (question, answer): no folding."""
    ids, mask = vqa._answer_ids(answer_list)
    n, b = len(answer_list), states.shape[0]
    with torch.no_grad():
        ll = vqa.answer_log_likelihood(
            states.repeat_interleave(n, 0), smask.repeat_interleave(n, 0), ids.repeat(b, 1), mask.repeat(b, 1)
        )
    return ll.view(b, n)


def test_vqa_rank_answers_with_every_candidate_is_the_argmax_log_likelihood(pretrained):
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(4, seed=9)
    # questions of one token length: this test is about the ranking, the padding ones above about the mask
    questions = ["a red square", "a blue circle", "a green triangle", "a yellow square"]
    with torch.no_grad():
        states, smask = vqa.encode_question(imgs, questions)
    assert smask.all()
    ll = _all_log_likelihoods(vqa, states, smask, ANSWERS)
    best = ll.argmax(1)
    assert (ll.max(1).values - ll.topk(2, dim=1).values[:, 1] > 1e-3).all()  # no near-ties
    for k in (len(ANSWERS), len(ANSWERS) + 5, 1000):
        assert torch.equal(vqa.rank_answers(states, smask, ANSWERS, k), best), k
    assert vqa.answer(imgs, questions, answer_list=ANSWERS, k=len(ANSWERS)) == [ANSWERS[i] for i in best.tolist()]

    # with k < len: the best by log-likelihood among the k candidates whose first token is most likely
    ids, _ = vqa._answer_ids(ANSWERS)
    with torch.no_grad():
        first = vqa.answer_decoder.decode(torch.full((4, 1), vqa.config.text.bos_token_id), None, states)[:, 0]
    first_prob = first.softmax(-1)[:, ids[:, 1]]
    for k in (1, 2):
        top = first_prob.topk(k, dim=1).indices
        want = top.gather(1, ll.gather(1, top).argmax(1, keepdim=True)).squeeze(1)
        assert torch.equal(vqa.rank_answers(states, smask, ANSWERS, k), want), k
    with pytest.raises(ValueError, match="empty"):
        vqa.rank_answers(states, smask, [], 3)


# === VQA: loss =============================================================================================
def _smoothed_nll(logits: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
    """Summed next-token NLL with label smoothing, by hand: (1 - eps) * -log p(y) + eps * mean_v -log p(v)."""
    logp = logits[0, :-1].float().log_softmax(-1)
    target = ids[0, 1:]
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    uniform = -logp.mean(-1)
    return ((1 - eps) * nll + eps * uniform).sum()


def test_vqa_loss_is_the_weighted_answer_nll_per_question(pretrained):
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(3, seed=11)
    answers = [["red", "blue circle"], ["two cats sleeping"], ["yes", "a dog", "green triangle on the right"]]
    weights = [[0.7, 0.3], [1.0], [0.5, 0.25, 0.25]]
    eps = vqa.config.label_smoothing
    assert eps > 0
    expected, expected_default = 0.0, 0.0
    with torch.no_grad():
        for i, (q, group, w) in enumerate(zip(QUESTIONS, answers, weights)):
            states, smask = vqa.encode_question(imgs[i : i + 1], [q])  # alone: unpadded
            for a, wa in zip(group, w):
                ids, _ = vqa._answer_ids([a])  # alone: unpadded
                nll = _smoothed_nll(vqa.answer_decoder.decode(ids, None, states), ids, eps)
                expected += wa * nll
                expected_default += nll / len(group)
        loss = vqa.loss(imgs, QUESTIONS, answers, weights)
        default = vqa.loss(imgs, QUESTIONS, answers)
    torch.testing.assert_close(loss, expected / 3, **TOL)
    torch.testing.assert_close(default, expected_default / 3, **TOL)
    assert abs(loss.item() - default.item()) > 1e-3  # the weights matter

    # gradients reach both halves
    vqa.train()
    vqa.loss(imgs, QUESTIONS, answers, weights).backward()
    assert vqa.question_encoder.encoder[0].cross_attn.q.weight.grad.abs().sum() > 0
    assert vqa.answer_decoder.decoder[0].cross_attn.k.weight.grad.abs().sum() > 0


def test_vqa_loss_rejects_bad_answer_lists(pretrained):
    vqa = BlipVQA.from_blip(pretrained).eval()
    imgs = images(2)
    qs = QUESTIONS[:2]
    with pytest.raises(ValueError, match="at least one answer"):
        vqa.loss(imgs, qs, [["red"], []])
    with pytest.raises(ValueError, match="one answer list per question"):
        vqa.loss(imgs, qs, [["red"]])
    with pytest.raises(ValueError, match="one weight per answer"):
        vqa.loss(imgs, qs, [["red"], ["blue"]], [[1.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match="one question per image"):
        vqa.encode_question(imgs, QUESTIONS)


# === checkpoints ===========================================================================================
def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_vqa_checkpoint_round_trip(pretrained, tmp_path):
    vqa = BlipVQA.from_blip(pretrained).eval()
    _perturb(vqa.answer_decoder, seed=5, scale=0.01)  # fine-tuned: no longer the pre-trained decoder
    vqa.save_pretrained(tmp_path / "vqa")
    assert json.loads((tmp_path / "vqa" / "config.json").read_text())["task"] == "vqa"
    loaded = BlipVQA.from_pretrained(tmp_path / "vqa")
    assert type(loaded) is BlipVQA and not loaded.training
    assert type(load_pretrained(tmp_path / "vqa")) is BlipVQA
    _same_state(vqa, loaded)
    # sharing="all" inside each half survives loading
    for m in (loaded.question_encoder, loaded.answer_decoder):
        assert m.encoder[0].self_attn.q.weight is m.decoder[0].self_attn.q.weight
        assert m.lm_head.decoder.weight is m.decoder_embeddings.word.weight
    imgs = images(3, seed=12)
    for model_answers in ((vqa, loaded),):
        a, b = model_answers
        assert a.answer(imgs, QUESTIONS) == b.answer(imgs, QUESTIONS)
        assert a.answer(imgs, QUESTIONS, answer_list=ANSWERS, k=3) == b.answer(
            imgs, QUESTIONS, answer_list=ANSWERS, k=3
        )
        with torch.no_grad():
            assert torch.equal(a.encode_question(imgs, QUESTIONS)[0], b.encode_question(imgs, QUESTIONS)[0])
            assert torch.equal(a.loss(imgs, QUESTIONS, [["red"]] * 3), b.loss(imgs, QUESTIONS, [["red"]] * 3))

    with pytest.raises(ValueError, match="'vqa'"):
        BlipModel.from_pretrained(tmp_path / "vqa")
    with pytest.raises(ValueError, match="'vqa'"):
        BlipNLVR.from_pretrained(tmp_path / "vqa")


def test_nlvr_checkpoint_round_trip(pretrained, tmp_path):
    nlvr = BlipNLVR.from_blip(pretrained).eval()
    _perturb(nlvr, seed=6, scale=0.01)  # merges no longer the average, image1 no longer image0
    nlvr.save_pretrained(tmp_path / "nlvr")
    assert json.loads((tmp_path / "nlvr" / "config.json").read_text())["task"] == "nlvr"
    loaded = BlipNLVR.from_pretrained(tmp_path / "nlvr")
    assert type(loaded) is BlipNLVR and not loaded.training
    _same_state(nlvr, loaded)
    a, b = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        assert torch.equal(nlvr.logits(a, b, QUESTIONS), loaded.logits(a, b, QUESTIONS))
    with pytest.raises(ValueError, match="'nlvr'"):
        BlipModel.from_pretrained(tmp_path / "nlvr")
    with pytest.raises(ValueError, match="'nlvr'"):
        BlipVQA.from_pretrained(tmp_path / "nlvr")


def test_heads_from_a_pretrained_checkpoint(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path / "blip")
    assert json.loads((tmp_path / "blip" / "config.json").read_text())["task"] == "pretrain"
    imgs = images(3, seed=13)

    vqa = BlipVQA.from_pretrained(tmp_path / "blip")
    assert type(vqa) is BlipVQA and not vqa.training
    _same_state(vqa, BlipVQA.from_blip(pretrained))  # every VQA weight comes from the pre-trained model
    ref, _ = _grounded(pretrained, imgs, QUESTIONS)
    with torch.no_grad():
        torch.testing.assert_close(vqa.encode_question(imgs, QUESTIONS)[0], ref, **TOL)

    nlvr = BlipNLVR.from_pretrained(tmp_path / "blip")
    assert type(nlvr) is BlipNLVR and not nlvr.training
    torch.testing.assert_close(_nlvr_hidden(_average_merges(nlvr), imgs, imgs, QUESTIONS)[:, 0], ref[:, 0], **TOL)

    assert type(BlipModel.from_pretrained(tmp_path / "blip")) is BlipModel


def test_unknown_task_in_a_checkpoint_is_an_error(pretrained, tmp_path):
    pretrained.save_pretrained(tmp_path / "blip")
    cfg = tmp_path / "blip" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["task"] = "retrieval_coco"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown task 'retrieval_coco'"):
        BlipModel.from_pretrained(tmp_path / "blip")


# === video =================================================================================================
def test_uniform_frame_indices():
    # 10 frames, 4 segments of 2.5 frames: middles at 1.25, 3.75, 6.25, 8.75
    assert uniform_frame_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_frame_indices(10, 1) == [5]
    assert uniform_frame_indices(4, 4) == [0, 1, 2, 3]
    assert uniform_frame_indices(9, 3) == [1, 4, 7]
    # shorter clips repeat frames, in order
    assert uniform_frame_indices(2, 5) == [0, 0, 1, 1, 1]
    assert uniform_frame_indices(1, 3) == [0, 0, 0]
    for n, f in ((0, 4), (-1, 4), (5, 0), (5, -2)):
        with pytest.raises(ValueError):
            uniform_frame_indices(n, f)


COLOURS = [
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (128, 0, 0),
    (0, 128, 0),
    (0, 0, 128),
    (128, 128, 128),
]


def _colour(img: Image.Image) -> tuple[int, int, int]:
    colours = img.getcolors()
    assert colours is not None and len(colours) == 1, colours  # a solid frame
    return colours[0][1]


def test_read_frames_from_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (20, 12), c) for c in COLOURS]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    got = read_frames(gif, 4)
    assert len(got) == 4 and all(f.mode == "RGB" and f.size == (20, 12) for f in got)
    assert [_colour(f) for f in got] == [COLOURS[i] for i in (1, 3, 6, 8)]
    assert [_colour(f) for f in read_frames(gif, 12)] == [COLOURS[i] for i in uniform_frame_indices(10, 12)]

    # a still image is a one-frame clip
    still = tmp_path / "still.png"
    frames[2].save(still)
    assert [_colour(f) for f in read_frames(still, 3)] == [COLOURS[2]] * 3

    # load_clip: the frames through the transform, stacked
    transform = eval_transform(32)
    clip = load_clip(gif, 4, transform)
    assert clip.shape == (4, 3, 32, 32)
    for f, i in zip(clip, (1, 3, 6, 8)):
        torch.testing.assert_close(f, transform(frames[i]), atol=1e-6, rtol=0)


def test_read_frames_from_a_directory_of_frames(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for i, c in enumerate(COLOURS[:7]):
        Image.new("RGB", (8, 8), c).save(d / f"frame_{i:03d}.png")
    (d / "notes.txt").write_text("not a frame")
    (d / "frame_999.json").write_text("{}")
    # 7 frames, 3 segments: middles at 7/6, 3.5, 35/6 -> 1, 3, 5
    assert [_colour(f) for f in read_frames(d, 3)] == [COLOURS[i] for i in (1, 3, 5)]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no frame images"):
        read_frames(empty, 3)


def test_read_frames_rejects_what_is_not_a_video(tmp_path):
    text = tmp_path / "clip.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(ValueError, match="not an animated image|not a readable video"):
        read_frames(text, 4)
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.gif", 4)


def test_encode_video(pretrained):
    model = pretrained
    clips = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # one frame: the image's tokens and ITC feature
        tokens, feats = encode_video(model, clips[:, :1])
        emb = model.encode_image(clips[:, 0])
        torch.testing.assert_close(tokens, emb, **TOL)
        torch.testing.assert_close(feats, model.image_features(emb), **TOL)

        # three frames: the frames' tokens side by side, the normalised mean of the projected [CLS]
        tokens, feats = encode_video(model, clips)
        n, w = emb.shape[1], model.config.vision.width
        assert tokens.shape == (2, 3 * n, w) and feats.shape == (2, model.config.embed_dim)
        per_frame = [model.encode_image(clips[:, f]) for f in range(3)]
        for f in range(3):
            torch.testing.assert_close(tokens[:, f * n : (f + 1) * n], per_frame[f], **TOL)
        mean = torch.stack([model.vision_proj(e[:, 0]) for e in per_frame]).mean(0)
        torch.testing.assert_close(feats, torch.nn.functional.normalize(mean, dim=-1), **TOL)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2), **TOL)
        # not the mean of the normalised features: the frames' norms differ
        norm_mean = torch.stack([model.image_features(e) for e in per_frame]).mean(0)
        assert (feats - norm_mean).abs().max() > 1e-4
        # frame tokens feed ITM like an image's
        ids, mask = model.tokenize(["a red square", "a blue circle"])
        assert model.itm_logits(tokens, ids, mask).shape == (2, 2)
    with pytest.raises(ValueError, match="clips must have shape"):
        encode_video(model, clips[0])
