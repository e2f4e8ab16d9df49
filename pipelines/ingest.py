"""Ingestion (``capfilt ingest``): a URL list -> webdataset shards under ``<root>/ingest/<source>/``, by img2dataset.

img2dataset does the work (download, resize, shard, per-sample status); this module decides what it reads
and records what it did:

- **Input.** ``ingest.url_list`` (a file or a directory of files, local or any fsspec URL) in
  ``ingest.input_format`` csv | tsv | parquet | jsonl | txt, with columns ``ingest.url_col`` and
  ``ingest.caption_col``. When ``url_list`` is None the synthetic world's ``web.parquet`` is ingested: the
  world's images are served for the duration (:func:`pipelines.world.serve_world`; on 127.0.0.1, or on this
  node's address when ``RAY_ADDRESS`` names a cluster whose nodes download) and its ``{base}/...`` URLs
  rewritten to the live server.
- **Captions byte for byte.** Every list is first rewritten, file by file and in order, to a local Parquet
  file holding only ``url`` and ``caption`` as strings, which img2dataset then reads. Reading CSV ourselves
  lets quoted captions hold newlines (img2dataset's own CSV reader rejects them) and stops type inference:
  a caption ``007``, ``NA``, ``true`` or an empty one stays exactly that, instead of becoming ``7``, null,
  ``True``. img2dataset writes the string to the sample's ``.txt`` (UTF-8) and to the shard's Parquet.
  Cleaning captions belongs to later stages. A headerless csv/tsv names its columns with ``ingest.column_names``;
  ``ingest.quoting: false`` reads raw TSVs (CC3M) whose captions may start with a quote.
- **Extra columns.** ``ingest.extra_columns`` (uid, similarity, NSFW, ...) follow in that file with the list's
  types where a sample's JSON can carry them (:func:`passable_extras`); img2dataset's
  ``save_additional_columns`` writes them into each sample's ``.json`` and the shard's Parquet (with the Arrow
  types of the file it reads), and CapFilt onto each row of the image.
- **Repeated URLs** each keep their own row, key, download and status; the manifest counts them per input file
  (``input.repeated_urls_within_files``, :func:`repeated_urls`).
- **Failures are data.** A dead URL, a refused connection, an undecodable or too small image
  (``ingest.min_image_size``) is a row in the shard's Parquet with img2dataset's ``status``
  (``success`` | ``failed_to_download`` | ``failed_to_resize``) and ``error_message``, never an exception.
  Only a shard that could not be written at all, after ``ingest.shard_retries`` retries (storage failure),
  stops the commit: the stage then raises :class:`IngestIncomplete`, and a rerun redoes just the missing shards.
- **Upright photographs.** img2dataset's resizing runs on the project's decoder
  (:mod:`pipelines.ingest_resize`): EXIF orientation applied, 16-bit images scaled, not clipped.
- **Shards as tasks.** img2dataset's own Reader and Downloader run shard by shard
  (:mod:`pipelines.ingest_shards`), on a pool of local processes or as Ray tasks over a cluster's nodes
  (``ingest.distributor``; ``auto``: Ray when a Ray cluster is in use); each shard reads its rows from, and writes
  straight to, the run root.
- **One order.** img2dataset writes a shard's samples in the order their downloads finish, so two ingests of
  one list would hold the same samples in different orders, and everything trained on them would differ.
  Each shard's task puts it in key order, which is the list's order, before publishing it
  (:func:`pipelines.shards.sort_shard`: one more read of the shard, and a rewrite when out of order); the
  manifest's ``this_run`` says how many were rewritten and how long it took.
- **Incremental and committed.** A shard is published with its ``NNNNN_stats.json`` last, and a shard whose
  stats file exists is skipped, so a rerun after a crash only redoes unfinished shards. When every shard is
  there, ``manifest.json`` (shards, counts, success rate, failures by status and by error, retries) is written
  and the directory committed (:func:`pipelines.storage.commit`); a rerun of a committed ingest does nothing.
  A different URL list needs another ``ingest.source`` or root.
- **Retrying what failed.** ``capfilt ingest --retry-failed`` (:func:`run_ingest` ``retry_failed``) takes a
  committed ingest's transient failures (timeouts, HTTP 5xx, connection errors: :mod:`pipelines.ingest_retry`),
  uncommits the directory, downloads them into new shards after the last one (each row's ``retry_of`` names
  the row it retries), and commits again with the manifest's counts updated (a URL counts once, by its last
  attempt) and the retry recorded in ``retries``. An interrupted retry is finished by the next run.

**S3 and other object stores.** img2dataset opens the output with plain ``fsspec.url_to_fs(url)`` in the
worker processes, so storage options cannot be passed as arguments; they come from the environment, which
spawned workers inherit (Ray workers on other nodes: set it on those nodes). For S3 or an S3-compatible server (MinIO, SeaweedFS, Ceph)::

    export AWS_ENDPOINT_URL=https://s3.example.com     # omit for AWS itself
    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # or a profile / instance role: the standard chain
    export AWS_DEFAULT_REGION=us-east-1
    capfilt ingest --config C --root s3://bucket/run1

(botocore reads ``AWS_ENDPOINT_URL``; fsspec's ``FSSPEC_S3_ENDPOINT_URL`` / ``FSSPEC_S3`` JSON work too,
for options botocore has no variable for.)

Environment traps handled here: img2dataset imports albumentations, whose import-time update check calls the
network (``NO_ALBUMENTATIONS_UPDATE=1`` is set), and wandb (``WANDB_MODE=disabled``); the ``multiprocessing``
distributor spawns fresh interpreters, so the caller's ``__main__`` must be import-safe (the ``capfilt``
script is), and each spawned worker pays img2dataset's imports (torch, cv2, albumentations, wandb: ~5-10 s on
2 cores) at start and again every 5 shards, so real lists want shards of thousands of samples (Ray workers
import once and are reused). ``img2dataset.download`` itself is not called, so neither its SIGINT handler nor
its logger process touch the caller: the stage runs off the main thread too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from . import storage
from .config import IngestConfig, RunConfig
from .errors import StageError
from .ingest_shards import SCRATCH, shard_name

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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
    extra_columns: dict[str, str] = field(default_factory=dict)  # ingest.extra_columns -> their Arrow types
    repeated_urls: int = 0  # rows whose URL an earlier row of the same input file has (see repeated_urls())

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file)

    def expected_shards(self, shard_size: int) -> list[int]:
        # img2dataset numbers shards consecutively over its input files, each file starting a new shard.
        return list(range(sum(math.ceil(n / shard_size) for n in self.rows_per_file)))


# ----------------------------------------------------------------------------------------------------------
# Input


def read_url_file(fs: storage.FileSystem, path: str, ic: IngestConfig) -> pa.Table:
    """One input file -> a table of ``url`` and (when configured) ``caption``, both exact strings, then the
    ``ingest.extra_columns`` (:func:`passable_extras`)."""
    text = [ic.url_col] + ([ic.caption_col] if ic.caption_col and ic.input_format != "txt" else [])
    cols = text + list(ic.extra_columns)
    fmt = ic.input_format
    try:
        with fs.open(path, "rb") as f:
            if fmt == "txt":
                lines = f.read().decode("utf-8").splitlines()
                return pa.table({"url": pa.array([ln for ln in lines if ln.strip()], pa.string())})
            if fmt in ("csv", "tsv"):
                table = pa_csv.read_csv(
                    f,
                    read_options=pa_csv.ReadOptions(column_names=ic.column_names),  # None: the first row names them
                    parse_options=pa_csv.ParseOptions(
                        delimiter="," if fmt == "csv" else "\t",
                        quote_char='"' if ic.quoting else False,
                        newlines_in_values=ic.quoting,
                    ),
                    convert_options=pa_csv.ConvertOptions(
                        column_types={c: pa.string() for c in cols}, include_columns=cols, strings_can_be_null=False
                    ),
                )
            elif fmt == "jsonl":
                table = pa_json.read_json(
                    f,
                    parse_options=pa_json.ParseOptions(
                        explicit_schema=pa.schema([(c, pa.string()) for c in text]),
                        unexpected_field_behavior="infer" if ic.extra_columns else "ignore",
                    ),
                )
                for c in text:
                    if table[c].null_count == table.num_rows and table.num_rows:
                        raise IngestError(f"{path}: no field {c!r} in any line (check ingest.url_col / caption_col)")
            else:
                schema_names = pq.read_schema(f).names
                f.seek(0)
                table = pq.read_table(f, columns=[c for c in cols if c in schema_names])
                table = table.cast(
                    pa.schema(
                        [pa.field(c, pa.string()) if c in text else table.schema.field(c) for c in table.schema.names]
                    )
                )
    except FileNotFoundError:
        raise IngestError(f"ingest.url_list: {path} does not exist") from None
    except KeyError as err:  # pyarrow's CSV reader: a column of include_columns is not in the file
        raise IngestError(f"{path}: {err.args[0]} ({_CHECK_COLUMNS})") from None
    except pa.ArrowInvalid as err:
        if "include_columns" in str(err) or "does not exist" in str(err):
            raise IngestError(f"{path}: {err} ({_CHECK_COLUMNS})") from None
        raise IngestError(f"{path} is not valid {fmt}: {err}") from None
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise IngestError(f"{path}: no column {missing[0]!r} ({_CHECK_COLUMNS})")
    names = {ic.url_col: "url", **({ic.caption_col: "caption"} if len(text) > 1 else {})}
    return passable_extras(table.select(cols).rename_columns([names.get(c, c) for c in cols]), path)


_CHECK_COLUMNS = "check ingest.url_col / ingest.caption_col / ingest.extra_columns"


def _passable_type(t: pa.DataType) -> pa.DataType | None:
    """The type an extra column travels as: the same where JSON carries it (img2dataset writes each sample's
    metadata with ``json.dumps``, CapFilt reads it back), else text; None when it cannot travel at all."""
    if pa.types.is_dictionary(t):
        return _passable_type(t.value_type)
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t):
        return t
    if pa.types.is_null(t):
        return t
    if pa.types.is_temporal(t) or pa.types.is_decimal(t):
        return pa.string()  # ISO 8601 text; decimals exactly
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_struct(t):
        children = [t.field(i).type for i in range(t.num_fields)]
        return t if all(_passable_type(c) == c for c in children) else None
    return None  # binary (bytes are not JSON), maps, unions


def passable_extras(table: pa.Table, path: str) -> pa.Table:
    """Each extra column (every column after ``url`` and ``caption``) as :func:`_passable_type` says, or an
    IngestError that names the column and its type."""
    fields = []
    for f in table.schema:
        if f.name in ("url", "caption"):
            fields.append(f)
            continue
        t = _passable_type(f.type)
        if t is None:
            raise IngestError(
                f"{path}: extra column {f.name!r} has type {f.type}, which cannot pass through a sample's JSON "
                "metadata; leave it out of ingest.extra_columns"
            )
        fields.append(pa.field(f.name, t))
    return table.cast(pa.schema(fields))


def repeated_urls(table: pa.Table) -> int:
    """Rows whose URL an earlier row of the table has: one pass of pyarrow's hashing, memory for one file."""
    return table.num_rows - len(pc.unique(table["url"]))  # ~0.7 s per million URLs on a busy core


