import torch

from blip_core import BlipConfig, BlipModel, BlipTokenizer
from pipelines.evaluate import _recalls, caption_metrics, caption_scores, retrieval_metrics, tokenize_caption


def test_recalls_count_the_best_ranked_ground_truth():
    # 3 images, 2 captions each (texts 0-5); image i's captions are 2i and 2i+1
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    i2t = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # image 0: its caption 1 first -> rank 0
            [0.9, 0.0, 0.1, 0.0, 0.0, 0.0],  # image 1: caption 0 (wrong) first, its caption 2 second -> rank 1
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # image 2: ties; argsort order decides; its captions are last
        ]
    )
    t2i = torch.eye(3).repeat_interleave(2, dim=0)  # every caption ranks its own image first
    r = _recalls(i2t, t2i, img2txt, txt2img)
    assert r["img_r1"] == 100.0
    assert abs(r["txt_r1"] - 100.0 / 3) < 1e-6 or abs(r["txt_r1"] - 200.0 / 3) < 1e-6
    assert r["txt_r5"] >= 200.0 / 3


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
