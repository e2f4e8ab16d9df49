"""What a caption-filter run does, resolved once on the driver: the models (``ModelRef``), generation and keep
settings, and the fingerprint that a rerun must match to continue the same output."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field

import pyarrow as pa

from .. import storage
from ..config import RunConfig
from ..stream import derive_seed
from .models import CapfiltError, ModelRef, captioner_class, import_plugins, scorer_class
from .pixels import PixelSpec
from .rows import check_extra_columns, ingest_extra_fields

SCHEMA_VERSION = 2  # 2: no `round` column (the directory round=K names it; docs/DESIGN.md)
FILTER = "blip_itm"  # the default filter: the scorer whose ITM P(match) is CapFilt's keep rule; it always runs


@dataclass
class Settings:
    """Everything the stages need (picklable: actors get a copy). ``scorers`` are the extra scorers, in the
    order they run (before the filter)."""

    round: int
    seed: int
    source: str
    captioner: ModelRef
    filter: ModelRef
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
    scorers: list[ModelRef] = field(default_factory=list)
    decode_batch_rows: int = 64
    plugins: list[str] = field(default_factory=list)
    extra_columns: list[pa.Field] = field(default_factory=list)  # the ingest's (ingest.extra_columns), typed

    def models(self) -> list[ModelRef]:
        return [self.captioner, *self.scorers, self.filter]

    def scorer(self, kind: str) -> ModelRef | None:
        return next((s for s in self.scorers if s.kind == kind), None)

    def pixel_specs(self) -> list[PixelSpec]:
        specs = {m.pixels.column: m.pixels for m in (self.captioner, self.filter, *self.scorers)}
        return list(specs.values())

    def fingerprint(self) -> dict:
        """What decides a row. The keys of schema version 1 stay as they were (the CLIP score was built in);
        another captioner or extra scorers add theirs."""
        clip = self.scorer("clip")
        fp = {
            "schema_version": SCHEMA_VERSION,
            "round": self.round,
            "seed": self.seed,
            "source": self.source,
            "captioner_id": self.captioner.id,
            "filter_id": self.filter.id,
            "clip_id": clip.id if clip else None,
            "clip_model": clip.options["model"] if clip else None,
            "num_samples": self.num_samples,
            "method": self.method,
            "top_p": self.top_p if self.method == "nucleus" else None,
            "num_beams": self.num_beams if self.method == "beam" else None,
            "max_length": self.max_length,
            "min_length": self.min_length,
            "repetition_penalty": self.repetition_penalty,
            "prompt": self.prompt,
            "itm_threshold": self.itm_threshold,
            "keep_top_k_synthetic": self.keep_top_k_synthetic,
            "max_text_chars": self.max_text_chars,
            "amp": self.amp,
            "image_sizes": [self.captioner.pixels.size, self.filter.pixels.size],
        }
        if self.captioner.kind != "blip":
            fp["captioner_kind"] = self.captioner.kind
        if self.filter.kind != FILTER:
            fp["filter_kind"] = self.filter.kind
        if self.extra_columns:
            fp["extra_columns"] = [[f.name, str(f.type)] for f in self.extra_columns]
        others = [s for s in self.scorers if s.kind != "clip"]
        if others or (clip and (clip.keep_above, clip.keep_below) != (None, None)):
            fp["scorers"] = {
                s.kind: {"id": s.id, "options": s.options, "keep_above": s.keep_above, "keep_below": s.keep_below}
                for s in self.scorers
            }
        return fp

    def metadata(self, keep_rule: str) -> dict:
        """The Parquet key-value metadata: thresholds, generation settings, checkpoints, versions."""
        clip = self.scorer("clip")
        return {
            "capfilt.schema_version": str(SCHEMA_VERSION),
            "capfilt.settings": json.dumps(
                {
                    **self.fingerprint(),
                    "captioner": self.captioner.url,
                    "filter": self.filter.url,
                    "clip_checkpoint": clip.url if clip else None,
                    "model_batch_size": self.model_batch_size,
                    "seed_rule": "per image: derive_seed('capfilt', run seed, key); candidate j: "
                    "blip_core.generation.sample_seed(seed, j)",
                    "keep_rule": keep_rule,
                },
                sort_keys=True,
            ),
            "capfilt.versions": json.dumps(versions(self), sort_keys=True),
        }


def versions(settings: Settings | None = None) -> dict:
    import importlib.metadata as md

    extra = [p for m in (settings.models() if settings else []) for p in m.cls.packages]
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("capfilt", "torch", "ray", "pyarrow", *dict.fromkeys(extra)):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def image_seed(run_seed: int, key: str) -> int:
    """The sampling seed of an image: from the run seed and the img2dataset key only (63 bits)."""
    return derive_seed("capfilt", int(run_seed), str(key))


def resolve_settings(cfg: RunConfig, root: str, round: int, *, use_gpu: bool | None = None) -> Settings:
    """Checkpoints, their content ids and input sizes, and the run's generation/filter settings. Cheap and
    without Ray: a bad checkpoint path fails before the cluster starts."""
    cc = cfg.capfilt
    import_plugins(cc.plugins)
    if cc.filter_kind in cc.scorers:
        raise CapfiltError(
            f"capfilt.scorers.{cc.filter_kind}: the filter always runs; set capfilt.filter and capfilt.itm_threshold "
            "instead"
        )
    captioner = captioner_class(cc.captioner_kind).resolve(cfg, root, round)
    filt = scorer_class(cc.filter_kind).resolve(cfg, root, round, None)
    if "itm_score" not in [f.name for f in filt.cls.columns]:
        raise CapfiltError(f"capfilt.filter_kind {cc.filter_kind!r} has no itm_score column: it cannot be the filter")
    scorers = []
    for name, section in cc.scorers.items():
        if section.enabled:
            ref = scorer_class(name).resolve(cfg, root, round, section)
            ref.keep_above, ref.keep_below = section.keep_above, section.keep_below
            scorers.append(ref)
    seen: dict[str, str] = {}
    for ref in [*scorers, filt]:
        for f in ref.cls.columns:
            if f.name in seen:
                raise CapfiltError(f"scorers {seen[f.name]!r} and {ref.kind!r} both write column {f.name!r}")
            seen[f.name] = ref.kind
    settings = Settings(
        round=round,
        seed=cfg.seed,
        source=cc.source or cfg.ingest.source,
        captioner=captioner,
        filter=filt,
        num_samples=cc.num_samples,
        method=cc.method,
        top_p=cc.top_p,
        num_beams=cc.num_beams,
        max_length=cc.max_length,
        min_length=cc.min_length,
        repetition_penalty=cc.repetition_penalty,
        prompt=cc.prompt,
        itm_threshold=cc.itm_threshold,
        keep_top_k_synthetic=cc.keep_top_k_synthetic,
        max_text_chars=cc.max_text_chars,
        model_batch_size=cc.model_batch_size,
        amp=cc.amp,
        use_gpu=bool(use_gpu),
        scorers=scorers,
        decode_batch_rows=cc.decode_batch_rows,
        plugins=list(cc.plugins),
        extra_columns=ingest_extra_fields(storage.RunRoot(root).ingest(cc.source or cfg.ingest.source)),
    )
    clash = check_extra_columns(settings)
    if clash:
        raise CapfiltError(f"{clash}: rename them in the URL list and ingest it again")
    return settings
