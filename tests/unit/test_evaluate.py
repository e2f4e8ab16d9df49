import weakref

import pytest
import torch

from blip_core import BlipConfig, BlipModel, BlipTokenizer
from pipelines.evaluate import (
    _recalls,
    _retrieval_ranks,
    caption_metrics,
    caption_scores,
    retrieval_metrics,
    tokenize_caption,
)


def _full_row_recalls(score_i2t, score_t2i, img2txt, txt2img, stable=True):
    """The former full-matrix recalls: argsort every query's whole score row."""
    order = score_i2t.argsort(dim=1, descending=True, stable=stable)
    tr = torch.tensor([min(int((order[i] == t).nonzero()[0, 0]) for t in gts) for i, gts in enumerate(img2txt)])
    order = score_t2i.argsort(dim=1, descending=True, stable=stable)
    ir = torch.tensor([int((order[t] == i).nonzero()[0, 0]) for t, i in enumerate(txt2img)])
    return _recalls(tr, ir)


def test_recalls_count_the_best_ranked_ground_truth():
    # 3 images, 2 captions each (texts 0-5); image i's captions are 2i and 2i+1; every text is listed
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its caption 1 first -> rank 0
            [0.9, 0.0, 0.1, 0.0, 0.0, 0.0],  # image 1: caption 0 (wrong) first, its caption 2 second -> rank 1
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # image 2: ties rank the lower index first: its caption 4 -> rank 4
        ]
    )
    t2i = torch.eye(3).repeat_interleave(2, dim=0)  # every caption ranks its own image first
    everything = torch.arange(6).expand(3, 6), torch.arange(3).expand(6, 3)
    tr, ir = _retrieval_ranks(everything[0], i2t, everything[1], t2i, img2txt, txt2img, fill=-100.0)
    assert tr.tolist() == [0, 1, 4] and ir.tolist() == [0] * 6
    r = _recalls(tr, ir)
    assert r["img_r1"] == 100.0 and r["txt_r1"] == pytest.approx(100.0 / 3) and r["txt_r5"] == 100.0


def test_ranks_from_top_k_lists_equal_a_stable_sort_of_the_filled_matrix():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, k = 7, 21, 4
    img2txt = [list(range(3 * i, 3 * i + 3)) for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(3)]
    for trial in range(20):
        # scores from a few levels: ties among listed candidates, with the fill (-100) and across the list edge
        levels = torch.tensor([-100.0, 0.0, 1.0, 2.0])
        i2t_idx = torch.stack([torch.randperm(n_txt, generator=g)[:k] for _ in range(n_img)])
        t2i_idx = torch.stack([torch.randperm(n_img, generator=g)[:k] for _ in range(n_txt)])
        i2t_score = levels[torch.randint(0, 4, (n_img, k), generator=g)]
        t2i_score = levels[torch.randint(0, 4, (n_txt, k), generator=g)]
        full_i2t = torch.full((n_img, n_txt), -100.0).scatter(1, i2t_idx, i2t_score)
        full_t2i = torch.full((n_txt, n_img), -100.0).scatter(1, t2i_idx, t2i_score)
        ranks = _retrieval_ranks(i2t_idx, i2t_score, t2i_idx, t2i_score, img2txt, txt2img, fill=-100.0)
        assert _recalls(*ranks) == _full_row_recalls(full_i2t, full_t2i, img2txt, txt2img), trial


def test_caption_scores_reward_exact_matches():
    refs = [["a red circle on the left", "a red circle"], ["two blue squares", "blue squares"]]
    perfect = caption_scores(refs, ["A red circle on the left.", "two blue squares"])
    wrong = caption_scores(refs, ["a green star at the top", "one yellow triangle"])
    assert perfect["bleu4"] > 90 and perfect["cider"] > wrong["cider"]
    assert wrong["bleu4"] < 1
    assert tokenize_caption("A Red, circle!") == "a red circle"


def _dataset(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 64, 64, generator=g), [f"caption {i} one", f"caption {i} two"], str(i)) for i in range(n)]


