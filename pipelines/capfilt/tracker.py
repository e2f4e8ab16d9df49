"""The driver's view of a caption-filter run: per-shard counts from the writers, and which units are complete.

The filter actors report, per batch, how many samples of each shard they staged, and the batch that holds a
shard's end row says how many samples the shard has (fragments.shard_counts). A shard is complete when the two
agree; a unit when its shards are. The tracker holds a few numbers per shard of the units still open and forgets
a unit once it is handed to its commit: O(shards), never O(rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from ..shards import shard_name
from .commit import Unit


class UnitTracker:
    def __init__(self, units: Sequence[Unit]):
        self._units = {u.index: u for u in units}
        self._open = {u.index: {shard_name(s) for s in u.shards} for u in units}  # shards not yet complete
        self._images: dict[str, int] = {}  # samples staged so far, per shard
        self._read: dict[str, tuple[int, str | None]] = {}  # samples read and error, once the end row is in

    def add(self, counts: pa.Table) -> list[Unit]:
        """Take a batch's counts; the units that became complete with them."""
        complete = []
        for row in counts.to_pylist():
            unit, shard = row["unit"], row["shard"]
            waiting = self._open.get(unit)
            if waiting is None:
                continue  # a unit already handed to its commit: a retried batch's counts
            self._images[shard] = self._images.get(shard, 0) + row["images"]
            if row["read"] >= 0:
                self._read[shard] = (row["read"], row["error"])
            if shard in waiting and shard in self._read and self._images[shard] >= self._read[shard][0]:
                waiting.discard(shard)
                if not waiting:
                    complete.append(self._units[unit])
        return complete

    def take(self, unit: Unit) -> dict[str, dict]:
        """The unit's shards for its commit (``{name: {"read", "error"}}``); the tracker forgets them."""
        del self._open[unit.index]
        out = {}
        for url in unit.shards:
            name = shard_name(url)
            read, error = self._read.pop(name)
            self._images.pop(name, None)
            out[name] = {"read": read, "error": error}
        return out

    def incomplete(self) -> dict[str, list[str]]:
        """Units not complete, with the shards they wait for."""
        return {self._units[u].name: sorted(w) for u, w in self._open.items()}
