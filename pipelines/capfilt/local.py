"""The caption-filter stages in one process, without Ray: the bare-model baseline of
``benchmarks/bench_capfilt.py``, and a way to debug one shard. Models load here."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from .actors import CaptionActor, ModelActor, ScoreActor
from .decode import ShardDecoder
from .rows import empty_table
from .settings import Settings


class LocalRunner:
    """Decode, caption, score and filter shards in this process with the same stage classes. ``pools`` maps a
    stage ("captioner", a scorer's name, "filter") to its pool settings (``torch_threads``, ``num_cpus``)."""

    def __init__(self, settings: Settings, pools: dict[str, dict] | None = None):
        pools = pools or {}
        self.settings = settings
        self.decoder = ShardDecoder(settings)
        self.stages: list[ModelActor] = [CaptionActor(settings.captioner, settings, pools.get("captioner", {}))]
        self.stages += [ScoreActor(ref, settings, pools.get(ref.kind, {})) for ref in settings.scorers]
        self.stages.append(ScoreActor(settings.filter, settings, pools.get("filter", {}), emit_rows=True))

    def __call__(self, shard_urls: Sequence[str], batch_size: int = 64) -> pa.Table:
        """The rows of ``shard_urls`` (with the internal ``_unit`` column: the shard's position)."""
        tables = []
        for i, url in enumerate(shard_urls):
            for block in self.decoder(url, i):
                for start in range(0, len(block["key"]), batch_size):
                    b = {c: v[start : start + batch_size] for c, v in block.items()}
                    for stage in self.stages:
                        b = stage(b)
                    tables.append(b)
        return pa.concat_tables(tables) if tables else empty_table(self.settings)
