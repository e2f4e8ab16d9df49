"""Readers: everything that turns stored data into samples, in one import.

    from pipelines.data import list_shards, read_shards_ray, ShardStream, KarpathyDataset, bootstrapped_stream

Where each piece lives (one responsibility per module):
  pipelines/shards.py        img2dataset webdataset shards: ``list_shards`` (committed ingest dirs only),
                             ``iter_shard`` (one shard, front to back), ``read_shards_ray`` (a Ray Dataset of
                             rows ``key, shard, url, text, image`` with the image still encoded: decoding
                             belongs to the stage that needs pixels).
  pipelines/stream.py        ``ShardStream``, the torch IterableDataset for training: units (shards) dealt
                             over ranks x DataLoader workers by sample count, shuffle buffer, seeded epochs,
                             corrupt images skipped and counted; ``balance="pad"`` + ``steps_per_epoch`` for
                             DDP. The sharding policy is in that module's docstring.
  pipelines/karpathy.py      COCO-Karpathy JSON on any fsspec URL: ``KarpathyDataset`` (image, captions,
                             image_id), ``KarpathyPairs`` (image, caption, image_id), ``KarpathySource`` (units
                             for the stream, to mix the human set with shards).
  pipelines/bootstrapped.py  a round's bootstrapped dataset: the manifest
                             (``<root>/round=<k>/dataset/manifest.json``, format in that module's docstring;
                             ``write_manifest`` for the assemble stage) and the shard-local join of kept
                             CapFilt rows to their images, ``bootstrapped_stream``.
Transforms (BLIP's train/eval preprocessing, ``decode_image``) live in ``blip_core.transforms``: the model
library owns its input normalisation.
"""

from blip_core.transforms import CorruptImageError, decode_image, eval_transform, train_transform

from .bootstrapped import (
    BootstrappedSource,
    DatasetManifest,
    bootstrapped_sources,
    bootstrapped_stream,
    read_manifest,
    write_manifest,
)
from .karpathy import KarpathyDataset, KarpathyEntry, KarpathyPairs, KarpathySource, read_karpathy
from .shards import NotCommittedError, iter_shard, list_shards, read_shards_ray, shard_name, shard_size
from .sources import RawSample, Sample, ShardSource, Source, StreamUnit
from .stream import ShardStream, assign_units

__all__ = [
    "BootstrappedSource",
    "CorruptImageError",
    "DatasetManifest",
    "KarpathyDataset",
    "KarpathyEntry",
    "KarpathyPairs",
    "KarpathySource",
    "NotCommittedError",
    "RawSample",
    "Sample",
    "ShardSource",
    "ShardStream",
    "Source",
    "StreamUnit",
    "assign_units",
    "bootstrapped_sources",
    "bootstrapped_stream",
    "decode_image",
    "eval_transform",
    "iter_shard",
    "list_shards",
    "read_karpathy",
    "read_manifest",
    "read_shards_ray",
    "shard_name",
    "shard_size",
    "train_transform",
    "write_manifest",
]
