"""The run configuration: one YAML file per run, validated by pydantic, overridable with ``--set a.b=value``.

Every section forbids unknown keys so that a typo fails before any work starts, with the field's dotted
path in the message.
"""
from __future__ import annotations

from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


NOISE_TYPES = ("unrelated", "wrong_attribute", "other_caption", "partial")


class WorldConfig(_Section):
    """The synthetic world (DESIGN.md): images with known facts, a noisy web corpus, a clean human set."""

    size: Literal["tiny", "demo", "full"] = "tiny"
    n_web: int | None = Field(None, ge=1, description="web images; default by size")
    n_human: int | None = Field(None, ge=1, description="human-annotated training images; default by size")
    n_test: int | None = Field(None, ge=1, description="held-out test images; default by size")
    captions_per_human_image: int = Field(3, ge=1)
    noise_rate: float = Field(0.4, ge=0.0, le=1.0)
    noise_mix: dict[str, float] = Field(default_factory=lambda: {t: 1.0 for t in NOISE_TYPES})
    image_size: int = Field(64, ge=64, le=96)

    @field_validator("noise_mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - set(NOISE_TYPES)
        if unknown:
            raise ValueError(f"unknown noise types {sorted(unknown)}; choose from {list(NOISE_TYPES)}")
        if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("noise_mix weights must be >= 0 and not all zero")
        return mix


class IngestConfig(_Section):
    """img2dataset settings. ``url_list`` None means the synthetic world's web corpus."""

    url_list: str | None = None
    input_format: Literal["csv", "tsv", "parquet", "jsonl", "txt"] = "parquet"
    url_col: str = "url"
    caption_col: str | None = "caption"
    source: str = Field("web", pattern=r"^[A-Za-z0-9_.-]+$")
    image_size: int = Field(64, ge=8)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    shard_size: int = Field(100, ge=1, description="samples per webdataset shard")
    processes: int = Field(1, ge=1)
    threads: int = Field(8, ge=1)
    timeout: int = Field(10, ge=1)
    retries: int = Field(0, ge=0)
    min_image_size: int = Field(10, ge=0, description="smaller images (tracking pixels) are recorded as failed_to_resize")


class HumanConfig(_Section):
    """The clean human-annotated set (COCO-Karpathy JSON). None means the synthetic world's."""

    train: str | None = None
    test: str | None = None
    image_root: str | None = None


class ModelSection(_Section):
    preset: Literal["tiny", "base", "large"] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict, description="BlipConfig fields over the preset")
    tokenizer: str = Field("bert-base-uncased", description="'bert-base-uncased', 'train' (on the run's captions) or a directory")
    tokenizer_vocab_size: int = Field(1000, ge=64)
    init_text_from_bert: str | None = None


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    world: WorldConfig | None = None
    ingest: IngestConfig = IngestConfig()
    human: HumanConfig = HumanConfig()
    model: ModelSection = ModelSection()

    @model_validator(mode="after")
    def _check_sources(self) -> "RunConfig":
        if self.world is None and self.ingest.url_list is None:
            raise ValueError("ingest.url_list is required when there is no synthetic world (world: null)")
        if self.world is None and (self.human.train is None or self.human.test is None):
            raise ValueError("human.train and human.test are required when there is no synthetic world")
        return self


class ConfigError(ValueError):
    """A bad configuration: the message names the field."""


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config from any fsspec URL, apply ``a.b=value`` overrides, validate."""
    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    for item in overrides or []:
        apply_override(data, item)
    return validate_config(data, source=path)


def validate_config(data: dict, source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config {source}: {explain(err)}") from None


def explain(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def apply_override(data: dict, item: str) -> None:
    """``section.key=value``; the value is parsed as YAML (numbers, booleans, null, lists)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set has an empty key in {item!r}")
    node = data
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
