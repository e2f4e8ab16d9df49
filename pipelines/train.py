"""Training jobs on Ray Train: ``capfilt pretrain`` and ``capfilt finetune --role captioner|filter|shared``.

Each job is one ``TorchTrainer`` run of N workers (CPU/gloo here, GPU/NCCL on a cluster) over a stream of
image-text pairs (``ShardStream``, one shard of the stream per rank, padded so every rank runs the same
number of steps):

  pretrain   ITC + ITM + LM jointly. Round 1: the web shards plus the human set; round K > 1: round K-1's
             bootstrapped dataset (``<root>/round=<K-1>/dataset/``). From scratch (the paper's choice for the
             next round; the text side optionally from a BERT directory) or from a checkpoint.
  captioner  LM only, on the human set, with the prompt "a picture of " (prompt tokens out of the loss).
  filter     ITC + ITM on the human set; captions of one image are positives of each other (image ids).
  shared     the paper's ablation: one model for both roles, LM on the prompted caption and ITC + ITM on the
             caption alone (as the filter sees texts), in one step. Not part of the flow; see
             benchmarks/capfilt_experiment.py.
The fine-tunes start from round K's pre-trained ``model/`` and are separate models (sharing them hurts).

Outputs under ``<root>/round=K/<job>/`` on any fsspec URL:
  model/           the final checkpoint in our format (``BlipModel.from_pretrained``)
  metrics.jsonl    one JSON per logged step: step, epoch, each loss, loss, lr, samples_per_s, data_wait
                   (share of step time spent waiting for data), memory; then one ``kind: eval`` row
  eval.json        the held-out evaluation: retrieval R@1/R@5 (pretrain, filter), caption loss (captioner)
  tensorboard/     the same scalars for TensorBoard (rank 0)
  ray_train/       Ray Train's run: checkpoints ``step_NNNNNNNN/state.pt`` every epoch and every N steps
  _COMMITTED       written last, by the driver; a committed job is a no-op when rerun

Fault tolerance. A checkpoint holds the model with BlipLosses' momentum encoders and queues, the optimiser,
the scheduler and the data position (epoch, step in epoch, global step). ``FailureConfig(max_failures)``
restarts crashed workers from the latest one; a job killed outright and rerun finds Ray Train's snapshot in
``ray_train/`` and resumes from it. The data order of an epoch is a function of (seed, epoch, ranks x
DataLoader workers), so a resumed epoch skips the batches already done; the RNG is reseeded from the global
step before each step, so a resumed run takes the same random choices (ITM negatives) as one never stopped.

DDP wraps ``BlipLosses`` with ``broadcast_buffers=False``: the feature queues are identical on every rank by
construction (every rank enqueues the same gathered batch), and broadcasting them each step would cost a
queue's size of traffic for nothing. Parameters the job's objectives never reach (the ITM head for the
captioner, the decoder's self-attention for the filter) are frozen, so DDP needs no unused-parameter search.

For tests: ``first_step_losses`` runs one step on a fixed global batch with N workers (N workers must give the
loss of one), and ``CAPFILT_TRAIN_FAULT=<step>:<rank>:<marker file>`` makes one worker die once, as a crash.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from blip_core import BlipLosses, BlipModel, alpha_at
from blip_core.transforms import eval_transform, train_transform

from . import storage
from .bootstrapped import bootstrapped_sources
from .config import RunConfig, TrainJob, validate_config
from .errors import StageError
from .karpathy import KarpathyDataset, KarpathySource, read_karpathy
from .modeling import build_model, ensure_tokenizer, human_set, is_local, save_model, upload_dir
from .optim import build_optimizer, build_scheduler, lr_at
from .shards import list_shards
from .sources import Sample, ShardSource, Source
from .stream import ShardStream, derive_seed

log = logging.getLogger(__name__)

OBJECTIVES: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "lm"),
    "captioner": ("lm",),
    "filter": ("itc", "itm"),
    "shared": ("itc", "itm", "lm"),
}
ROLES = ("captioner", "filter", "shared")
PROMPTED = ("captioner", "shared")  # jobs whose LM learns to caption after the prompt "a picture of "
RAY_DIR = "ray_train"
# Ray Train's controller takes each report off a one-slot queue when it polls the workers (every 2 s by
# default), so a report blocks until the previous one was taken: metrics go to Ray at most this often (every
# row still goes to metrics.jsonl and TensorBoard), and the controller polls faster than its default.
REPORT_EVERY_S = 5.0
HEALTH_CHECK_INTERVAL_S = "0.5"
STATE_FILE = "state.pt"
METRICS = "metrics.jsonl"
EVAL = "eval.json"


class TrainError(StageError):
    """A job that cannot start (missing inputs, bad settings) or that failed for good."""


# ================================================================================================ the plan
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
    rr = storage.RunRoot(root)
    jc: TrainJob = getattr(cfg.train, job)
    try:
        human = {k: storage.absolute(v) for k, v in human_set(cfg, root).items()}
    except ValueError as err:
        raise TrainError(str(err)) from None
    for name in ("train", "test"):
        fs, path = storage.filesystem(human[name])
        if not fs.exists(path):
            raise TrainError(f"the human {name} set {human[name]} does not exist"
                             + (" (run `capfilt synth` first)" if cfg.world is not None else ""))
    karpathy = {"kind": "karpathy", "ann": human["train"], "image_root": human["image_root"]}

    if job == "pretrain":
        if round == 1:
            web = rr.ingest(cfg.ingest.source)
            if not storage.is_committed(web):
                raise TrainError(f"round 1 pre-trains on the web shards in {web}, which are not committed; "
                                 "run `capfilt ingest` first")
            sources = [{"kind": "shards", "url": web}, karpathy]
        else:
            dataset = rr.round(round - 1, "dataset")
            if not storage.is_committed(dataset):
                raise TrainError(f"round {round} pre-trains on round {round - 1}'s bootstrapped dataset {dataset}, "
                                 f"which is not committed; run `capfilt assemble --round {round - 1}` first")
            sources = [{"kind": "bootstrapped", "manifest": dataset}]
    else:
        sources = [karpathy]

    init = jc.init
    if init == "pretrain":
        if job == "pretrain":
            raise TrainError("train.pretrain.init cannot be 'pretrain' (the job itself); use scratch, previous "
                             "or a checkpoint path")
        src = job_dir(root, round, "pretrain")
        if not storage.is_committed(src):
            raise TrainError(f"the {job} starts from round {round}'s pre-trained model, but {src} is not "
                             f"committed; run `capfilt pretrain --round {round}` first")
        init = storage.join(src, "model")
    elif init == "previous":
        src = job_dir(root, round - 1, "pretrain")
        if round < 2 or not storage.is_committed(src):
            raise TrainError(f"train.{job}.init is 'previous' but round {round - 1}'s pre-training {src} is not "
                             "committed")
        init = storage.join(src, "model")
    elif init != "scratch":
        init = storage.absolute(init)
        fs, path = storage.filesystem(init)
        if not fs.exists(path):
            raise TrainError(f"train.{job}.init: no checkpoint at {init}")

    tokenizer = bert = None
    if init == "scratch":
        try:
            tokenizer = ensure_tokenizer(cfg, root)
        except (ValueError, OSError) as err:
            raise TrainError(f"model.tokenizer: {err}") from None
        if tokenizer != "bert-base-uncased":
            tokenizer = storage.absolute(tokenizer)
        bert = cfg.model.init_text_from_bert and storage.absolute(cfg.model.init_text_from_bert)
    return JobSpec(job=job, round=round, root=root, job_dir=job_dir(root, round, job), config=cfg.model_dump(),
                   init=init, tokenizer=tokenizer, bert_dir=bert, sources=sources,
                   test={"ann": human["test"], "image_root": human["image_root"]},
                   seed=derive_seed(cfg.seed, "train", job, round))


# ============================================================================================== the driver
def run_job(cfg: RunConfig, root: str, round: int, job: str) -> dict:
    """Run (or resume) one training job and commit its directory; a committed job returns its summary."""
    out = job_dir(root, round, job)
    if storage.is_committed(out):
        log.info("%s of round %d already committed at %s; nothing to do", job, round, out)
        return storage.read_commit(out)
    spec = resolve_job(cfg, root, round, job)
    t0 = time.time()
    _fit(spec, _train_loop, storage_path=spec.job_dir)
    evaluation = storage.read_json(storage.join(out, EVAL))
    summary = {
        "job": job, "round": round, "model": storage.join(out, "model"), "model_id": evaluation.get("model_id"),
        "final_step": evaluation.get("final_step"), "eval": evaluation.get("metrics", {}),
        "resumed_from_step": evaluation.get("resumed_from_step"), "seconds": round_(time.time() - t0, 1),
    }
    storage.commit(out, summary)
    log.info("%s of round %d committed at %s (model %s, %s)", job, round, out, summary["model_id"],
             summary["eval"])
    return summary


def run_pretrain(cfg: RunConfig, root: str, round: int) -> dict:
    return run_job(cfg, root, round, "pretrain")


def run_finetune(cfg: RunConfig, root: str, round: int, role: str) -> dict:
    if role not in ROLES:
        raise TrainError(f"--role must be one of {list(ROLES)}, got {role!r}")
    return run_job(cfg, root, round, role)


def first_step_losses(cfg: RunConfig, root: str, round: int, job: str, *, workers: int, batch_size: int,
                      storage_path: str) -> dict:
    """The losses of one optimizer step on a fixed global batch (the first ``batch_size`` human pairs) with
    ``workers`` workers, averaged over ranks: N workers must give the loss of one on the same global batch."""
    cfg = validate_config({**cfg.model_dump(), "train": {
        **cfg.train.model_dump(), job: {**getattr(cfg.train, job).model_dump(), "workers": workers,
                                        "batch_size": batch_size, "max_failures": 0}}})
    spec = resolve_job(cfg, root, round, job)
    spec.job_dir = storage_path  # where rank 0 leaves its answer; nothing is written into the run root
    _fit(spec, _first_step_loop, storage_path=storage_path)
    return storage.read_json(storage.join(storage_path, "first_step.json"))


def round_(x: float, n: int) -> float:
    return float(f"{x:.{n}f}")


def _ray_storage(url: str) -> tuple[str, Any]:
    """Ray Train's storage for a URL: a local path as is, anything else through fsspec wrapped for pyarrow."""
    if is_local(url):
        return os.path.abspath(storage.filesystem(url)[1]), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(url)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _fit(spec: JobSpec, loop: Callable[[dict], None], storage_path: str):
    from .ray_runtime import ensure_ray

    # Propagated by Ray Train from the driver to its controller; a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    # A local Ray started for training gets the dashboard (on 127.0.0.1): it shows the job's metrics, and Ray
    # Train's controller watches itself through the state API that the dashboard serves.
    ensure_ray(dashboard=os.environ.get("CAPFILT_RAY_DASHBOARD", "1") == "1")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    jc = spec.train
    resources = {"CPU": jc.cpus_per_worker, **({"GPU": 1} if jc.use_gpu else {})}
    path, filesystem = _ray_storage(storage_path)
    trainer = TorchTrainer(
        loop,
        train_loop_config=dataclasses.asdict(spec),
        torch_config=TorchConfig(backend="nccl" if jc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=jc.workers, use_gpu=jc.use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=RAY_DIR, storage_path=path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=jc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=jc.keep_checkpoints),
        ),
    )
    log.info("%s round %d: %d Ray Train worker(s), global batch %d, storage %s", spec.job, spec.round,
             jc.workers, jc.batch_size, storage_path)
    try:
        result = trainer.fit()
    except Exception as err:  # ray.train.TrainingFailedError and friends: one clear line, the cause chained
        raise TrainError(f"{spec.job} of round {spec.round} failed: {err}") from err
    if getattr(result, "error", None) is not None:
        raise TrainError(f"{spec.job} of round {spec.round} failed: {result.error}") from result.error
    return result


