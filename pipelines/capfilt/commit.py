"""Exactly once: the plan of commit units, their Parquet files and done markers, and the stage summary.

Work is committed in *units* (``capfilt.shards_per_unit`` consecutive shards). The plan is fixed by the first run
in ``_plan.json`` together with the fingerprint of everything that decides a row; a rerun with other settings or
other shards is refused. The filter actors stage a unit's rows as fragments (fragments.py); once the driver has
counted every sample of the unit's shards, a commit task on a worker (:func:`commit_unit`) gathers them, checks
that each shard's samples are all there, and publishes the unit in two steps, each atomic
(``storage.publish_bytes``):

  1. its rows, sorted by (shard, key, candidate with web first), as ``part-<shard>.parquet``;
  2. then ``_done/<name>.json`` (rows, bytes, counts, fingerprint);

and then removes the unit's fragments. A unit is done iff its marker parses, matches the fingerprint and names a
file of the recorded size. A rerun first removes every staged fragment (a killed run's), skips done units and
recomputes the others (overwriting a file that lost its marker with identical rows). When every unit is done the
directory is committed with ``storage.commit`` (the summary in ``_COMMITTED``) and the staging area removed.
Killing the job, an actor or a node at any moment therefore leaves each unit either absent, or present and
identical to what an uninterrupted run writes: one row per (key, source, candidate), none duplicated, none missing.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..shards import shard_name
from .fragments import gather, remove_staging
from .models import CapfiltError
from .rows import UNIT_COLUMN, describe_keep_rule, output_schema
from .settings import Settings

log = logging.getLogger(__name__)

PLAN = "_plan.json"
DONE_DIR = "_done"


@dataclass
class Unit:
    """One commit unit: consecutive shards whose rows become one Parquet file."""

    index: int
    name: str
    shards: list[str]  # shard URLs

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"


@dataclass
class Plan:
    units: list[Unit]
    fingerprint: dict = field(default_factory=dict)


def make_units(shard_urls: Sequence[str], per_unit: int) -> list[Unit]:
    units = []
    for i, start in enumerate(range(0, len(shard_urls), per_unit)):
        group = list(shard_urls[start : start + per_unit])
        names = [shard_name(u) for u in group]
        name = f"part-{names[0]}" if len(names) == 1 else f"part-{names[0]}_{names[-1]}"
        units.append(Unit(i, name, group))
    return units


def _diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_or_create_plan(out: str, shard_urls: Sequence[str], settings: Settings, per_unit: int) -> Plan:
    """The plan of the first run (units and fingerprint), checked against this run's inputs and settings."""
    url = storage.join(out, PLAN)
    fp = settings.fingerprint()
    names = [shard_name(u) for u in shard_urls]
    if storage.exists(url):
        stored = storage.read_json(url)
        diff = _diff(stored["fingerprint"], fp)
        if diff:
            raise CapfiltError(
                f"{out} holds CapFilt output of other settings ({'; '.join(diff)}); remove that "
                "directory to start over, or run with the settings it was started with"
            )
        stored_names = [s for u in stored["units"] for s in u["shards"]]
        if stored_names != names:
            raise CapfiltError(f"{out} was planned over other shards ({len(stored_names)} then, {len(names)} now)")
        by_name = {shard_name(u): u for u in shard_urls}
        units = [Unit(u["index"], u["name"], [by_name[s] for s in u["shards"]]) for u in stored["units"]]
        if any(len(u.shards) != per_unit for u in units[:-1]):
            log.warning("%s was planned with other unit sizes; the stored plan wins", out)
        return Plan(units, fp)
    units = make_units(shard_urls, per_unit)
    storage.write_json(
        url,
        {
            "fingerprint": fp,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "units": [{"index": u.index, "name": u.name, "shards": [shard_name(s) for s in u.shards]} for u in units],
        },
    )
    return Plan(units, fp)


def unit_marker(out: str, unit: Unit) -> str:
    return storage.join(out, DONE_DIR, f"{unit.name}.json")


def read_done(out: str, unit: Unit, fingerprint: dict) -> dict | None:
    """The unit's marker if the unit is done (marker parses, same fingerprint, data file of the recorded size)."""
    try:
        marker = storage.read_json(unit_marker(out, unit))
    except (FileNotFoundError, ValueError, OSError):
        return None
    if marker.get("fingerprint") != fingerprint:
        return None
    fs, data = storage.filesystem(storage.join(out, unit.file))
    try:
        if fs.size(data) != marker.get("bytes"):
            return None
    except (FileNotFoundError, OSError):
        return None
    return marker


SUMMARY_KEYS = ("rows", "images", "by_source", "by_status", "shard_errors")


