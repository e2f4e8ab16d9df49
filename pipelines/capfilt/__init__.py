"""CapFilt: caption every ingested image and filter web and synthetic texts into the CapFilt Parquet.

settings.py  what a run does, resolved once on the driver; its fingerprint
models.py    the seams: ``Captioner`` and ``Scorer`` base classes and their registries
blip.py      BLIP's captioner and filter (ITM/ITC)      clip.py  the CLIP score
phash.py     perceptual hashes: duplicates and test-set leaks
pixels.py    each model's pixels                         decode.py  shard read + decode tasks
actors.py    Ray actors hosting a model on fixed-shape batches
rows.py      the output schema and the keep rule        commit.py  units, markers, exactly once
stage.py     run_caption_filter: the Ray Data pipeline  local.py  the same stages in one process
"""

from . import blip, clip, phash  # noqa: F401  - register the built-in captioner and scorers
from .commit import Unit
from .local import LocalRunner
from .models import CAPTIONERS, SCORERS, CapfiltError, Captioner, ModelRef, Scorer, register_captioner, register_scorer
from .pixels import PixelSpec, blip_pixels
from .rows import OUTPUT_SCHEMA, STATUSES, output_schema
from .settings import SCHEMA_VERSION, Settings, image_seed, resolve_settings
from .stage import build_dataset, capfilt_dir, run_caption_filter

__all__ = [
    "CAPTIONERS",
    "SCORERS",
    "Captioner",
    "CapfiltError",
    "LocalRunner",
    "ModelRef",
    "OUTPUT_SCHEMA",
    "PixelSpec",
    "SCHEMA_VERSION",
    "STATUSES",
    "Scorer",
    "Settings",
    "Unit",
    "blip_pixels",
    "build_dataset",
    "capfilt_dir",
    "image_seed",
    "output_schema",
    "register_captioner",
    "register_scorer",
    "resolve_settings",
    "run_caption_filter",
]
