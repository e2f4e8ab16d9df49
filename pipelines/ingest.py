"""Ingestion (``capfilt ingest``): a URL list -> webdataset shards under ``<root>/ingest/<source>/``, by img2dataset.

img2dataset does the work (download, resize, shard, per-sample status); this module decides what it reads
and records what it did:

- **Input.** ``ingest.url_list`` (a file or a directory of files, local or any fsspec URL) in
  ``ingest.input_format`` csv | tsv | parquet | jsonl | txt, with columns ``ingest.url_col`` and
  ``ingest.caption_col``. When ``url_list`` is None the synthetic world's ``web.parquet`` is ingested: the
  world's images are served on 127.0.0.1 for the duration (:func:`pipelines.world.serve_world`) and its
  ``{base}/...`` URLs rewritten to the live server.
- **Captions byte for byte.** Every list is first rewritten, file by file and in order, to a local Parquet
  file holding only ``url`` and ``caption`` as strings, which img2dataset then reads. Reading CSV ourselves
  lets quoted captions hold newlines (img2dataset's own CSV reader rejects them) and stops type inference:
  a caption ``007``, ``NA``, ``true`` or an empty one stays exactly that, instead of becoming ``7``, null,
  ``True``. img2dataset writes the string to the sample's ``.txt`` (UTF-8) and to the shard's Parquet.
  Cleaning captions belongs to later stages.
- **Failures are data.** A dead URL, a refused connection, an undecodable or too small image
  (``ingest.min_image_size``) is a row in the shard's Parquet with img2dataset's ``status``
  (``success`` | ``failed_to_download`` | ``failed_to_resize``) and ``error_message``, never an exception.
  Only a shard that img2dataset could not write at all (storage failure) stops the commit: the stage then
  raises :class:`IngestIncomplete`, and a rerun redoes just the missing shards.
- **One order.** img2dataset writes a shard's samples in the order their downloads finish, so two ingests of
  one list would hold the same samples in different orders, and everything trained on them would differ.
  Before the commit every shard is put in key order, which is the list's order
  (:func:`pipelines.shards.sort_shard`: one more read of each shard, and a rewrite of those out of order);
  the manifest's ``this_run`` says how many were rewritten and how long it took.
- **Incremental and committed.** img2dataset runs with ``incremental_mode="incremental"``: a shard whose
  ``NNNNN_stats.json`` exists is skipped, so a rerun after a crash only redoes unfinished shards. When every
  shard is there, ``manifest.json`` (shards, counts, success rate, failures by status and by error) is
  written and the directory committed (:func:`pipelines.storage.commit`); a rerun of a committed ingest
  does nothing. A different URL list needs another ``ingest.source`` or root.

**S3 and other object stores.** img2dataset opens the output with plain ``fsspec.url_to_fs(url)`` in its
worker processes, so storage options cannot be passed as arguments; they come from the environment, which
spawned workers inherit. For S3 or an S3-compatible server (MinIO, SeaweedFS, Ceph)::

    export AWS_ENDPOINT_URL=https://s3.example.com     # omit for AWS itself
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # or a profile / instance role: the standard chain
    export AWS_DEFAULT_REGION=us-east-1
    capfilt ingest --config C --root s3://bucket/run1

(botocore reads ``AWS_ENDPOINT_URL``; fsspec's ``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3`` JSON work too,
for options botocore has no variable for.)

Environment traps handled here: img2dataset imports albumentations, whose import-time update check calls the
network (``NO_ALBUMENTATIONS_UPDATE=1`` is set), and wandb (``enable_wandb=False``, ``WANDB_MODE=disabled``);
its ``multiprocessing`` distributor spawns fresh interpreters, so the caller's ``__main__`` must be
import-safe (the ``capfilt`` script is), and each spawned worker pays img2dataset's imports (torch, cv2,
albumentations, wandb: ~5-10 s on 2 cores) at start and again every 5 shards (its pool's
``maxtasksperchild=5``), so real lists want shards of thousands of samples; its SIGINT handler is kept out
of the caller's process (:func:`_own_signal_handlers`), which also lets the stage run off the main thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import signal
import sys
import tarfile
import tempfile
import threading
import time
import types
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from . import storage
from .config import IngestConfig, RunConfig
from .errors import StageError
from .shards import sort_shard

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_OOM_SHARD_COUNT = 5  # shard names NNNNN


class IngestError(StageError):
    """The input cannot be ingested as configured (missing list or column, empty list, no world)."""


class IngestIncomplete(StageError):
    """img2dataset finished without writing some shards; nothing was committed, a rerun redoes them."""


@dataclass
class PreparedInput:
    """The normalised URL list img2dataset reads: one local Parquet file per input file, in order."""

    folder: str
    rows_per_file: list[int]
    has_caption: bool
    description: str

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)

    def expected_shards(self, shard_size: int) -> list[int]:
        # img2dataset numbers shards consecutively over its input files, each file starting a new shard.
        return list(range(sum(math.ceil(n / shard_size) for n in self.rows_per_file)))


def _quiet_environment() -> None:
    """Before img2dataset is imported, here and in the processes it spawns (they inherit os.environ)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")


