"""The driver's side of a job: Ray Train's setup and storage, the run, and the result (commit, summary)."""

from __future__ import annotations

import builtins
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import storage
from ..config import RunConfig, validate_config
from .spec import EVAL, RAY_DIR, ROLES, JobSpec, TrainError, job_dir, resolve_job
from .worker import first_step_loop, train_loop

log = logging.getLogger(__name__)

# Ray Train's controller polls the workers every 2 s by default, and a worker's report waits until the previous
# one was taken (see ``worker.REPORT_EVERY_S``): the controller polls faster than its default.
HEALTH_CHECK_INTERVAL_S = "0.5"


def run_job(cfg: RunConfig, root: str, round: int, job: str) -> dict:
    """Run (or resume) one training job and commit its directory; a committed job returns its summary."""
    out = job_dir(root, round, job)
    if storage.is_committed(out):
        log.info("%s of round %d already committed at %s; nothing to do", job, round, out)
        return storage.read_commit(out)
    spec = resolve_job(cfg, root, round, job)
    t0 = time.time()
    _fit(spec, train_loop, storage_path=spec.job_dir)
    evaluation = storage.read_json(storage.join(out, EVAL))
    summary = {
        "job": job,
        "round": round,
        "model": storage.join(out, "model"),
        "model_id": evaluation.get("model_id"),
        "final_step": evaluation.get("final_step"),
        "eval": evaluation.get("metrics", {}),
        "resumed_from_step": evaluation.get("resumed_from_step"),
        "seconds": builtins.round(time.time() - t0, 1),  # the parameter ``round`` shadows the builtin
    }
    storage.commit(out, summary)
    log.info("%s of round %d committed at %s (model %s, %s)", job, round, out, summary["model_id"], summary["eval"])
    return summary


def run_pretrain(cfg: RunConfig, root: str, round: int) -> dict:
    return run_job(cfg, root, round, "pretrain")


def run_finetune(cfg: RunConfig, root: str, round: int, role: str) -> dict:
    if role not in ROLES:
        raise TrainError(f"--role must be one of {list(ROLES)}, got {role!r}")
    return run_job(cfg, root, round, role)


def first_step_losses(
    cfg: RunConfig, root: str, round: int, job: str, *, workers: int, batch_size: int, storage_path: str
) -> dict:
    """The losses of one optimizer step on a fixed global batch (the first ``batch_size`` human pairs) with
    ``workers`` workers, averaged over ranks: N workers must give the loss of one on the same global batch."""
    cfg = validate_config(
        {
            **cfg.model_dump(),
            "train": {
                **cfg.train.model_dump(),
                job: {
                    **getattr(cfg.train, job).model_dump(),
                    "workers": workers,
                    "batch_size": batch_size,
                    "max_failures": 0,
                },
            },
        }
    )
    spec = resolve_job(cfg, root, round, job)
    spec.job_dir = storage_path  # where rank 0 leaves its answer; nothing is written into the run root
    _fit(spec, first_step_loop, storage_path=storage_path)
    return storage.read_json(storage.join(storage_path, "first_step.json"))


def _ray_storage(url: str) -> tuple[str, Any]:
    """Ray Train's storage for a URL: a local path as is, anything else through fsspec wrapped for pyarrow."""
    if storage.is_local(url):
        return os.path.abspath(storage.filesystem(url)[1]), None
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(url)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _fit(spec: JobSpec, loop: Callable[[dict], None], storage_path: str):
    from ..ray_runtime import ensure_ray

    # Propagated by Ray Train from the driver to its controller; a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    # A local Ray started for training gets the dashboard (on 127.0.0.1): it shows the job's metrics, and Ray
    # Train's controller watches itself through the state API that the dashboard serves.
    ensure_ray(dashboard=os.environ.get("CAPFILT_RAY_DASHBOARD", "1") == "1")
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
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
            name=RAY_DIR,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=jc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=jc.keep_checkpoints),
        ),
    )
    log.info(
        "%s round %d: %d Ray Train worker(s), global batch %d, storage %s",
        spec.job,
        spec.round,
        jc.workers,
        jc.batch_size,
        storage_path,
    )
    try:
        result = trainer.fit()
    except Exception as err:  # ray.train.TrainingFailedError and friends: one clear line, the cause chained
        raise TrainError(f"{spec.job} of round {spec.round} failed: {err}") from err
    if getattr(result, "error", None) is not None:
        raise TrainError(f"{spec.job} of round {spec.round} failed: {result.error}") from result.error
    return result
