"""The Prefect flow ``capfilt``: BLIP's bootstrapping loop over the pipeline stages, or curation with given models.

``flow.mode: bootstrap`` (the default): synth or ingest -> pre-train round k -> fine-tune captioner and filter ->
CapFilt -> assemble -> pre-train round k+1 -> ... for ``flow.rounds`` rounds; then evaluate every pre-trained
round's model and write each round's HTML report. Round 1's pre-training is skipped when both fine-tunes start
from given checkpoints (``RunConfig.pretrained_rounds``). ``flow.mode: curate``: ingest -> CapFilt -> assemble ->
report with ``capfilt.captioner`` and ``capfilt.filter`` (released BLIP checkpoints), no training. The ``mode``
parameter (``capfilt curate``, ``prefect deployment run capfilt/bootstrap -p mode=curate``) overrides the config's.
Every stage skips committed work, so a rerun of a failed flow resumes where it stopped; the logic lives in
``pipelines``, this module only orchestrates.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.runtime import configure_environment  # absolute: Prefect loads this file as a script (entrypoint)
from pipelines import storage
from pipelines.config import RunConfig, load_config

RETRY = dict(retries=2, retry_delay_seconds=[5, 30])


def _cfg(config: str, overrides: list[str]) -> RunConfig:
    return load_config(config, overrides)


def _timed(name: str, fn, *args) -> Any:
    t0 = time.perf_counter()
    out = fn(*args)
    get_run_logger().info("%s done in %.1f s", name, time.perf_counter() - t0)
    return out


@task(name="synth", **RETRY)
def synth(config: str, overrides: list[str], root: str) -> dict:
    from pipelines.world import run_synth

    return _timed("synth", run_synth, _cfg(config, overrides), root)


@task(name="ingest", **RETRY)
def ingest(config: str, overrides: list[str], root: str) -> dict:
    from pipelines.ingest import run_ingest

    return _timed("ingest", run_ingest, _cfg(config, overrides), root)


@task(name="pretrain", retries=1, retry_delay_seconds=10, task_run_name="pretrain round {round}")
def pretrain(config: str, overrides: list[str], root: str, round: int) -> dict:
    from pipelines.train import run_pretrain

    return _timed(f"pretrain round {round}", run_pretrain, _cfg(config, overrides), root, round)


@task(name="finetune", retries=1, retry_delay_seconds=10, task_run_name="finetune {role} round {round}")
def finetune(config: str, overrides: list[str], root: str, round: int, role: str) -> dict:
    from pipelines.train import run_finetune

    return _timed(f"finetune {role} round {round}", run_finetune, _cfg(config, overrides), root, round, role)


@task(name="caption-filter", **RETRY, task_run_name="caption-filter round {round}")
def caption_filter(config: str, overrides: list[str], root: str, round: int) -> dict:
    from pipelines.capfilt import run_caption_filter

    return _timed(f"caption-filter round {round}", run_caption_filter, _cfg(config, overrides), root, round)


@task(name="assemble", **RETRY, task_run_name="assemble round {round}")
def assemble(config: str, overrides: list[str], root: str, round: int) -> dict:
    from pipelines.assemble import run_assemble

    return _timed(f"assemble round {round}", run_assemble, _cfg(config, overrides), root, round)


@task(name="evaluate", **RETRY, task_run_name="evaluate round {round}")
def evaluate(config: str, overrides: list[str], root: str, round: int) -> dict:
    from pipelines.evaluate import run_eval

    return _timed(f"evaluate round {round}", run_eval, _cfg(config, overrides), root, round)


@task(name="report", **RETRY, task_run_name="report round {round}")
def report(config: str, overrides: list[str], root: str, round: int) -> str:
    from pipelines.report import run_report

    return _timed(f"report round {round}", run_report, _cfg(config, overrides), root, round)


def _finetune_concurrently(cfg: RunConfig) -> bool:
    """Captioner and filter run side by side only when the cluster holds both jobs at once."""
    from pipelines.ray_runtime import ensure_ray

    ensure_ray()  # sets Ray's environment, then imports and starts Ray
    import ray

    have = ray.cluster_resources()
    jobs = (cfg.train.captioner, cfg.train.filter)
    gpus = sum(j.workers for j in jobs if j.use_gpu)
    cpus = sum(j.workers * j.cpus_per_worker for j in jobs)
    return have.get("GPU", 0) >= gpus and have.get("CPU", 0) >= cpus


def _bootstrap(cfg: RunConfig, config: str, overrides: list[str], root: str, summary: dict) -> None:
    rounds = cfg.flow.rounds
    if 1 in cfg.pretrained_rounds:
        pretrain(config, overrides, root, 1)
    for k in range(1, rounds + 1):
        if _finetune_concurrently(cfg):
            futures = [finetune.submit(config, overrides, root, k, role) for role in ("captioner", "filter")]
            captioner, filt = (f.result() for f in futures)
        else:
            captioner = finetune(config, overrides, root, k, "captioner")
            filt = finetune(config, overrides, root, k, "filter")
        capfilt_summary = caption_filter(config, overrides, root, k)
        dataset = assemble(config, overrides, root, k)
        pretrain(config, overrides, root, k + 1)
        summary["rounds"].append(
            {"round": k, "captioner": captioner, "filter": filt, "capfilt": capfilt_summary, "dataset": dataset}
        )
    summary["eval"] = {k: evaluate(config, overrides, root, k) for k in cfg.pretrained_rounds}
    summary["html"] = {k: report(config, overrides, root, k) for k in range(1, rounds + 1)}


def _curate(config: str, overrides: list[str], root: str, summary: dict) -> None:
    capfilt_summary = caption_filter(config, overrides, root, 1)
    dataset = assemble(config, overrides, root, 1)
    summary["rounds"].append({"round": 1, "capfilt": capfilt_summary, "dataset": dataset})
    summary["html"] = {1: report(config, overrides, root, 1)}


@flow(name="capfilt", log_prints=True)
def capfilt(
    config: str,
    root: str,
    overrides: list[str] | None = None,
    mode: Literal["bootstrap", "curate"] | None = None,
) -> dict:
    """Bootstrap a cleaner dataset from noisy web data (BLIP's CapFilt), round after round; or, with ``mode``
    curate (or the config's ``flow.mode``), caption and filter it with given checkpoints, no training."""
    configure_environment()  # a deployment's worker runs this flow without ``capfilt``'s main: before any Ray work
    overrides = list(overrides or []) + ([f"flow.mode={mode}"] if mode else [])
    cfg = _cfg(config, overrides)  # fails fast, before any cluster work, on a bad config
    storage.check_root_writable(root)
    logger = get_run_logger()
    if cfg.world is not None:
        synth(config, overrides, root)
    ingested = ingest(config, overrides, root)
    summary: dict[str, Any] = {"root": root, "mode": cfg.flow.mode, "ingest": ingested, "rounds": []}
    if cfg.flow.mode == "curate":
        _curate(config, overrides, root, summary)
    else:
        _bootstrap(cfg, config, overrides, root, summary)
    from pipelines.summary import run_summary

    closing = run_summary(cfg, root)
    create_markdown_artifact(
        key="capfilt-summary", markdown=closing["markdown"], description=f"CapFilt {cfg.flow.mode} of {root}"
    )
    logger.info("\n%s", closing["text"])
    summary["report"] = closing
    return summary


logging.getLogger("prefect").setLevel(logging.INFO)