def prepare_url_list(ic: IngestConfig, tmp: str) -> PreparedInput:
    """Each input file, in name order, rewritten as a local Parquet file of ``url``, ``caption`` and the extra
    columns. The first file's extra column types are the list's: a later file's are cast to them (or it fails,
    naming the column). Repeated URLs are counted within each file (:func:`repeated_urls`); counting repeats
    across files would hold every URL of the list in memory at once."""
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
    repeated = 0
    schema: pa.Schema | None = None
    for k, p in enumerate(files):
        table = read_url_file(fs, p, ic)
        if schema is None:
            schema = table.schema
        elif table.schema != schema:
            try:
                table = table.cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                theirs = {f.name: str(f.type) for f in table.schema}
                ours = {f.name: str(f.type) for f in schema}
                raise IngestError(
                    f"{p}: its extra columns {theirs} do not cast to the types of the list's first file {ours}: {err}"
                ) from None
        has_caption = "caption" in table.column_names
        repeated += repeated_urls(table)
        pq.write_table(table, posixpath.join(tmp, f"{k:05d}.parquet"))
        rows.append(table.num_rows)
    extra = {f.name: str(f.type) for f in schema or [] if f.name not in ("url", "caption")}
    return PreparedInput(tmp, rows, has_caption, ic.url_list, extra, repeated)


