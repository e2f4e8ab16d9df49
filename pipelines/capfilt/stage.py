"""``capfilt caption-filter --round K``: caption every ingested image and filter its web and synthetic texts, as
a Ray Data pipeline that writes the CapFilt Parquet (docs/DESIGN.md)::

    shards --(CPU read task per shard: decode + resize, decode.py)--> images
           --(captioner actor pool: K captions per image, nucleus sampling or beam search)-->
           --(one actor pool per extra scorer, e.g. CLIP)-->
           --(filter actor pool: ITM P(match) and ITC cosine of the web text and each synthetic text,
              each image encoded once for all its 1 + K texts; keep decisions, rows.py)--> rows
           --(the filter actors write the rows as staged fragments, fragments.py; Ray Data carries back only
              counts per shard)--> driver: adds up the counts (tracker.py); a unit whose samples are all staged
              gets a commit task on a worker, which publishes its Parquet file and done marker (commit.py)

Determinism. A caption depends only on its image, the checkpoint and a per-image seed derived from (run seed,
key); a score depends only on (image, text) up to the last bits (actors.py). Changing ``model_batch_size``, the
device or the torch thread count may change scores in the last bits; a caption only if a sampling draw falls
within that difference of a boundary.

No driver funnel. Rows never travel to the driver and the dataset runs unordered: a slow shard holds back its own
unit only. The driver holds a few numbers per open shard and one marker per unit: its memory and CPU do not grow
with rows. Exactly once (commit.py): a unit is published only when every sample of its shards is staged, by one
task, atomically; a batch retried after an actor or a node died stages the same rows again and the commit keeps
one of each.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .. import storage
from ..config import ActorPool, RunConfig
from ..shards import list_shards
from .actors import CaptionActor, ScoreActor
from .commit import SUMMARY_KEYS, Plan, Unit, commit_unit, done_units, load_or_create_plan, summarize
from .decode import shard_datasource
from .fragments import remove_staging
from .models import CapfiltError, ModelRef, ship_plugins
from .rows import describe_keep_rule
from .settings import Settings, resolve_settings
from .tracker import UnitTracker

log = logging.getLogger(__name__)


def capfilt_dir(root: str, round: int) -> str:
    return storage.RunRoot(root).round(round, "capfilt")


def _num_gpus(pool: ActorPool, use_gpu: bool) -> float:
    if pool.num_gpus is not None:
        return pool.num_gpus
    return 1.0 if use_gpu else 0.0


def model_stages(settings: Settings, cfg: RunConfig, out: str) -> list[tuple[type, ModelRef, ActorPool, dict]]:
    """(actor class, model, pool, extra constructor arguments) in pipeline order: captioner, extra scorers,
    filter. Each stage drops the pixel columns no later stage reads; the filter stages the output rows under
    ``out``."""
    cc = cfg.capfilt
    stages: list[tuple[type, ModelRef, ActorPool, dict]] = [(CaptionActor, settings.captioner, cc.captioner_pool, {})]
    stages += [(ScoreActor, ref, cc.scorers[ref.kind].pool, {}) for ref in settings.scorers]
    stages.append((ScoreActor, settings.filter, cc.filter_pool, {"write_to": out}))
    for pos, (_, ref, _, extra) in enumerate(stages[:-1]):
        later = {r.pixels.column for _, r, _, _ in stages[pos + 1 :]}
        extra["drop_columns"] = [ref.pixels.column] if ref.pixels.column not in later else []
    return stages


def build_dataset(units: Sequence[Unit], settings: Settings, cfg: RunConfig, out: str):
    """The Ray Dataset of the run: read, caption, score; its filter actors stage the rows under ``out`` and
    yield their counts per shard (fragments.COUNTS_SCHEMA)."""
    import ray.data

    cc = cfg.capfilt
    items = [(s, u.index) for u in units for s in u.shards]
    ds = ray.data.read_datasource(
        shard_datasource(items, settings),
        num_cpus=cc.decode_num_cpus,
        concurrency=cc.decode_concurrency,
        override_num_blocks=len(items),
    )
    for actor, ref, pool, extra in model_stages(settings, cfg, out):
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
    pools = [pool for _, _, pool, _ in model_stages(settings, cfg, "")]
    total = ray.cluster_resources()
    actor_cpus = sum(p.actors * p.num_cpus for p in pools)
    tasks = cc.decode_num_cpus + cc.commit_num_cpus
    if actor_cpus + tasks > total.get("CPU", 0) + 1e-9:
        raise CapfiltError(
            f"the actor pools reserve {actor_cpus:g} CPUs and a decode and a commit task need {tasks:g}, but the "
            f"Ray cluster has {total.get('CPU', 0):g}: lower capfilt.*_pool.num_cpus / actors, "
            "capfilt.decode_num_cpus or capfilt.commit_num_cpus"
        )
    gpus = sum(p.actors * _num_gpus(p, settings.use_gpu) for p in pools)
    if gpus > total.get("GPU", 0) + 1e-9:
        raise CapfiltError(f"the actor pools ask for {gpus:g} GPUs; the Ray cluster has {total.get('GPU', 0):g}")


def stream_units(
    ds,
    todo: Sequence[Unit],
    commit: Callable[[Unit, dict[str, dict]], Any],
    on_commit: Callable[[Unit, dict], None],
    concurrency: int,
) -> None:
    """Run the dataset, hand each unit to ``commit(unit, shards)`` (which returns a Ray ObjectRef of the unit's
    marker) once its samples are all staged, at most ``concurrency`` at a time (each commit task runs in a Ray
    worker process: unbounded, a burst of complete units would start a process per unit), and call
    ``on_commit(unit, marker)`` as the commits finish. Raises when the stream ends with units incomplete; units
    committed until then stay committed."""
    import ray

    tracker = UnitTracker(todo)
    ready_units: deque[tuple[Unit, dict[str, dict]]] = deque()
    pending: dict[Any, Unit] = {}

    def reap(until: int) -> None:
        """Collect finished commits, waiting while more than ``until`` are in flight; then submit ready units."""
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if len(pending) > until else 0)
            if not done:
                break
            for ref in done:
                on_commit(pending.pop(ref), ray.get(ref))
            while ready_units and len(pending) < concurrency:
                unit, shards = ready_units.popleft()
                pending[commit(unit, shards)] = unit

    try:
        for counts in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            ready_units.extend((unit, tracker.take(unit)) for unit in tracker.add(counts))
            while ready_units and len(pending) < concurrency:
                unit, shards = ready_units.popleft()
                pending[commit(unit, shards)] = unit
            reap(until=concurrency)
    finally:
        while ready_units or pending:
            while ready_units and len(pending) < concurrency:
                unit, shards = ready_units.popleft()
                pending[commit(unit, shards)] = unit
            reap(until=0)
    incomplete = tracker.incomplete()
    if incomplete:
        raise CapfiltError(f"the run ended with units whose samples were not all staged: {incomplete}")


def run_caption_filter(cfg: RunConfig, root: str, round: int) -> dict:
    """``capfilt caption-filter``: caption and filter every ingested image into ``<root>/round=K/capfilt/``.

    One job per round directory at a time. Returns the stage summary (also stored in the directory's
    ``_COMMITTED``)."""
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
    done = done_units(out, plan.units, plan.fingerprint)
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
        remove_staging(out)  # a killed run's fragments: their units are recomputed whole
        commit_task = ray.remote(commit_unit).options(num_cpus=cc.commit_num_cpus, max_retries=3)
        started = time.time()

        def commit(unit: Unit, shards: dict[str, dict]):
            return commit_task.remote(out, unit, settings, cc.row_group_size, shards)

        def on_commit(unit: Unit, marker: dict) -> None:
            done[unit.index] = {k: marker[k] for k in SUMMARY_KEYS}
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
                f"; broken shards: {marker['shard_errors']}" if marker["shard_errors"] else "",
            )

        stream_units(build_dataset(todo, settings, cfg, out), todo, commit, on_commit, cc.commit_concurrency)
        this_run["seconds"] = builtins.round(time.time() - started, 3)
        this_run["images_per_second"] = builtins.round(this_run["images"] / max(this_run["seconds"], 1e-9), 2)
    summary = _summary(plan, done, settings, this_run, time.time() - t0)
    remove_staging(out)  # fragments a retried batch staged after its unit's commit
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
