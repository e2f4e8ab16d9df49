"""The numbers a job reports besides its losses: ITC retrieval on held-out features, and memory use."""

from __future__ import annotations

import os
import resource

import torch


def itc_retrieval_metrics(
    image_feats: torch.Tensor, image_index: torch.Tensor, text_feats: torch.Tensor, text_owner: torch.Tensor
) -> dict:
    """Zero-shot retrieval by ITC similarity: text->image R@1/R@5 (the text's own image ranked first / in the
    top 5) and image->text R@1/R@5 (one of the image's own captions ranked first / in the top 5), in percent.
    (``pipelines.evaluate.retrieval_metrics`` is the full evaluation: ITC ranking re-ranked by ITM, on a model.)"""
    sim = text_feats.float() @ image_feats.float().t()  # [texts, images]
    k = min(5, sim.shape[1])
    top_img = image_index[sim.topk(k, dim=1).indices]  # [texts, k] image indices
    t2i = top_img == text_owner[:, None]
    k_t = min(5, sim.shape[0])
    top_txt = text_owner[sim.t().topk(k_t, dim=1).indices]  # [images, k] owners of the best texts
    i2t = top_txt == image_index[:, None]
    return {
        "t2i_r1": 100.0 * float(t2i[:, 0].float().mean()),
        "t2i_r5": 100.0 * float(t2i.any(1).float().mean()),
        "i2t_r1": 100.0 * float(i2t[:, 0].float().mean()),
        "i2t_r5": 100.0 * float(i2t.any(1).float().mean()),
        "r1_mean": 50.0 * float(t2i[:, 0].float().mean() + i2t[:, 0].float().mean()),
        "images": int(sim.shape[1]),
        "texts": int(sim.shape[0]),
    }


def memory_stats(gpu: bool) -> dict:
    """Peak resident memory of this trainer process and (summed) of its live DataLoader workers, in MiB; peak
    GPU memory allocated by torch on GPU."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    loaders = 0.0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                for pid in f.read().split():
                    loaders += _vm_hwm_mib(pid)
    except OSError:
        pass
    out["loader_rss_mib"] = loaders
    if gpu:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _vm_hwm_mib(pid: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
