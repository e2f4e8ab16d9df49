"""Caption decoding: batched beam search and nucleus sampling over the MED decoder, with a KV cache.

The image's cross-attention keys/values are computed once per image and shared by all its beams or
samples (the decoder folds them into the query axis), the prompt is run once per image, and lengths count
``[DEC]`` and the prompt as the official BLIP code does. Beam search follows one of two rules (``beam_rule``):

- ``"transformers"``: today's transformers (``GenerationMixin._beam_search``), so that both give the same captions
  on the same weights. A caption that ends with ``[SEP]`` is scored by its summed log-probability over its
  generated tokens (``[SEP]`` included, the prompt not) ** ``length_penalty``; at ``max_length`` the best
  ``num_beams`` candidates of the last step are finished the same way. A search stops when the best running beam,
  divided by its generated length so far, no longer beats the worst of ``num_beams`` finished captions.
- ``"transformers-4.15"``: transformers 4.15 (``BeamSearchScorer`` / ``BeamHypotheses`` and ``beam_search`` in
  ``generation_utils.py``), which the official salesforce/BLIP code pins. A caption that ends with ``[SEP]`` is
  scored by its summed log-probability over its whole length without the ``[SEP]``: ``[DEC]`` and the prompt
  included (whose log-probabilities are not in the sum); an image is done, and its finished captions frozen, once
  it has ``num_beams`` of them and the best candidate of the step (``[SEP]`` ones included) divided by the length
  before that step is no better than the worst; beams still running at ``max_length`` join the finished ones
  divided by ``max_length``. The constant prompt length in the denominator weakens the length normalisation: a
  caption that stops at ``[SEP]`` wins where ``"transformers"`` prefers one that runs on to ``max_length``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from .config import BeamRule
from .med import MED

NEG = -1.0e9


def _expand(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat_interleave(k, dim=0) if k > 1 else x


def _prefill(med: MED, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, k: int, context_mask: torch.Tensor | None):
    """Run the prompt once per image; return last logits, cache and image K/V, ready for k sequences per image."""
    b = image_embeds.shape[0]
    image_kv = med.image_kv(image_embeds)
    logits, past = med.decode_step(prompt_ids.expand(b, -1), image_kv, None, context_mask)
    past = [(_expand(kk, k), _expand(vv, k)) for kk, vv in past]
    return _expand(logits.float(), k), past, image_kv


def _min_length_and_repetition(scores, seqs, cur_len, min_length, eos_token_id, repetition_penalty):
    if cur_len < min_length:
        scores[:, eos_token_id] = float("-inf")
    if repetition_penalty != 1.0:
        seen = scores.gather(1, seqs)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores.scatter_(1, seqs, seen)
    return scores


def beam_search(
    med: MED,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    *,
    num_beams: int = 3,
    max_length: int = 30,
    min_length: int = 10,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int,
    pad_token_id: int,
    context_mask: torch.Tensor | None = None,
    beam_rule: BeamRule = "transformers",
) -> torch.Tensor:
    """Returns [B * num_return_sequences, L] token ids, the prompt included, padded with ``pad_token_id``.
    ``context_mask`` [B, N]: which context tokens are real (VQA's padded questions); None: all of them.
    ``beam_rule``: how finished captions are scored and when the search stops (module docstring); greedy decoding
    (``num_beams`` 1) is the same under both."""
    if beam_rule not in ("transformers", "transformers-4.15"):
        raise ValueError(f"unknown beam_rule {beam_rule!r}; choose 'transformers' or 'transformers-4.15'")
    if num_beams == 1:
        if num_return_sequences != 1:
            raise ValueError("greedy decoding (num_beams=1) returns one sequence per image")
        return greedy(
            med,
            image_embeds,
            prompt_ids,
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            context_mask=context_mask,
        )
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    B, nb, dev = image_embeds.shape[0], num_beams, image_embeds.device
    plen = prompt_ids.shape[1]
    if max_length <= plen:
        raise ValueError(f"max_length ({max_length}) must exceed the prompt's {plen} tokens ([DEC] included)")
    if max_length > med.cfg.max_positions:  # else it fails only after generating max_positions tokens
        raise ValueError(f"max_length ({max_length}) would exceed text.max_positions ({med.cfg.max_positions})")
    logits, past, image_kv = _prefill(med, image_embeds, prompt_ids, nb, context_mask)

    running = torch.full((B, nb, max_length), pad_token_id, dtype=torch.long, device=dev)
    running[:, :, :plen] = prompt_ids[0]
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = NEG
    finished = running.clone()
    finished_scores = torch.full((B, nb), NEG, device=dev)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    # images that may still take finished captions: "transformers"' early-stop heuristic, or not yet done (4.15)
    accepting = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_mask = torch.arange(2 * nb, device=dev) < nb
    batch_idx = torch.arange(B, device=dev)[:, None]
    legacy = beam_rule == "transformers-4.15"

    cur_len = plen
    while True:
        flat = running[:, :, :cur_len].reshape(B * nb, cur_len)
        scores = torch.log_softmax(logits, dim=-1)
        scores = _min_length_and_repetition(scores, flat, cur_len, min_length, eos_token_id, repetition_penalty)
        V = scores.shape[-1]
        acc = (scores.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top_scores, top_idx = acc.topk(2 * nb, dim=1)
        src_beam, tokens = top_idx // V, top_idx % V
        cand = running[batch_idx, src_beam]  # [B, 2nb, L]
        cand[:, :, cur_len] = tokens
        # which candidates stop: at [SEP]; under "transformers" also every candidate that reaches max_length (4.15
        # keeps those running and finalizes the running beams after the loop)
        hits = tokens == eos_token_id
        if not legacy:
            hits = hits | (cur_len + 1 >= max_length)

        # the best num_beams continuations that did not stop keep running
        keep = (top_scores + hits.float() * NEG).topk(nb, dim=1).indices
        running = cand[batch_idx, keep]
        running_scores = (top_scores + hits.float() * NEG).gather(1, keep)
        reorder = (src_beam.gather(1, keep) + batch_idx * nb).view(-1)

        # stopped continuations among the top num_beams become finished captions, scored with the length penalty
        just_done = hits & top_mask[None, :]
        length = cur_len if legacy else cur_len + 1 - plen  # 4.15: the whole sequence without [SEP]
        norm = top_scores / float(length) ** length_penalty
        norm = norm + (~accepting).float() * NEG + (~just_done).float() * NEG
        finished, finished_scores, is_finished = _keep_best(
            finished, finished_scores, is_finished, cand, norm, just_done, nb, batch_idx
        )

        if legacy:  # BeamHypotheses.is_done with early_stopping=False, on the step's best candidate, [SEP] or not
            worst = finished_scores.min(dim=1, keepdim=True).values
            full = is_finished.all(dim=1, keepdim=True)
            accepting = accepting & ~(full & (worst >= top_scores[:, :1] / float(cur_len) ** length_penalty))
        cur_len += 1
        if not legacy:
            best_running = running_scores[:, :1] / float(cur_len - plen) ** length_penalty
            worst = torch.where(
                is_finished, finished_scores.min(dim=1, keepdim=True).values, torch.full_like(finished_scores, NEG)
            )
            accepting = accepting & (best_running > worst).any(dim=1, keepdim=True)
            if not bool(accepting.any()) or bool(hits.all()) or cur_len >= max_length:
                break
        elif not bool(accepting.any()) or cur_len >= max_length:
            break
        past = [(kk.index_select(0, reorder), vv.index_select(0, reorder)) for kk, vv in past]
        logits, past = med.decode_step(running[:, :, cur_len - 1].reshape(-1, 1), image_kv, past, context_mask)
        logits = logits.float()

    if legacy:  # BeamSearchScorer.finalize: an image not done takes its running beams, divided by their full length
        norm = running_scores / float(cur_len) ** length_penalty + (~accepting).float() * NEG
        ran_out = accepting.expand(B, nb)
        finished, finished_scores, is_finished = _keep_best(
            finished, finished_scores, is_finished, running, norm, ran_out, nb, batch_idx
        )
    out = finished[:, :num_return_sequences].reshape(B * num_return_sequences, max_length)
    lengths = _lengths(out, eos_token_id, plen)
    return out[:, : int(lengths.max())]


def _keep_best(finished, finished_scores, is_finished, cand, cand_scores, cand_finished, nb, batch_idx):
    """The best ``nb`` of the finished captions and the candidates (non-candidates carry a NEG score), best first."""
    merged = torch.cat([finished_scores, cand_scores], dim=1)
    best = merged.topk(nb, dim=1).indices
    return (
        torch.cat([finished, cand], dim=1)[batch_idx, best],
        merged.gather(1, best),
        torch.cat([is_finished, cand_finished], dim=1).gather(1, best),
    )


def greedy(
    med: MED,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    *,
    max_length: int = 30,
    min_length: int = 10,
    repetition_penalty: float = 1.0,
    eos_token_id: int,
    pad_token_id: int,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy decoding: the most likely token at every step; finished sequences are padded."""
    return _decode_loop(
        med,
        image_embeds,
        prompt_ids,
        1,
        None,
        max_length=max_length,
        min_length=min_length,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        context_mask=context_mask,
    )


def _decode_loop(
    med,
    image_embeds,
    prompt_ids,
    k,
    choose,
    *,
    max_length,
    min_length,
    repetition_penalty,
    eos_token_id,
    pad_token_id,
    context_mask=None,
):
    """Shared loop of greedy decoding and sampling: ``choose(scores, step)`` picks tokens (argmax if None)."""
    B, dev = image_embeds.shape[0], image_embeds.device
    plen = prompt_ids.shape[1]
    if max_length <= plen:
        raise ValueError(f"max_length ({max_length}) must exceed the prompt's {plen} tokens ([DEC] included)")
    if max_length > med.cfg.max_positions:  # else it fails only after generating max_positions tokens
        raise ValueError(f"max_length ({max_length}) would exceed text.max_positions ({med.cfg.max_positions})")
    logits, past, image_kv = _prefill(med, image_embeds, prompt_ids, k, context_mask)
    seqs = prompt_ids.expand(B * k, -1).clone()
    alive = torch.ones(B * k, dtype=torch.bool, device=dev)
    for step in range(max_length - plen):
        scores = _min_length_and_repetition(logits, seqs, seqs.shape[1], min_length, eos_token_id, repetition_penalty)
        tokens = scores.argmax(-1) if choose is None else choose(scores, step)
        tokens = torch.where(alive, tokens, torch.full_like(tokens, pad_token_id))
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        alive = alive & (tokens != eos_token_id)
        if not bool(alive.any()) or seqs.shape[1] >= max_length:
            break
        logits, past = med.decode_step(tokens[:, None], image_kv, past, context_mask)
        logits = logits.float()
    return seqs


def _lengths(seqs: torch.Tensor, eos_token_id: int, plen: int) -> torch.Tensor:
    """Length of each sequence up to and including its first EOS after the prompt (or the full width)."""
    is_eos = seqs[:, plen:] == eos_token_id
    first = torch.where(
        is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], is_eos.shape[1], dtype=torch.long)
    )
    return first + plen


