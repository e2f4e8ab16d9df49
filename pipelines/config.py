"""The run configuration: one YAML file per run, validated by pydantic, overridable with ``--set a.b=value``.

Every section forbids unknown keys so that a typo fails before any work starts, with the field's dotted
path in the message.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def noise_types() -> tuple[str, ...]:
    """The registered noise types (``pipelines/world/noise.py``), in registration order. Imported when a config is
    validated, not when this module is: the world's modules import this one."""
    from .world.noise import NOISE_TYPES

    return NOISE_TYPES


class WorldConfig(_Section):
    """The synthetic world (docs/DESIGN.md): images with known facts, a noisy web corpus, a clean human set."""

    size: Literal["tiny", "demo", "full"] = "tiny"
    n_web: int | None = Field(None, ge=1, description="web images; default by size")
    n_human: int | None = Field(None, ge=1, description="human-annotated training images; default by size")
    n_test: int | None = Field(None, ge=1, description="held-out test images; default by size")
    captions_per_human_image: int = Field(3, ge=1)
    noise_rate: float = Field(0.4, ge=0.0, le=1.0)
    noise_mix: dict[str, float] = Field(default_factory=lambda: {t: 1.0 for t in noise_types()})
    image_size: int = Field(64, ge=64, le=96)
    duplicate_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="web copies of other web images (re-encoded, resized, cropped), per web image"
    )
    leak_rate: float = Field(0.0, ge=0.0, le=1.0, description="web copies of held-out test images, per web image")

    @field_validator("noise_mix")
    @classmethod
    def _check_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        unknown = set(mix) - set(noise_types())
        if unknown:
            raise ValueError(f"unknown noise types {sorted(unknown)}; choose from {list(noise_types())}")
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
    min_image_size: int = Field(
        10, ge=0, description="smaller images (tracking pixels) are recorded as failed_to_resize"
    )
    distributor: Literal["auto", "multiprocessing", "ray"] = Field(
        "auto",
        description="where shards download: processes on this machine, or Ray tasks over the cluster's nodes; "
        "auto: ray when RAY_ADDRESS names a Ray cluster",
    )
    max_concurrent_shards: int | None = Field(
        None, ge=1, description="ray: shard tasks running at once (None: the cluster's CPUs)"
    )
    shard_retries: int = Field(2, ge=0, description="a shard whose task failed or lost its node is run again")
    column_names: list[str] | None = Field(
        None, description="a csv/tsv list without a header row: its columns' names, in order (CC3M: [caption, url])"
    )
    quoting: bool = Field(
        True,
        description='csv/tsv fields may be quoted ("a, b"); false: every byte between delimiters is the value, '
        "quotes included (raw TSVs such as CC3M and CC12M)",
    )
    extra_columns: list[str] = Field(
        default_factory=list,
        description="more columns of the list (uid, similarity, ...) carried into each sample's .json, the "
        "shard's Parquet and every CapFilt row of the image",
    )

    @model_validator(mode="after")
    def _check_columns(self) -> IngestConfig:
        wanted = [self.url_col, *([self.caption_col] if self.caption_col else []), *self.extra_columns]
        if len(set(wanted)) < len(wanted):
            raise ValueError(f"url_col, caption_col and extra_columns name a column twice: {wanted}")
        reserved = sorted(set(self.extra_columns) & IMG2DATASET_RESERVED)
        if reserved:
            raise ValueError(f"extra_columns {reserved}: img2dataset reserves these names for its own metadata")
        if self.extra_columns and (self.input_format == "txt" or self.url_list is None):
            raise ValueError("extra_columns need a URL list (ingest.url_list) of more than one column")
        if self.column_names is not None:
            if self.input_format not in ("csv", "tsv"):
                raise ValueError("column_names is for a csv or tsv list without a header row")
            missing = [c for c in wanted if c not in self.column_names]
            if missing or len(set(self.column_names)) < len(self.column_names):
                raise ValueError(
                    f"column_names {self.column_names} must be distinct and name every column used {wanted}"
                )
        return self


