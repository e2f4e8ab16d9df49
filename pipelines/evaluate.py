"""Evaluation on a COCO-Karpathy-format held-out set: retrieval (ITC top-k, then ITM re-rank) and captioning.

Retrieval follows the paper's two stages: every image-text pair is ranked by ITC cosine similarity, the top
``k`` candidates of each query are re-scored by the ITM head, and recall@1/5/10 is reported for text
retrieval (image -> its captions) and image retrieval (caption -> its image). Captioning uses beam search
(3 beams, max 20, min 5 tokens, the prompt) and BLEU-4 / CIDEr from pycocoevalcap.
"""

from __future__ import annotations

import builtins  # ``round`` is a stage parameter here: builtins.round is the number's
import json
import logging
import re
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from blip_core import BlipModel

log = logging.getLogger(__name__)


def _collate(batch):
    images, captions, ids = zip(*batch)
    return torch.stack(images), list(captions), list(ids)


@torch.no_grad()
def encode_eval_set(model: BlipModel, dataset, batch_size: int = 64, num_workers: int = 0):
    """Image tokens, image ITC features, all captions and the caption -> image index."""
    image_embeds, image_feats, texts, txt2img, img2txt = [], [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for images, captions, _ in loader:
        emb = model.encode_image(images)
        image_embeds.append(emb.cpu())
        image_feats.append(model.image_features(emb).cpu())
        for caps in captions:
            img = len(img2txt)
            img2txt.append(list(range(len(texts), len(texts) + len(caps))))
            texts.extend(caps)
            txt2img.extend([img] * len(caps))
    return torch.cat(image_embeds), torch.cat(image_feats), texts, txt2img, img2txt


@torch.no_grad()
def retrieval_metrics(model: BlipModel, dataset, k: int = 256, batch_size: int = 64, itm_batch: int = 128) -> dict:
    """TR/IR R@1/5/10 (percent) of ITC ranking re-ranked by ITM on the top ``k``; also ITC-only R@1."""
    model.eval()
    image_embeds, image_feats, texts, txt2img, img2txt = encode_eval_set(model, dataset, batch_size)
    return rank_two_stage(
        model, image_embeds, image_feats, texts, txt2img, img2txt, k=k, batch_size=batch_size, itm_batch=itm_batch
    )


@torch.no_grad()
def rank_two_stage(
    model: BlipModel,
    image_embeds: torch.Tensor,
    image_feats: torch.Tensor,
    texts: list[str],
    txt2img: list[int],
    img2txt: list[list[int]],
    k: int = 256,
    batch_size: int = 64,
    itm_batch: int = 128,
) -> dict:
    """The two stages over encoded images (or clips: their frames' tokens concatenated) and raw texts."""
    ids, mask = model.tokenize(texts)
    text_feats = torch.cat(
        [
            model.text_features(model.encode_text_ids(ids[i : i + batch_size], mask[i : i + batch_size])).cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )
    sim = image_feats @ text_feats.t()  # [images, texts]
    n_img, n_txt = sim.shape
    dev = model.device

    def itm(img_idx: torch.Tensor, txt_idx: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(img_idx), itm_batch):
            ii, tt = img_idx[s : s + itm_batch], txt_idx[s : s + itm_batch]
            logits = model.itm_logits(image_embeds[ii].to(dev), ids[tt].to(dev), mask[tt].to(dev))
            out.append(logits[:, 1].cpu())  # BLIP re-ranks by the ITM "match" logit
        return torch.cat(out)

    score_i2t = torch.full_like(sim, -100.0)
    k_t = min(k, n_txt)
    top_sim, top_idx = sim.topk(k_t, dim=1)
    scores = itm(torch.arange(n_img).repeat_interleave(k_t), top_idx.reshape(-1)).view(n_img, k_t)
    score_i2t.scatter_(1, top_idx, scores + top_sim)

    score_t2i = torch.full_like(sim.t(), -100.0)
    k_i = min(k, n_img)
    top_sim, top_idx = sim.t().topk(k_i, dim=1)
    scores = itm(top_idx.reshape(-1), torch.arange(n_txt).repeat_interleave(k_i)).view(n_txt, k_i)
    score_t2i.scatter_(1, top_idx, scores + top_sim)

    out = _recalls(score_i2t, score_t2i, img2txt, txt2img)
    itc_only = _recalls(sim, sim.t(), img2txt, txt2img)
    out.update(
        {"itc_txt_r1": itc_only["txt_r1"], "itc_img_r1": itc_only["img_r1"], "k": k, "images": n_img, "texts": n_txt}
    )
    return out


def _recalls(score_i2t: torch.Tensor, score_t2i: torch.Tensor, img2txt: list[list[int]], txt2img: list[int]) -> dict:
    order = score_i2t.argsort(dim=1, descending=True)
    tr_rank = torch.tensor([min(int((order[i] == t).nonzero()[0, 0]) for t in gts) for i, gts in enumerate(img2txt)])
    order = score_t2i.argsort(dim=1, descending=True)
    ir_rank = torch.tensor([int((order[t] == i).nonzero()[0, 0]) for t, i in enumerate(txt2img)])
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
