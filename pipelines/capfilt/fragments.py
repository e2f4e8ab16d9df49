"""Staged rows: the filter actors write each batch's rows as fragments; a unit's commit gathers them.

The actor that scores a batch writes its rows, one fragment per commit unit in the batch, to
``_staging/<unit index>/<random name>.parquet`` (atomic, ``storage.publish_bytes``), and hands Ray Data back only a
few counts per shard (:func:`shard_counts`), which the driver adds up. Nothing of a row travels to the driver.

A retried batch (an actor or a node died after writing but before returning) writes its rows again under another
name. Its rows are the same rows (a row depends only on its image, its text and the settings), so
:func:`gather` keeps one row per (shard, key, source, candidate), the one of the first fragment by name: a unit
retried any number of times still becomes one file, without duplicates.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from .rows import SHARD_END, SHARD_READ_COLUMN, UNIT_COLUMN

STAGING = "_staging"

COUNTS_SCHEMA = pa.schema(
    [
        pa.field("unit", pa.int32()),
        pa.field("shard", pa.string()),
        pa.field("images", pa.int64()),  # samples of the shard in this batch (one web row each)
        pa.field("read", pa.int32()),  # the shard's samples in all, on the batch that holds its end row; else -1
        pa.field("error", pa.string()),  # why a truncated shard ended early, on its end row
    ]
)


def staging_dir(out: str, unit_index: int) -> str:
    return storage.join(out, STAGING, f"{unit_index:08d}")


def shard_counts(batch: dict[str, np.ndarray]) -> pa.Table:
    """What the driver needs to know of a batch: per (unit, shard), the samples it held and, where the batch
    holds the shard's end row, how many samples the shard has and its error."""
    units = np.asarray(batch[UNIT_COLUMN])
    shards = np.asarray(batch["shard"], dtype=object)
    is_end = np.asarray(batch["image_status"], dtype=object) == SHARD_END
    rows = []
    for u, s in sorted({(int(u), str(s)) for u, s in zip(units, shards)}):
        mine = (units == u) & (shards == s)
        end = np.flatnonzero(mine & is_end)
        read = int(batch[SHARD_READ_COLUMN][end[0]]) if len(end) else -1
        error = batch["error"][end[0]] if len(end) else None
        error = error if isinstance(error, str) else None  # Ray turns a column of only None into NaN
        rows.append({"unit": u, "shard": s, "images": int(np.sum(mine & ~is_end)), "read": read, "error": error})
    return pa.Table.from_pylist(rows, schema=COUNTS_SCHEMA)


def write_fragments(out: str, rows: pa.Table) -> None:
    """One fragment per commit unit of ``rows`` (output rows with the internal unit column)."""
    if rows.num_rows == 0:
        return
    for u in pc.unique(rows[UNIT_COLUMN]).to_pylist():
        part = rows.filter(pc.equal(rows[UNIT_COLUMN], u)).drop_columns([UNIT_COLUMN])
        buf = io.BytesIO()
        pq.write_table(part, buf, compression="zstd")
        storage.publish_bytes(storage.join(staging_dir(out, u), f"{uuid.uuid4().hex}.parquet"), buf.getvalue())


def gather(out: str, unit_index: int, schema: pa.Schema) -> pa.Table:
    """A unit's staged rows, one per (shard, key, source, candidate)."""
    urls = sorted(u for u in storage.list_files(staging_dir(out, unit_index)) if u.endswith(".parquet"))
    tables = []
    for url in urls:
        with storage.open_url(url, "rb") as f:
            tables.append(pq.read_table(f).cast(schema))
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables)
    return first_of_each(table)


def first_of_each(table: pa.Table) -> pa.Table:
    """The first row of each (shard, key, source, candidate), in the table's order."""
    ids = table.select(["shard", "key", "source", "candidate"]).append_column(
        "_pos", pa.array(np.arange(table.num_rows, dtype=np.int64))
    )
    first = ids.group_by(["shard", "key", "source", "candidate"], use_threads=False).aggregate([("_pos", "min")])
    if first.num_rows == table.num_rows:
        return table
    return table.take(np.sort(first["_pos_min"].to_numpy()))


def remove_staging(out: str, unit_index: int | None = None) -> None:
    """A unit's staged fragments (after its commit), or all of them (before a run: a killed run's leftovers)."""
    storage.remove(staging_dir(out, unit_index) if unit_index is not None else storage.join(out, STAGING))
