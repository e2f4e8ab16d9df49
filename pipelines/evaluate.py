"""Evaluation on a COCO-Karpathy-format held-out set: retrieval (ITC top-k, then ITM re-rank) and captioning.

Retrieval follows the paper's two stages: every image-text pair is ranked by ITC cosine similarity, the top
``k`` candidates of each query are re-scored by the ITM head, and recall@1/5/10 is reported for text
retrieval (image -> its captions) and image retrieval (caption -> its image). Only ITC features and top-``k``
lists are kept for the whole set: the re-rank encodes the images again, one batch of tokens at a time.
Captioning uses beam search (3 beams, max 20, min 5 tokens, the prompt) and BLEU-4 / CIDEr from pycocoevalcap.
"""

from __future__ import annotations

import builtins  # ``round`` is a stage parameter here: builtins.round is the number's
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from blip_core import BlipModel

log = logging.getLogger(__name__)


def _collate(batch):
    images, captions, ids = zip(*batch)
    return torch.stack(images), list(captions), list(ids)


@torch.no_grad()
def encode_eval_set(model: BlipModel, dataset, batch_size: int = 64, num_workers: int = 0):
    """Image ITC features [images, embed_dim], all captions, the caption -> image and image -> captions indices.
    Each batch's image tokens are dropped once projected: the ITM re-rank encodes the images again."""
    image_feats, texts, txt2img, img2txt = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for images, captions, _ in loader:
        image_feats.append(model.image_features(model.encode_image(images)).cpu())
        for caps in captions:
            img = len(img2txt)
            img2txt.append(list(range(len(texts), len(texts) + len(caps))))
            texts.extend(caps)
            txt2img.extend([img] * len(caps))
    return torch.cat(image_feats), texts, txt2img, img2txt


