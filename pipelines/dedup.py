"""Duplicate groups over the perceptual hashes of a whole CapFilt run (``pipelines/capfilt/phash.py``): images whose
64-bit hashes are within ``distance`` bits, exact copies included, share a group, the transitive closure of
"near" (connected components); a group's representative is its smallest (shard, key).

Finding the near pairs without comparing every pair (multi-index hashing): split the 64 bits into ``distance + 1``
bands; two hashes within ``distance`` bits agree exactly on at least one band (pigeonhole). Per band, the distinct
hashes are sorted by the band's value and only those sharing a value are compared. Past a few thousand distinct
hashes a band of ~13 bits is shared by many by chance, so each band is paired with one of ``distance + 1``
sub-bands of the other bits (:func:`masks`): ``(distance + 1)^2`` sorts, few chance candidates. Exact copies collapse first
(the distinct hashes), so a hash repeated a thousand times costs one entry, not a million pairs.

Memory, for n images with a hash: the hashes (8 bytes each) in (shard, key) order, then the grouping's arrays:
the representative of each image (4 bytes) and its membership (1 byte) are what ``assemble`` holds while it
decides; the peak while grouping is ~30 bytes per image (measured in docs/SCALING.md). Per-shard offsets and the files' shards are
O(shards). Cost: one sort of the distinct hashes per mask, plus the candidate pairs that share a mask's bits by
chance: ~``m^2 / 2^(w + 1)`` per mask of w bits (m distinct hashes; w ~ 23 for ``distance`` 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BITS = 64


def _split(bits: list[int], parts: int) -> list[list[int]]:
    edges = [round(i * len(bits) / parts) for i in range(parts + 1)]
    return [bits[a:b] for a, b in zip(edges[:-1], edges[1:])]


def masks(distance: int, distinct: int) -> list[int]:
    """Bit masks such that two hashes within ``distance`` bits agree on every bit of at least one. One level:
    ``distance + 1`` bands (pigeonhole); with more distinct hashes than a band has values, two levels: a band
    plus one of ``distance + 1`` sub-bands of the other bits (the rest differs in at most ``distance`` bits too),
    ``(distance + 1)^2`` masks of ~1.4x the bits, so that a key is shared by few hashes by chance."""
    top = _split(list(range(BITS)), distance + 1)
    if distinct <= 1 << min(len(b) for b in top):
        groups = top
    else:
        groups = []
        for band in top:
            rest = [i for i in range(BITS) if i not in band]
            groups += [band + sub for sub in _split(rest, distance + 1)]
    return [sum(1 << i for i in g) for g in groups]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances of int64/uint64 hashes (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a.view(np.uint64), b.view(np.uint64))).astype(np.int32)


def near_pairs(unique: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) into ``unique`` (distinct uint64 hashes) within ``distance`` bits, each at least once."""
    m = len(unique)
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    if distance == 0 or m < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    for mask in masks(distance, m):
        order = np.argsort(unique & np.uint64(mask))
        key = unique[order]
        key &= np.uint64(mask)
        active = np.flatnonzero(key[1:] == key[:-1])  # positions whose key runs on for at least `offset` more
        offset = 1
        while active.size:
            a, b = order[active], order[active + offset]
            close = hamming(unique[a], unique[b]) <= distance
            found_a.append(a[close])
            found_b.append(b[close])
            offset += 1
            active = active[active < m - offset]
            active = active[key[active] == key[active + offset]]
        del key, order
    if not found_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(found_a), np.concatenate(found_b)


def group_representatives(hashes: np.ndarray, distance: int) -> np.ndarray:
    """For each image (hashes in (shard, key) order), the index of its group's representative: the smallest index
    of its connected component under "within ``distance`` bits". int32 indices (a run of up to 2^31 images)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    if n == 0:
        return np.zeros(0, np.int32)
    # the distinct hashes and each image's (np.unique's return_inverse, with int32 where it allocates int64)
    order = np.argsort(hashes.view(np.uint64))
    ordered = hashes.view(np.uint64)[order]
    new = np.empty(n, dtype=bool)
    new[0], new[1:] = True, ordered[1:] != ordered[:-1]
    unique = ordered[new]
    del ordered
    label = np.empty(n, dtype=np.int32)
    label[order] = np.cumsum(new, dtype=np.int32) - 1
    del order, new
    a, b = near_pairs(unique, distance)
    m = len(unique)
    del unique
    if len(a):
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(m, m)).tocsr()
        labels = connected_components(graph, directed=False)[1].astype(np.int32)
        label = labels[label]
        del labels, graph
    first = np.full(int(label.max()) + 1, n, dtype=np.int32)
    np.minimum.at(first, label, np.arange(n, dtype=np.int32))
    return first[label]


# ------------------------------------------------------------------------------------------ over CapFilt files


def _images(table: pa.Table) -> pa.Table:
    """The distinct (shard, key) of rows with a hash, with it, sorted by (shard, key)."""
    hashed = table.filter(pc.is_valid(table["phash"]))
    img = hashed.group_by(["shard", "key"], use_threads=False).aggregate([("phash", "min")])
    return img.rename_columns(["shard", "key", "phash"]).sort_by([("shard", "ascending"), ("key", "ascending")])


def _shard_runs(shards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted shard names: where each run of one shard starts (bool), and each entry's rank in its run."""
    pos = np.arange(len(shards))
    change = np.r_[True, shards[1:] != shards[:-1]] if len(shards) else np.zeros(0, bool)
    return change, pos - np.maximum.accumulate(np.where(change, pos, 0))