def test_retrieval_and_caption_metrics_run_on_a_model():
    torch.manual_seed(0)
    model = BlipModel(BlipConfig.preset("tiny"), BlipTokenizer.bert_base_uncased()).eval()
    data = _dataset()
    r = retrieval_metrics(model, data, k=3, batch_size=4)
    assert r["images"] == 6 and r["texts"] == 12 and r["k"] == 3
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert 0.0 <= r[key] <= 100.0
    assert r["img_r10"] == 100.0  # 6 images: every caption's image is within its top 10
    metrics, rows = caption_metrics(
        model,
        data,
        batch_size=4,
        max_length=10,
        min_length=5,
        attribute_accuracy=lambda image_id, text: {"correct": 1, "total": 2},
    )
    assert metrics["images"] == 6 and len(rows) == 6
    assert metrics["caption_attribute_accuracy"] == 50.0
    assert all(isinstance(row["caption"], str) for row in rows)


@torch.no_grad()
def _reference_retrieval(model, data, k, stable=True):
    """The former algorithm, whole matrices: all image tokens, full ITC similarities, ITM on each query's top k,
    -100 elsewhere, ranks by argsort of every row."""
    texts = [c for _, caps, _ in data for c in caps]
    img2txt, txt2img = [], []
    for i, (_, caps, _) in enumerate(data):
        img2txt.append(list(range(len(txt2img), len(txt2img) + len(caps))))
        txt2img.extend([i] * len(caps))
    embeds = torch.cat(
        [model.encode_image(torch.stack([x[0] for x in data[s : s + 4]])) for s in range(0, len(data), 4)]
    )
    ids, mask = model.tokenize(texts)
    sim = model.image_features(embeds) @ model.text_features(model.encode_text_ids(ids, mask)).t()

    def rerank(sim, image_of, text_of):
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
        query = torch.arange(len(sim)).unsqueeze(1).expand_as(top_idx).flatten()
        ii, tt = image_of(query, top_idx.flatten()), text_of(query, top_idx.flatten())
        itm = model.itm_logits(embeds[ii], ids[tt], mask[tt])[:, 1]
        return torch.full_like(sim, -100.0).scatter(1, top_idx, itm.view_as(top_idx) + top_sim)

    score_i2t = rerank(sim, lambda q, c: q, lambda q, c: c)
    score_t2i = rerank(sim.t(), lambda q, c: c, lambda q, c: q)
    out = _full_row_recalls(score_i2t, score_t2i, img2txt, txt2img, stable)
    itc = _full_row_recalls(sim, sim.t(), img2txt, txt2img, stable)
    return out, itc


@pytest.mark.parametrize("k", [3, 12, 40])  # 16 images, 32 texts: outside the top k (ties matter), k >= 10, all
def test_retrieval_equals_the_full_matrix_algorithm(k):
    torch.manual_seed(0)
    model = BlipModel(BlipConfig.preset("tiny"), BlipTokenizer.bert_base_uncased()).eval()
    data = _dataset(16)
    r = retrieval_metrics(model, data, k=k, batch_size=4, itm_batch=8)
    for stable in (True, False) if k >= 10 else (True,):  # k >= 10: a row's tie order cannot move R@1/5/10
        ref, itc = _reference_retrieval(model, data, k, stable=stable)
        assert {key: r[key] for key in ref} == ref
        assert (r["itc_txt_r1"], r["itc_img_r1"]) == (itc["txt_r1"], itc["img_r1"])
    assert (r["images"], r["texts"], r["k"]) == (16, 32, k)


def test_retrieval_encodes_each_image_twice_and_holds_one_batch_of_tokens(monkeypatch):
    torch.manual_seed(0)
    model = BlipModel(BlipConfig.preset("tiny"), BlipTokenizer.bert_base_uncased()).eval()
    encode, sizes, outputs, alive = model.encode_image, [], [], []

    def counting_encode(images):
        alive.append(sum(ref() is not None for ref in outputs))  # earlier batches' tokens still held
        tokens = encode(images)
        sizes.append(len(images))
        outputs.append(weakref.ref(tokens))
        return tokens

    monkeypatch.setattr(model, "encode_image", counting_encode)
    retrieval_metrics(model, _dataset(10), k=3, batch_size=4)
    assert sizes == [4, 4, 2] * 2  # features pass, then the re-rank pass
    assert max(alive) <= 1