def _prepare_world_list(root: str, base_url: str, tmp: str) -> PreparedInput:
    from .world import resolve_urls, world_files

    world = storage.RunRoot(root).world()
    with storage.open_url(world_files(world)["web"], "rb") as f:
        table = pq.read_table(f)
    urls = resolve_urls(table["url"].to_pylist(), base_url)
    out = pa.table({"url": pa.array(urls, pa.string()), "caption": table["caption"].cast(pa.string())})
    pq.write_table(out, posixpath.join(tmp, "00000.parquet"))
    description = f"synthetic world {world_files(world)['web']}"
    return PreparedInput(tmp, [out.num_rows], True, description, repeated_urls=repeated_urls(out))


# ----------------------------------------------------------------------------------------------------------
# Output

RETRY_PLAN = "_retry.json"  # a retry under way: its list, its shards and the errors it retries


def _stats_files(out: str) -> dict[int, str]:
    """Shard id -> path of its ``NNNNN_stats.json``: the shards that are done (one listing, no reads)."""
    fs, path = storage.filesystem(out)
    fs.invalidate_cache()  # the shards' workers wrote through other processes' clients: listings are stale
    return {int(posixpath.basename(f).split("_")[0]): f for f in fs.glob(path.rstrip("/") + "/*_stats.json")}