def sample_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th sample of an image whose seed is ``seed`` (stable across processes)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def nucleus_sample(
    med: MED,
    image_embeds: torch.Tensor,
    prompt_ids: torch.Tensor,
    *,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    max_length: int = 30,
    min_length: int = 10,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    seeds: Sequence[int] | None = None,
    eos_token_id: int,
    pad_token_id: int,
) -> torch.Tensor:
    """Nucleus sampling. Each sequence draws its uniforms from its own generator seeded from ``seeds[i]``
    and its sample index, so a caption depends only on its image and seed, never on batch composition."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, k, dev = image_embeds.shape[0], num_return_sequences, image_embeds.device
    steps = max(max_length - prompt_ids.shape[1], 0)
    if seeds is not None and len(seeds) != B:
        raise ValueError(f"seeds must give one seed per image: {B} images, {len(seeds)} seeds")
    if seeds is None:
        uniforms = torch.rand(B * k, steps, dtype=torch.float64)
    else:
        rows = []
        for s in seeds:
            for j in range(k):
                g = torch.Generator().manual_seed(sample_seed(s, j))
                rows.append(torch.rand(steps, dtype=torch.float64, generator=g))
        uniforms = torch.stack(rows)
    uniforms = uniforms.to(dev)

    def choose(scores: torch.Tensor, step: int) -> torch.Tensor:
        logits = scores / temperature
        threshold = nucleus_threshold(logits, top_p, top_k)
        # Invert the CDF in vocabulary order, not probability order: near-ties that swap places under a
        # last-bit difference (another batch size) then move the CDF by that difference only.
        probs = torch.softmax(logits, dim=-1, dtype=torch.float64) * (logits >= threshold)
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, uniforms[:, step : step + 1] * cdf[:, -1:])
        return pick.clamp_max(cdf.shape[1] - 1).squeeze(1)

    return _decode_loop(
        med,
        image_embeds,
        prompt_ids,
        k,
        choose,
        max_length=max_length,
        min_length=min_length,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def nucleus_threshold(
    logits: torch.Tensor, top_p: float, top_k: int = 0, head: int = 64, bins: int = 8192
) -> torch.Tensor:
    """The logit of the last token of each row's nucleus [B, 1]: the nucleus is every token whose logit is at least
    this (the smallest top set whose probability reaches ``top_p``, at most ``top_k`` tokens when > 0). Token i
    (in descending order) is kept when the probability of the tokens before it is < top_p.

    Sorting the vocabulary is the slow part of a sampling step on CPU, so it is avoided: a trained captioner's
    nucleus is a few dozen tokens, which the top ``head`` cover; otherwise (a flat distribution: the nucleus is
    much of the vocabulary) the probability is binned by logit in one pass, the bin where the cumulative
    probability reaches ``top_p`` is found, and only that bin's tokens are ordered. On GPU the sort is cheap."""
    V = logits.shape[-1]
    if top_p >= 1.0 and top_k == 0:  # no nucleus: every token (whatever the rounding of a sum of V probabilities)
        return logits.min(dim=-1, keepdim=True).values
    log_z = torch.logsumexp(logits.double(), dim=-1, keepdim=True)
    top = logits.topk(min(head, V), dim=-1).values
    top_mass = torch.exp(top.double() - log_z)
    in_head = top_mass.sum(-1, keepdim=True) >= top_p
    if 0 < top_k <= top.shape[1]:
        in_head = torch.ones_like(in_head)
    if bool(in_head.all()):
        return _threshold_from_descending(top, top_mass, top_p, top_k)
    if top_k == 0 and logits.device.type == "cpu" and V > bins:
        from_bins = _threshold_by_bins(logits, log_z, top_p, bins)
        return torch.where(in_head, _threshold_from_descending(top, top_mass, top_p, top_k), from_bins)
    ordered = logits.sort(dim=-1, descending=True).values
    return _threshold_from_descending(ordered, torch.exp(ordered.double() - log_z), top_p, top_k)


