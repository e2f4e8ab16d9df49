"""CapFilt at scale: ``capfilt caption-filter --round K`` captions every ingested image and filters web and
synthetic texts, as a Ray Data pipeline that writes the CapFilt Parquet of DESIGN.md.

The pipeline (one Ray Dataset over the shards not yet committed)::

    shards --(CPU task per shard: read the tar front to back, decode + resize)--> images
           --(captioner actor pool: K captions per image, nucleus sampling or beam search)-->
           --(CLIP actor pool, optional: CLIP cosine of every text)-->
           --(filter actor pool: ITM P(match) and ITC cosine of the web text and each synthetic text,
              each image encoded once for all its 1 + K texts; keep decisions)--> rows
           --(driver: rows of one commit unit -> one Parquet file, published atomically, then a done marker)

Determinism. A caption depends only on its image, the checkpoint and a per-image seed derived from
(run seed, key); the filter scores depend only on (image, text). The models never see Ray's batches: each
actor cuts what it is handed into chunks of exactly ``capfilt.model_batch_size`` images (padded with blank
images and placeholder texts) and pads every text to the model's maximum length, so every forward pass has the
same shapes whatever the number of actors, Ray's batch size or the neighbours of a row. (A GEMM over a
different number of rows may round differently in the last bit, and even over the same shapes a CPU kernel
may round a row by its position in the chunk: a score can move by ~1e-7 with a row's neighbours.) Changing
``model_batch_size``, the device or the torch thread count may change scores in the last bits; a caption only
if a sampling draw falls within that difference of a boundary.

Exactly once. Work is committed in *units* (``capfilt.shards_per_unit`` consecutive shards; the plan is fixed
by the first run in ``_plan.json`` together with a fingerprint of everything that decides a row: checkpoint
ids, generation settings, thresholds, seed). The dataset runs with ``preserve_order``, so the driver receives
the rows of unit u, then of unit u+1, ...; when the next unit starts (or the stream ends), unit u is complete
and is published:

  1. its rows, sorted by (shard, key, candidate with web first), are written to ``part-<shard>.parquet``:
     on a local disk to ``_tmp/<name>.<uuid>.tmp`` then renamed into place (atomic); on an object store
     straight to the final name (an object becomes visible only once its upload completes);
  2. then ``_done/<name>.json`` (rows, bytes, fingerprint) is written the same way.
A unit is done iff its marker parses, matches the fingerprint and names a file of the recorded size. A rerun
skips done units and recomputes the others (overwriting a file that lost its marker with identical bytes).
When every unit is done the directory is committed with ``storage.commit`` (the summary in ``_COMMITTED``).
Killing the job at any moment therefore leaves each unit either absent, or present and identical to what an
uninterrupted run writes: one row per (key, source, candidate), none duplicated, none missing.

Bad input never fails a batch: an image that is missing or cannot be decoded gets one web row with status
``missing_image`` / ``corrupt_image`` (and no synthetic rows); an empty or whitespace web text gets
``empty_text`` (its image is still captioned), one longer than ``max_text_chars`` gets ``text_too_long`` (stored
truncated); a synthetic caption that decodes to nothing gets ``empty_text``. The models skip those rows; their
scores are null and ``keep`` is false. A shard whose tar is truncated yields the rows before the break; the
break is recorded in the unit's marker and the stage summary.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import ActorPool, RunConfig
from .errors import StageError
from .shards import iter_shard, list_shards, shard_name
from .stream import derive_seed

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = ("ok", "corrupt_image", "missing_image", "empty_text", "text_too_long")
DROP_REASONS = ("bad_input", "itm_below_threshold", "not_top_k")
PLAN = "_plan.json"
DONE_DIR = "_done"
TMP_DIR = "_tmp"
SHARD_ERROR_KEY = "__shard_error__"  # an internal row: a truncated tar, reported by the reader, never written

OUTPUT_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("text", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("candidate", pa.int16()),
    pa.field("itm_score", pa.float32()),
    pa.field("itc_score", pa.float32()),
    pa.field("clip_score", pa.float32()),
    pa.field("keep", pa.bool_(), nullable=False),
    pa.field("drop_reason", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("text_length", pa.int32(), nullable=False),
    pa.field("round", pa.int32(), nullable=False),
    pa.field("captioner_id", pa.string(), nullable=False),
    pa.field("filter_id", pa.string(), nullable=False),
])
UNIT_COLUMN = "_unit"


class CapfiltError(StageError):
    """A run that cannot start or continue (missing checkpoints, a plan from other settings, no resources)."""


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class PixelSpec:
    """How one model wants its pixels: resized as uint8 [H, W, 3] in the decode task, normalised in the actor."""

    kind: str  # "blip" (square bicubic resize, as blip_core.transforms.eval_transform) | "clip" (open_clip's eval)
    size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    @property
    def column(self) -> str:
        return f"px_{self.kind}_{self.size}"


@dataclass
class Settings:
    """Everything the stages need, resolved once on the driver (picklable: actors get a copy)."""

    round: int
    seed: int
    source: str
    captioner_url: str
    filter_url: str
    captioner_id: str
    filter_id: str
    num_samples: int
    method: str
    top_p: float
    num_beams: int
    max_length: int
    min_length: int
    repetition_penalty: float
    prompt: str | None
    itm_threshold: float
    keep_top_k_synthetic: int | None
    max_text_chars: int
    model_batch_size: int
    amp: str
    use_gpu: bool
    captioner_pixels: PixelSpec
    filter_pixels: PixelSpec
    clip_pixels: PixelSpec | None = None
    clip_model: str | None = None
    clip_checkpoint: str | None = None
    clip_id: str | None = None
    clip_model_config_file: str | None = None
    decode_batch_rows: int = 64

    def pixel_specs(self) -> list[PixelSpec]:
        specs = {s.column: s for s in (self.captioner_pixels, self.filter_pixels, self.clip_pixels) if s is not None}
        return list(specs.values())

    def fingerprint(self) -> dict:
        """What decides a row: a rerun must match it to continue the same output."""
        return {
            "schema_version": SCHEMA_VERSION, "round": self.round, "seed": self.seed, "source": self.source,
            "captioner_id": self.captioner_id, "filter_id": self.filter_id, "clip_id": self.clip_id,
            "clip_model": self.clip_model, "num_samples": self.num_samples, "method": self.method,
            "top_p": self.top_p if self.method == "nucleus" else None,
            "num_beams": self.num_beams if self.method == "beam" else None,
            "max_length": self.max_length, "min_length": self.min_length,
            "repetition_penalty": self.repetition_penalty, "prompt": self.prompt,
            "itm_threshold": self.itm_threshold, "keep_top_k_synthetic": self.keep_top_k_synthetic,
            "max_text_chars": self.max_text_chars, "amp": self.amp,
            "image_sizes": [self.captioner_pixels.size, self.filter_pixels.size],
        }

    def metadata(self) -> dict:
        """The Parquet key-value metadata: thresholds, generation settings, checkpoints, versions."""
        return {
            "capfilt.schema_version": str(SCHEMA_VERSION),
            "capfilt.settings": json.dumps({
                **self.fingerprint(), "captioner": self.captioner_url, "filter": self.filter_url,
                "clip_checkpoint": self.clip_checkpoint, "model_batch_size": self.model_batch_size,
                "seed_rule": "per image: derive_seed('capfilt', run seed, key); candidate j: "
                             "blip_core.generation.sample_seed(seed, j)",
                "keep_rule": "status ok and itm_score > itm_threshold (synthetic: and among the best "
                             "keep_top_k_synthetic of the image, ties to the lower candidate)",
            }, sort_keys=True),
            "capfilt.versions": json.dumps(versions(self.clip_model is not None), sort_keys=True),
        }


def versions(with_clip: bool = False) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("capfilt", "torch", "ray", "pyarrow") + (("open_clip_torch",) if with_clip else ()):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def image_seed(run_seed: int, key: str) -> int:
    """The sampling seed of an image: from the run seed and the img2dataset key only (63 bits)."""
    return derive_seed("capfilt", int(run_seed), str(key))


def _model_id(local_path: str) -> str:
    """Content hash of a checkpoint: ``blip_core.checkpoint_id`` for our format, else a hash of the files."""
    from blip_core import checkpoint_id

    if os.path.isdir(local_path) and all(os.path.exists(os.path.join(local_path, f))
                                         for f in ("config.json", "model.safetensors")):
        return checkpoint_id(local_path)
    h = hashlib.sha256()
    paths = [local_path] if os.path.isfile(local_path) else sorted(
        os.path.join(b, f) for b, _, fs in os.walk(local_path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, local_path).encode() if p != local_path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _checkpoint_image_size(local_path: str) -> int:
    """The input size a checkpoint was trained at: from its config.json (ours or Hugging Face's), else by loading it."""
    cfg = os.path.join(local_path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            meta = json.load(f)
        for vision in ((meta.get("config") or {}).get("vision"), meta.get("vision_config")):
            if isinstance(vision, dict) and isinstance(vision.get("image_size"), int):
                return vision["image_size"]
    from blip_core import BlipModel

    return BlipModel.from_pretrained(local_path).config.vision.image_size


def _clip_preprocess(model: str, model_config_file: str | None) -> tuple[int, tuple, tuple]:
    import open_clip

    _register_clip_config(model_config_file)
    mcfg = open_clip.get_model_config(model)
    if mcfg is None:
        raise CapfiltError(f"capfilt.clip.model: open_clip has no architecture {model!r} "
                           "(set capfilt.clip.model_config_file for a custom one)")
    size = mcfg.get("vision_cfg", {}).get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return size, tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def _register_clip_config(model_config_file: str | None) -> None:
    if not model_config_file:
        return
    import open_clip

    from .modeling import local_copy

    with local_copy(model_config_file) as path:
        name = posixpath.basename(model_config_file)
        if os.path.basename(path) != name:  # add_model_config names the architecture after the file
            import shutil
            import tempfile

            d = tempfile.mkdtemp(prefix="capfilt-clipcfg-")
            shutil.copy(path, os.path.join(d, name))
            path = os.path.join(d, name)
        open_clip.add_model_config(path)


def resolve_settings(cfg: RunConfig, root: str, round: int, *, use_gpu: bool | None = None) -> Settings:
    """Checkpoints, their content ids and input sizes, and the run's generation/filter settings."""
    from .modeling import local_copy

    cc = cfg.capfilt
    rr = storage.RunRoot(root)
    urls = {}
    for role in ("captioner", "filter"):
        given = getattr(cc, role)
        if given is None:
            job = rr.round(round, role)
            if not storage.is_committed(job):
                raise CapfiltError(f"no committed {role} for round {round} at {job}: run "
                                   f"`capfilt finetune --round {round} --role {role}` first, or set capfilt.{role}")
            given = storage.join(job, "model")
        fs, path = storage.filesystem(given)
        if not fs.exists(path):
            raise CapfiltError(f"capfilt.{role}: no checkpoint at {given}")
        urls[role] = given
    ids, sizes = {}, {}
    for role, url in urls.items():
        with local_copy(url) as path:
            ids[role] = _model_id(path)
            sizes[role] = cc.image_size or _checkpoint_image_size(path)
    blip_mean_std = _blip_mean_std()
    cap_px = PixelSpec("blip", sizes["captioner"], *blip_mean_std)
    filt_px = PixelSpec("blip", sizes["filter"], *blip_mean_std)
    clip_px = clip_id = None
    if cc.clip.enabled:
        fs, path = storage.filesystem(cc.clip.checkpoint)
        if not fs.exists(path):
            raise CapfiltError(f"capfilt.clip.checkpoint: no file at {cc.clip.checkpoint}")
        size, mean, std = _clip_preprocess(cc.clip.model, cc.clip.model_config_file)
        clip_px = PixelSpec("clip", size, mean, std)
        with local_copy(cc.clip.checkpoint) as p:
            clip_id = _model_id(p)
    return Settings(
        round=round, seed=cfg.seed, source=cc.source or cfg.ingest.source,
        captioner_url=urls["captioner"], filter_url=urls["filter"],
        captioner_id=ids["captioner"], filter_id=ids["filter"],
        num_samples=cc.num_samples, method=cc.method, top_p=cc.top_p, num_beams=cc.num_beams,
        max_length=cc.max_length, min_length=cc.min_length, repetition_penalty=cc.repetition_penalty,
        prompt=cc.prompt, itm_threshold=cc.itm_threshold, keep_top_k_synthetic=cc.keep_top_k_synthetic,
        max_text_chars=cc.max_text_chars, model_batch_size=cc.model_batch_size, amp=cc.amp,
        use_gpu=bool(use_gpu), captioner_pixels=cap_px, filter_pixels=filt_px, clip_pixels=clip_px,
        clip_model=cc.clip.model if cc.clip.enabled else None,
        clip_checkpoint=cc.clip.checkpoint if cc.clip.enabled else None, clip_id=clip_id,
        clip_model_config_file=cc.clip.model_config_file if cc.clip.enabled else None,
        decode_batch_rows=cc.decode_batch_rows,
    )


def _blip_mean_std() -> tuple[tuple, tuple]:
    from blip_core.transforms import MEAN, STD

    return tuple(MEAN), tuple(STD)


# ----------------------------------------------------------------------------------- read + decode (CPU)
def _pil_transform(spec: PixelSpec):
    """The PIL part of a model's eval transform (everything before ToTensor)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if spec.kind == "blip":  # == blip_core.transforms.eval_transform up to ToTensor
        return T.Resize((spec.size, spec.size), interpolation=InterpolationMode.BICUBIC)
    import open_clip

    full = open_clip.image_transform(spec.size, is_train=False, mean=spec.mean, std=spec.std,
                                     resize_mode=spec.resize_mode, interpolation=spec.interpolation)
    steps = []
    for t in full.transforms:
        if "ToTensor" in type(t).__name__:
            break
        steps.append(t)
    return T.Compose(steps)


def _text_status(text: str, max_chars: int) -> str:
    if not text or not text.strip():
        return "empty_text"
    if len(text) > max_chars:
        return "text_too_long"
    return "ok"


class ShardDecoder:
    """Reads a shard front to back (one GET on an object store) and yields decoded, resized rows in blocks."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.specs = settings.pixel_specs()
        self.transforms = {s.column: _pil_transform(s) for s in self.specs}

    def decode_rows(self, samples: Sequence[Any], shard: str, unit: int) -> dict[str, np.ndarray]:
        from blip_core.transforms import CorruptImageError, decode_image

        n = len(samples)
        out: dict[str, Any] = {
            UNIT_COLUMN: np.full(n, unit, dtype=np.int32),
            "shard": np.array([shard] * n, dtype=object),
            "key": np.array([s.key for s in samples], dtype=object),
            "url": np.array([s.meta.get("url") if isinstance(s.meta, dict) else None for s in samples], dtype=object),
            "seed": np.array([image_seed(self.settings.seed, s.key) for s in samples], dtype=np.int64),
        }
        texts, lengths, tstat, istat, errors = [], [], [], [], []
        pixels = {s.column: np.zeros((n, s.size, s.size, 3), dtype=np.uint8) for s in self.specs}
        for i, s in enumerate(samples):
            text = s.text if isinstance(s.text, str) else ""
            lengths.append(len(text))
            st = _text_status(text, self.settings.max_text_chars)
            tstat.append(st)
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
        out.update(text=np.array(texts, dtype=object), text_length=np.array(lengths, dtype=np.int32),
                   text_status=np.array(tstat, dtype=object), image_status=np.array(istat, dtype=object),
                   error=np.array(errors, dtype=object), **pixels)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for url, unit in zip(batch["shard_url"], batch["unit"]):
            name, unit = shard_name(str(url)), int(unit)
            samples = iter_shard(str(url))
            pending: list = []
            read = 0
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    break
                except Exception as e:  # noqa: BLE001 - a broken tar: keep what was read, report the break
                    log.warning("shard %s is broken after %d samples: %s", url, read, e)
                    if pending:
                        yield self.decode_rows(pending, name, unit)
                        pending = []
                    yield self._shard_error(name, unit, f"after {read} samples: {type(e).__name__}: {e}")
                    break
                read += 1
                pending.append(sample)
                if len(pending) >= self.settings.decode_batch_rows:
                    yield self.decode_rows(pending, name, unit)
                    pending = []
            if pending:
                yield self.decode_rows(pending, name, unit)

    def _shard_error(self, shard: str, unit: int, message: str) -> dict[str, np.ndarray]:
        from .shards import ShardSample

        row = self.decode_rows([ShardSample(key=SHARD_ERROR_KEY, image=None, text="", meta={})], shard, unit)
        row["error"] = np.array([message[:1000]], dtype=object)
        row["image_status"] = np.array(["shard_error"], dtype=object)
        return row


# ------------------------------------------------------------------------------------------ model stages
def _fixed_chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start:start + size])