@torch.no_grad()
def image_token_chunks(model: BlipModel, dataset, batch_size: int = 64, num_workers: int = 0) -> Iterator[torch.Tensor]:
    """The dataset's image tokens in dataset order, one batch [batch, tokens, vision width] at a time."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for images, _, _ in loader:
        yield model.encode_image(images)


@torch.no_grad()
def retrieval_metrics(model: BlipModel, dataset, k: int = 256, batch_size: int = 64, itm_batch: int = 128) -> dict:
    """TR/IR R@1/5/10 (percent) of ITC ranking re-ranked by ITM on the top ``k``; also ITC-only R@1. Each image is
    encoded twice (ITC features, then tokens for the re-rank) and at most one batch of image tokens is held."""
    model.eval()
    image_feats, texts, txt2img, img2txt = encode_eval_set(model, dataset, batch_size)
    tokens = image_token_chunks(model, dataset, batch_size)
    return rank_two_stage(
        model, tokens, image_feats, texts, txt2img, img2txt, k=k, batch_size=batch_size, itm_batch=itm_batch
    )


@torch.no_grad()
def rank_two_stage(
    model: BlipModel,
    image_tokens: Iterable[torch.Tensor],
    image_feats: torch.Tensor,
    texts: list[str],
    txt2img: list[int],
    img2txt: list[list[int]],
    k: int = 256,
    batch_size: int = 64,
    itm_batch: int = 128,
) -> dict:
    """The two stages over images (or clips: their frames' tokens concatenated) and raw texts.

    ``image_tokens`` yields the images' tokens in image order, one chunk [chunk, tokens, width] at a time, and is
    read once, for the ITM re-rank. Memory is O((images + texts) x (embed_dim + k)) plus one chunk of tokens and
    one ITM batch; no [images, texts] matrix is built. A ground truth outside its query's top ``k`` scores -100:
    it ranks after every re-ranked candidate."""
    ids, mask = model.tokenize(texts)
    text_feats = torch.cat(
        [
            model.text_features(model.encode_text_ids(ids[i : i + batch_size], mask[i : i + batch_size])).cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )
    n_img, n_txt = len(image_feats), len(texts)
    i2t_sim, i2t_idx = _topk_similarity(image_feats, text_feats, min(k, n_txt))  # [images, k] texts
    t2i_sim, t2i_idx = _topk_similarity(text_feats, image_feats, min(k, n_img))  # [texts, k] images

    # the pairs either direction re-ranks, each once, keyed image * n_txt + text: sorted, they group by image
    i2t_key = torch.arange(n_img).unsqueeze(1) * n_txt + i2t_idx
    t2i_key = t2i_idx * n_txt + torch.arange(n_txt).unsqueeze(1)
    pairs = torch.cat([i2t_key.flatten(), t2i_key.flatten()]).unique()
    itm = _itm_scores(model, image_tokens, pairs, n_img, n_txt, ids, mask, itm_batch)
    i2t_score = itm[torch.searchsorted(pairs, i2t_key)] + i2t_sim
    t2i_score = itm[torch.searchsorted(pairs, t2i_key)] + t2i_sim

    out = _recalls(*_retrieval_ranks(i2t_idx, i2t_score, t2i_idx, t2i_score, img2txt, txt2img, fill=-100.0))
    # a ground truth outside the ITC top k ranks >= k >= 1 whatever its similarity: ITC R@1 is exact
    itc_only = _recalls(*_retrieval_ranks(i2t_idx, i2t_sim, t2i_idx, t2i_sim, img2txt, txt2img, fill=-math.inf))
    out.update(
        {"itc_txt_r1": itc_only["txt_r1"], "itc_img_r1": itc_only["img_r1"], "k": k, "images": n_img, "texts": n_txt}
    )
    return out


_SIM_ROWS = 256  # query rows per block of ITC similarities: at most 256 x candidates floats exist at once


def _topk_similarity(queries: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query feature's ``k`` most similar candidate features: (similarities, indices), both [queries, k]."""
    blocks = [(queries[s : s + _SIM_ROWS] @ candidates.t()).topk(k, dim=1) for s in range(0, len(queries), _SIM_ROWS)]
    return torch.cat([b.values for b in blocks]), torch.cat([b.indices for b in blocks])


def _itm_scores(
    model: BlipModel,
    image_tokens: Iterable[torch.Tensor],
    pairs: torch.Tensor,
    n_img: int,
    n_txt: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    itm_batch: int,
) -> torch.Tensor:
    """The ITM "match" logit (BLIP re-ranks by it) of each pair image * n_txt + text of the sorted ``pairs``. Each
    chunk of ``image_tokens`` is read once, in order. The pairs go through the ITM head in batches of ``itm_batch``,
    all full but the last (few shapes: CPU kernels keep memory per shape), whose image tokens are gathered from
    as many chunks as they span: at most one chunk and one batch of gathered tokens are held."""
    scores = torch.empty(len(pairs))
    first = s = start = 0  # the batch being filled starts at pair ``first``; pairs before ``s`` are gathered
    for tokens in image_tokens:
        stop = start + len(tokens)
        end = int(torch.searchsorted(pairs, stop * n_txt))  # this chunk's images' pairs end here
        while s < end:
            if s == first:
                batch = tokens.new_empty((min(itm_batch, len(pairs) - first), *tokens.shape[1:]))
            e = min(first + len(batch), end)
            image = (pairs[s:e] // n_txt - start).to(tokens.device)
            torch.index_select(tokens, 0, image, out=batch[s - first : e - first])
            if e == first + len(batch):
                txt = pairs[first:e] % n_txt
                scores[first:e] = model.itm_logits(batch.to(model.device), ids[txt], mask[txt])[:, 1].cpu()
                first = e
            s = e
        start = stop
    if start != n_img:
        raise ValueError(f"image_tokens holds {start} images' tokens for {n_img} images' features")
    return scores


def _ranks(
    cand_idx: torch.Tensor,
    cand_score: torch.Tensor,
    query: torch.Tensor,
    target: torch.Tensor,
    n_candidates: int,
    fill: float,
) -> torch.Tensor:
    """The rank (0 = first) of candidate ``target[p]`` for query ``query[p]`` among ``n_candidates``, where query
    q's listed candidates ``cand_idx[q]`` score ``cand_score[q]`` and all others score ``fill``. Equal scores rank
    the lower index first: the order a stable descending sort of the query's whole score row gives."""
    idx, score, t = cand_idx[query], cand_score[query], target.unsqueeze(1)
    listed = idx == t
    own = torch.where(listed.any(1), score.masked_fill(~listed, 0.0).sum(1), fill)
    before = idx < t
    rank = (score > own.unsqueeze(1)).sum(1) + ((score == own.unsqueeze(1)) & before).sum(1)
    unlisted_before = target - before.sum(1)  # unlisted candidates with a lower index than the target
    return rank + torch.where(fill > own, n_candidates - idx.shape[1], 0) + torch.where(fill == own, unlisted_before, 0)


def _retrieval_ranks(
    i2t_idx: torch.Tensor,
    i2t_score: torch.Tensor,
    t2i_idx: torch.Tensor,
    t2i_score: torch.Tensor,
    img2txt: list[list[int]],
    txt2img: list[int],
    fill: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the rank of its best-ranked caption among the texts, per text the rank of its image among the
    images, from each query's listed candidates and scores (every other candidate scores ``fill``)."""
    n_img, n_txt = len(img2txt), len(txt2img)
    image = torch.tensor([i for i, gts in enumerate(img2txt) for _ in gts])
    caption = torch.tensor([t for gts in img2txt for t in gts])
    tr = _ranks(i2t_idx, i2t_score, image, caption, n_txt, fill)
    tr_best = torch.full((n_img,), n_txt).scatter_reduce(0, image, tr, "amin")
    ir = _ranks(t2i_idx, t2i_score, torch.arange(n_txt), torch.tensor(txt2img), n_img, fill)
    return tr_best, ir


def _recalls(tr_rank: torch.Tensor, ir_rank: torch.Tensor) -> dict:
    """Text (per image) and image (per text) recall@1/5/10 in percent, their means and the overall mean."""
    out = {}
    for name, ranks in (("txt", tr_rank), ("img", ir_rank)):
        for r in (1, 5, 10):
            out[f"{name}_r{r}"] = 100.0 * float((ranks < r).float().mean())
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize_caption(text: str) -> str:
    """Lower-case words without punctuation: the normalisation COCO's PTB tokenizer applies, without Java."""
    return " ".join(_TOKEN.findall(text.lower()))


def caption_scores(references: Sequence[Sequence[str]], candidates: Sequence[str]) -> dict:
    """BLEU-4 and CIDEr (pycocoevalcap scorers) of one candidate per image against its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(c) or "empty"] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": 100.0 * float(bleu[3]), "cider": 100.0 * float(cider)}


@torch.no_grad()
def caption_metrics(
    model: BlipModel,
    dataset,
    batch_size: int = 32,
    num_beams: int = 3,
    max_length: int = 20,
    min_length: int = 5,
    prompt: str | None = None,
    attribute_accuracy: Callable[[str, str], dict] | None = None,
) -> tuple[dict, list[dict]]:
    """Beam-search captions of every image, scored with BLEU-4 and CIDEr; with ``attribute_accuracy``
    (image_id, caption) -> {"correct", "total", ...} also the synthetic world's attribute accuracy."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=_collate)
    refs, cands, rows = [], [], []
    for images, captions, image_ids in loader:
        out = model.generate(images, num_beams=num_beams, max_length=max_length, min_length=min_length, prompt=prompt)
        for caption, gts, image_id in zip(out, captions, image_ids):
            refs.append(gts)
            cands.append(caption)
            rows.append({"image_id": image_id, "caption": caption, "references": gts})
    metrics = caption_scores(refs, cands)
    if attribute_accuracy is not None:
        correct = total = 0
        for row in rows:
            acc = attribute_accuracy(row["image_id"], row["caption"])
            row["attributes"] = acc
            correct += acc["correct"]
            total += acc["total"]
        metrics["caption_attribute_accuracy"] = 100.0 * correct / max(total, 1)
    metrics["images"] = len(rows)
    return metrics, rows


def world_attribute_scorer(root: str) -> Callable[[str, str], dict] | None:
    """(image_id, caption) -> attribute accuracy against the synthetic world's ground truth, or None when the
    run has no world. Only evaluation reads ``world/truth/``."""
    import pyarrow.parquet as pq

    from . import storage
    from .world import caption_attribute_accuracy

    truth_url = storage.join(storage.RunRoot(root).world(), "truth", "images.parquet")
    fs, path = storage.filesystem(truth_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["image_id", "facts"])
    facts = dict(zip(table.column("image_id").to_pylist(), (json.loads(x) for x in table.column("facts").to_pylist())))

    def score(image_id: str, caption: str) -> dict:
        return caption_attribute_accuracy(facts[image_id], caption)

    return score


def run_eval(cfg, root: str, round: int) -> dict:
    """``capfilt eval --round K``: writes ``<root>/round=K/eval/metrics.json`` (+ ``captions.jsonl``), committed."""
    import time

    from blip_core.transforms import eval_transform

    from . import storage
    from .karpathy import KarpathyDataset
    from .modeling import human_set, load_model

    rr = storage.RunRoot(root)
    out = rr.round(round, "eval")
    if storage.is_committed(out):
        log.info("round %d evaluation is committed: %s", round, out)
        return storage.read_json(storage.join(out, "metrics.json"))
    model_url = storage.join(rr.round(round, "pretrain"), "model")
    if not storage.is_committed(rr.round(round, "pretrain")):
        raise FileNotFoundError(
            f"round {round} has no committed pre-trained model at {model_url}: run capfilt pretrain first"
        )
    e = cfg.eval
    model = load_model(model_url, image_size=e.image_size)
    hs = human_set(cfg, root)
    data = KarpathyDataset(hs["test"], hs["image_root"], transform=eval_transform(model.config.vision.image_size))
    t0 = time.perf_counter()
    retrieval = retrieval_metrics(model, data, k=e.retrieval_k, batch_size=e.batch_size)
    captioning, rows = caption_metrics(
        model,
        data,
        batch_size=e.batch_size,
        num_beams=e.num_beams,
        max_length=e.max_length,
        min_length=e.min_length,
        prompt=e.prompt,
        attribute_accuracy=world_attribute_scorer(root),
    )
    metrics = {
        "round": round,
        "model": model_url,
        "test_set": hs["test"],
        "images": len(data),
        "retrieval": retrieval,
        "captioning": captioning,
        "retrieval_r1": (retrieval["txt_r1"] + retrieval["img_r1"]) / 2,
        "caption_attribute_accuracy": captioning.get("caption_attribute_accuracy"),
        "cider": captioning["cider"],
        "seconds": builtins.round(time.perf_counter() - t0, 2),
    }
    fs, path = storage.filesystem(out)
    fs.makedirs(path, exist_ok=True)
    with fs.open(storage.join(path, "captions.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    storage.commit(out, {"round": round, "retrieval_r1": metrics["retrieval_r1"]})
    log.info(
        "round %d: retrieval R@1 %.1f, CIDEr %.1f, attribute accuracy %s",
        round,
        metrics["retrieval_r1"],
        metrics["cider"],
        metrics["caption_attribute_accuracy"],
    )
    return metrics
