"""Read + decode, on CPU: one Ray read task per shard reads the tar front to back (one GET on an object store)
and yields blocks of decoded rows, each model's pixels resized to uint8 once. An image that is missing or cannot
be decoded keeps a status; a text that is empty or too long keeps a status. Every shard ends with one internal
end row (rows.py) that says how many samples were read and, for a truncated tar, where and why it broke: the
writers and the driver know from it when a shard's rows are all there (stage.py)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..shards import ShardSample, iter_shard, shard_name
from .pixels import pil_transform
from .rows import EXTRA_COLUMN, SHARD_END, SHARD_READ_COLUMN, UNIT_COLUMN
from .settings import Settings, image_seed

log = logging.getLogger(__name__)


def text_status(text: str, max_chars: int) -> str:
    if not text or not text.strip():
        return "empty_text"
    if len(text) > max_chars:
        return "text_too_long"
    return "ok"


class ShardDecoder:
    """Reads a shard front to back and yields decoded, resized rows in blocks of ``capfilt.decode_batch_rows``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.specs = settings.pixel_specs()
        self.transforms = {s.column: pil_transform(s) for s in self.specs}

    def decode_rows(self, samples: Sequence[Any], shard: str, unit: int) -> dict[str, np.ndarray]:
        from blip_core.transforms import CorruptImageError, decode_image

        n = len(samples)
        out: dict[str, Any] = {
            UNIT_COLUMN: np.full(n, unit, dtype=np.int32),
            SHARD_READ_COLUMN: np.full(n, -1, dtype=np.int32),
            "shard": np.array([shard] * n, dtype=object),
            "key": np.array([s.key for s in samples], dtype=object),
            "url": np.array([s.meta.get("url") if isinstance(s.meta, dict) else None for s in samples], dtype=object),
            "seed": np.array([image_seed(self.settings.seed, s.key) for s in samples], dtype=np.int64),
        }
        if self.settings.extra_columns:  # the ingest's extra columns from each sample's .json, for rows.build_rows
            names = [f.name for f in self.settings.extra_columns]
            metas = [s.meta if isinstance(s.meta, dict) else {} for s in samples]
            out[EXTRA_COLUMN] = np.array([json.dumps({c: m.get(c) for c in names}) for m in metas], dtype=object)
        texts, lengths, tstat, istat, errors = [], [], [], [], []
        pixels = {s.column: np.zeros((n, s.size, s.size, 3), dtype=np.uint8) for s in self.specs}
        for i, s in enumerate(samples):
            text = s.text if isinstance(s.text, str) else ""
            lengths.append(len(text))
            tstat.append(text_status(text, self.settings.max_text_chars))
            texts.append(text[: self.settings.max_text_chars])
            err = None
            if s.image is None:
                ist, err = "missing_image", "the shard has no image for this key"
            else:
                try:
                    img = decode_image(s.image)
                    for col, tf in self.transforms.items():
                        pixels[col][i] = np.asarray(tf(img), dtype=np.uint8)  # decode_image gave RGB
                    ist = "ok"
                except CorruptImageError as e:
                    ist, err = "corrupt_image", str(e)[:500]
                except Exception as e:  # noqa: BLE001 - a transform failing on one odd image must not lose the batch
                    ist, err = "corrupt_image", f"{type(e).__name__}: {e}"[:500]
            istat.append(ist)
            errors.append(err)
        out.update(
            text=np.array(texts, dtype=object),
            text_length=np.array(lengths, dtype=np.int32),
            text_status=np.array(tstat, dtype=object),
            image_status=np.array(istat, dtype=object),
            error=np.array(errors, dtype=object),
            **pixels,
        )
        return out

    def __call__(self, shard_url: str, unit: int) -> Iterator[dict[str, np.ndarray]]:
        name = shard_name(shard_url)
        samples = iter_shard(shard_url)
        pending: list = []
        read = 0
        error = None
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - a broken tar: keep what was read, report the break
                log.warning("shard %s is broken after %d samples: %s", shard_url, read, e)
                error = f"after {read} samples: {type(e).__name__}: {e}"
                break
            read += 1
            pending.append(sample)
            if len(pending) >= self.settings.decode_batch_rows:
                yield self.decode_rows(pending, name, unit)
                pending = []
        if pending:
            yield self.decode_rows(pending, name, unit)
        yield self.shard_end(name, unit, read, error)

    def shard_end(self, shard: str, unit: int, read: int, error: str | None) -> dict[str, np.ndarray]:
        row = self.decode_rows([ShardSample(key=f"__end_of_{shard}__", image=None, text="", meta={})], shard, unit)
        row[SHARD_READ_COLUMN] = np.array([read], dtype=np.int32)
        row["error"] = np.array([None if error is None else error[:1000]], dtype=object)
        row["image_status"] = np.array([SHARD_END], dtype=object)
        return row


def shard_datasource(items: Sequence[tuple[str, int]], settings: Settings):
    """A Ray Datasource with one read task per (shard URL, unit), in that order. Reading and decoding are one
    CPU task (a Read, which Ray never fuses into the captioner actor, where decoding would run serially with
    the model)."""
    from ray.data.block import BlockAccessor, BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def make(url: str, unit: int):
        def read_fn():
            for batch in ShardDecoder(settings)(url, unit):
                yield BlockAccessor.batch_to_block(batch)

        return read_fn

    class ShardDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
        ) -> list:
            return [
                ReadTask(
                    make(url, unit), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(url,))
                )
                for url, unit in items
            ]

    return ShardDatasource()