def _shard_stats(out: str) -> dict[int, dict]:
    fs, _ = storage.filesystem(out)
    stats = {}
    for sid, f in _stats_files(out).items():
        with fs.open(f, "r") as fh:
            stats[sid] = json.load(fh)
    return stats


def _input_info(ic: IngestConfig, prepared: PreparedInput) -> dict:
    return {
        "url_list": prepared.description,
        "input_format": ic.input_format if ic.url_list else "parquet",
        "url_col": ic.url_col,
        "caption_col": ic.caption_col if prepared.has_caption else None,
        "files": len(prepared.rows_per_file),
        "rows": prepared.rows,
        "extra_columns": prepared.extra_columns,
        # each such row keeps its own key, download and status; repeats across files are not counted
        "repeated_urls_within_files": prepared.repeated_urls,
    }


def _manifest(ic: IngestConfig, input_info: dict, stats: dict[int, dict], this_run: dict, retries: list) -> dict:
    """The ingest's record. With retries (:func:`_retry`), a retried URL counts once, by its last attempt: its
    failed row in an earlier shard is taken out of ``total`` and of the failures (each retry's ``urls`` and
    ``retried_errors``), its new row counts where it now is."""
    shards, errors, by_status = [], Counter(), Counter()
    for sid in sorted(stats):
        s = stats[sid]
        name = shard_name(sid)
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
    retried = sum(r["urls"] for r in retries)
    by_status["failed_to_download"] -= retried  # only download failures are retried
    for r in retries:
        errors.subtract(r["retried_errors"])
    total = sum(s["count"] for s in shards) - retried
    successes = sum(s["successes"] for s in shards)
    return {
        "source": ic.source,
        "input": input_info,
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
        "failures_by_error": dict((+errors).most_common()),
        "retries": retries,
        "this_run": this_run,
    }


