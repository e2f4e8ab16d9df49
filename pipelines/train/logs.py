"""Rank 0's logs of a job: ``metrics.jsonl`` and TensorBoard event files, on any URL."""

from __future__ import annotations

import json
import shutil
import tempfile
import time

from .. import storage


class MetricsLog:
    """``metrics.jsonl`` on any URL: rows kept in memory and the whole file rewritten on ``flush`` (object
    stores cannot append). A resumed job keeps the rows up to the step it resumed from and drops the rest,
    so no step appears twice."""

    def __init__(self, url: str, keep_through: int | None = None, flush_every_s: float = 30.0):
        self.url = url
        self.rows: list[dict] = []
        self.local = storage.is_local(url)
        self.flush_every_s, self.last_flush = flush_every_s, time.monotonic()
        if keep_through is not None and storage.exists(url):
            with storage.open_url(url, "r") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a kill
                    if row.get("kind", "train") == "train" and row.get("step", 0) <= keep_through:
                        self.rows.append(row)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.local or time.monotonic() - self.last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        storage.publish_text(self.url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        self.last_flush = time.monotonic()


class TensorBoard:
    """A SummaryWriter on rank 0 when ``tensorboard`` is installed; event files go to ``<job>/tensorboard/``
    directly on a local disk, through a local folder synced on ``flush`` elsewhere."""

    def __init__(self, url: str, purge_step: int | None = None):
        self.url, self.writer, self.tmp = url, None, None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            return
        if purge_step is None:
            storage.remove(url)  # events of a run killed before its first checkpoint
        if storage.is_local(url):
            log_dir = storage.filesystem(url)[1]  # the URL's local path
        else:
            self.tmp = tempfile.mkdtemp(prefix="capfilt-tb-")
            log_dir = self.tmp
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=None if purge_step is None else purge_step + 1)

    def scalars(self, row: dict, step: int, prefix: str = "train/") -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                self.writer.add_scalar(prefix + k, v, step)

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.tmp is not None:
            storage.upload_dir(self.tmp, self.url)

    def close(self) -> None:
        if self.writer is None:
            return
        self.flush()
        self.writer.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