# ----------------------------------------------------------------------------------------------------------
# Input


def read_url_file(fs: storage.FileSystem, path: str, ic: IngestConfig) -> pa.Table:
    """One input file -> a table of ``url`` and (when configured) ``caption``, both exact strings."""
    cols = [ic.url_col] + ([ic.caption_col] if ic.caption_col and ic.input_format != "txt" else [])
    fmt = ic.input_format
    try:
        with fs.open(path, "rb") as f:
            if fmt == "txt":
                lines = f.read().decode("utf-8").splitlines()
                return pa.table({"url": pa.array([ln for ln in lines if ln.strip()], pa.string())})
            if fmt in ("csv", "tsv"):
                table = pa_csv.read_csv(
                    f,
                    parse_options=pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True),
                    convert_options=pa_csv.ConvertOptions(
                        column_types={c: pa.string() for c in cols}, include_columns=cols, strings_can_be_null=False
                    ),
                )
            elif fmt == "jsonl":
                table = pa_json.read_json(
                    f,
                    parse_options=pa_json.ParseOptions(
                        explicit_schema=pa.schema([(c, pa.string()) for c in cols]), unexpected_field_behavior="ignore"
                    ),
                )
                for c in cols:
                    if table[c].null_count == table.num_rows and table.num_rows:
                        raise IngestError(f"{path}: no field {c!r} in any line (check ingest.url_col / caption_col)")
            else:
                schema_names = pq.read_schema(f).names
                missing = [c for c in cols if c not in schema_names]
                if missing:
                    raise KeyError(missing[0])
                f.seek(0)
                table = pq.read_table(f, columns=cols)
                table = table.cast(pa.schema([(c, pa.string()) for c in cols]))
    except FileNotFoundError:
        raise IngestError(f"ingest.url_list: {path} does not exist") from None
    except KeyError as err:
        raise IngestError(f"{path}: no column {err.args[0]!r} (check ingest.url_col / ingest.caption_col)") from None
    except pa.ArrowInvalid as err:
        if "include_columns" in str(err) or "does not exist" in str(err):
            raise IngestError(f"{path}: {err} (check ingest.url_col / ingest.caption_col)") from None
        raise IngestError(f"{path} is not valid {fmt}: {err}") from None
    names = {ic.url_col: "url", **({ic.caption_col: "caption"} if len(cols) > 1 else {})}
    return table.select(cols).rename_columns([names[c] for c in cols])


def prepare_url_list(ic: IngestConfig, tmp: str) -> PreparedInput:
    fs, path = storage.filesystem(ic.url_list)
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + f"/*.{ic.input_format}"))
        if not files:
            raise IngestError(f"ingest.url_list: no *.{ic.input_format} file in {ic.url_list}")
    elif fs.exists(path):
        files = [path]
    else:
        raise IngestError(f"ingest.url_list: {ic.url_list} does not exist")
    rows = []
    has_caption = False
    for k, p in enumerate(files):
        table = read_url_file(fs, p, ic)
        has_caption = "caption" in table.column_names
        pq.write_table(table, posixpath.join(tmp, f"{k:05d}.parquet"))
        rows.append(table.num_rows)
    return PreparedInput(tmp, rows, has_caption, ic.url_list)


def _prepare_world_list(root: str, base_url: str, tmp: str) -> PreparedInput:
    from .world import resolve_urls, world_files

    world = storage.RunRoot(root).world()
    with storage.open_url(world_files(world)["web"], "rb") as f:
        table = pq.read_table(f)
    urls = resolve_urls(table["url"].to_pylist(), base_url)
    out = pa.table({"url": pa.array(urls, pa.string()), "caption": table["caption"].cast(pa.string())})
    pq.write_table(out, posixpath.join(tmp, "00000.parquet"))
    return PreparedInput(tmp, [out.num_rows], True, f"synthetic world {world_files(world)['web']}")


