"""Shards of a URL list downloaded by img2dataset's own pieces, one shard at a time, on local processes or Ray.

img2dataset's ``download()`` builds a Reader (the list -> one small Arrow file per shard), a Downloader (one
shard: download, resize, write ``NNNNN.tar``, ``NNNNN.parquet`` and last ``NNNNN_stats.json``) and a distributor
that runs the Downloader over the Reader's shards. Here the same Reader and Downloader run under a
:class:`ShardJob` of ours, which adds what a shard needs to be final:

- **Upright photographs.** The Downloader resizes with :class:`pipelines.ingest_resize.UprightResizer`
  (EXIF orientation applied, 16-bit scaled, the project's decoder); resize modes, encode format and statuses
  are img2dataset's.
- **Staged, ordered, then published.** A shard is written into ``_tmp/shard-NNNNN/`` under the output, put in key
  order there (:func:`pipelines.shards.sort_shard`: img2dataset writes samples in download-completion order), and
  moved into the output, its ``_stats.json`` last. So a shard whose stats file exists is whole and ordered, a
  killed or failed attempt leaves nothing in the output, and a retry or a rerun starts it again from scratch.
- **Where it runs.** ``ingest.distributor``: ``multiprocessing`` (a pool of ``ingest.processes`` spawned
  processes on this machine, restarted after 5 shards as img2dataset's own) or ``ray`` (one Ray task per shard,
  spread over the cluster's nodes, at most ``ingest.max_concurrent_shards`` at once, a task that fails or whose
  node dies retried ``ingest.shard_retries`` times); ``auto`` is ``ray`` when this process uses a Ray cluster
  (``RAY_ADDRESS`` is set, or Ray is initialised here) and ``multiprocessing`` otherwise. Every shard reads its
  input from, and writes straight to, the output URL: a worker node needs only that URL (a shared path or an
  object store, with credentials in its own environment), nothing of the driver's disk. The driver keeps a
  shard id per running shard, never a sample.

Shards already done (their ``_stats.json`` exists) are not read nor written again: a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import storage
from .config import IngestConfig
from .shards import sort_shard

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # shard names NNNNN
SCRATCH = "_tmp"  # img2dataset's scratch folder under the output: shard inputs, staged shards


def quiet_environment() -> None:
    """Before img2dataset is imported, here and in the processes that inherit os.environ: albumentations'
    import-time update check calls the network, wandb must stay off."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


@dataclass(frozen=True)
class ShardJob:
    """Download, order and publish one shard (picklable: it travels to spawned processes and Ray tasks)."""

    out: str
    ingest: IngestConfig
    column_list: tuple[str, ...]
    save_caption: bool

    def run(self, shard_id: int, shard_file: str) -> dict[str, Any]:
        """The shard's img2dataset stats, plus ``shard``, ``rewritten`` (whether sorting reordered it) and
        ``sort_seconds``."""
        quiet_environment()
        fs, out_path = storage.filesystem(self.out)
        name = shard_name(shard_id)
        stats_path = posixpath.join(out_path, f"{name}_stats.json")
        rewritten, sort_seconds = False, 0.0
        if not fs.exists(stats_path):  # else published by an attempt that then lost its node, or by an earlier run
            stage_url = storage.join(self.out, SCRATCH, f"shard-{name}")
            stage = storage.filesystem(stage_url)[1]
            if fs.exists(stage):
                fs.rm(stage, recursive=True)  # a killed attempt's leftovers
            fs.makedirs(stage, exist_ok=True)
            # The Downloader deletes the input it read: it reads a copy, so that the input outlives every attempt.
            fs.copy(storage.filesystem(shard_file)[1], posixpath.join(stage, "input.feather"))
            downloader = self._downloader(stage_url)
            downloader.download_shard((shard_id, storage.join(stage_url, "input.feather")))
            t0 = time.time()
            rewritten = sort_shard(storage.join(stage_url, f"{name}.tar"))
            sort_seconds = time.time() - t0
            for suffix in (".tar", ".parquet", "_stats.json"):  # the stats file last: it says the shard is done
                fs.mv(posixpath.join(stage, name + suffix), posixpath.join(out_path, name + suffix))
            fs.rm(stage, recursive=True)
            fs.rm(storage.filesystem(shard_file)[1])
        with fs.open(stats_path, "r") as f:
            return {"shard": shard_id, "rewritten": rewritten, "sort_seconds": sort_seconds, **json.load(f)}

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str], dict | None]:
        """For a process pool: a failure is returned (and printed), not raised, so the pool goes on."""
        try:
            return True, row, self.run(*row)
        except Exception as err:  # noqa: BLE001 - any failure of one shard: report it, retry it later
            traceback.print_exc()
            print(f"shard {row[0]} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return False, row, None

    def _downloader(self, folder: str) -> Any:
        from img2dataset.downloader import Downloader
        from img2dataset.writer import WebDatasetSampleWriter

        from .ingest_resize import UprightResizer

        ic = self.ingest
        resizer = UprightResizer(
            image_size=ic.image_size,
            resize_mode=ic.resize_mode,
            resize_only_if_bigger=False,
            encode_format="jpg",
            min_image_size=ic.min_image_size,
        )
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=resizer,
            thread_count=ic.threads,
            save_caption=self.save_caption,
            extract_exif=True,
            output_folder=folder,
            column_list=list(self.column_list),
            timeout=ic.timeout,
            number_sample_per_shard=ic.shard_size,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=ic.retries,
            user_agent_token="capfilt",
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        )


