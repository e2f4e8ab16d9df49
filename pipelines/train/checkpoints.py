"""A job's checkpoint state: what ``state.pt`` in each of Ray Train's checkpoints holds, written and read back.

The state is the model with BlipLosses' momentum encoders and queues, the optimiser, the scheduler, the data
position (epoch, step in epoch, global step) and a fingerprint of the settings that decide the data order.
"""

from __future__ import annotations

import os

import torch

STATE_FILE = "state.pt"


def save_state(
    directory: str, *, losses: torch.nn.Module, optimizer, scheduler, position: dict, fingerprint: dict
) -> None:
    """Write the state into ``directory`` (the folder that becomes a Ray Train checkpoint)."""
    torch.save(
        {
            "losses": losses.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "position": position,
            "fingerprint": fingerprint,
        },
        os.path.join(directory, STATE_FILE),
    )


def load_state(checkpoint) -> dict | None:
    """The state of a Ray Train checkpoint, on the CPU; None without a checkpoint."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def restore_state(state: dict, *, losses: torch.nn.Module, optimizer, scheduler) -> None:
    """Load the model (with the losses' encoders and queues), optimiser and scheduler of ``state``."""
    losses.load_state_dict(state["losses"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def resume_position(position: dict, plan: list[int]) -> tuple[int, int, int]:
    """(epoch, step in epoch, global step) to go on from: a checkpoint at the end of an epoch goes on with the
    next one."""
    epoch, step_in_epoch, global_step = position["epoch"], position["step_in_epoch"], position["global_step"]
    if epoch < len(plan) and step_in_epoch >= plan[epoch]:
        epoch, step_in_epoch = epoch + 1, 0
    return epoch, step_in_epoch, global_step