# ----------------------------------------------------------------------------------------------------------
# Output


def _shard_stats(out: str) -> dict[int, dict]:
    fs, path = storage.filesystem(out)
    fs.invalidate_cache()  # img2dataset's workers wrote through other processes' clients: listings are stale
    stats = {}
    for f in fs.glob(path.rstrip("/") + "/*_stats.json"):
        name = posixpath.basename(f)
        with fs.open(f, "r") as fh:
            stats[int(name.split("_")[0])] = json.load(fh)
    return stats


def _manifest(ic: IngestConfig, prepared: PreparedInput, stats: dict[int, dict], this_run: dict) -> dict:
    shards, errors, by_status = [], Counter(), Counter()
    for sid in sorted(stats):
        s = stats[sid]
        name = f"{sid:0{_OOM_SHARD_COUNT}d}"
        shards.append(
            {
                "shard": name,
                "tar": f"{name}.tar",
                "parquet": f"{name}.parquet",
                "count": s["count"],
                "successes": s["successes"],
                "failed_to_download": s["failed_to_download"],
                "failed_to_resize": s["failed_to_resize"],
            }
        )
        by_status.update({"failed_to_download": s["failed_to_download"], "failed_to_resize": s["failed_to_resize"]})
        errors.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
    total = sum(s["count"] for s in shards)
    successes = sum(s["successes"] for s in shards)
    return {
        "source": ic.source,
        "input": {
            "url_list": prepared.description,
            "input_format": ic.input_format if ic.url_list else "parquet",
            "url_col": ic.url_col,
            "caption_col": ic.caption_col if prepared.has_caption else None,
            "files": len(prepared.rows_per_file),
            "rows": prepared.rows,
        },
        "settings": {
            "image_size": ic.image_size,
            "resize_mode": ic.resize_mode,
            "shard_size": ic.shard_size,
            "processes": ic.processes,
            "threads": ic.threads,
            "timeout": ic.timeout,
            "retries": ic.retries,
            "min_image_size": ic.min_image_size,
            "output_format": "webdataset",
            "encode_format": "jpg",
        },
        "img2dataset_version": version("img2dataset"),
        "shards": shards,
        "n_shards": len(shards),
        "total": total,
        "successes": successes,
        "failed": total - successes,
        "success_rate": successes / total if total else 0.0,
        "failures_by_status": dict(by_status),
        "failures_by_error": dict(errors.most_common()),
        "this_run": this_run,
    }


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """img2dataset.download installs a SIGINT handler that deletes its scratch folder and exits with status 0,
    and never removes it; outside the main thread (a Prefect task, a thread pool) installing it raises. Keep
    the caller's handler in the main thread, and skip img2dataset's in any other."""
    main_module = sys.modules["img2dataset.main"]
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    real = main_module.signal
    main_module.signal = types.SimpleNamespace(signal=lambda *_: None, SIGINT=signal.SIGINT)
    try:
        yield
    finally:
        main_module.signal = real


def _download(prepared: PreparedInput, out: str, ic: IngestConfig) -> None:
    _quiet_environment()
    import img2dataset

    with _own_signal_handlers():
        _img2dataset_download(img2dataset, prepared, out, ic)


def _img2dataset_download(img2dataset: Any, prepared: PreparedInput, out: str, ic: IngestConfig) -> None:
    img2dataset.download(
        url_list=prepared.folder,
        input_format="parquet",
        url_col="url",
        caption_col="caption" if prepared.has_caption else None,
        output_folder=out,
        output_format="webdataset",
        image_size=ic.image_size,
        resize_mode=ic.resize_mode,
        min_image_size=ic.min_image_size,
        number_sample_per_shard=ic.shard_size,
        oom_shard_count=_OOM_SHARD_COUNT,
        processes_count=ic.processes,
        thread_count=ic.threads,
        timeout=ic.timeout,
        retries=ic.retries,
        encode_format="jpg",
        distributor="multiprocessing",
        incremental_mode="incremental",
        enable_wandb=False,
        user_agent_token="capfilt",
    )


