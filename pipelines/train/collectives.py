"""The few collectives a worker needs beyond DDP's, each a no-op with one rank."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def share(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: int) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    parts = [obj]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, obj)
    return parts


def mean_over_ranks(x: torch.Tensor, world: int) -> float:
    x = x.detach().float().clone()
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return float(x)