# ================================================================================================ the data
_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(text: str) -> str:
    """BLIP's caption clean-up (punctuation to spaces, one space between words); lower-casing is the
    tokenizer's job, and length is cut in tokens."""
    return " ".join(_PUNCT.sub(" ", text).split())


def image_key(image_id: str) -> int:
    """A stable int64 for an image id string (``web:000123``): equal on every rank, so positives agree."""
    return derive_seed("image", image_id)


class Collate:
    """Samples -> a batch: images stacked, ``prompt + caption`` tokenised, image ids hashed (runs in the
    DataLoader workers). ``separate_lm``: the prompted text goes to ``lm_input_ids`` / ``lm_attention_mask``
    and ``input_ids`` holds the caption alone, for a job that also trains ITC/ITM (the shared fine-tune)."""

    def __init__(self, tokenizer, max_length: int, prompt: str = "", separate_lm: bool = False):
        self.tokenizer, self.max_length, self.prompt = tokenizer, max_length, prompt
        self.separate_lm = separate_lm

    def __call__(self, samples: list) -> dict:
        captions = [pre_caption(s.text) for s in samples]
        lm_ids, lm_mask = self.tokenizer([self.prompt + c for c in captions], max_length=self.max_length)
        batch = {
            "images": torch.stack([s.image for s in samples]),
            "input_ids": lm_ids,
            "attention_mask": lm_mask,
            "image_ids": torch.tensor([image_key(s.image_id) for s in samples], dtype=torch.long),
        }
        if self.separate_lm:
            batch["input_ids"], batch["attention_mask"] = self.tokenizer(captions, max_length=self.max_length)
            batch["lm_input_ids"], batch["lm_attention_mask"] = lm_ids, lm_mask
        return batch


