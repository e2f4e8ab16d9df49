"""The seams of caption-filter: a ``Captioner`` writes K captions per image, a ``Scorer`` scores each of an
image's 1 + K texts. Both are chosen by registered name, resolved once on the driver into a ``ModelRef``
(what to load, a content id for the fingerprint, the pixels it wants), and run inside Ray actors
(``actors.py``) on fixed-shape batches of ``capfilt.model_batch_size`` images.

Adding one: subclass, decorate with ``@register_captioner("name")`` / ``@register_scorer("name")``, and name it
in the config (``capfilt.captioner_kind: name``, or a ``capfilt.scorers.name:`` section). A module outside this
package is listed in ``capfilt.plugins``: it is imported on the driver and its code ships to the Ray workers.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from ..errors import StageError
from .pixels import PixelSpec

if TYPE_CHECKING:
    from ..config import RunConfig, ScorerConfig
    from .settings import Settings


class CapfiltError(StageError):
    """A run that cannot start or continue (missing checkpoints, a plan from other settings, no resources)."""


@dataclass
class ModelRef:
    """A model resolved on the driver: its class, what it loads, its content id and its pixels. Picklable: each
    actor gets a copy and builds ``cls(ref, settings, device)``."""

    kind: str  # the registered name
    cls: type[Any]  # a Captioner or Scorer subclass
    url: str | None  # the checkpoint, if any
    id: str  # content id (part of the fingerprint: another id means other output)
    pixels: PixelSpec
    options: dict[str, Any] = field(default_factory=dict)
    keep_above: float | None = None  # scorers: keep a text only if its score is above / below
    keep_below: float | None = None


class Captioner(ABC):
    """K captions per image. Subclasses implement ``resolve`` (driver) and ``caption`` (actor)."""

    packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions go into the Parquet metadata

    @classmethod
    @abstractmethod
    def resolve(cls, cfg: RunConfig, root: str, round: int) -> ModelRef:
        """On the driver, before Ray starts: the checkpoint, its content id and the pixels it wants."""

    def __init__(self, ref: ModelRef, settings: Settings, device: Any):
        self.ref, self.settings, self.device = ref, settings, device

    @abstractmethod
    def caption(self, images: Any, seeds: Sequence[int]) -> list[list[str]]:
        """``images``: normalised float [model_batch_size, 3, H, W] on the device (trailing rows are padding);
        ``seeds``: one per row. Returns ``num_samples`` captions for every row."""


class Scorer(ABC):
    """Scores of each (image, text) pair; ``columns`` are the Parquet columns it fills, in order. The first is
    the one ``keep_above`` / ``keep_below`` apply to."""

    columns: ClassVar[tuple[pa.Field, ...]] = ()
    packages: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def resolve(cls, cfg: RunConfig, root: str, round: int, section: ScorerConfig | None) -> ModelRef:
        """On the driver, before Ray starts: what to load, its content id and the pixels it wants; ``section`` is
        the scorer's ``capfilt.scorers.<name>`` (its own options in ``section.model_extra``)."""

    def __init__(self, ref: ModelRef, settings: Settings, device: Any):
        self.ref, self.settings, self.device = ref, settings, device

    @abstractmethod
    def score(self, images: Any, texts: list[str], scored: list[bool]) -> dict[str, np.ndarray]:
        """``images`` as for ``Captioner.caption``; ``texts``: the 1 + K texts of each row, row after row (padding
        rows get "."); ``scored``: which texts are kept (a scorer may replace the others). Returns, per column, a
        float array [model_batch_size, 1 + K]."""


CAPTIONERS: dict[str, type[Captioner]] = {}
SCORERS: dict[str, type[Scorer]] = {}


def register_captioner(name: str):
    def add(cls: type[Captioner]) -> type[Captioner]:
        CAPTIONERS[name] = cls
        return cls

    return add


def register_scorer(name: str):
    def add(cls: type[Scorer]) -> type[Scorer]:
        SCORERS[name] = cls
        return cls

    return add


def captioner_class(name: str) -> type[Captioner]:
    if name not in CAPTIONERS:
        raise CapfiltError(
            f"capfilt.captioner_kind: no captioner {name!r} (registered: {sorted(CAPTIONERS)}); "
            "a captioner of another module is listed in capfilt.plugins"
        )
    return CAPTIONERS[name]


def scorer_class(name: str) -> type[Scorer]:
    if name not in SCORERS:
        raise CapfiltError(
            f"capfilt.scorers.{name}: no scorer {name!r} (registered: {sorted(SCORERS)}); "
            "a scorer of another module is listed in capfilt.plugins"
        )
    return SCORERS[name]


def import_plugins(modules: Sequence[str]) -> None:
    """Import the modules of ``capfilt.plugins`` (their decorators register captioners and scorers)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise CapfiltError(f"capfilt.plugins: cannot import {name!r}: {err}") from None


def ship_plugins(modules: Sequence[str]) -> None:
    """Let Ray pickle the plugins' classes by value, so workers run them without the modules installed."""
    from ray import cloudpickle

    for name in modules:
        cloudpickle.register_pickle_by_value(importlib.import_module(name))


def content_id(local_path: str) -> str:
    """Content hash of a checkpoint: ``blip_core.checkpoint_id`` for our format, else a hash of the files."""
    from blip_core import checkpoint_id

    if os.path.isdir(local_path) and all(
        os.path.exists(os.path.join(local_path, f)) for f in ("config.json", "model.safetensors")
    ):
        return checkpoint_id(local_path)
    h = hashlib.sha256()
    paths = (
        [local_path]
        if os.path.isfile(local_path)
        else sorted(os.path.join(b, f) for b, _, fs in os.walk(local_path) for f in fs)
    )
    for p in paths:
        h.update(os.path.relpath(p, local_path).encode() if p != local_path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
