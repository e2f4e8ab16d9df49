"""``capfilt ingest --retry-failed``: which failed downloads may succeed later, and the list that retries them.

img2dataset records a failed download as a row (``status`` ``failed_to_download``, ``error_message`` the
exception's text from ``urllib``). A failure is **transient**, worth another try, when the server or the network
may answer differently later: an HTTP 5xx, 408 (request timeout) or 429 (too many requests); a timeout; a refused,
reset, aborted or closed connection, a cut response, an unreachable network or a failed DNS lookup that says
"temporary". Everything else stays: other HTTP 4xx (404, 403, 410...), unknown hosts, a disallowing
``X-Robots-Tag``, a hash mismatch, and every ``failed_to_resize`` (the bytes arrived and are not a usable image).

A retry reads the shards of the last generation only: the original shards, or the previous retry's shards (an
earlier retry already took every transient failure of the generation before), streaming each shard's Parquet, and
writes the failed rows' ``url``, ``caption``, extra columns and ``retry_of`` (the original row's key, kept through
every generation) to one Parquet list; the driver holds one shard's rows at a time.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage

RETRY_OF = "retry_of"

_HTTP = re.compile(r"HTTP Error (\d{3})")
_TRANSIENT_HTTP = re.compile(r"^(5\d\d|408|429)$")
_TRANSIENT = re.compile(
    r"timed out|timeout|connection (refused|reset|aborted)|remote end closed|remotedisconnected|incompleteread|"
    r"temporary failure in name resolution|network is unreachable|no route to host|broken pipe|eof occurred|"
    r"connection broken|errno 10[34]|errno 11[013]",
    re.IGNORECASE,
)


def is_transient(status: str | None, error: str | None) -> bool:
    """Whether a row of img2dataset's Parquet records a failure that another try may not meet."""
    if status != "failed_to_download" or not error:
        return False
    http = _HTTP.search(error)
    if http:
        return bool(_TRANSIENT_HTTP.match(http.group(1)))
    return bool(_TRANSIENT.search(error))


def write_retry_list(
    out: str, shard_names: list[str], dest: str, extra_columns: list[str]
) -> tuple[int, bool, Counter]:
    """The transient failures of ``shard_names`` (in shard and key order) -> a Parquet list at ``dest`` of ``url``,
    ``caption`` (when the shards have captions), ``extra_columns`` and ``retry_of``. Returns (rows written,
    whether there are captions, their errors counted by message); with no row, nothing is written."""
    writer: pq.ParquetWriter | None = None
    rows, errors, has_caption = 0, Counter(), False
    fs, dest_path = storage.filesystem(dest)
    with contextlib.ExitStack() as stack:
        for name in shard_names:
            with storage.open_url(storage.join(out, f"{name}.parquet"), "rb") as f:
                table = pq.read_table(f)
            has_caption = "caption" in table.column_names
            statuses, messages = table["status"].to_pylist(), table["error_message"].to_pylist()
            failed = table.filter(pa.array([is_transient(s, e) for s, e in zip(statuses, messages)], pa.bool_()))
            if not failed.num_rows:
                continue
            errors.update(failed["error_message"].to_pylist())
            origin = failed[RETRY_OF] if RETRY_OF in failed.column_names else failed["key"]
            cols = ["url", *(["caption"] if has_caption else []), *extra_columns]
            part = failed.select(cols).append_column(RETRY_OF, pc.cast(origin, pa.string()))
            if writer is None:
                fs.makedirs(posixpath.dirname(dest_path), exist_ok=True)
                sink = stack.enter_context(fs.open(dest_path, "wb"))
                writer = stack.enter_context(pq.ParquetWriter(sink, part.schema))
            writer.write_table(part.cast(writer.schema))
            rows += part.num_rows
    return rows, has_caption, errors
