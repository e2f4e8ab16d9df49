"""``capfilt caption-filter --round K``: caption every ingested image and filter its web and synthetic texts, as
a Ray Data pipeline that writes the CapFilt Parquet (docs/DESIGN.md)::

    shards --(CPU read task per shard: decode + resize, decode.py)--> images
           --(captioner actor pool: K captions per image, nucleus sampling or beam search)-->
           --(one actor pool per extra scorer, e.g. CLIP)-->
           --(filter actor pool: ITM P(match) and ITC cosine of the web text and each synthetic text,
              each image encoded once for all its 1 + K texts; keep decisions, rows.py)--> rows
           --(driver: rows of one commit unit -> one Parquet file, published atomically, then a done marker)

Determinism. A caption depends only on its image, the checkpoint and a per-image seed derived from (run seed,
key); a score depends only on (image, text) up to the last bits (actors.py). Changing ``model_batch_size``, the
device or the torch thread count may change scores in the last bits; a caption only if a sampling draw falls
within that difference of a boundary.

Exactly once (commit.py). The dataset runs with ``preserve_order``, so the driver receives the rows of unit u,
then of unit u+1, ...; when the next unit starts (or the stream ends), unit u is complete and is published.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..config import ActorPool, RunConfig
from ..shards import list_shards
from .actors import CaptionActor, ScoreActor
from .commit import Plan, Unit, load_or_create_plan, read_done, summarize, write_unit
from .decode import shard_datasource
from .models import CapfiltError, ModelRef, ship_plugins
from .rows import SHARD_ERROR_KEY, UNIT_COLUMN, describe_keep_rule, empty_table
from .settings import Settings, resolve_settings

log = logging.getLogger(__name__)


def capfilt_dir(root: str, round: int) -> str:
    return storage.RunRoot(root).round(round, "capfilt")


def _num_gpus(pool: ActorPool, use_gpu: bool) -> float:
    if pool.num_gpus is not None:
        return pool.num_gpus
    return 1.0 if use_gpu else 0.0


def model_stages(settings: Settings, cfg: RunConfig) -> list[tuple[type, ModelRef, ActorPool, dict]]:
    """(actor class, model, pool, extra constructor arguments) in pipeline order: captioner, extra scorers,
    filter. Each stage drops the pixel columns no later stage reads; the filter emits the output rows."""
    cc = cfg.capfilt
    stages: list[tuple[type, ModelRef, ActorPool, dict]] = [(CaptionActor, settings.captioner, cc.captioner_pool, {})]
    stages += [(ScoreActor, ref, cc.scorers[ref.kind].pool, {}) for ref in settings.scorers]
    stages.append((ScoreActor, settings.filter, cc.filter_pool, {"emit_rows": True}))
    for pos, (_, ref, _, extra) in enumerate(stages[:-1]):
        later = {r.pixels.column for _, r, _, _ in stages[pos + 1 :]}
        extra["drop_columns"] = [ref.pixels.column] if ref.pixels.column not in later else []
    return stages


def build_dataset(units: Sequence[Unit], settings: Settings, cfg: RunConfig):
    """The Ray Dataset of output rows (pyarrow blocks, with the internal ``_unit`` column), in unit order."""
    import ray.data

    cc = cfg.capfilt
    items = [(s, u.index) for u in units for s in u.shards]
    ds = ray.data.read_datasource(
        shard_datasource(items, settings),
        num_cpus=cc.decode_num_cpus,
        concurrency=cc.decode_concurrency,
        override_num_blocks=len(items),
    )
    for actor, ref, pool, extra in model_stages(settings, cfg):
        ds = ds.map_batches(
            actor,
            fn_constructor_args=(ref, settings, pool.model_dump()),
            fn_constructor_kwargs=extra,
            batch_size=pool.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.num_cpus,
            num_gpus=_num_gpus(pool, settings.use_gpu),
        )
    return ds


def check_resources(settings: Settings, cfg: RunConfig) -> None:
    """Actors hold their CPUs for the whole run: if they leave none for a decode task the run would hang."""
    import ray

    cc = cfg.capfilt
    pools = [pool for _, _, pool, _ in model_stages(settings, cfg)]
    total = ray.cluster_resources()
    actor_cpus = sum(p.actors * p.num_cpus for p in pools)
    if actor_cpus + cc.decode_num_cpus > total.get("CPU", 0) + 1e-9:
        raise CapfiltError(
            f"the actor pools reserve {actor_cpus:g} CPUs and a decode task needs {cc.decode_num_cpus:g}, but the "
            f"Ray cluster has {total.get('CPU', 0):g}: lower capfilt.*_pool.num_cpus / actors or "
            "capfilt.decode_num_cpus"
        )
    gpus = sum(p.actors * _num_gpus(p, settings.use_gpu) for p in pools)
    if gpus > total.get("GPU", 0) + 1e-9:
        raise CapfiltError(f"the actor pools ask for {gpus:g} GPUs; the Ray cluster has {total.get('GPU', 0):g}")


def _runs(units_col: np.ndarray) -> list[tuple[int, int, int]]:
    """(unit, start, stop) for each run of equal values."""
    if len(units_col) == 0:
        return []
    cut = np.flatnonzero(np.diff(units_col)) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(units_col)]])
    return [(int(units_col[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def consume(ds, todo: Sequence[Unit], write: Callable[[Unit, pa.Table, list[dict]], None], empty: pa.Table) -> None:
    """Stream the dataset's rows (in unit order) and call ``write(unit, table, shard_errors)`` for each unit of
    ``todo`` as soon as the next one starts (units without rows get ``empty``)."""
    order = {u.index: pos for pos, u in enumerate(todo)}
    pos = 0  # the position in todo of the unit being collected
    parts: list[pa.Table] = []

    def flush_until(target: int) -> None:
        nonlocal pos, parts
        while pos < target:
            unit = todo[pos]
            table = pa.concat_tables(parts) if parts else empty
            errors = []
            if table.num_rows and UNIT_COLUMN in table.column_names:
                is_err = pc.equal(table["key"], SHARD_ERROR_KEY)
                if pc.any(is_err).as_py():
                    errs = table.filter(is_err)
                    errors = [
                        {"shard": s, "error": e} for s, e in zip(errs["shard"].to_pylist(), errs["error"].to_pylist())
                    ]
                    table = table.filter(pc.invert(is_err))
            write(unit, table, errors)
            parts = []
            pos += 1

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        for u, a, b in _runs(block[UNIT_COLUMN].to_numpy()):
            p = order.get(u)
            if p is None or p < pos:
                raise CapfiltError(f"rows of unit {u} arrived out of order; nothing of it was written")
            flush_until(p)
            parts.append(block.slice(a, b - a))
    flush_until(len(todo))


def run_caption_filter(cfg: RunConfig, root: str, round: int) -> dict:
    """``capfilt caption-filter``: caption and filter every ingested image into ``<root>/round=K/capfilt/``.

    One job per round directory at a time (the driver is the only writer). Returns the stage summary (also
    stored in the directory's ``_COMMITTED``)."""
    out = capfilt_dir(root, round)
    if storage.is_committed(out):
        log.info("capfilt %s already committed; nothing to do", out)
        return storage.read_commit(out)
    cc = cfg.capfilt
    source = cc.source or cfg.ingest.source
    shard_urls = list_shards(storage.RunRoot(root).ingest(source))
    if not shard_urls:
        raise CapfiltError(f"no shards in {storage.RunRoot(root).ingest(source)}")

    t0 = time.time()
    from ..ray_runtime import ensure_ray

    # Settings first (cheap, no Ray): a bad checkpoint path must fail before the cluster starts. The device is
    # not part of them (it is not part of the fingerprint either): it is decided once Ray is up.
    settings = resolve_settings(cfg, root, round, use_gpu=False)
    plan = load_or_create_plan(out, shard_urls, settings, cc.shards_per_unit)
    done = {u.index: m for u in plan.units if (m := read_done(out, u, plan.fingerprint)) is not None}
    todo = [u for u in plan.units if u.index not in done]
    log.info(
        "capfilt round %d: %d shards in %d units, %d already committed, %d to do -> %s",
        round,
        len(shard_urls),
        len(plan.units),
        len(done),
        len(todo),
        out,
    )
    this_run = {"units": 0, "images": 0, "rows": 0, "seconds": 0.0}
    if todo:
        ensure_ray()
        import ray

        ship_plugins(settings.plugins)
        use_gpu = cc.use_gpu if cc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
        settings.use_gpu = bool(use_gpu)
        check_resources(settings, cfg)
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        started = time.time()

        def write(unit: Unit, table: pa.Table, errors: list[dict]) -> None:
            marker = write_unit(out, unit, table, settings, cc.row_group_size, errors)
            done[unit.index] = marker
            this_run["units"] += 1
            this_run["images"] += marker["images"]
            this_run["rows"] += marker["rows"]
            el = time.time() - started
            log.info(
                "committed %s: %d images, %d rows (%d/%d units; this run %d images in %.1fs, %.1f images/s)%s",
                unit.file,
                marker["images"],
                marker["rows"],
                len(done),
                len(plan.units),
                this_run["images"],
                el,
                this_run["images"] / el if el > 0 else 0.0,
                f"; broken shards: {errors}" if errors else "",
            )

        try:
            consume(build_dataset(todo, settings, cfg), todo, write, empty_table(settings))
        finally:
            ctx.execution_options.preserve_order = saved
        this_run["seconds"] = builtins.round(time.time() - started, 3)
        this_run["images_per_second"] = builtins.round(this_run["images"] / max(this_run["seconds"], 1e-9), 2)
    summary = _summary(plan, done, settings, this_run, time.time() - t0)
    storage.commit(out, summary)
    log.info(
        "capfilt committed at %s: %d images, %d rows; web kept %d/%d, synthetic kept %d/%d",
        out,
        summary["images"],
        summary["rows"],
        summary["by_source"]["web"]["kept"],
        summary["by_source"]["web"]["rows"],
        summary["by_source"]["synthetic"]["kept"],
        summary["by_source"]["synthetic"]["rows"],
    )
    return summary


def _summary(plan: Plan, done: dict[int, dict], settings: Settings, this_run: dict, wall: float) -> dict:
    summary = summarize(plan, done)
    meta = settings.metadata(describe_keep_rule(settings))
    summary.update(
        round=settings.round,
        fingerprint=plan.fingerprint,
        this_run=this_run,
        settings=json.loads(meta["capfilt.settings"]),
        wall_seconds=builtins.round(wall, 3),
    )
    return summary