def _setup_torch(pool_threads: int | None, num_cpus: float) -> None:
    import torch

    torch.set_num_threads(pool_threads or max(1, int(num_cpus)))


def _device(use_gpu: bool):
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _to_tensor(pixels: np.ndarray, spec: PixelSpec, n_total: int, device):
    """uint8 [n, H, W, 3] -> normalised float [n_total, 3, H, W] on ``device`` (rows beyond n are blank padding).
    The same arithmetic as torchvision's ToTensor + Normalize; uint8 crosses to the device, 4x less than floats."""
    import torch

    x = torch.zeros((n_total, spec.size, spec.size, 3), dtype=torch.uint8)
    x[: len(pixels)] = torch.from_numpy(np.ascontiguousarray(pixels))
    x = x.to(device).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def _load_blip(url: str, image_size: int, device, amp: str):
    import torch

    from .modeling import load_model

    model = load_model(url, image_size=image_size).eval().to(device)
    if device.type == "cuda" and amp != "none":
        model.amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return model


class Captioner:
    """Actor: K synthetic captions per decodable image (columns ``syn_0 .. syn_{K-1}``)."""

    def __init__(self, settings: Settings, pool: dict, drop_columns: Sequence[str] = ()):
        _setup_torch(pool.get("torch_threads"), pool.get("num_cpus", 1))
        self.s = settings
        self.device = _device(settings.use_gpu)
        self.model = _load_blip(settings.captioner_url, settings.captioner_pixels.size, self.device, settings.amp)
        self.drop = list(drop_columns)

    def caption(self, pixels: np.ndarray, seeds: Sequence[int]) -> list[list[str]]:
        """Captions of ``len(pixels) <= model_batch_size`` images, computed on a full fixed-shape batch."""
        import torch

        s, mb, k = self.s, self.s.model_batch_size, self.s.num_samples
        n = len(pixels)
        images = _to_tensor(pixels, s.captioner_pixels, mb, self.device)
        common = dict(max_length=s.max_length, min_length=s.min_length, repetition_penalty=s.repetition_penalty,
                      num_return_sequences=k, prompt=s.prompt)
        with torch.inference_mode():
            if s.method == "nucleus":
                out = self.model.generate(images, top_p=s.top_p, seeds=list(seeds) + [0] * (mb - n), **common)
            else:
                out = self.model.generate(images, num_beams=s.num_beams, **common)
        out = [[t] for t in out] if k == 1 else out
        return out[:n]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k = len(batch["key"]), self.s.num_samples
        caps = [[""] * n for _ in range(k)]
        ok = [i for i in range(n) if batch["image_status"][i] == "ok"]
        px = batch[self.s.captioner_pixels.column]
        for chunk in _fixed_chunks(ok, self.s.model_batch_size):
            texts = self.caption(px[chunk], [int(batch["seed"][i]) for i in chunk])
            for i, t in zip(chunk, texts):
                for j in range(k):
                    caps[j][i] = t[j]
        for j in range(k):
            batch[f"syn_{j}"] = np.array(caps[j], dtype=object)
        for c in self.drop:
            batch.pop(c, None)
        return batch