def _download(
    ic: IngestConfig,
    out: str,
    url_list: str,
    *,
    has_caption: bool,
    extra_columns: list[str],
    expected: list[int],
    start_shard_id: int = 0,
) -> dict:
    """Every shard of ``expected`` not yet done, downloaded from ``url_list`` (:mod:`pipelines.ingest_shards`);
    returns the ``this_run`` record, or raises IngestIncomplete naming the shards still missing."""
    from .ingest_shards import ShardJob, choose_distributor, reader, run_shards

    distributor = choose_distributor(ic)
    done = set(_stats_files(out))
    log.info(
        "downloading %d shards of %d into %s (%d done before) with %s",
        len(set(expected) - done),
        ic.shard_size,
        out,
        len(done & set(expected)),
        distributor,
    )
    t0 = time.time()
    shards = reader(
        url_list,
        out,
        ic,
        has_caption=has_caption,
        done=done,
        start_shard_id=start_shard_id,
        extra_columns=extra_columns,
    )
    job = ShardJob(out, ic, tuple(shards.column_list), has_caption)
    results, failed = run_shards(job, shards, distributor)
    seconds = time.time() - t0
    missing = sorted(set(expected) - set(_stats_files(out)))
    if missing:
        raise IngestIncomplete(
            f"shards {[shard_name(s) for s in missing[:20]]} of {out} did not finish ({len(failed)} failed after "
            f"{ic.shard_retries} retries); nothing committed, rerun the same command to redo them"
        )
    storage.remove(storage.join(out, SCRATCH))
    samples = sum(r["count"] for r in results)
    shard_seconds = sum(r["duration"] for r in results)
    return {
        "distributor": distributor,
        "shards": len(results),
        "samples": samples,
        "seconds": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
        # per shard task, without start-up (spawning a process and importing img2dataset take ~5-10 s)
        "shard_seconds": round(shard_seconds, 3),
        "worker_samples_per_second": round(samples / shard_seconds, 1) if shard_seconds > 0 else None,
        # shards put in key order (the input list's) by their task, so that every ingest of a list is the same
        "shards_sorted": sum(r["rewritten"] for r in results),
        "sort_seconds": round(sum(r["sort_seconds"] for r in results), 3),
    }


def _commit(ic: IngestConfig, out: str, manifest: dict) -> dict:
    storage.write_json(storage.join(out, MANIFEST), manifest)
    storage.commit(
        out, {"total": manifest["total"], "successes": manifest["successes"], "n_shards": manifest["n_shards"]}
    )
    this_run = manifest["this_run"]
    log.info(
        "ingest committed at %s: %d/%d images (%.1f%%) in %d shards; this run %d samples in %.1fs "
        "(%s samples/s overall, %s per shard task while downloading); failures: %s",
        out,
        manifest["successes"],
        manifest["total"],
        100 * manifest["success_rate"],
        manifest["n_shards"],
        this_run["samples"],
        this_run["seconds"],
        this_run["samples_per_second"],
        this_run["worker_samples_per_second"],
        manifest["failures_by_status"],
    )
    return manifest


def _server_host() -> str:
    """Where the world's images are served: loopback, unless ``RAY_ADDRESS`` names a cluster, whose other nodes
    must reach the server: then the address Ray knows this node by."""
    if not os.environ.get("RAY_ADDRESS"):
        return "127.0.0.1"
    from .ray_runtime import ensure_ray

    ensure_ray()
    import ray

    return ray.util.get_node_ip_address()


def _ingest_list(cfg: RunConfig, root: str, out: str) -> dict[str, Any]:
    ic = cfg.ingest
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
            base = stack.enter_context(serve_world(world, host=_server_host()))
            prepared = _prepare_world_list(root, base, tmp)
        else:
            prepared = prepare_url_list(ic, tmp)
        if prepared.rows == 0:
            raise IngestError(f"the URL list {prepared.description} has no rows")
        log.info("ingesting %d URLs from %s into %s", prepared.rows, prepared.description, out)
        this_run = _download(
            ic,
            out,
            prepared.folder,
            has_caption=prepared.has_caption,
            extra_columns=list(prepared.extra_columns),
            expected=prepared.expected_shards(ic.shard_size),
        )
    stats = _shard_stats(out)
    return _commit(ic, out, _manifest(ic, _input_info(ic, prepared), stats, this_run, _earlier_retries(out, stats)))


