"""The Ray actors that host a captioner or a scorer: they take Ray's batches (numpy columns) and hand the model
fixed-shape chunks of exactly ``capfilt.model_batch_size`` images, padded with blank images and "." texts, so
every forward pass has the same shapes whatever the number of actors, Ray's batch size or a row's neighbours.
(A GEMM over a different number of rows may round differently in the last bit, and even over the same shapes a
CPU kernel may round a row by its position in the chunk: a score can move by ~1e-7 with a row's neighbours.)"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from .fragments import shard_counts, write_fragments
from .models import ModelRef
from .pixels import to_tensor
from .rows import build_rows
from .settings import Settings


def fixed_chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def texts_of(batch: dict[str, np.ndarray], i: int, k: int) -> list[tuple[str, bool]]:
    """The 1 + K texts of image ``i`` and whether each is scored (web first, then the candidates)."""
    texts = [(str(batch["text"][i]), bool(batch["text_status"][i] == "ok"))]
    for j in range(k):
        t = str(batch[f"syn_{j}"][i])
        texts.append((t, bool(t.strip())))
    return texts


def score_buffer(field: pa.Field, n: int, per: int) -> np.ndarray:
    """A scorer column's values for ``n`` images x ``per`` texts: float32 NaN for a float column, zeros of the
    column's own type for an integer one (exact: a 64-bit hash does not survive a float)."""
    if pa.types.is_floating(field.type):
        return np.full((n, per), np.nan, dtype=np.float32)
    return np.zeros((n, per), dtype=field.type.to_pandas_dtype())


def score_column(column: str, j: int) -> str:
    """The internal batch column of a score of text ``j`` (0: the web text, 1..K: the candidates)."""
    return f"{column}__{j}"


class ModelActor(ABC):
    """Builds ``ref.cls`` once per actor on the pool's device and threads; drops pixel columns no later stage
    needs."""

    def __init__(self, ref: ModelRef, settings: Settings, pool: dict, drop_columns: Sequence[str] = ()):
        import torch

        torch.set_num_threads(pool.get("torch_threads") or max(1, int(pool.get("num_cpus", 1))))
        self.device = torch.device("cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu")
        self.ref, self.s = ref, settings
        self.model = ref.cls(ref, settings, self.device)
        self.drop = list(drop_columns)

    def chunks(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[list[int], object]]:
        """(row indices, their images as a padded, normalised batch) over the decodable images."""
        ok = [i for i in range(len(batch["key"])) if batch["image_status"][i] == "ok"]
        px = batch[self.ref.pixels.column]
        for chunk in fixed_chunks(ok, self.s.model_batch_size):
            yield chunk, to_tensor(px[chunk], self.ref.pixels, self.s.model_batch_size, self.device)

    @abstractmethod
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
        """The batch with this model's columns (or, for the filter, the output rows)."""

    def finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for c in self.drop:
            batch.pop(c, None)
        return batch


class CaptionActor(ModelActor):
    """K synthetic captions per decodable image (columns ``syn_0 .. syn_{K-1}``)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k, mb = len(batch["key"]), self.s.num_samples, self.s.model_batch_size
        caps = [[""] * n for _ in range(k)]
        for chunk, images in self.chunks(batch):
            seeds = [int(batch["seed"][i]) for i in chunk] + [0] * (mb - len(chunk))
            for i, texts in zip(chunk, self.model.caption(images, seeds)):
                for j in range(k):
                    caps[j][i] = texts[j]
        for j in range(k):
            batch[f"syn_{j}"] = np.array(caps[j], dtype=object)
        return self.finish(batch)


class ScoreActor(ModelActor):
    """A scorer's columns for each of an image's 1 + K texts (NaN where a text is not scored). The last scorer
    of the pipeline (the filter) also turns the batch into output rows: it returns them (``emit_rows``), or
    writes them as staged fragments under ``write_to`` and returns only their counts per shard
    (fragments.py)."""

    def __init__(
        self,
        ref: ModelRef,
        settings: Settings,
        pool: dict,
        drop_columns: Sequence[str] = (),
        emit_rows: bool = False,
        write_to: str | None = None,
    ):
        super().__init__(ref, settings, pool, drop_columns)
        self.emit_rows = emit_rows
        self.write_to = write_to

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
        n, k, mb = len(batch["key"]), self.s.num_samples, self.s.model_batch_size
        per = 1 + k
        out = {f.name: score_buffer(f, n, per) for f in self.ref.cls.columns}
        for chunk, images in self.chunks(batch):
            pairs = [p for i in chunk for p in texts_of(batch, i, k)]
            pairs += [(".", False)] * ((mb - len(chunk)) * per)
            scores = self.model.score(images, [t for t, _ in pairs], [ok for _, ok in pairs])
            scored = np.array([ok for _, ok in pairs[: len(chunk) * per]]).reshape(len(chunk), per)
            for name, values in scores.items():
                values = np.asarray(values, dtype=out[name].dtype)[: len(chunk)]
                # integer columns (hashes, distances) have no NaN: rows.py nulls what is not scored by status
                out[name][chunk] = np.where(scored, values, np.nan) if out[name].dtype == np.float32 else values
        for name, values in out.items():
            for j in range(per):
                batch[score_column(name, j)] = values[:, j]
        if self.write_to is not None:
            write_fragments(self.write_to, build_rows(batch, self.s))
            return shard_counts(batch)
        if self.emit_rows:
            return build_rows(batch, self.s)
        return self.finish(batch)