def _texts_of(batch: dict[str, np.ndarray], i: int, k: int) -> list[tuple[str, bool]]:
    """The 1 + K texts of image ``i`` and whether each is scored (web first, then the candidates)."""
    web_ok = batch["text_status"][i] == "ok"
    texts = [(str(batch["text"][i]), bool(web_ok))]
    for j in range(k):
        t = str(batch[f"syn_{j}"][i])
        texts.append((t, bool(t.strip())))
    return texts


class ClipScorer:
    """Actor: the CLIP cosine similarity of each of an image's 1 + K texts (columns ``clip_0 .. clip_K``)."""

    def __init__(self, settings: Settings, pool: dict, drop_columns: Sequence[str] = ()):
        import open_clip

        from .modeling import local_copy

        _setup_torch(pool.get("torch_threads"), pool.get("num_cpus", 1))
        self.s = settings
        self.device = _device(settings.use_gpu)
        _register_clip_config(settings.clip_model_config_file)
        with local_copy(settings.clip_checkpoint) as path:
            self.model = open_clip.create_model(settings.clip_model, pretrained=path, device=self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(settings.clip_model)
        self.drop = list(drop_columns)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        s, n, k, mb = self.s, len(batch["key"]), self.s.num_samples, self.s.model_batch_size
        scores = np.full((n, 1 + k), np.nan, dtype=np.float32)
        ok = [i for i in range(n) if batch["image_status"][i] == "ok"]
        px = batch[s.clip_pixels.column]
        for chunk in _fixed_chunks(ok, mb):
            texts = [t for i in chunk for t, _ in _texts_of(batch, i, k)]
            texts += ["."] * ((mb - len(chunk)) * (1 + k))
            images = _to_tensor(px[chunk], s.clip_pixels, mb, self.device)
            with torch.inference_mode():
                img = self.model.encode_image(images, normalize=True).float()
                txt = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True).float()
                cos = (txt.view(mb, 1 + k, -1) * img[:, None]).sum(-1).cpu().numpy()
            for r, i in enumerate(chunk):
                for j, (_, scored) in enumerate(_texts_of(batch, i, k)):
                    if scored:
                        scores[i, j] = cos[r, j]
        for j in range(1 + k):
            batch[f"clip_{j}"] = scores[:, j]
        for c in self.drop:
            batch.pop(c, None)
        return batch