# The keys img2dataset writes into each sample's metadata itself (``img2dataset.main.arguments_validator``).
IMG2DATASET_RESERVED = frozenset(
    "key caption url width height original_width original_height status error_message exif md5 sha256 sha512".split()
)


class HumanConfig(_Section):
    """The clean human-annotated set (COCO-Karpathy JSON). None means the synthetic world's."""

    train: str | None = None
    test: str | None = None
    image_root: str | None = None


class ModelSection(_Section):
    preset: Literal["tiny", "base", "large"] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict, description="BlipConfig fields over the preset")
    tokenizer: str = Field(
        "bert-base-uncased", description="'bert-base-uncased', 'train' (on the run's captions) or a directory"
    )
    tokenizer_vocab_size: int = Field(1000, ge=64)
    init_text_from_bert: str | None = None


INIT_CHOICES = ("scratch", "previous", "pretrain")


class TrainJob(_Section):
    """One Ray Train job. Subclasses carry the paper's defaults for each job; every field can be set per job.

    ``batch_size`` is global (all workers together) and must divide evenly over ``workers``. ``epochs`` counts
    passes over the job's stream; ``max_steps`` (optimizer steps) overrides it when set. The learning rate warms
    up linearly from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then follows a cosine to ``min_lr`` at the
    last step. ``init``: ``scratch``, ``previous`` (round K-1's pre-trained model), ``pretrain`` (round K's
    pre-trained model: the fine-tunes' start), or a checkpoint path/URL (our format, HF BLIP dir or BLIP .pth).
    """

    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on a cluster)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        1.0, gt=0, description="Ray CPUs reserved per worker (its DataLoader workers included)"
    )
    batch_size: int = Field(256, ge=1, description="global batch size, all workers together")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    lr: float = Field(1e-5, gt=0)
    warmup_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)  # AdamW, as the paper
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    image_size: int = Field(384, ge=16)
    bf16: bool = Field(True, description="bf16 autocast; only ever on GPU")
    grad_checkpointing: bool = Field(False, description="ViT gradient checkpointing (memory for compute)")
    init: str = Field(
        "pretrain",
        description="scratch | previous | pretrain | a checkpoint path or URL (fine-tunes: round 1 only; later "
        "rounds fine-tune their own pre-trained model)",
    )
    checkpoint_every_steps: int = Field(1000, ge=1, description="Ray Train checkpoint every N steps (and every epoch)")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker crashes retried from the last checkpoint")
    dataloader_workers: int = Field(4, ge=0, description="DataLoader worker processes per Ray Train worker")
    shuffle_buffer: int = Field(1000, ge=0)
    max_text_length: int = Field(35, ge=4, description="tokens, [CLS]/[DEC] and [SEP] included")
    log_every_steps: int = Field(50, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    hflip: bool = Field(True, description="random horizontal flips; false for worlds whose captions say left/right")
    randaugment: bool = True
    random_crop: bool = Field(
        True,
        description="BLIP's random crop of 50-100% of the image; false resizes the whole "
        "image (worlds whose captions state positions, counts and sizes)",
    )

    @model_validator(mode="after")
    def _check_job(self) -> TrainJob:
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by workers ({self.workers})")
        if not self.init.strip():
            raise ValueError(f"init must be one of {list(INIT_CHOICES)} or a checkpoint path")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


class PretrainJob(TrainJob):
    # The paper: ViT-B batch 2880, lr warmed up to 3e-4 (ViT-L: batch 2400, 2e-4) from 1e-6 over 3000 steps, 20
    # epochs at 224 px, then decayed by 0.85 per epoch; here the decay is a cosine to min_lr.
    batch_size: int = Field(2880, ge=1, description="global batch size, all workers together")
    epochs: int = Field(20, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(3000, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    image_size: int = Field(224, ge=16)
    init: str = Field(
        "scratch", description="scratch (the paper's choice for the next round) | previous | a checkpoint"
    )
    max_text_length: int = Field(30, ge=4, description="tokens, [CLS]/[DEC] and [SEP] included")


class CaptionerJob(TrainJob):
    # BLIP's caption_coco.yaml: 32 per GPU x 8 GPUs = 256, lr 1e-5 (ViT-B), 5 epochs at 384 px, cosine to 0.
    epochs: int = Field(5, ge=1)
    max_text_length: int = Field(40, ge=4, description="tokens, prompt included")


class FilterJob(TrainJob):
    # BLIP's retrieval_coco.yaml: 32 per GPU x 8 GPUs = 256, lr 1e-5 (ViT-B), 6 epochs at 384 px, cosine to 0.
    epochs: int = Field(6, ge=1)


class SharedJob(CaptionerJob):
    """The paper's ablation of sharing (Table 4): one fine-tune with LM + ITC + ITM, used as both captioner and
    filter. Unset fields are the captioner's (see ``TrainConfig``)."""


class TrainConfig(_Section):
    """``capfilt pretrain`` and ``capfilt finetune --role captioner|filter|shared``.

    ``shared`` is the ablation of a captioner and filter that share their parameters: one model fine-tuned with
    LM (prompted, as the captioner) and ITC + ITM (the caption alone, as the filter). Each field it does not set
    is the captioner's, so ``--set train.shared.epochs=3`` changes only that.
    """

    pretrain: PretrainJob = PretrainJob()
    captioner: CaptionerJob = CaptionerJob()
    filter: FilterJob = FilterJob()
    shared: SharedJob = SharedJob()

    @model_validator(mode="before")
    @classmethod
    def _shared_defaults_to_captioner(cls, data: Any) -> Any:
        # Before validation, so that the shared job is checked once, as merged; a bad captioner is left to
        # fail under its own name only.
        if not isinstance(data, dict):
            return data
        cap, own = data.get("captioner"), data.get("shared")
        cap = cap.model_dump() if isinstance(cap, BaseModel) else cap
        own = own.model_dump(exclude_unset=True) if isinstance(own, BaseModel) else own
        if not isinstance(cap, (dict, type(None))) or not isinstance(own, (dict, type(None))):
            return data
        try:
            CaptionerJob.model_validate(cap or {})
        except ValidationError:
            return data
        return {**data, "shared": {**(cap or {}), **(own or {})}}


class ActorPool(_Section):
    """One Ray Data actor pool (a model stage of ``capfilt caption-filter``).

    ``batch_size`` is the number of images Ray hands an actor per call; the model itself always runs on fixed
    shapes of ``capfilt.model_batch_size`` images (see ``pipelines/capfilt/actors.py``), so neither this nor ``actors``
    changes a caption or a score.
    """

    actors: int = Field(1, ge=1, description="actors in the pool (one per GPU on a cluster)")
    batch_size: int = Field(64, ge=1, description="images per actor call")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per actor")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; null: 1 when capfilt.use_gpu, else 0")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; null: max(1, num_cpus)")


class ScorerConfig(BaseModel):
    """An extra scorer of ``capfilt caption-filter`` (``capfilt.scorers.<name>``, by registered name: ``clip``, or
    one of ``capfilt.plugins``). Keys other than these are the scorer's own options (e.g. CLIP's ``model``,
    ``checkpoint``, ``model_config_file``), checked by the scorer."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = Field(True, description="false: leave the scorer out without removing its section")
    keep_above: float | None = Field(None, description="keep a text only if the scorer's first column exceeds it")
    keep_below: float | None = Field(None, description="keep a text only if the scorer's first column is below it")
    pool: ActorPool = ActorPool()


class CapfiltConfig(_Section):
    """``capfilt caption-filter``: caption every ingested image and score web and synthetic texts.

    Checkpoints default to round K's fine-tunes: ``<root>/round=K/captioner/model``, ``<root>/round=K/filter/model``.
    """

    source: str | None = Field(None, description="ingest source to caption; null: ingest.source")
    captioner: str | None = Field(None, description="captioner checkpoint (path/URL); null: round K's")
    filter: str | None = Field(None, description="filter checkpoint (path/URL); null: round K's")
    num_samples: int = Field(1, ge=1, le=64, description="synthetic captions per image (K)")
    method: Literal["nucleus", "beam"] = Field("nucleus", description="the paper: nucleus sampling")
    top_p: float = Field(0.9, gt=0, le=1)
    num_beams: int = Field(3, ge=1)
    max_length: int = Field(30, ge=2, description="tokens, [DEC] and the prompt included")
    min_length: int = Field(5, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    prompt: str | None = Field(None, description='null: the captioner\'s own ("a picture of ")')
    image_size: int | None = Field(None, ge=16, description="captioner/filter input size; null: each checkpoint's")
    itm_threshold: float = Field(0.5, ge=0, le=1, description="keep a text when the filter's P(match) exceeds it")
    keep_top_k_synthetic: int | None = Field(None, ge=1, description="keep at most the k best synthetic texts")
    max_text_chars: int = Field(2000, ge=1, description="longer web texts get status text_too_long")
    model_batch_size: int = Field(8, ge=1, description="images per model call: fixed shapes, so batch-invariant")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast on GPU")
    use_gpu: bool | None = Field(None, description="null: when the Ray cluster has GPUs")
    captioner_pool: ActorPool = ActorPool()
    filter_pool: ActorPool = ActorPool()
    decode_num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per shard read+decode task")
    decode_batch_rows: int = Field(64, ge=1, description="rows per block the decode task yields")
    decode_concurrency: int | None = Field(None, ge=1, description="max concurrent decode tasks; null: Ray's choice")
    commit_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs per unit commit task (reads and writes files)")
    commit_concurrency: int = Field(4, ge=1, description="unit commit tasks in flight at once")
    shards_per_unit: int = Field(1, ge=1, description="shards per commit unit (one Parquet file each)")
    row_group_size: int = Field(32768, ge=1024, description="rows per Parquet row group")
    captioner_kind: str = Field("blip", description="registered captioner (pipelines/capfilt/models.py)")
    filter_kind: str = Field(
        "blip_itm", description="registered scorer that is the filter; its columns include itm_score (the keep rule)"
    )
    scorers: dict[str, ScorerConfig] = Field(default_factory=dict, description="extra scorers by registered name")
    plugins: list[str] = Field(default_factory=list, description="modules that register captioners/scorers")

    @model_validator(mode="after")
    def _check_capfilt(self) -> CapfiltConfig:
        if self.method == "beam" and self.num_samples > self.num_beams:
            raise ValueError(
                f"num_samples ({self.num_samples}) must be <= num_beams ({self.num_beams}) with beam search"
            )
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is above max_length ({self.max_length})")
        return self


class AssembleConfig(_Section):
    """``capfilt assemble``: the keep rule of round K's dataset, applied to the scores CapFilt stored (one read of
    its Parquet, no model run; ``pipelines/keep_rule.py``). Null everywhere: CapFilt's own ``keep`` column. A field
    set replaces CapFilt's setting and the others stay CapFilt's (its extra scorers' rules included)."""

    itm_threshold: float | None = Field(None, ge=0, le=1, description="keep a text when ITM P(match) exceeds it")
    itc_threshold: float | None = Field(None, ge=-1, le=1, description="and when its ITC cosine exceeds it")
    clip_threshold: float | None = Field(None, ge=-1, le=1, description="and when its CLIP cosine exceeds it")
    top_k_synthetic: int | None = Field(None, ge=1, description="keep at most the k best synthetic texts per image")
    drop_duplicates: bool = Field(
        False, description="keep one image per duplicate group, its smallest (shard, key) (capfilt.scorers.phash)"
    )
    duplicate_distance: int = Field(4, ge=0, le=16, description="near duplicates: hashes within this many bits")
    drop_leaks: bool = Field(
        False, description="drop images within capfilt.scorers.phash.leak_distance bits of a test image"
    )


class EvalConfig(_Section):
    """``capfilt eval``: round K's pre-trained model on the held-out set (``human.test``), the same protocol
    for every round. Retrieval: ITC top-``retrieval_k`` re-ranked by ITM (256 for COCO). Captioning: beam
    search with the pre-trained decoder; ``prompt`` "" because pre-training uses none."""

    retrieval_k: int = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    image_size: int | None = Field(None, ge=16, description="null: the model's own resolution")
    num_beams: int = Field(3, ge=1)
    max_length: int = Field(20, ge=2)
    min_length: int = Field(5, ge=0)
    prompt: str = ""


class FlowConfig(_Section):
    """The flow ``capfilt``: what it runs, and how many CapFilt rounds (the paper does one).

    ``bootstrap``: BLIP's loop, ingest -> pre-train -> fine-tune captioner and filter -> caption-filter -> assemble
    -> pre-train the next round -> evaluate -> report. ``curate``: ingest -> caption-filter -> assemble -> report
    with given checkpoints (``capfilt.captioner`` and ``capfilt.filter``: released BLIP ``.pth`` files or Hugging
    Face BLIP directories), one round, no training and no evaluation."""

    mode: Literal["bootstrap", "curate"] = "bootstrap"
    rounds: int = Field(1, ge=1)


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    world: WorldConfig | None = None
    ingest: IngestConfig = IngestConfig()
    human: HumanConfig = HumanConfig()
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    capfilt: CapfiltConfig = CapfiltConfig()
    assemble: AssembleConfig = AssembleConfig()
    eval: EvalConfig = EvalConfig()
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _check_sources(self) -> RunConfig:
        if self.world is None and self.ingest.url_list is None:
            raise ValueError("ingest.url_list is required when there is no synthetic world (world: null)")
        curate = self.flow.mode == "curate"
        if not curate and self.world is None and (self.human.train is None or self.human.test is None):
            raise ValueError("human.train and human.test are required when there is no synthetic world")
        if curate:
            missing = [f"capfilt.{r}" for r in ("captioner", "filter") if getattr(self.capfilt, r) is None]
            if missing:
                raise ValueError(
                    f"flow.mode curate needs {' and '.join(missing)}: a released BLIP .pth or Hugging Face BLIP "
                    "directory (path or URL)"
                )
            if self.flow.rounds != 1:
                raise ValueError(f"flow.rounds is {self.flow.rounds}, but flow.mode curate runs one round")
        elif 1 not in self.pretrained_rounds and self.train.pretrain.init == "previous":
            raise ValueError(
                "train.pretrain.init is 'previous', but round 1 is not pre-trained (both fine-tunes start "
                "from checkpoints): round 2 has no previous model to start from"
            )
        return self

    @property
    def pretrained_rounds(self) -> list[int]:
        """The rounds whose model the flow pre-trains (and evaluates). Bootstrap: 1 to ``flow.rounds`` + 1, round 1
        on the web data, unless both fine-tunes start from given checkpoints (``train.captioner.init`` and
        ``train.filter.init`` other than ``pretrain``: released BLIP ones): round 1 then fine-tunes those only and
        its pre-training is skipped; later rounds pre-train on the bootstrapped data as always. Curate: none."""
        if self.flow.mode == "curate":
            return []
        first = 1 if "pretrain" in (self.train.captioner.init, self.train.filter.init) else 2
        return list(range(first, self.flow.rounds + 2))


class ConfigError(ValueError):
    """A bad configuration: the message names the field."""


def load_config(path: str, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config from any fsspec URL, apply ``a.b=value`` overrides, validate."""
    try:
        with storage.open_url(path, "r") as f:
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
        # Here, not at the top: ``blip_core`` brings torch and torchvision, whose import sets
        # TORCHINDUCTOR_CACHE_DIR; reading a config (``capfilt --help``, the flow's module) needs neither.
        from blip_core.config import explain_validation_error

        raise ConfigError(f"invalid config {source}: {explain_validation_error(err)}") from None


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