def done_units(out: str, units: Sequence[Unit], fingerprint: dict, threads: int = 16) -> dict[int, dict]:
    """The done units (index -> the parts of its marker the summary needs): one listing of ``_done/``, then the
    markers that exist, read in parallel."""
    listed = {storage.basename(u) for u in storage.list_files(storage.join(out, DONE_DIR), ".json")}
    candidates = [u for u in units if f"{u.name}.json" in listed]
    with ThreadPoolExecutor(threads) as pool:
        markers = pool.map(lambda u: read_done(out, u, fingerprint), candidates)
        return {u.index: {k: m.get(k) for k in SUMMARY_KEYS} for u, m in zip(candidates, markers) if m is not None}


def counts(table: pa.Table) -> dict:
    """Rows, images, rows and kept rows by source, rows by status."""
    out: dict[str, Any] = {"rows": table.num_rows}
    if table.num_rows == 0:
        return {**out, "images": 0, "by_source": {}, "by_status": {}}
    out["images"] = table.filter(pc.equal(table["source"], "web")).num_rows
    by_source = {}
    for src in ("web", "synthetic"):
        t = table.filter(pc.equal(table["source"], src))
        by_source[src] = {"rows": t.num_rows, "kept": int(pc.sum(t["keep"]).as_py() or 0)}
    out["by_source"] = by_source
    vc = pc.value_counts(table["status"])
    out["by_status"] = {str(v): int(c) for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())}
    return out


def write_unit(
    out: str, unit: Unit, table: pa.Table, settings: Settings, row_group_size: int, shard_errors: list[dict]
) -> dict:
    """Publish one unit: its Parquet file, then its done marker (see the module docstring)."""
    if UNIT_COLUMN in table.column_names:
        table = table.drop_columns([UNIT_COLUMN])
    table = table.cast(output_schema(settings))
    table = table.sort_by([("shard", "ascending"), ("key", "ascending"), ("candidate", "ascending", "at_start")])
    meta = settings.metadata(describe_keep_rule(settings))
    meta["capfilt.unit"] = json.dumps({"name": unit.name, "shards": [shard_name(s) for s in unit.shards]})
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(
        table, buf, compression="zstd", row_group_size=row_group_size, write_statistics=True, write_page_index=True
    )
    data = buf.getvalue()
    storage.publish_bytes(storage.join(out, unit.file), data)
    marker = {
        "unit": unit.name,
        "file": unit.file,
        "shards": [shard_name(s) for s in unit.shards],
        "bytes": len(data),
        **counts(table),
        "shard_errors": shard_errors,
        "fingerprint": settings.fingerprint(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(unit_marker(out, unit), marker)
    return marker


def commit_unit(out: str, unit: Unit, settings: Settings, row_group_size: int, shards: dict[str, dict]) -> dict:
    """Publish a unit from its staged fragments. ``shards`` maps each of its shard names to ``{"read": samples
    the reader read, "error": why a truncated tar ended early, or None}``; a shard with fewer rows than samples
    read means a fragment is missing: nothing is published and the unit stays to do."""
    table = gather(out, unit.index, output_schema(settings))
    web = table.filter(pc.equal(table["source"], "web"))
    vc = pc.value_counts(web["shard"])
    got = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))
    short = {s: (got.get(s, 0), info["read"]) for s, info in shards.items() if got.get(s, 0) != info["read"]}
    if short:
        raise CapfiltError(f"unit {unit.name}: staged images (found, read) per shard {short}; nothing was published")
    errors = [{"shard": s, "error": info["error"]} for s, info in shards.items() if info["error"] is not None]
    marker = write_unit(out, unit, table, settings, row_group_size, errors)
    remove_staging(out, unit.index)
    return marker


def summarize(plan: Plan, done: dict[int, dict]) -> dict:
    """The stage summary from the units' markers (stored in ``_COMMITTED``)."""
    total: dict[str, Any] = {
        "units": len(plan.units),
        "files": [],
        "rows": 0,
        "images": 0,
        "by_source": {"web": {"rows": 0, "kept": 0}, "synthetic": {"rows": 0, "kept": 0}},
        "by_status": {},
        "shard_errors": [],
    }
    for u in plan.units:
        m = done[u.index]
        total["files"].append(u.file)
        total["rows"] += m["rows"]
        total["images"] += m["images"]
        for src, c in m.get("by_source", {}).items():
            total["by_source"][src]["rows"] += c["rows"]
            total["by_source"][src]["kept"] += c["kept"]
        for st, c in m.get("by_status", {}).items():
            total["by_status"][st] = total["by_status"].get(st, 0) + c
        total["shard_errors"] += m.get("shard_errors") or []
    return total