class SeparateLMLosses(torch.nn.Module):
    """``BlipLosses`` for the shared fine-tune: LM on the prompted caption and ITC + ITM on the caption alone,
    in one forward, so DDP sees one forward per backward. The image is encoded once per call (twice a step)."""

    def __init__(self, losses: BlipLosses):
        super().__init__()
        self.losses = losses

    def forward(self, images, input_ids, attention_mask, *, lm_input_ids, lm_attention_mask, objectives,
                prompt_length: int = 0, **kw) -> dict[str, torch.Tensor]:
        # LM first: every BlipLosses call clamps the temperature in place, and the ITC loss keeps it for backward.
        out = {}
        if "lm" in objectives:
            out = self.losses(images, lm_input_ids, lm_attention_mask, objectives=("lm",),
                              prompt_length=prompt_length, **kw)
        rest = [o for o in objectives if o != "lm"]
        if rest:
            out.update(self.losses(images, input_ids, attention_mask, objectives=rest, **kw))
        return out


def build_sources(spec: JobSpec, n_slots: int) -> list[Source]:
    """The job's stream sources. The human set is cut into at least ~4 units per stream slot, so that every
    rank and DataLoader worker gets its own part of a small set rather than a padded copy of one unit."""
    sources: list[Source] = []
    for s in spec.sources:
        if s["kind"] == "shards":
            sources.append(ShardSource(list_shards(s["url"])))
        elif s["kind"] == "karpathy":
            entries = read_karpathy(s["ann"])
            per_unit = max(1, min(256, len(entries) // (4 * n_slots)))
            sources.append(KarpathySource(s["ann"], s["image_root"], images_per_unit=per_unit, entries=entries))
        elif s["kind"] == "bootstrapped":
            sources.extend(bootstrapped_sources(s["manifest"], images_per_unit=64))
        else:
            raise TrainError(f"unknown source kind {s['kind']!r}")
    return sources


# ============================================================================================== the worker
def _train_loop(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    worker = Worker(JobSpec(**config), ctx.get_world_rank(), ctx.get_world_size())
    worker.train()


def _first_step_loop(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    worker = Worker(JobSpec(**config), ctx.get_world_rank(), ctx.get_world_size(), restore=False)
    losses = worker.first_step()
    if worker.rank == 0:
        storage.write_json(storage.join(worker.spec.job_dir, "first_step.json"), losses)
    worker.report(losses)


class Worker:
    """One Ray Train rank of a job: model, optimiser, stream, the loop, checkpoints, evaluation."""

    def __init__(self, spec: JobSpec, rank: int, world: int, restore: bool = True):
        import ray.train
        import ray.train.torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after tokenising
        self.started = time.perf_counter()
        self.spec, self.rank, self.world = spec, rank, world
        self.jc = spec.train
        if self.jc.batch_size % world:
            raise TrainError(f"batch_size {self.jc.batch_size} does not divide over {world} workers")
        self.batch = self.jc.batch_size // world
        self.device = ray.train.torch.get_device()
        self.gpu = self.device.type == "cuda"

        torch.manual_seed(derive_seed(spec.seed, "init"))  # the same initial weights on every rank
        model = build_model(spec.run_config.model, self.jc, spec.init, spec.tokenizer, spec.bert_dir)
        if self.jc.max_text_length > model.config.text.max_positions:
            raise TrainError(f"train.{spec.job}.max_text_length ({self.jc.max_text_length}) exceeds the model's "
                             f"text.max_positions ({model.config.text.max_positions})")
        model.amp_dtype = torch.bfloat16 if (self.gpu and self.jc.bf16) else None
        self.model = model
        self.prompt = model.config.prompt if spec.job in PROMPTED else ""
        self.prompt_length = self._prompt_length() if self.prompt else 0
        # LM on the prompted caption and ITC/ITM on the caption alone need two tokenisations of each caption.
        self.separate_lm = bool(self.prompt) and "lm" in spec.objectives and len(spec.objectives) > 1
        self.losses = BlipLosses(model)
        self.losses.to(self.device)
        frozen = freeze_unused(model, spec.objectives)
        if frozen and rank == 0:
            log.info("%s: %d parameter tensors never reached by %s are frozen", spec.job, frozen, spec.objectives)
        self.params = [p for p in model.parameters() if p.requires_grad]

        self.stream = ShardStream(
            build_sources(spec, world * max(1, self.jc.dataloader_workers)),
            transform=train_transform(self.jc.image_size, hflip=self.jc.hflip, randaugment=self.jc.randaugment,
                                      random_crop=self.jc.random_crop),
            seed=derive_seed(spec.seed, "data"), shuffle_buffer=self.jc.shuffle_buffer, rank=rank,
            world_size=world, balance="pad")
        nw = self.jc.dataloader_workers
        self.plan = self._epoch_plan(nw)
        self.total_steps = sum(self.plan)

        self.optimizer = build_optimizer(self.params, lr=self.jc.lr, weight_decay=self.jc.weight_decay,
                                         fused=self.gpu)
        self.scheduler = build_scheduler(self.optimizer, lr=self.jc.lr, total_steps=self.total_steps,
                                         warmup_steps=self.jc.warmup_steps, warmup_lr=self.jc.warmup_lr,
                                         min_lr=self.jc.min_lr)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.resumed_from: int | None = None
        self.last_report = time.monotonic()
        if restore:
            self._restore(ray.train.get_checkpoint())
        self.ddp = ray.train.torch.prepare_model(SeparateLMLosses(self.losses) if self.separate_lm else self.losses,
                                                 move_to_device=False,
                                                 parallel_strategy_kwargs={"broadcast_buffers": False})
        self.loader = DataLoader(
            self.stream, batch_size=self.batch, num_workers=nw,
            collate_fn=self._collate(),
            pin_memory=self.gpu, persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None)
        self.metrics = MetricsLog(storage.join(spec.job_dir, METRICS), keep_through=self.resumed_from) \
            if rank == 0 else None
        self.tb = TensorBoard(storage.join(spec.job_dir, "tensorboard"), purge_step=self.resumed_from) \
            if rank == 0 else None

    # ----------------------------------------------------------------------------------------------- setup
    def _collate(self) -> Collate:
        return Collate(self.model.tokenizer, self.jc.max_text_length, self.prompt, separate_lm=self.separate_lm)

    def _prompt_length(self) -> int:
        ids, _ = self.model.tokenizer([self.prompt], add_sep=False)
        return ids.shape[1]  # [DEC] + the prompt's tokens, as BLIP's prompt_length

    def _epoch_plan(self, num_workers: int) -> list[int]:
        """Steps of every epoch (the same on every rank): ``epochs`` of them, or as many as ``max_steps`` needs,
        the last one cut short."""
        plan: list[int] = []
        limit = self.jc.max_steps
        while True:
            e = len(plan)
            if limit is None and e >= self.jc.epochs:
                break
            steps = self.stream.steps_per_epoch(self.batch, num_workers, epoch=e)
            if limit is not None:
                steps = min(steps, limit - sum(plan))
                if steps <= 0:
                    break
            plan.append(steps)
        if not plan or sum(plan) == 0:
            raise TrainError(f"{self.spec.job}: the stream has no data")
        return plan

    def _fingerprint(self) -> dict:
        return {"plan": self.plan, "batch_size": self.jc.batch_size, "workers": self.world,
                "dataloader_workers": self.jc.dataloader_workers}

    def _restore(self, checkpoint) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        self.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        pos = state["position"]
        self.epoch, self.step_in_epoch, self.global_step = pos["epoch"], pos["step_in_epoch"], pos["global_step"]
        if self.epoch < len(self.plan) and self.step_in_epoch >= self.plan[self.epoch]:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.resumed_from = self.global_step
        if state.get("fingerprint") != self._fingerprint() and self.rank == 0:
            log.warning("%s: resuming at step %d under other settings (%s, now %s); the data order of the "
                        "current epoch may differ", self.spec.job, self.global_step, state.get("fingerprint"),
                        self._fingerprint())
        if self.rank == 0:
            log.info("%s: resumed from checkpoint at step %d (epoch %d, step %d of it)", self.spec.job,
                     self.global_step, self.epoch, self.step_in_epoch)

    # ---------------------------------------------------------------------------------------------- stepping
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step(self, batch: dict, epoch: int, step_in_epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the detached losses of this rank."""
        torch.manual_seed(derive_seed(self.spec.seed, "step", self.rank, self.global_step))
        b = self._to_device(batch)
        alpha = alpha_at(self.model.config.alpha, epoch, step_in_epoch, self.plan[0])
        lm = {k: b[k] for k in ("lm_input_ids", "lm_attention_mask") if k in b}
        out = self.ddp(b["images"], b["input_ids"], b["attention_mask"], image_ids=b["image_ids"], alpha=alpha,
                       objectives=self.spec.objectives, prompt_length=self.prompt_length, **lm)
        loss = sum(out.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.jc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.jc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return {k: v.detach() for k, v in out.items()}

    def first_step(self) -> dict:
        """One step on this rank's rows of a fixed global batch (see ``first_step_losses``)."""
        human = next(s for s in self.spec.sources if s["kind"] == "karpathy")
        ds = KarpathyDataset(human["ann"], human["image_root"], transform=eval_transform(self.jc.image_size))
        pairs = ds.pairs()
        n = self.jc.batch_size
        if len(pairs) < n:
            raise TrainError(f"the human set has {len(pairs)} pairs, fewer than the batch of {n}")
        rows = range(self.rank * self.batch, (self.rank + 1) * self.batch)
        collate = self._collate()
        samples = [Sample(image=img, text=text, key=iid, image_id=iid, source="human")
                   for img, text, iid in (pairs[i] for i in rows)]
        out = self.step(collate(samples), 0, 0)
        return {k: self._mean_over_ranks(v) for k, v in out.items()}

    def _mean_over_ranks(self, x: torch.Tensor) -> float:
        x = x.detach().float().clone()
        if self.world > 1:
            dist.all_reduce(x)
            x /= self.world
        return float(x)

    def report(self, metrics: dict, checkpoint=None, name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        self.last_report = time.monotonic()

    # ---------------------------------------------------------------------------------------------- the loop
    def train(self) -> None:
        jc, obj = self.jc, self.spec.objectives
        if self.rank == 0:
            log.info("%s round %d: %d steps (%s per epoch), %d per rank x %d ranks, objectives %s, from %s%s; "
                     "set up in %.1fs", self.spec.job, self.spec.round, self.total_steps, self.plan, self.batch,
                     self.world, obj, self.spec.init,
                     f", resuming at step {self.global_step}" if self.resumed_from else "",
                     time.perf_counter() - self.started)
        train_started = time.perf_counter()
        # Window sums: the losses stay on the device (no sync per step), the rest is host-side bookkeeping.
        loss_acc = torch.zeros(len(obj), dtype=torch.float64, device=self.device)
        acc = torch.zeros(5, dtype=torch.float64)  # steps, samples, data seconds, step seconds, report flag
        first_epoch, skip = self.epoch, self.step_in_epoch
        window_start = time.perf_counter()
        for epoch in range(first_epoch, len(self.plan)):
            if self.global_step >= self.total_steps:
                break
            self.stream.set_epoch(epoch)
            batches = iter(self.loader)
            done = skip if epoch == first_epoch else 0
            for _ in range(done):  # the resumed epoch: same order, so skip what the checkpoint has seen
                next(batches)
            while done < self.plan[epoch] and self.global_step < self.total_steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    raise TrainError(f"rank {self.rank}: the stream ran out after {done} of {self.plan[epoch]} "
                                     f"batches of epoch {epoch}")
                t1 = time.perf_counter()
                _inject_fault(self.global_step, self.rank)
                out = self.step(batch, epoch, done)
                done += 1
                n = len(batch["input_ids"])
                t2 = time.perf_counter()
                loss_acc += torch.stack([out[k] for k in obj]).double()
                acc += torch.tensor([1, n, t1 - t0, t2 - t0, 0], dtype=torch.float64)
                last = self.global_step == self.total_steps
                if self.global_step % jc.log_every_steps == 0 or last:
                    self._log(loss_acc, acc, epoch, time.perf_counter() - window_start)
                    loss_acc.zero_()
                    acc.zero_()
                    window_start = time.perf_counter()
                if self.global_step % jc.checkpoint_every_steps == 0 or done == self.plan[epoch] or last:
                    self._checkpoint(epoch, done)
            del batches
        if self.rank == 0:
            log.info("%s: %d steps in %.1fs", self.spec.job, self.global_step - (self.resumed_from or 0),
                     time.perf_counter() - train_started)
        self._finish()

    def _log(self, loss_acc: torch.Tensor, acc: torch.Tensor, epoch: int, wall: float) -> None:
        """Window means over all ranks (one all-reduce), to metrics.jsonl, TensorBoard and Ray Train."""
        obj = self.spec.objectives
        host = acc.clone()
        last = self.global_step == self.total_steps
        if self.rank == 0 and (last or time.monotonic() - self.last_report >= REPORT_EVERY_S):
            host[-1] = 1  # rank 0 decides, the all-reduce tells the others: every rank must call report alike
        sums = torch.cat([loss_acc, host.to(self.device)])
        if self.world > 1:
            dist.all_reduce(sums)
        sums = sums.tolist()
        steps, samples, data_s, step_s, to_ray = sums[len(obj):]
        losses = {k: sums[i] / steps for i, k in enumerate(obj)}
        row = {
            "kind": "train", "step": self.global_step, "epoch": epoch, **losses, "loss": sum(losses.values()),
            "lr": self._lr_of_last_step(), "samples_per_s": samples / max(wall, 1e-9),
            "data_wait": data_s / max(step_s, 1e-9), "step_time_s": step_s / steps, **memory_stats(self.gpu),
        }
        if self.rank == 0:
            self.metrics.append(row)
            self.tb.scalars(row, self.global_step)
            log.info("%s step %d/%d epoch %d: %s lr %.2e, %.1f samples/s, data wait %.0f%%", self.spec.job,
                     self.global_step, self.total_steps, epoch, " ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                     row["lr"], row["samples_per_s"], 100 * row["data_wait"])
        if to_ray:
            self.report(row)

    def _lr_of_last_step(self) -> float:
        return lr_at(self.global_step - 1, lr=self.jc.lr, total_steps=self.total_steps,
                     warmup_steps=self.jc.warmup_steps, warmup_lr=self.jc.warmup_lr, min_lr=self.jc.min_lr)

    def _checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        from ray.train import Checkpoint

        name = f"step_{self.global_step:08d}"
        row = {"kind": "checkpoint", "step": self.global_step, "epoch": epoch}
        with tempfile.TemporaryDirectory(prefix="capfilt-ckpt-", ignore_cleanup_errors=True) as tmp:
            checkpoint = None
            if self.rank == 0:
                self.metrics.flush()  # before the checkpoint exists: a resume never misses rows up to it
                self.tb.flush()
                torch.save({
                    "losses": self.losses.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "position": {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": self.global_step},
                    "fingerprint": self._fingerprint(),
                }, os.path.join(tmp, STATE_FILE))
                checkpoint = Checkpoint.from_directory(tmp)
            self.report(row, checkpoint=checkpoint, name=name)

    # ----------------------------------------------------------------------------------------- the ending
    def _finish(self) -> None:
        t0 = time.perf_counter()
        metrics = self.evaluate()
        eval_s = time.perf_counter() - t0
        if self.rank == 0:
            model_id = save_model(_cpu_copy(self.model), storage.join(self.spec.job_dir, "model"))
            row = {"kind": "eval", "step": self.global_step, "epoch": len(self.plan) - 1, **metrics,
                   "eval_seconds": eval_s}
            self.metrics.append(row)
            self.metrics.flush()
            self.tb.scalars({f"eval/{k}": v for k, v in metrics.items()}, self.global_step, prefix="")
            self.tb.close()
            storage.write_json(storage.join(self.spec.job_dir, EVAL), {
                "job": self.spec.job, "round": self.spec.round, "final_step": self.global_step,
                "model_id": model_id, "metrics": metrics, "resumed_from_step": self.resumed_from,
                "test_set": self.spec.test["ann"],
            })
            log.info("%s round %d: evaluation %s (%.1fs); model %s", self.spec.job, self.spec.round, metrics, eval_s,
                     model_id)
        self.report({"kind": "final", "step": self.global_step, **{f"eval_{k}": v for k, v in metrics.items()}})

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The held-out set, split over ranks: retrieval for models with ITC, caption loss for captioning models
        (the captioner; the shared model gets both)."""
        m = self.model
        was_training = m.training
        m.eval()
        ds = KarpathyDataset(self.spec.test["ann"], self.spec.test["image_root"],
                             transform=eval_transform(self.jc.image_size))
        part = Subset(ds, list(range(self.rank, len(ds), self.world)))
        loader = DataLoader(part, batch_size=self.jc.eval_batch_size, num_workers=min(2, self.jc.dataloader_workers),
                            collate_fn=_eval_collate)
        result: dict = {}
        if "itc" in self.spec.objectives:
            result.update(self._retrieval(loader, [i for i in range(self.rank, len(ds), self.world)]))
        if self.prompt:
            result.update(self._caption_loss(loader))
        m.train(was_training)
        return result

    def _retrieval(self, loader: DataLoader, indices: list[int]) -> dict:
        m = self.model
        img_feats, txt_feats, owners = [], [], []
        pos = 0
        for images, captions, _ in loader:
            img_feats.append(m.image_features(m.encode_image(images.to(self.device))).cpu())
            flat = [pre_caption(c) for caps in captions for c in caps]
            ids, mask = m.tokenizer(flat, max_length=self.jc.max_text_length)
            txt_feats.append(m.text_features(m.encode_text_ids(ids.to(self.device), mask.to(self.device))).cpu())
            for j, caps in enumerate(captions):
                owners += [indices[pos + j]] * len(caps)
            pos += len(captions)
        local = (indices, torch.cat(img_feats) if img_feats else None, torch.cat(txt_feats) if txt_feats else None,
                 owners)
        parts = [local]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, local)
        metrics: dict = {}
        if self.rank == 0:
            idx = [i for p in parts for i in p[0]]
            img = torch.cat([p[1] for p in parts if p[1] is not None])
            txt = torch.cat([p[2] for p in parts if p[2] is not None])
            owner = torch.tensor([o for p in parts for o in p[3]])
            metrics = retrieval_metrics(img, torch.tensor(idx), txt, owner)
        return self._share(metrics)

    def _caption_loss(self, loader: DataLoader) -> dict:
        m = self.model
        cfg = m.config.text
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for images, captions, _ in loader:
            embeds = m.encode_image(images.to(self.device))
            counts = torch.tensor([len(c) for c in captions], device=self.device)
            texts = [self.prompt + pre_caption(c) for caps in captions for c in caps]
            ids, mask = m.tokenizer(texts, max_length=self.jc.max_text_length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            ids[:, 0] = cfg.bos_token_id
            logits = m.lm_logits(embeds.repeat_interleave(counts, dim=0), ids, mask)
            targets = ids.masked_fill(mask == 0, -100)
            targets[:, :self.prompt_length] = -100
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
            total += torch.stack([loss.double(), (targets[:, 1:] != -100).sum().double()])
        if self.world > 1:
            dist.all_reduce(total)
        loss_sum, tokens = total.tolist()
        loss = loss_sum / max(tokens, 1)
        return {"caption_loss": loss, "caption_perplexity": math.exp(min(loss, 50.0)), "caption_tokens": int(tokens)}

    def _share(self, metrics: dict) -> dict:
        if self.world == 1:
            return metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        return box[0]


FAULT_ENV = "CAPFILT_TRAIN_FAULT"


def _inject_fault(step: int, rank: int) -> None:
    """Test hook: ``CAPFILT_TRAIN_FAULT=<step>:<rank>:<marker file>`` makes that rank's process die (as a crashed
    worker does) before that step, once: the marker file records that it happened."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if step == int(at) and rank == int(who) and not os.path.exists(marker):
        Path(marker).write_text(f"crashed rank {rank} before step {step}\n")
        log.error("%s: rank %d crashes before step %d (fault injection)", FAULT_ENV, rank, step)
        os._exit(17)


def _eval_collate(items: list) -> tuple[torch.Tensor, list[list[str]], list[str]]:
    images, captions, ids = zip(*items)
    return torch.stack(images), [list(c) for c in captions], list(ids)


def retrieval_metrics(image_feats: torch.Tensor, image_index: torch.Tensor, text_feats: torch.Tensor,
                      text_owner: torch.Tensor) -> dict:
    """Zero-shot retrieval by ITC similarity: text->image R@1/R@5 (the text's own image ranked first / in the
    top 5) and image->text R@1/R@5 (one of the image's own captions ranked first / in the top 5), in percent."""
    sim = text_feats.float() @ image_feats.float().t()  # [texts, images]
    k = min(5, sim.shape[1])
    top_img = image_index[sim.topk(k, dim=1).indices]  # [texts, k] image indices
    t2i = top_img == text_owner[:, None]
    k_t = min(5, sim.shape[0])
    top_txt = text_owner[sim.t().topk(k_t, dim=1).indices]  # [images, k] owners of the best texts
    i2t = top_txt == image_index[:, None]
    return {
        "t2i_r1": 100.0 * float(t2i[:, 0].float().mean()), "t2i_r5": 100.0 * float(t2i.any(1).float().mean()),
        "i2t_r1": 100.0 * float(i2t[:, 0].float().mean()), "i2t_r5": 100.0 * float(i2t.any(1).float().mean()),
        "r1_mean": 50.0 * float(t2i[:, 0].float().mean() + i2t[:, 0].float().mean()),
        "images": int(sim.shape[1]), "texts": int(sim.shape[0]),
    }


def _cpu_copy(model: BlipModel) -> BlipModel:
    if model.device.type == "cpu":
        return model
    import copy

    return copy.deepcopy(model).cpu()


def freeze_unused(model: BlipModel, objectives: tuple[str, ...]) -> int:
    """Freeze the parameters that ``objectives`` never reach, found by one backward pass of the objectives'
    model functions on a dummy batch (no state of ``BlipLosses`` is touched); returns how many were frozen."""
    cfg = model.config
    size = cfg.vision.image_size
    images = torch.zeros(2, 3, size, size, device=model.device)
    t = cfg.text
    ids = torch.tensor([[t.cls_token_id, t.sep_token_id, t.pad_token_id], [t.cls_token_id, t.sep_token_id, t.sep_token_id]],
                       device=model.device)
    mask = (ids != t.pad_token_id).long()
    model.zero_grad(set_to_none=True)
    image_embeds = model.vision.forward_features(images)
    total = image_embeds.float().sum() * 0
    if "itc" in objectives or "itm" in objectives:
        text_embeds = model.encode_text_ids(ids, mask)
        total = total + (model.image_features(image_embeds) @ model.text_features(text_embeds).t() / model.temp).sum()
    if "itm" in objectives:
        total = total + model.itm_logits(image_embeds, ids, mask).sum()
    if "lm" in objectives:
        dec = ids.clone()
        dec[:, 0] = t.bos_token_id
        total = total + model.lm_logits(image_embeds, dec, mask).sum()
    total.backward()
    frozen = 0
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            frozen += 1
    model.zero_grad(set_to_none=True)
    return frozen


def memory_stats(gpu: bool) -> dict:
    """Peak resident memory of this trainer process and (summed) of its live DataLoader workers, in MiB; peak
    GPU memory allocated by torch on GPU."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    loaders = 0.0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                for pid in f.read().split():
                    loaders += _vm_hwm_mib(pid)
    except OSError:
        pass
    out["loader_rss_mib"] = loaders
    if gpu:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _vm_hwm_mib(pid: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ============================================================================================ rank 0's logs
class MetricsLog:
    """``metrics.jsonl`` on any URL: rows kept in memory and the whole file rewritten on ``flush`` (object
    stores cannot append). A resumed job keeps the rows up to the step it resumed from and drops the rest,
    so no step appears twice."""

    def __init__(self, url: str, keep_through: int | None = None, flush_every_s: float = 30.0):
        self.url = url
        self.rows: list[dict] = []
        self.local = is_local(url)
        self.flush_every_s, self.last_flush = flush_every_s, time.monotonic()
        fs, path = storage.filesystem(url)
        if keep_through is not None and fs.exists(path):
            with fs.open(path, "r") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill
                    if row.get("kind", "train") == "train" and row.get("step", 0) <= keep_through:
                        self.rows.append(row)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.local or time.monotonic() - self.last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        fs, path = storage.filesystem(self.url)
        fs.makedirs(os.path.dirname(path) if self.local else path.rsplit("/", 1)[0], exist_ok=True)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        if self.local:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        else:
            with fs.open(path, "w") as f:
                f.write(text)
        self.last_flush = time.monotonic()


class TensorBoard:
    """A SummaryWriter on rank 0 when ``tensorboard`` is installed; event files go to ``<job>/tensorboard/``
    directly on a local disk, through a local folder synced on ``flush`` elsewhere."""

    def __init__(self, url: str, purge_step: int | None = None):
        self.url, self.writer, self.tmp = url, None, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            return
        fs, path = storage.filesystem(url)
        if purge_step is None and fs.exists(path):
            fs.rm(path, recursive=True)  # events of a run killed before its first checkpoint
        if is_local(url):
            log_dir = path
        else:
            self.tmp = tempfile.mkdtemp(prefix="capfilt-tb-")
            log_dir = self.tmp
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=None if purge_step is None else purge_step + 1)

    def scalars(self, row: dict, step: int, prefix: str = "train/") -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self.writer.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.tmp is not None:
            upload_dir(self.tmp, self.url)

    def close(self) -> None:
        if self.writer is None:
            return
        self.flush()
        self.writer.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