def _threshold_by_bins(
    values: torch.Tensor, log_z: torch.Tensor, need: torch.Tensor | float, bins: int
) -> torch.Tensor:
    """Nucleus threshold of rows of logits (-inf = no token) that must still gather probability ``need``; the
    boundary bin's tokens are binned again until few enough to sort."""
    x = values.double()
    finite = torch.isfinite(x)
    hi = x.masked_fill(~finite, float("-inf")).max(-1, keepdim=True).values
    lo = x.masked_fill(~finite, float("inf")).min(-1, keepdim=True).values
    # bin 0 holds the largest logits; the map is monotone, so every bin's tokens outrank the next bin's
    b = ((hi - x) / (hi - lo).clamp_min(1e-300) * bins).nan_to_num(bins).clamp_(0, bins - 1).long()
    mass = torch.zeros(x.shape[0], bins, dtype=torch.float64, device=x.device).scatter_add_(1, b, torch.exp(x - log_z))
    cum = mass.cumsum(-1)
    j = (cum < need).sum(-1, keepdim=True).clamp_max(bins - 1)  # the bin where the nucleus ends
    before = torch.where(j > 0, cum.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(cum[:, :1]))
    in_bin = (b == j) & finite
    # that bin's logits, packed to the left of a smaller [B, n] tensor (-inf after each row's own)
    slot = in_bin.cumsum(-1) - 1
    rows, cols = in_bin.nonzero(as_tuple=True)
    cand = torch.full((x.shape[0], int(slot[:, -1].max()) + 1), float("-inf"), dtype=values.dtype, device=values.device)
    cand[rows, slot[rows, cols]] = values[rows, cols]
    if cand.shape[1] > 4 * bins**0.5 and cand.shape[1] < values.shape[1]:
        return _threshold_by_bins(cand, log_z, need - before, bins)
    cand = cand.sort(dim=-1, descending=True).values
    cand_mass = torch.exp(cand.double() - log_z)
    keep = ((before + cand_mass.cumsum(-1) - cand_mass) < need) & torch.isfinite(cand)
    return cand.gather(1, keep.sum(-1, keepdim=True).clamp_min(1) - 1)


def _threshold_from_descending(ordered: torch.Tensor, probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    n_keep = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True)  # smallest head reaching top_p
    if top_k > 0:
        n_keep = n_keep.clamp_max(top_k)
    return ordered.gather(1, n_keep.clamp_min(1) - 1)