def _earlier_retries(out: str, stats: dict[int, dict]) -> list[dict]:
    """The retries an earlier manifest of this directory records whose shards are still there (a directory
    uncommitted by hand after a retry keeps counting each URL once)."""
    url = storage.join(out, MANIFEST)
    earlier = storage.read_json(url).get("retries", []) if storage.exists(url) else []
    return [r for r in earlier if all(int(s) in stats for s in r["shards"])]


def _plan_retry(ic: IngestConfig, out: str, manifest: dict) -> bool:
    """Write the list of the last generation's transient failures and the retry's plan, then uncommit the
    directory (its new shards are not committed until all are in); False when there is nothing to retry."""
    from .ingest_retry import write_retry_list

    retries = manifest.get("retries", [])
    source = retries[-1]["shards"] if retries else [s["shard"] for s in manifest["shards"]]
    extra = list(manifest["input"].get("extra_columns") or [])
    rows, has_caption, errors = write_retry_list(out, source, storage.join(out, SCRATCH, "retry.parquet"), extra)
    if not rows:
        log.info("ingest %s: no transient failure in shards %s..%s; nothing to retry", out, source[0], source[-1])
        return False
    first = max(int(s["shard"]) for s in manifest["shards"]) + 1
    plan = {
        "from_shards": source,
        "shards": [shard_name(first + i) for i in range(math.ceil(rows / ic.shard_size))],
        "urls": rows,
        "shard_size": ic.shard_size,
        "has_caption": has_caption,
        "extra_columns": extra,
        "retried_errors": dict(errors.most_common()),
    }
    storage.write_json(storage.join(out, RETRY_PLAN), plan)
    storage.remove(storage.join(out, storage.MARKER))
    log.info("ingest %s: retrying %d URLs with transient failures into shards %s", out, rows, plan["shards"])
    return True


def _retry(ic: IngestConfig, out: str) -> dict[str, Any]:
    """Download the planned retry's list into its new shards, then record it in the manifest and commit."""
    from .ingest_retry import RETRY_OF

    plan = storage.read_json(storage.join(out, RETRY_PLAN))
    manifest = storage.read_json(storage.join(out, MANIFEST))  # the last committed one
    ic = ic.model_copy(update={"shard_size": plan["shard_size"]})  # the plan's shards, whatever a resume says
    ids = [int(s) for s in plan["shards"]]
    this_run = _download(
        ic,
        out,
        storage.join(out, SCRATCH, "retry.parquet"),
        has_caption=plan["has_caption"],
        extra_columns=[*plan["extra_columns"], RETRY_OF],
        expected=ids,
        start_shard_id=ids[0],
    )
    stats = _shard_stats(out)
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **{k: plan[k] for k in ("from_shards", "shards", "urls", "retried_errors")},
        "recovered": sum(stats[i]["successes"] for i in ids),
    }
    # The manifest may already hold this retry, written by a run that stopped before its commit.
    retries = [*(r for r in manifest.get("retries", []) if r["shards"] != plan["shards"]), record]
    committed = _commit(ic, out, _manifest(ic, manifest["input"], stats, this_run, retries))
    storage.remove(storage.join(out, RETRY_PLAN))  # after the commit: a stale plan in a committed directory is inert
    return committed


def run_ingest(cfg: RunConfig, root: str, retry_failed: bool = False) -> dict[str, Any]:
    """``capfilt ingest``: download the URL list into committed shards; returns the manifest.

    ``retry_failed`` (``capfilt ingest --retry-failed``): on a committed ingest, download again the URLs whose
    last attempt failed transiently (:mod:`pipelines.ingest_retry`), as new shards after the last one, and commit
    the manifest with the retry recorded. A retry that was interrupted is finished by the next run, with or without
    the flag."""
    ic = cfg.ingest
    out = storage.RunRoot(root).ingest(ic.source)
    if storage.is_committed(out):
        manifest = storage.read_json(storage.join(out, MANIFEST))
        if not retry_failed:
            log.info("ingest %s already committed; nothing to do", out)
            return manifest
        if not _plan_retry(ic, out, manifest):
            return manifest
    if storage.exists(storage.join(out, RETRY_PLAN)):
        return _retry(ic, out)
    return _ingest_list(cfg, root, out)