def reader(
    url_list: str,
    out: str,
    ic: IngestConfig,
    *,
    has_caption: bool,
    done: set[int],
    start_shard_id: int = 0,
    extra_columns: list[str] | None = None,
) -> Any:
    """img2dataset's Reader over a normalised list (Parquet with ``url``, ``caption`` and ``extra_columns``): it
    writes each shard's rows to ``<out>/_tmp/<id>.feather``, skipping the shards in ``done``, one input file at a
    time (one file's rows in memory), and yields ``(shard_id, feather URL)``."""
    from .ray_runtime import configure_environment

    configure_environment()  # img2dataset imports ray when present: Ray's settings must be there before
    quiet_environment()
    from img2dataset.reader import Reader

    scratch = storage.join(out, SCRATCH)
    fs, path = storage.filesystem(scratch)
    fs.makedirs(path, exist_ok=True)
    return Reader(
        url_list,
        "parquet",
        "url",
        "caption" if has_caption else None,
        None,
        None,
        extra_columns or None,
        ic.shard_size,
        done,
        scratch,
        start_shard_id,
    )


def choose_distributor(ic: IngestConfig) -> str:
    if ic.distributor != "auto":
        return ic.distributor
    # A cluster is named by RAY_ADDRESS. A local Ray this process started is not one: its workers, started earlier,
    # may lack settings (storage credentials) the stage's environment has now, and one machine gains nothing.
    return "ray" if os.environ.get("RAY_ADDRESS") else "multiprocessing"


def run_shards(job: ShardJob, shards: Iterable[tuple[int, str]], distributor: str) -> tuple[list[dict], list[int]]:
    """Run ``job`` over ``shards``; returns (each finished shard's result, the ids of shards that failed)."""
    if distributor == "ray":
        return _run_ray(job, shards)
    return _run_processes(job, shards)


def _run_processes(job: ShardJob, shards: Iterable[tuple[int, str]]) -> tuple[list[dict], list[int]]:
    """img2dataset's multiprocessing distributor, with each shard's result kept: a spawned pool of
    ``ingest.processes`` (each worker replaced after 5 shards), failed shards retried ``ingest.shard_retries``
    times after the first pass. The caller's ``__main__`` must be import-safe (spawn)."""
    from multiprocessing import get_context

    done: list[dict] = []
    todo: Iterable[tuple[int, str]] = shards
    with get_context("spawn").Pool(job.ingest.processes, maxtasksperchild=5) as pool:
        for attempt in range(job.ingest.shard_retries + 1):
            failed = []
            for ok, row, result in pool.imap_unordered(job, todo):
                if ok:
                    done.append(result)
                    _log_done(result, len(done))
                else:
                    failed.append(row)
            if not failed:
                break
            log.warning("%d shards failed (attempt %d); retrying: %s", len(failed), attempt + 1, failed[:10])
            todo = failed
    return done, [sid for sid, _ in failed]


def _ray_shard(job: ShardJob, shard_id: int, shard_file: str) -> dict[str, Any]:
    return job.run(shard_id, shard_file)


def _run_ray(job: ShardJob, shards: Iterable[tuple[int, str]]) -> tuple[list[dict], list[int]]:
    from .ray_runtime import ensure_ray

    ensure_ray()
    import ray

    ic = job.ingest
    window = ic.max_concurrent_shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(_ray_shard).options(
        name="ingest-shard",
        num_cpus=1,
        max_retries=ic.shard_retries,
        retry_exceptions=True,
        scheduling_strategy="SPREAD",
    )
    job_ref = ray.put(job)
    pending: dict[Any, int] = {}
    done: list[dict] = []
    failed: list[int] = []

    def collect(block: int) -> None:
        ready, _ = ray.wait(list(pending), num_returns=block)
        for ref in ready:
            sid = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - every retry failed: the shard stays missing, the rest go on
                log.error("shard %s failed after %d retries: %s", shard_name(sid), ic.shard_retries, err)
                failed.append(sid)
                continue
            done.append(result)
            _log_done(result, len(done))

    for shard_id, shard_file in shards:
        if len(pending) >= window:
            collect(1)
        pending[task.remote(job_ref, shard_id, shard_file)] = shard_id
    while pending:
        collect(1)
    return done, failed


def _log_done(result: dict, n: int) -> None:
    log.info(
        "shard %s done (%d finished this run): %d/%d images in %.1fs",
        shard_name(result["shard"]),
        n,
        result["successes"],
        result["count"],
        result["duration"],
    )