@dataclass
class Duplicates:
    """The groups of a run: ``rep[i]`` is the representative of image i (images with a hash, in (shard, key)
    order); ``offsets`` the first image of each shard."""

    distance: int
    offsets: dict[str, int]
    rep: np.ndarray
    grouped: np.ndarray  # bool: image i is in a group of two or more

    @property
    def images(self) -> int:
        return len(self.rep)

    def image_index(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """The hashed images of a file's rows (columns shard, key, phash) sorted by (shard, key), and their
        indices."""
        img = _images(table)
        shards = img["shard"].to_numpy(zero_copy_only=False)
        change, rank = _shard_runs(shards)
        base = np.array([self.offsets[s] for s in shards[change]], dtype=np.int64)
        return img, base[np.cumsum(change) - 1] + rank if len(shards) else np.zeros(0, np.int64)

    def row_flags(self, table: pa.Table) -> np.ndarray:
        """Per row: True where its image is a duplicate that is not its group's representative."""
        img, idx = self.image_index(table)
        dup = self.rep[idx] != idx
        where = pc.fill_null(pc.index_in(_joined(table), value_set=_joined(img)), -1).to_numpy(zero_copy_only=False)
        out = np.zeros(table.num_rows, dtype=bool)
        known = where >= 0
        out[known] = dup[where[known]]
        return out


def _joined(table: pa.Table) -> pa.Array:
    joined = pc.binary_join_element_wise(table["shard"], table["key"], "\x00")
    return joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined


def find_duplicates(tables: Iterable[pa.Table], distance: int) -> Duplicates:
    """Groups over the (shard, key, phash) columns of every file, read one at a time (an image's rows in one
    file, a shard in one file)."""
    pieces: list[tuple[str, np.ndarray]] = []
    for table in tables:
        img = _images(table)
        shards = img["shard"].to_numpy(zero_copy_only=False)
        hashes = img["phash"].to_numpy()
        change, _ = _shard_runs(shards)
        starts = np.flatnonzero(change)
        for s, e in zip(starts, np.r_[starts[1:], len(shards)]):
            pieces.append((str(shards[s]), hashes[s:e]))
    pieces.sort(key=lambda p: p[0])
    offsets, at = {}, 0
    for shard, h in pieces:
        offsets[shard] = at
        at += len(h)
    hashes = np.concatenate([h for _, h in pieces]) if pieces else np.zeros(0, np.int64)
    del pieces
    rep = group_representatives(hashes, distance)
    del hashes
    grouped = rep != np.arange(len(rep), dtype=np.int32)
    grouped[rep[grouped]] = True
    return Duplicates(distance, offsets, rep, grouped)


def group_rows(dups: Duplicates, tables: Iterable[pa.Table]) -> pa.Table:
    """(shard, key, phash, group_shard, group_key) of every image in a group of two or more, the group named by
    its representative's (shard, key); sorted by group, then (shard, key)."""
    members: list[pa.Table] = []
    reps: dict[int, tuple[str, str]] = {}
    for table in tables:
        img, idx = dups.image_index(table)
        sel = dups.grouped[idx]
        if not sel.any():
            continue
        chosen = img.filter(pa.array(sel))
        members.append(chosen.append_column("rep", pa.array(dups.rep[idx[sel]])))
        for i, s, k in zip(idx[sel], chosen["shard"].to_pylist(), chosen["key"].to_pylist()):
            if dups.rep[i] == i:
                reps[int(i)] = (s, k)
    if not members:
        return pa.table(
            {c: pa.array([], pa.string()) for c in ("shard", "key")}
            | {"phash": pa.array([], pa.int64())}
            | {c: pa.array([], pa.string()) for c in ("group_shard", "group_key")}
        )
    t = pa.concat_tables(members)
    rep = t["rep"].to_pylist()
    t = t.drop_columns(["rep"])
    t = t.append_column("group_shard", pa.array([reps[r][0] for r in rep], pa.string()))
    t = t.append_column("group_key", pa.array([reps[r][1] for r in rep], pa.string()))
    return t.sort_by([(c, "ascending") for c in ("group_shard", "group_key", "shard", "key")])
