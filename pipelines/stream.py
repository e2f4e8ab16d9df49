"""The training stream: samples from shards (and other sources) for a torch DataLoader on every Ray Train rank.

Work is split in *units* (a webdataset shard, a slice of a Karpathy file, a shard of a round's bootstrapped
dataset), never in samples, so a reader opens each file once, front to back, and its memory is one unit's
sample at a time plus the shuffle buffer, whatever the number of shards.

Sharding policy (every epoch):
  1. all units of all sources are put in one list and permuted with a seed derived from (seed, epoch), so
     every rank and worker computes the same order without talking to the others;
  2. there are ``world_size * num_workers`` *slots* (slot ``worker_id * world_size + rank``). When every
     unit's size is known (always with ``balance="pad"``; Karpathy and bootstrapped units always know theirs,
     shards only when sized), units are dealt by samples, longest first: the permuted list is sorted by size,
     largest first (stably, so equal sizes keep the epoch's random order), and each unit goes to the slot with
     the fewest samples so far (ties to the lowest slot); the slots are then relabelled by a permutation
     seeded by (seed, epoch), so units move between ranks from epoch to epoch even when their sizes fix the
     grouping. Slots differ by at most one unit's size — usually far less than round-robin over units of very
     different sizes, whose short slots would be padded with repeats. Without sizes, slot ``s`` takes units
     ``s, s + n_slots, s + 2 n_slots, ...`` (round-robin, ranks first, so the ranks' unit counts differ by at
     most one). Either way each slot streams its units in the epoch's permuted order, and the plan is a pure
     function of (seed, epoch, unit sizes);
  3. each slot streams its units through a shuffle buffer seeded by (seed, epoch, slot).
With the default ``balance="none"`` every sample is seen exactly once per epoch across all ranks x workers,
and ranks may see unequal numbers of samples (whole units) — fine for a single process, wrong for DDP,
where a rank that runs out first would hang the others' all-reduce. ``balance="pad"`` is for DDP: every slot
yields exactly as many samples as the largest slot's plan (known from the units' sizes), by streaming its own
units once more (a slot without units repeats one of the epoch's units), so every rank gets
``num_workers * ceil(target / batch_size)`` batches; ``steps_per_epoch`` gives that number ahead of time.
Padding repeats the few samples the dealing by size could not even out (as torch's DistributedSampler does);
it never drops one.

Bad data never stops the stream: a corrupt image is skipped and counted, a sample whose image is missing
is skipped and counted, a unit that fails to read (a truncated tar) is counted and the stream moves on.
Counts are kept in shared memory, so ``stats()`` in the main process includes the DataLoader workers';
each worker also logs its counts when it finishes an epoch.

A sample's augmentation is seeded from (seed, epoch, image_id, text): reruns and other cluster sizes
augment the same sample the same way (the order of samples does depend on the cluster size).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import random
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from blip_core.transforms import CorruptImageError, decode_image

from .sources import RawSample, Sample, ShardSource, Source, StreamUnit

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def assign_units(
    n_units: int,
    *,
    epoch: int,
    seed: int,
    world_size: int,
    num_workers: int,
    shuffle: bool = True,
    sizes: Sequence[int | None] | None = None,
) -> list[list[int]]:
    """Unit indices per slot (slot = worker_id * world_size + rank) for one epoch; see the module docstring.

    ``sizes`` (samples per unit): when given and all known, units are dealt longest first to the slot with the
    fewest samples, so slots get near-equal sample counts; otherwise round-robin by unit.
    """
    order = list(range(n_units))
    if shuffle:
        random.Random(derive_seed(seed, "units", epoch)).shuffle(order)
    n_slots = world_size * num_workers
    if sizes is not None and len(sizes) != n_units:
        raise ValueError(f"{len(sizes)} sizes for {n_units} units")
    if sizes is None or any(n is None for n in sizes):
        return [order[s::n_slots] for s in range(n_slots)]
    position = {u: i for i, u in enumerate(order)}
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    loads = [(0, s) for s in range(n_slots)]  # a heap of (samples so far, slot): ties go to the lowest slot
    for u in sorted(order, key=lambda u: -sizes[u]):  # stable: equal sizes keep the permuted order
        load, s = heapq.heappop(loads)
        slots[s].append(u)
        heapq.heappush(loads, (load + sizes[u], s))
    if shuffle:  # relabel the slots, so that units still move between ranks from epoch to epoch
        random.Random(derive_seed(seed, "slots", epoch)).shuffle(slots)
    return [sorted(units, key=position.__getitem__) for units in slots]


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: hold ``size`` items, emit a random one for each new arrival, drain at the end."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


# Shared-memory counters: row 0 holds the epoch, then one row of counters per DataLoader worker.
COUNTERS = ("samples", "corrupt", "missing", "broken_units", "repeated")
MAX_WORKERS = 256


class ShardStream(IterableDataset):
    """Training samples streamed from shards and other sources; see the module docstring for the policy.

    ``sources``: shard URLs, or Source objects (mix a KarpathySource with ShardSource/BootstrappedSource).
    ``rank``/``world_size``: the distributed position; when None, taken from torch.distributed (which Ray
    Train's TorchTrainer initialises) or 0/1. Pass Ray Train's ``get_world_rank()``/``get_world_size()``
    explicitly when no process group exists.
    Call ``set_epoch(e)`` before each epoch: it reaches DataLoader workers, persistent ones included.
    """

    def __init__(
        self,
        sources: Sequence[str] | Sequence[Source] | Source,
        *,
        transform: Callable | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_units: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        balance: Literal["none", "pad"] = "none",
        storage_options: dict | None = None,
    ):
        super().__init__()
        if isinstance(sources, Source):
            sources = [sources]
        sources = list(sources)
        if sources and all(isinstance(s, str) for s in sources):
            sources = [ShardSource(sources, storage_options=storage_options)]
        if not all(isinstance(s, Source) for s in sources):
            raise TypeError("ShardStream takes shard URLs or Source objects, not a mix")
        if balance not in ("none", "pad"):
            raise ValueError(f"balance must be 'none' or 'pad', got {balance!r}")
        if rank is None or world_size is None:
            rank, world_size = _distributed_position()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources: list[Source] = sources
        self.transform = transform
        self.seed = seed
        self.buffer_size = shuffle_buffer
        self.shuffle_units = shuffle_units
        self.rank, self.world_size = rank, world_size
        self.balance = balance
        # Listing (and, for padding, sizing) happens once here, not in every worker.
        self.units: list[tuple[int, StreamUnit]] = [
            (i, u) for i, s in enumerate(sources) for u in s.units(with_sizes=balance == "pad")
        ]
        self._shared = torch.zeros(1 + MAX_WORKERS * len(COUNTERS), dtype=torch.int64).share_memory_()

    def __setstate__(self, state: dict) -> None:
        # Unpickled by plain pickle (e.g. shipped to a Ray worker): make the counters shared again so that
        # this process's DataLoader workers report into them.
        self.__dict__.update(state)
        if not self._shared.is_shared():
            self._shared.share_memory_()

    # ----------------------------------------------------------------------------------------- epochs
    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    def set_epoch(self, epoch: int) -> None:
        self._shared[0] = epoch

    def stats(self) -> dict[str, int]:
        """Counts summed over this process and its DataLoader workers, cumulative over epochs."""
        rows = self._shared[1:].view(MAX_WORKERS, len(COUNTERS)).sum(0).tolist()
        return dict(zip(COUNTERS, rows))

    def _count(self, worker: int, name: str, n: int = 1) -> None:
        self._shared[1 + (worker % MAX_WORKERS) * len(COUNTERS) + COUNTERS.index(name)] += n

    # ----------------------------------------------------------------------------------------- planning
    def plan(self, num_workers: int = 1, epoch: int | None = None) -> list[list[tuple[int, StreamUnit]]]:
        """Units per slot for an epoch (slot = worker_id * world_size + rank), as every process computes it."""
        epoch = self.epoch if epoch is None else epoch
        slots = assign_units(
            len(self.units),
            epoch=epoch,
            seed=self.seed,
            world_size=self.world_size,
            num_workers=max(1, num_workers),
            shuffle=self.shuffle_units,
            sizes=[u.size for _, u in self.units],
        )
        return [[self.units[i] for i in s] for s in slots]

    def pad_target(self, num_workers: int = 1, epoch: int | None = None) -> int:
        """Samples each slot yields under ``balance="pad"``: the largest slot's planned size."""
        if any(u.size is None for _, u in self.units):
            raise ValueError("padding needs unit sizes; construct the stream with balance='pad'")
        return max((sum(u.size for _, u in slot) for slot in self.plan(num_workers, epoch)), default=0)

    def steps_per_epoch(
        self, batch_size: int, num_workers: int = 0, *, drop_last: bool = False, epoch: int | None = None
    ) -> int:
        """Batches every rank's DataLoader yields in an epoch under ``balance="pad"`` (the same on all ranks).

        A DataLoader batches inside each worker, so this is per worker, times the number of workers.
        """
        if self.balance != "pad":
            raise ValueError("equal steps per rank need balance='pad'")
        target = self.pad_target(num_workers, epoch)
        per_worker = target // batch_size if drop_last else -(-target // batch_size)
        return max(1, num_workers) * per_worker

    # ----------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        slot = worker_id * self.world_size + self.rank
        plan = self.plan(num_workers, epoch)
        mine = plan[slot]
        target = self.pad_target(num_workers, epoch) if self.balance == "pad" else None
        rng = random.Random(derive_seed(self.seed, "buffer", epoch, slot))
        before, started = self._worker_counts(worker_id), time.perf_counter()

        yielded = 0
        passes = [mine]
        if target is not None and self.units:
            # A slot with nothing of its own repeats one of the epoch's units, chosen by slot.
            all_units = [u for s in plan for u in s]
            passes.append(mine or [all_units[slot % len(all_units)]])
        pass_no = 0
        while pass_no < len(passes):
            units = passes[pass_no]
            got_any = False
            raws = self._raw(units, worker_id, count=pass_no == 0)
            for source_index, raw in shuffle_buffer(raws, self.buffer_size, rng):
                if target is not None and yielded >= target:
                    break
                # Bad samples are counted on the first pass only: padding passes re-read the same data.
                sample = self._materialise(self.sources[source_index], raw, epoch, worker_id, repeat=pass_no)
                if sample is None:
                    continue
                got_any = True
                if pass_no > 0:
                    self._count(worker_id, "repeated")
                self._count(worker_id, "samples")
                yielded += 1
                yield sample
            if target is None or yielded >= target:
                break
            if pass_no > 0 and not got_any:
                log.error(
                    "stream slot %d: padding source yields no decodable sample; stopping at %d of %d",
                    slot,
                    yielded,
                    target,
                )
                break
            if pass_no == len(passes) - 1:
                passes.append(passes[-1])  # keep repeating until the target
            pass_no += 1
        self._log_epoch(epoch, worker_id, slot, len(mine), before, time.perf_counter() - started)

    def _raw(
        self, units: list[tuple[int, StreamUnit]], worker_id: int, count: bool = True
    ) -> Iterator[tuple[int, RawSample]]:
        for source_index, unit in units:
            try:
                for raw in self.sources[source_index].read(unit):
                    yield source_index, raw
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                if count:
                    self._count(worker_id, "broken_units")
                    log.error("unit %s is broken and was cut short: %s", unit.name, err)

    def _materialise(
        self, source: Source, raw: RawSample, epoch: int, worker_id: int, repeat: int = 0
    ) -> Sample | None:
        count = repeat == 0
        data = raw.image
        if data is None and raw.image_url is not None:
            try:
                data = source.fetch(raw.image_url)
            except OSError as err:
                if count:
                    self._count(worker_id, "missing")
                    log.warning("image %s of %s is missing: %s", raw.image_url, raw.image_id, err)
                return None
        if data is None:
            if count:
                self._count(worker_id, "missing")
                log.warning("sample %s has no image; skipped", raw.image_id)
            return None
        try:
            image = decode_image(data)
        except CorruptImageError as err:
            if count:
                self._count(worker_id, "corrupt")
                log.debug("corrupt image %s skipped: %s", raw.image_id, err)
            return None
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                # A padding repeat gets its own view of the image.
                parts = (self.seed, "augment", epoch, raw.image_id, raw.text) + ((repeat,) if repeat else ())
                torch.manual_seed(derive_seed(*parts))
                image = self.transform(image)
        return Sample(image=image, text=raw.text, key=raw.key, image_id=raw.image_id, source=raw.source)

    def _worker_counts(self, worker_id: int) -> list[int]:
        row = 1 + (worker_id % MAX_WORKERS) * len(COUNTERS)
        return self._shared[row : row + len(COUNTERS)].tolist()

    def _log_epoch(
        self, epoch: int, worker_id: int, slot: int, n_units: int, before: list[int], seconds: float
    ) -> None:
        delta = dict(zip(COUNTERS, (a - b for a, b in zip(self._worker_counts(worker_id), before))))
        bad = delta["corrupt"] + delta["missing"] + delta["broken_units"]
        log.log(
            logging.WARNING if bad else logging.INFO,
            "stream epoch %d rank %d worker %d (slot %d, %d units): %d samples (%.0f/s), %d corrupt images "
            "skipped, %d missing images, %d broken units, %d repeated for padding",
            epoch,
            self.rank,
            worker_id,
            slot,
            n_units,
            delta["samples"],
            delta["samples"] / max(seconds, 1e-9),
            delta["corrupt"],
            delta["missing"],
            delta["broken_units"],
            delta["repeated"],
        )


def _distributed_position() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
