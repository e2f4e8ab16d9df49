"""A job's spec: what ``capfilt pretrain`` / ``capfilt finetune --role R`` of round K does, resolved on the driver.

``resolve_job`` checks the job's inputs (committed, present) and resolves every location into a ``JobSpec``,
plain data that travels to the Ray Train workers; it fails before any Ray work.
"""

from __future__ import annotations

import dataclasses

from .. import storage
from ..config import RunConfig, TrainJob, validate_config
from ..errors import StageError
from ..modeling import ensure_tokenizer, human_set
from ..stream import derive_seed

OBJECTIVES: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "lm"),
    "captioner": ("lm",),
    "filter": ("itc", "itm"),
    "shared": ("itc", "itm", "lm"),
}
ROLES = ("captioner", "filter", "shared")
PROMPTED = ("captioner", "shared")  # jobs whose LM learns to caption after the prompt "a picture of "
# The job directory's layout (see the package docstring).
RAY_DIR = "ray_train"
METRICS = "metrics.jsonl"
EVAL = "eval.json"


class TrainError(StageError):
    """A job that cannot start (missing inputs, bad settings) or that failed for good."""


@dataclasses.dataclass
class JobSpec:
    """Everything a worker needs, resolved on the driver (plain data: it travels to the Ray workers)."""

    job: str
    round: int
    root: str
    job_dir: str
    config: dict  # RunConfig.model_dump()
    init: str  # "scratch" or a checkpoint URL
    tokenizer: str | None  # for a model built from scratch
    bert_dir: str | None
    sources: list[dict]  # {"kind": "shards"|"karpathy"|"bootstrapped", ...}
    test: dict  # {"ann": url, "image_root": url}
    seed: int

    @property
    def run_config(self) -> RunConfig:
        return validate_config(self.config)

    @property
    def train(self) -> TrainJob:
        return getattr(self.run_config.train, self.job)

    @property
    def objectives(self) -> tuple[str, ...]:
        return OBJECTIVES[self.job]


def job_dir(root: str, round: int, job: str) -> str:
    return storage.RunRoot(root).round(round, job)


def resolve_job(cfg: RunConfig, root: str, round: int, job: str) -> JobSpec:
    """Check a job's inputs (committed, present) and resolve every location; fails before any Ray work."""
    if job not in OBJECTIVES:
        raise TrainError(f"unknown job {job!r}; choose from {list(OBJECTIVES)}")
    if round < 1:
        raise TrainError(f"rounds count from 1, got --round {round}")
    root = storage.absolute(root)  # the workers run elsewhere: every location below is absolute (or a URL)
    jc: TrainJob = getattr(cfg.train, job)
    try:
        human = {k: storage.absolute(v) for k, v in human_set(cfg, root).items()}
    except ValueError as err:
        raise TrainError(str(err)) from None
    for name in ("train", "test"):
        if not storage.exists(human[name]):
            raise TrainError(
                f"the human {name} set {human[name]} does not exist"
                + (" (run `capfilt synth` first)" if cfg.world is not None else "")
            )
    karpathy = {"kind": "karpathy", "ann": human["train"], "image_root": human["image_root"]}
    sources = _sources(cfg, root, round, job, karpathy)
    init = _init(jc.init, root, round, job)

    tokenizer = bert = None
    if init == "scratch":
        try:
            tokenizer = ensure_tokenizer(cfg, root)
        except (ValueError, OSError) as err:
            raise TrainError(f"model.tokenizer: {err}") from None
        if tokenizer != "bert-base-uncased":
            tokenizer = storage.absolute(tokenizer)
        bert = cfg.model.init_text_from_bert and storage.absolute(cfg.model.init_text_from_bert)
    return JobSpec(
        job=job,
        round=round,
        root=root,
        job_dir=job_dir(root, round, job),
        config=cfg.model_dump(),
        init=init,
        tokenizer=tokenizer,
        bert_dir=bert,
        sources=sources,
        test={"ann": human["test"], "image_root": human["image_root"]},
        seed=derive_seed(cfg.seed, "train", job, round),
    )


def _sources(cfg: RunConfig, root: str, round: int, job: str, karpathy: dict) -> list[dict]:
    """The job's training data: pre-training reads the web shards and the human set (round 1) or the previous
    round's bootstrapped dataset; the fine-tunes read the human set."""
    if job != "pretrain":
        return [karpathy]
    rr = storage.RunRoot(root)
    if round == 1:
        web = rr.ingest(cfg.ingest.source)
        if not storage.is_committed(web):
            raise TrainError(
                f"round 1 pre-trains on the web shards in {web}, which are not committed; run `capfilt ingest` first"
            )
        return [{"kind": "shards", "url": web}, karpathy]
    dataset = rr.round(round - 1, "dataset")
    if not storage.is_committed(dataset):
        raise TrainError(
            f"round {round} pre-trains on round {round - 1}'s bootstrapped dataset {dataset}, "
            f"which is not committed; run `capfilt assemble --round {round - 1}` first"
        )
    return [{"kind": "bootstrapped", "manifest": dataset}]


def _init(init: str, root: str, round: int, job: str) -> str:
    """``train.<job>.init`` resolved: "scratch", or the URL of the checkpoint the job starts from. A fine-tune's
    checkpoint (a released model) starts round 1 only: later rounds fine-tune their own pre-trained model."""
    if job != "pretrain" and round > 1 and init not in ("pretrain", "previous", "scratch"):
        init = "pretrain"
    if init == "pretrain":
        if job == "pretrain":
            raise TrainError(
                "train.pretrain.init cannot be 'pretrain' (the job itself); use scratch, previous or a checkpoint path"
            )
        src = job_dir(root, round, "pretrain")
        if not storage.is_committed(src):
            raise TrainError(
                f"the {job} starts from round {round}'s pre-trained model, but {src} is not "
                f"committed; run `capfilt pretrain --round {round}` first"
            )
        return storage.join(src, "model")
    if init == "previous":
        src = job_dir(root, round - 1, "pretrain")
        if round < 2 or not storage.is_committed(src):
            raise TrainError(
                f"train.{job}.init is 'previous' but round {round - 1}'s pre-training {src} is not committed"
            )
        return storage.join(src, "model")
    if init != "scratch":
        init = storage.absolute(init)
        if not storage.exists(init):
            raise TrainError(f"train.{job}.init: no checkpoint at {init}")
    return init