def _sort_shards(out: str, shard_ids: list[int], workers: int) -> int:
    """Every shard in key order (:func:`pipelines.shards.sort_shard`, one shard per thread); how many had to be
    rewritten. Shards of an earlier, interrupted run are checked too (reading an ordered one costs one read).
    A broken tar is an IngestIncomplete; a storage error propagates as it is (a rerun retries it)."""

    def one(sid: int) -> bool:
        name = f"{sid:0{_OOM_SHARD_COUNT}d}"
        try:
            return sort_shard(storage.join(out, f"{name}.tar"))
        except tarfile.TarError as err:
            raise IngestIncomplete(
                f"shard {name} of {out} is unreadable ({err}); nothing committed: delete its "
                f"{name}_stats.json and rerun `capfilt ingest` to download it again"
            ) from err

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return sum(pool.map(one, shard_ids))


def run_ingest(cfg: RunConfig, root: str) -> dict[str, Any]:
    """``capfilt ingest``: download the URL list into committed shards; returns the manifest."""
    ic = cfg.ingest
    out = storage.RunRoot(root).ingest(ic.source)
    manifest_url = storage.join(out, MANIFEST)
    if storage.is_committed(out):
        log.info("ingest %s already committed; nothing to do", out)
        return storage.read_json(manifest_url)

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="capfilt-ingest-"))
        if ic.url_list is None:
            from .world import serve_world

            world = storage.RunRoot(root).world()
            if not storage.is_committed(world):
                raise IngestError(
                    f"ingest.url_list is not set and there is no committed world at {world}; "
                    "run `capfilt synth` first or set ingest.url_list"
                )
            base = stack.enter_context(serve_world(world))
            prepared = _prepare_world_list(root, base, tmp)
        else:
            prepared = prepare_url_list(ic, tmp)
        if prepared.rows == 0:
            raise IngestError(f"the URL list {prepared.description} has no rows")

        fs, path = storage.filesystem(out)
        if fs.exists(posixpath.join(path, MANIFEST)):
            fs.rm(posixpath.join(path, MANIFEST))  # img2dataset reads every *.json there as NNNNN_stats.json
        before = set(_shard_stats(out))
        log.info(
            "ingesting %d URLs from %s into %s (%d shards of %d, %d done before)",
            prepared.rows,
            prepared.description,
            out,
            len(prepared.expected_shards(ic.shard_size)),
            ic.shard_size,
            len(before),
        )
        t0 = time.time()
        _download(prepared, out, ic)
        seconds = time.time() - t0

    fs, path = storage.filesystem(out)
    if fs.exists(posixpath.join(path, "_tmp")):  # img2dataset leaves its (empty) scratch folder on object stores
        fs.rm(posixpath.join(path, "_tmp"), recursive=True)
    stats = _shard_stats(out)
    missing = sorted(set(prepared.expected_shards(ic.shard_size)) - set(stats))
    if missing:
        raise IngestIncomplete(
            f"img2dataset did not finish shards {missing[:20]} of {out}; "
            "nothing committed, rerun `capfilt ingest` to redo them"
        )
    t0 = time.time()
    sorted_now = _sort_shards(out, sorted(stats), ic.processes)
    sort_seconds = time.time() - t0
    done_now = [stats[s] for s in stats if s not in before]
    samples_now = sum(s["count"] for s in done_now)
    shard_seconds = sum(s["duration"] for s in done_now)
    this_run = {
        "shards": len(done_now),
        "samples": samples_now,
        "seconds": round(seconds, 3),
        "samples_per_second": round(samples_now / seconds, 1) if seconds > 0 else None,
        # per worker process, without img2dataset's start-up (spawning and importing take ~10 s)
        "shard_seconds": round(shard_seconds, 3),
        "worker_samples_per_second": round(samples_now / shard_seconds, 1) if shard_seconds > 0 else None,
        # img2dataset's shards put in key order (the input list's), so that every ingest of a list is the same
        "shards_sorted": sorted_now,
        "sort_seconds": round(sort_seconds, 3),
    }
    manifest = _manifest(ic, prepared, stats, this_run)
    storage.write_json(manifest_url, manifest)
    storage.commit(
        out, {"total": manifest["total"], "successes": manifest["successes"], "n_shards": manifest["n_shards"]}
    )
    log.info(
        "ingest committed at %s: %d/%d images (%.1f%%) in %d shards; this run %d samples in %.1fs "
        "(%s samples/s overall, %s per worker while downloading); failures: %s",
        out,
        manifest["successes"],
        manifest["total"],
        100 * manifest["success_rate"],
        manifest["n_shards"],
        samples_now,
        seconds,
        this_run["samples_per_second"],
        this_run["worker_samples_per_second"],
        manifest["failures_by_status"],
    )
    return manifest
