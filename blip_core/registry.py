"""The model classes by the ``task`` name a checkpoint records (``pretrain``, ``vqa``, ``nlvr``).

Each class registers itself where it is defined (``@register_model``); ``blip_core/__init__.py`` imports every
module that defines one, so by the time anything in ``blip_core`` runs the table is complete. Code that builds a
model from a name (``checkpoint.load_pretrained``, the importers in ``convert``) looks the class up here instead
of importing ``model``, ``vqa`` and ``nlvr``, which themselves build on ``checkpoint`` and ``convert``.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound=type)

_MODELS: dict[str, type] = {}


def register_model(cls: T) -> T:
    """Class decorator: ``cls.task`` names ``cls`` in checkpoints. A name belongs to one class."""
    task = cls.task
    if _MODELS.get(task, cls) is not cls:
        raise ValueError(f"task {task!r} is already registered to {_MODELS[task].__qualname__}")
    _MODELS[task] = cls
    return cls


def model_class(task: str) -> type:
    """The class of a checkpoint's ``task``; a ValueError naming the known tasks otherwise."""
    try:
        return _MODELS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; this capfilt knows {sorted(_MODELS)}") from None


def model_classes() -> dict[str, type]:
    """Every registered task and its class."""
    return dict(_MODELS)
