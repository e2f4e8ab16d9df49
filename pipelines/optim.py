"""The optimiser and learning-rate schedule of every training job: AdamW, linear warm-up, then a cosine.

The paper pre-trains with AdamW (weight decay 0.05), a warm-up to the peak rate and a decay; BLIP's code
applies weight decay to every parameter, and so do we. The schedule is a pure function of the optimizer step
(``lr_at``), so a resumed job recomputes it from the step it restored; the ``LambdaLR`` wrapper exists so
that its state travels in checkpoints like the optimiser's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_at(
    step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 1e-6, min_lr: float = 0.0
) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear from ``warmup_lr`` to ``lr`` over
    ``warmup_steps``, then a half cosine from ``lr`` down to ``min_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW with weight decay on every trainable parameter, as BLIP's code does."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to optimise: no parameter requires a gradient")
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_lr: float = 1e-6,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_at`` as a scheduler: call ``scheduler.step()`` after every ``optimizer.step()``."""

    def factor(step: int) -> float:
        return (
            lr_at(step, lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, warmup_lr=warmup_lr, min_lr=min_lr)
            / lr
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