class Filter:
    """Actor: ITM P(match) and ITC cosine of each of an image's 1 + K texts, keep decisions, output rows."""

    def __init__(self, settings: Settings, pool: dict):
        _setup_torch(pool.get("torch_threads"), pool.get("num_cpus", 1))
        self.s = settings
        self.device = _device(settings.use_gpu)
        self.model = _load_blip(settings.filter_url, settings.filter_pixels.size, self.device, settings.amp)

    def score(self, pixels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """[n, 1+K] ITM and ITC for ``n <= model_batch_size`` images and their 1+K texts each, on fixed shapes."""
        import torch
        import torch.nn.functional as F

        m, mb, per = self.model, self.s.model_batch_size, 1 + self.s.num_samples
        n = len(pixels)
        texts = texts + ["."] * ((mb - n) * per)
        images = _to_tensor(pixels, self.s.filter_pixels, mb, self.device)
        width = m.max_text_length
        ids, mask = m.tokenizer(texts, max_length=width)
        ids = F.pad(ids, (0, width - ids.shape[1]), value=m.config.text.pad_token_id).to(self.device)
        mask = F.pad(mask, (0, width - mask.shape[1]), value=0).to(self.device)
        with torch.inference_mode():
            image_embeds = m.encode_image(images)  # once per image, for all its texts
            itm = m.itm_logits(image_embeds, ids, mask).softmax(-1)[:, 1]
            img_feat = m.image_features(image_embeds)
            txt_feat = m.text_features(m.encode_text_ids(ids, mask))
            itc = (txt_feat.view(mb, per, -1) * img_feat[:, None]).sum(-1)
        return itm.view(mb, per)[:n].float().cpu().numpy(), itc[:n].float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        s, n, k = self.s, len(batch["key"]), self.s.num_samples
        itm = np.full((n, 1 + k), np.nan, dtype=np.float32)
        itc = np.full((n, 1 + k), np.nan, dtype=np.float32)
        ok = [i for i in range(n) if batch["image_status"][i] == "ok"]
        px = batch[s.filter_pixels.column]
        for chunk in _fixed_chunks(ok, s.model_batch_size):
            texts = [t if scored else "." for i in chunk for t, scored in _texts_of(batch, i, k)]
            a, b = self.score(px[chunk], texts)
            itm[chunk], itc[chunk] = a, b
        return build_rows(batch, itm, itc, s)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def build_rows(batch: dict[str, np.ndarray], itm: np.ndarray, itc: np.ndarray, s: Settings) -> pa.Table:
    """One row per (image, text) with the keep decisions; a bad image gets its web row only."""
    n, k = len(batch["key"]), s.num_samples
    cols: dict[str, list] = {f.name: [] for f in OUTPUT_SCHEMA}
    cols[UNIT_COLUMN] = []
    clip = [batch.get(f"clip_{j}") for j in range(1 + k)]

    def add(i: int, text: str, source: str, cand: int | None, j: int, status: str, error: str | None,
            keep: bool, reason: str | None, length: int) -> None:
        scored = status == "ok"
        cols["key"].append(str(batch["key"][i]))
        cols["shard"].append(str(batch["shard"][i]))
        url = batch["url"][i]
        cols["url"].append(None if url is None else str(url))
        cols["text"].append(text)
        cols["source"].append(source)
        cols["candidate"].append(cand)
        cols["itm_score"].append(_nan_to_none(itm[i, j]) if scored else None)
        cols["itc_score"].append(_nan_to_none(itc[i, j]) if scored else None)
        cols["clip_score"].append(_nan_to_none(clip[j][i]) if scored and clip[j] is not None else None)
        cols["keep"].append(keep)
        cols["drop_reason"].append(reason)
        cols["status"].append(status)
        cols["error"].append(error)
        cols["seed"].append(int(batch["seed"][i]) if source == "synthetic" and s.method == "nucleus" else None)
        cols["text_length"].append(length)
        cols["round"].append(s.round)
        cols["captioner_id"].append(s.captioner_id)
        cols["filter_id"].append(s.filter_id)
        cols[UNIT_COLUMN].append(int(batch[UNIT_COLUMN][i]))

    for i in range(n):
        image_status = str(batch["image_status"][i])
        err = batch["error"][i]
        err = None if err is None else str(err)
        if image_status != "ok":  # missing, corrupt (or the reader's shard_error row): the web row only
            add(i, str(batch["text"][i]), "web", None, 0, image_status, err, False, "bad_input",
                int(batch["text_length"][i]))
            continue
        above = lambda j: bool(itm[i, j] > s.itm_threshold)  # noqa: E731
        web_status = str(batch["text_status"][i])
        web_keep = web_status == "ok" and above(0)
        add(i, str(batch["text"][i]), "web", None, 0, web_status, None, web_keep,
            None if web_keep else ("bad_input" if web_status != "ok" else "itm_below_threshold"),
            int(batch["text_length"][i]))
        texts = [str(batch[f"syn_{j}"][i]) for j in range(k)]
        passing = [j for j in range(k) if texts[j].strip() and above(j + 1)]
        if s.keep_top_k_synthetic is not None:
            ranked = sorted(passing, key=lambda j: (-float(itm[i, j + 1]), j))
            kept = set(ranked[: s.keep_top_k_synthetic])
        else:
            kept = set(passing)
        for j in range(k):
            status = "ok" if texts[j].strip() else "empty_text"
            reason = None if j in kept else ("bad_input" if status != "ok" else
                                             "not_top_k" if j in passing else "itm_below_threshold")
            add(i, texts[j], "synthetic", j, j + 1, status, None, j in kept, reason, len(texts[j]))
    arrays = [pa.array(cols[f.name], type=f.type) for f in OUTPUT_SCHEMA]
    return pa.Table.from_arrays(arrays + [pa.array(cols[UNIT_COLUMN], pa.int32())],
                                names=[f.name for f in OUTPUT_SCHEMA] + [UNIT_COLUMN])


# ---------------------------------------------------------------------------------- units and the plan
@dataclass
class Unit:
    index: int
    name: str
    shards: list[str]  # shard URLs

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"


@dataclass
class Plan:
    units: list[Unit]
    fingerprint: dict = field(default_factory=dict)


def make_units(shard_urls: Sequence[str], per_unit: int) -> list[Unit]:
    units = []
    for i, start in enumerate(range(0, len(shard_urls), per_unit)):
        group = list(shard_urls[start:start + per_unit])
        names = [shard_name(u) for u in group]
        name = f"part-{names[0]}" if len(names) == 1 else f"part-{names[0]}_{names[-1]}"
        units.append(Unit(i, name, group))
    return units


def _atomic_write(url: str, data: bytes, tmp_dir: str) -> None:
    """Local: write a temporary file in ``tmp_dir`` (same filesystem), fsync, rename into place. Object stores:
    write the final name directly (an object appears only once its upload is complete)."""
    from .modeling import is_local

    fs, path = storage.filesystem(url)
    if not is_local(url):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp_path = storage.filesystem(tmp_dir)[1]
    os.makedirs(tmp_path, exist_ok=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(tmp_path, f"{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_or_create_plan(out: str, shard_urls: Sequence[str], settings: Settings, per_unit: int) -> Plan:
    """The plan of the first run (units and fingerprint), checked against this run's inputs and settings."""
    url = storage.join(out, PLAN)
    fs, path = storage.filesystem(url)
    fp = settings.fingerprint()
    names = [shard_name(u) for u in shard_urls]
    if fs.exists(path):
        stored = storage.read_json(url)
        diff = _diff(stored["fingerprint"], fp)
        if diff:
            raise CapfiltError(f"{out} holds CapFilt output of other settings ({'; '.join(diff)}); remove that "
                               "directory to start over, or run with the settings it was started with")
        stored_names = [s for u in stored["units"] for s in u["shards"]]
        if stored_names != names:
            raise CapfiltError(f"{out} was planned over other shards ({len(stored_names)} then, {len(names)} now)")
        by_name = {shard_name(u): u for u in shard_urls}
        units = [Unit(u["index"], u["name"], [by_name[s] for s in u["shards"]]) for u in stored["units"]]
        if any(len(u.shards) != per_unit for u in units[:-1]):
            log.warning("%s was planned with other unit sizes; the stored plan wins", out)
        return Plan(units, fp)
    units = make_units(shard_urls, per_unit)
    payload = {"fingerprint": fp, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "units": [{"index": u.index, "name": u.name, "shards": [shard_name(s) for s in u.shards]}
                         for u in units]}
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    _atomic_write(url, json.dumps(payload, indent=2, sort_keys=True).encode(), storage.join(out, TMP_DIR))
    return Plan(units, fp)


def unit_marker(out: str, unit: Unit) -> str:
    return storage.join(out, DONE_DIR, f"{unit.name}.json")


def read_done(out: str, unit: Unit, fingerprint: dict) -> dict | None:
    """The unit's marker if the unit is done (marker parses, same fingerprint, data file of the recorded size)."""
    fs, path = storage.filesystem(unit_marker(out, unit))
    try:
        with fs.open(path, "r") as f:
            marker = json.load(f)
    except (FileNotFoundError, ValueError, OSError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    fs_d, data = storage.filesystem(storage.join(out, unit.file))
    try:
        if fs_d.size(data) != marker.get("bytes"):
            return None
    except (FileNotFoundError, OSError):
        return None
    return marker


def _clean_tmp(out: str) -> None:
    from .modeling import is_local

    if is_local(out):
        fs, path = storage.filesystem(out)
        tmp = posixpath.join(path, TMP_DIR)
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def _counts(table: pa.Table) -> dict:
    import pyarrow.compute as pc

    out: dict[str, Any] = {"rows": table.num_rows}
    if table.num_rows == 0:
        return {**out, "images": 0, "by_source": {}, "by_status": {}}
    web = table.filter(pc.equal(table["source"], "web"))
    out["images"] = web.num_rows
    by_source = {}
    for src in ("web", "synthetic"):
        t = table.filter(pc.equal(table["source"], src))
        by_source[src] = {"rows": t.num_rows, "kept": int(pc.sum(t["keep"]).as_py() or 0)}
    out["by_source"] = by_source
    vc = pc.value_counts(table["status"])
    out["by_status"] = {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}
    return out


def write_unit(out: str, unit: Unit, table: pa.Table, settings: Settings, row_group_size: int,
               shard_errors: list[dict]) -> dict:
    """Publish one unit: its Parquet file, then its done marker (see the module docstring)."""
    if UNIT_COLUMN in table.column_names:
        table = table.drop_columns([UNIT_COLUMN])
    table = table.cast(OUTPUT_SCHEMA)
    table = table.sort_by([("shard", "ascending"), ("key", "ascending"), ("candidate", "ascending", "at_start")])
    meta = settings.metadata()
    meta["capfilt.unit"] = json.dumps({"name": unit.name, "shards": [shard_name(s) for s in unit.shards]})
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size, write_statistics=True,
                   write_page_index=True)
    data = buf.getvalue()
    _atomic_write(storage.join(out, unit.file), data, storage.join(out, TMP_DIR))
    marker = {"unit": unit.name, "file": unit.file, "shards": [shard_name(s) for s in unit.shards],
              "bytes": len(data), **_counts(table), "shard_errors": shard_errors,
              "fingerprint": settings.fingerprint(),
              "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _atomic_write(unit_marker(out, unit), json.dumps(marker, indent=2, sort_keys=True).encode(),
                  storage.join(out, TMP_DIR))
    return marker


def empty_table() -> pa.Table:
    return pa.Table.from_pylist([], schema=OUTPUT_SCHEMA)


# ------------------------------------------------------------------------------------------- the dataset
def _pool_dict(pool: ActorPool) -> dict:
    return pool.model_dump()


def _num_gpus(pool: ActorPool, use_gpu: bool) -> float:
    if pool.num_gpus is not None:
        return pool.num_gpus
    return 1.0 if use_gpu else 0.0


def build_dataset(units: Sequence[Unit], settings: Settings, cfg: RunConfig):
    """The Ray Dataset of output rows (pyarrow blocks, with the internal ``_unit`` column), in unit order."""
    import ray.data

    cc = cfg.capfilt
    ds = ray.data.read_datasource(ShardDatasource(units, settings), num_cpus=cc.decode_num_cpus,
                                  concurrency=cc.decode_concurrency,
                                  override_num_blocks=sum(len(u.shards) for u in units))
    cap_col, filt_col = settings.captioner_pixels.column, settings.filter_pixels.column
    clip_col = settings.clip_pixels.column if settings.clip_pixels is not None else None
    later = {filt_col} | ({clip_col} if clip_col else set())
    drop_after_caption = [c for c in {cap_col} if c not in later]
    pools = [(Captioner, cc.captioner_pool, {"drop_columns": drop_after_caption})]
    if clip_col:
        pools.append((ClipScorer, cc.clip.pool, {"drop_columns": [clip_col] if clip_col != filt_col else []}))
    pools.append((Filter, cc.filter_pool, {}))
    for cls, pool, extra in pools:
        ds = ds.map_batches(
            cls, fn_constructor_args=(settings, _pool_dict(pool)), fn_constructor_kwargs=extra,
            batch_size=pool.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.num_cpus, num_gpus=_num_gpus(pool, settings.use_gpu),
        )
    return ds


def _shard_datasource_base():
    from ray.data.datasource import Datasource

    return Datasource


class ShardDatasource(_shard_datasource_base()):
    """One Ray read task per shard, in plan order: it reads the tar front to back and yields decoded blocks.

    Reading and decoding are one CPU task (a Read, which Ray never fuses into the captioner actor, where decoding
    would run serially with the model)."""

    def __init__(self, units: Sequence[Unit], settings: Settings):
        super().__init__()
        self.items = [(s, u.index) for u in units for s in u.shards]
        self.settings = settings

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        settings = self.settings

        def make(url: str, unit: int):
            def read_fn():
                from ray.data.block import BlockAccessor

                decoder = ShardDecoder(settings)
                for batch in decoder({"shard_url": [url], "unit": [unit]}):
                    yield BlockAccessor.batch_to_block(batch)
            return read_fn

        return [ReadTask(make(url, unit), BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                                        input_files=(url,)))
                for url, unit in self.items]


def _check_resources(cfg: RunConfig, use_gpu: bool) -> None:
    """Actors hold their CPUs for the whole run: if they leave none for a decode task the run would hang."""
    import ray

    cc = cfg.capfilt
    pools = [cc.captioner_pool, cc.filter_pool] + ([cc.clip.pool] if cc.clip.enabled else [])
    total = ray.cluster_resources()
    actor_cpus = sum(p.actors * p.num_cpus for p in pools)
    if actor_cpus + cc.decode_num_cpus > total.get("CPU", 0) + 1e-9:
        raise CapfiltError(
            f"the actor pools reserve {actor_cpus:g} CPUs and a decode task needs {cc.decode_num_cpus:g}, but the "
            f"Ray cluster has {total.get('CPU', 0):g}: lower capfilt.*_pool.num_cpus / actors or "
            "capfilt.decode_num_cpus")
    gpus = sum(p.actors * _num_gpus(p, use_gpu) for p in pools)
    if gpus > total.get("GPU", 0) + 1e-9:
        raise CapfiltError(f"the actor pools ask for {gpus:g} GPUs; the Ray cluster has {total.get('GPU', 0):g}")


def _runs(units_col: np.ndarray) -> list[tuple[int, int, int]]:
    """(unit, start, stop) for each run of equal values."""
    if len(units_col) == 0:
        return []
    cut = np.flatnonzero(np.diff(units_col)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(units_col)]])
    return [(int(units_col[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def consume(ds, todo: Sequence[Unit], write: Any) -> None:
    """Stream the dataset's rows (in unit order) and call ``write(unit, table, shard_errors)`` for each unit of
    ``todo`` as soon as the next one starts (units without rows get an empty table)."""
    import pyarrow.compute as pc

    order = {u.index: pos for pos, u in enumerate(todo)}
    pos, parts = 0, []  # pos: the position in todo of the unit being collected

    def flush_until(target: int) -> None:
        nonlocal pos, parts
        while pos < target:
            unit = todo[pos]
            table = pa.concat_tables(parts) if parts else empty_table()
            errors = []
            if table.num_rows and UNIT_COLUMN in table.column_names:
                is_err = pc.equal(table["key"], SHARD_ERROR_KEY)
                if pc.any(is_err).as_py():
                    errs = table.filter(is_err)
                    errors = [{"shard": s, "error": e} for s, e in zip(errs["shard"].to_pylist(), errs["error"].to_pylist())]
                    table = table.filter(pc.invert(is_err))
            write(unit, table, errors)
            parts = []
            pos += 1

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        units_col = block[UNIT_COLUMN].to_numpy()
        for u, a, b in _runs(units_col):
            p = order.get(u)
            if p is None or p < pos:
                raise CapfiltError(f"rows of unit {u} arrived out of order; nothing of it was written")
            flush_until(p)
            parts.append(block.slice(a, b - a))
    flush_until(len(todo))


# -------------------------------------------------------------------------------------------- the stage
def capfilt_dir(root: str, round: int) -> str:
    return storage.RunRoot(root).round(round, "capfilt")


def run_caption_filter(cfg: RunConfig, root: str, round: int) -> dict:
    """``capfilt caption-filter``: caption and filter every ingested image into ``<root>/round=K/capfilt/``.

    One job per round directory at a time (the driver is the only writer). Returns the stage summary (also
    stored in the directory's ``_COMMITTED``)."""
    out = capfilt_dir(root, round)
    if storage.is_committed(out):
        log.info("capfilt %s already committed; nothing to do", out)
        return storage.read_commit(out)
    cc = cfg.capfilt
    source = cc.source or cfg.ingest.source
    shard_urls = list_shards(storage.RunRoot(root).ingest(source))
    if not shard_urls:
        raise CapfiltError(f"no shards in {storage.RunRoot(root).ingest(source)}")

    t0 = time.time()
    from .ray_runtime import ensure_ray

    # Settings first (cheap, no Ray): a bad checkpoint path must fail before the cluster starts. The device is
    # not part of them (it is not part of the fingerprint either): it is decided once Ray is up.
    settings = resolve_settings(cfg, root, round, use_gpu=False)
    plan = load_or_create_plan(out, shard_urls, settings, cc.shards_per_unit)
    done = {u.index: m for u in plan.units if (m := read_done(out, u, plan.fingerprint)) is not None}
    todo = [u for u in plan.units if u.index not in done]
    log.info("capfilt round %d: %d shards in %d units, %d already committed, %d to do -> %s", round,
             len(shard_urls), len(plan.units), len(done), len(todo), out)
    this_run = {"units": 0, "images": 0, "rows": 0, "seconds": 0.0}
    if todo:
        ensure_ray()
        import ray

        use_gpu = cc.use_gpu if cc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        settings.use_gpu = bool(use_gpu)
        _check_resources(cfg, settings.use_gpu)
        _clean_tmp(out)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        started = time.time()

        def write(unit: Unit, table: pa.Table, errors: list[dict]) -> None:
            marker = write_unit(out, unit, table, settings, cc.row_group_size, errors)
            done[unit.index] = marker
            this_run["units"] += 1
            this_run["images"] += marker["images"]
            this_run["rows"] += marker["rows"]
            el = time.time() - started
            log.info("committed %s: %d images, %d rows (%d/%d units; this run %d images in %.1fs, %.1f images/s)%s",
                     unit.file, marker["images"], marker["rows"], len(done), len(plan.units), this_run["images"],
                     el, this_run["images"] / el if el > 0 else 0.0,
                     f"; broken shards: {errors}" if errors else "")

        try:
            consume(build_dataset(todo, settings, cfg), todo, write)
        finally:
            ctx.execution_options.preserve_order = saved
        _clean_tmp(out)
        this_run["seconds"] = round_(time.time() - started, 3)
        this_run["images_per_second"] = round_(this_run["images"] / max(this_run["seconds"], 1e-9), 2)
    summary = summarize(plan, done)
    summary.update(round=round, fingerprint=plan.fingerprint, this_run=this_run,
                   settings=json.loads(settings.metadata()["capfilt.settings"]),
                   wall_seconds=round_(time.time() - t0, 3))
    storage.commit(out, summary)
    log.info("capfilt committed at %s: %d images, %d rows; web kept %d/%d, synthetic kept %d/%d", out,
             summary["images"], summary["rows"], summary["by_source"]["web"]["kept"],
             summary["by_source"]["web"]["rows"], summary["by_source"]["synthetic"]["kept"],
             summary["by_source"]["synthetic"]["rows"])
    return summary


def round_(x: float, n: int) -> float:
    return float(f"{x:.{n}f}")


def summarize(plan: Plan, done: dict[int, dict]) -> dict:
    total = {"units": len(plan.units), "files": [], "rows": 0, "images": 0,
             "by_source": {"web": {"rows": 0, "kept": 0}, "synthetic": {"rows": 0, "kept": 0}},
             "by_status": {}, "shard_errors": []}
    for u in plan.units:
        m = done[u.index]
        total["files"].append(u.file)
        total["rows"] += m["rows"]
        total["images"] += m["images"]
        for src, c in m.get("by_source", {}).items():
            total["by_source"][src]["rows"] += c["rows"]
            total["by_source"][src]["kept"] += c["kept"]
        for st, c in m.get("by_status", {}).items():
            total["by_status"][st] = total["by_status"].get(st, 0) + c
        total["shard_errors"] += m.get("shard_errors", [])
    return total


# ---------------------------------------------------------------------- the same stages, in one process
class LocalRunner:
    """Decode, caption, (CLIP) and filter shards in this process with the same stage classes and no Ray: the
    bare-model baseline of ``benchmarks/bench_capfilt.py``, and a way to debug one shard. Models load here."""

    def __init__(self, settings: Settings, pools: dict[str, dict] | None = None):
        pools = pools or {}
        self.settings = settings
        self.decoder = ShardDecoder(settings)
        self.captioner = Captioner(settings, pools.get("captioner", {}))
        self.clip = ClipScorer(settings, pools.get("clip", {})) if settings.clip_pixels is not None else None
        self.filter = Filter(settings, pools.get("filter", {}))

    def __call__(self, shard_urls: Sequence[str], batch_size: int = 64) -> pa.Table:
        tables = []
        for i, url in enumerate(shard_urls):
            for block in self.decoder({"shard_url": [url], "unit": [i]}):
                for start in range(0, len(block["key"]), batch_size):
                    b = {c: v[start:start + batch_size] for c, v in block.items()}
                    b = self.captioner(b)
                    if self.clip is not None:
                        b = self.clip(b)
                    tables.append(self.filter(b))
        return pa.concat_tables(tables) if tables else empty_table()


def process_locally(settings: Settings, shard_urls: Sequence[str], pools: dict[str, dict] | None = None,
                    batch_size: int = 64) -> pa.Table:
    """``LocalRunner(settings, pools)(shard_urls, batch_size)``: the rows of those shards (with ``_unit``)."""
    return LocalRunner(settings, pools)(shard_urls, batch_size)


__all__ = ["CapfiltError", "OUTPUT_SCHEMA", "SCHEMA_VERSION", "STATUSES", "Settings", "build_dataset",
           "LocalRunner", "capfilt_dir", "image_seed", "process_locally", "resolve_settings", "run_caption_filter"]
