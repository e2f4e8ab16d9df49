"""The fault-injection hook of the fault-tolerance tests: a worker that dies once, as a crash."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FAULT_ENV = "CAPFILT_TRAIN_FAULT"


def inject_fault(step: int, rank: int) -> None:
    """Test hook: ``CAPFILT_TRAIN_FAULT=<step>:<rank>:<marker file>`` makes that rank's process die (as a crashed
    worker does) before that step, once: the marker file records that it happened."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        Path(marker).write_text(f"crashed rank {rank} before step {step}\n")
        log.error("%s: rank %d crashes before step %d (fault injection)", FAULT_ENV, rank, step)
        os._exit(17)
