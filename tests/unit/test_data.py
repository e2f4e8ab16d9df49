"""Readers: shard listing, the training stream (distribution, epochs, bad data), COCO-Karpathy, the
bootstrapped dataset's shard-local join. Ray Data's reader is tested in tests/integration/test_readers_ray.py."""

from __future__ import annotations

import logging
import posixpath
import random
import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import jpeg, key_of, write_karpathy, write_shards
from torch.utils.data import DataLoader

from pipelines import storage
from pipelines.bootstrapped import read_manifest, relativize, resolve
from pipelines.data import (
    KarpathyDataset,
    KarpathySource,
    NotCommittedError,
    ShardStream,
    assign_units,
    bootstrapped_stream,
    decode_image,
    eval_transform,
    iter_shard,
    list_shards,
    shard_name,
    shard_size,
    train_transform,
    write_manifest,
)
from pipelines.sources import RawSample, Source, StreamUnit

SIZE = 16
EVAL = eval_transform(SIZE)


def memory_url() -> str:
    return f"memory://t-{uuid.uuid4().hex[:8]}"


def image_of(data: bytes) -> torch.Tensor:
    return EVAL(decode_image(data))


def run(stream: ShardStream, num_workers: int = 0, batch_size: int = 4, **kw) -> list:
    """Every sample one rank's DataLoader yields, unbatched: (key, text, image_id, source, image)."""
    out = []
    loader = DataLoader(stream, batch_size=batch_size, num_workers=num_workers, **kw)
    for batch in loader:
        for i in range(len(batch.key)):
            out.append((batch.key[i], batch.text[i], batch.image_id[i], batch.source[i], batch.image[i]))
    return out


# ------------------------------------------------------------------------------------------------ shards


def test_list_shards_only_reads_committed_dirs(tmp_path):
    url = str(tmp_path / "ingest" / "web")
    write_shards(url, [2, 2, 1], commit=False)
    with pytest.raises(NotCommittedError, match="not committed"):
        list_shards(url)
    assert [shard_name(s) for s in list_shards(url, allow_uncommitted=True)] == ["00000", "00001", "00002"]
    storage.commit(url)
    shards = list_shards(url)
    assert shards == sorted(shards) and all(s.startswith(url) and s.endswith(".tar") for s in shards)
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nowhere"))


def test_list_and_read_shards_through_fsspec():
    url = memory_url() + "/ingest/web"
    truth = write_shards(url, [3, 2])
    shards = list_shards(url)
    assert shards == [f"{url}/00000.tar", f"{url}/00001.tar"]
    assert [shard_size(s) for s in shards] == [3, 2]
    got = {s.key: s for s in iter_shard(shards[1])}
    assert set(got) == {key_of(1, 0), key_of(1, 1)}
    for key, s in got.items():
        assert s.text == truth[key]["text"] and s.image == truth[key]["image"] and s.meta["url"] == truth[key]["url"]
    only = list(iter_shard(shards[0], keys={key_of(0, 2)}))
    assert [s.key for s in only] == [key_of(0, 2)]


def test_shard_size_without_stats_scans_the_tar(tmp_path):
    url = str(tmp_path / "web")
    write_shards(url, [4])
    (tmp_path / "web" / "00000_stats.json").unlink()
    assert shard_size(f"{url}/00000.tar") == 4


# ------------------------------------------------------------------------------------------------ stream


def test_stream_skips_and_counts_a_corrupt_image(tmp_path, caplog):
    url = str(tmp_path / "web")
    bad = key_of(0, 1)
    truth = write_shards(url, [3, 3], corrupt={bad})
    stream = ShardStream(list_shards(url), transform=EVAL, shuffle_buffer=4)
    with caplog.at_level(logging.INFO, logger="pipelines.stream"):
        got = run(stream)
    assert sorted(k for k, *_ in got) == sorted(set(truth) - {bad})
    assert stream.stats()["corrupt"] == 1 and stream.stats()["samples"] == 5
    assert any("1 corrupt images skipped" in r.getMessage() for r in caplog.records)
    for key, text, image_id, source, image in got:
        assert text == truth[key]["text"] and image_id == f"web:{key}" and source == "web"
        assert torch.allclose(image, image_of(truth[key]["image"]))


@pytest.mark.parametrize("sizes", [[4, 4, 4, 4], [5, 3, 4, 2, 6]], ids=["4-shards", "5-shards-uneven"])
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path, sizes):
    url = str(tmp_path / "web")
    bad = {key_of(1, 0), key_of(3, 1)}
    truth = write_shards(url, sizes, corrupt=bad)
    shards = list_shards(url)
    for epoch in (0, 1):
        seen, corrupt = [], 0
        for rank in range(2):
            stream = ShardStream(shards, transform=EVAL, rank=rank, world_size=2, seed=3, shuffle_buffer=3)
            stream.set_epoch(epoch)
            seen += [k for k, *_ in run(stream, num_workers=2)]
            corrupt += stream.stats()["corrupt"]  # counted inside the DataLoader workers
        assert sorted(seen) == sorted(set(truth) - bad)
        assert corrupt == len(bad)


def test_assignment_round_robins_units_over_ranks_first():
    slots = assign_units(5, epoch=0, seed=0, world_size=2, num_workers=2, shuffle=False)
    assert slots == [[0, 4], [1], [2], [3]]  # slot = worker * world_size + rank
    for epoch in range(3):
        slots = assign_units(7, epoch=epoch, seed=1, world_size=2, num_workers=2)
        assert sorted(sum(slots, [])) == list(range(7))
        per_rank = [len(slots[r]) + len(slots[2 + r]) for r in range(2)]
        assert abs(per_rank[0] - per_rank[1]) <= 1


class SizedSource(Source):
    """Units of known, chosen sizes (as Karpathy and bootstrapped units are), all sharing one small JPEG."""

    def __init__(self, sizes: list[int]):
        self.sizes, self.image = list(sizes), jpeg((90, 120, 200))

    def units(self, with_sizes: bool = False) -> list[StreamUnit]:
        return [StreamUnit(f"sized/{u}", u, n) for u, n in enumerate(self.sizes)]

    def read(self, unit: StreamUnit):
        for j in range(unit.size):
            yield RawSample(
                key=f"{unit.ref}-{j}", image_id=f"sized:{unit.ref}-{j}", text="t", source="sized", image=self.image
            )


SKEWED = [1000, 900, 50, 50, 40, 30, 20, 10]


def test_assignment_with_sizes_deals_samples_evenly_and_keeps_every_unit_once():
    rng = random.Random(0)
    for trial in range(50):
        sizes = [rng.choice([1, 5, 20, 300, 2000]) for _ in range(rng.randint(1, 40))]
        world, workers, epoch = rng.randint(1, 4), rng.randint(1, 3), rng.randint(0, 5)
        slots = assign_units(len(sizes), epoch=epoch, seed=trial, world_size=world, num_workers=workers, sizes=sizes)
        assert len(slots) == world * workers
        assert sorted(sum(slots, [])) == list(range(len(sizes)))  # every unit exactly once
        loads = [sum(sizes[u] for u in s) for s in slots]
        assert max(loads) - min(loads) <= max(sizes)  # longest-first greedy: within one unit of each other
        # A pure function of (seed, epoch, sizes): every rank and worker computes the same plan.
        assert slots == assign_units(
            len(sizes), epoch=epoch, seed=trial, world_size=world, num_workers=workers, sizes=sizes
        )
    # Sizes fix the grouping ({1000 + small ones} vs {900 + small ones}), yet the groups move between ranks.
    firsts = {tuple(assign_units(8, epoch=e, seed=3, world_size=2, num_workers=1, sizes=SKEWED)[0]) for e in range(6)}
    assert len(firsts) > 1
    # Each slot streams its units in the epoch's permuted order, not by size; unknown sizes fall back to
    # round-robin over units.
    order = assign_units(8, epoch=2, seed=7, world_size=1, num_workers=1)[0]
    assert assign_units(8, epoch=2, seed=7, world_size=1, num_workers=1, sizes=SKEWED) == [order]
    assert assign_units(5, epoch=0, seed=0, world_size=2, num_workers=2, shuffle=False, sizes=[3, None, 1, 1, 1]) == [
        [0, 4],
        [1],
        [2],
        [3],
    ]
    with pytest.raises(ValueError, match="sizes"):
        assign_units(3, epoch=0, seed=0, world_size=1, num_workers=1, sizes=[1, 2])


def test_pad_with_skewed_unit_sizes_repeats_few_samples():
    # Round-robin over these units left one rank with a few small units, padded with thousands of repeats.
    keys = {f"{u}-{j}" for u, n in enumerate(SKEWED) for j in range(n)}
    for epoch in range(3):
        seen, repeated, steps = [], 0, []
        for rank in range(2):
            stream = ShardStream(
                [SizedSource(SKEWED)], rank=rank, world_size=2, balance="pad", seed=epoch, shuffle_buffer=50
            )
            stream.set_epoch(epoch)
            got = [s.key for s in stream]
            steps.append(stream.steps_per_epoch(batch_size=10))
            assert len(got) == stream.pad_target()
            seen += got
            repeated += stream.stats()["repeated"]
        assert steps[0] == steps[1]
        assert set(seen) == keys  # padding never drops a sample
        assert len(seen) - repeated == len(keys) and repeated == len(seen) - len(keys)
        assert repeated < 0.02 * len(seen), (epoch, repeated, len(seen))


def test_sized_units_are_seen_exactly_once_per_epoch_across_ranks_and_workers():
    sizes = [9, 1, 7, 3, 3, 2, 12, 5]
    keys = sorted(f"{u}-{j}" for u, n in enumerate(sizes) for j in range(n))
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            stream = ShardStream(
                [SizedSource(sizes)], transform=EVAL, rank=rank, world_size=2, seed=4, shuffle_buffer=3
            )
            stream.set_epoch(epoch)
            seen += [k for k, *_ in run(stream, num_workers=2)]
        assert sorted(seen) == keys


def test_epochs_reshuffle_reproducibly(tmp_path):
    url = str(tmp_path / "web")
    write_shards(url, [6, 6, 6])
    shards = list_shards(url)

    def epoch_of(stream: ShardStream, epoch: int) -> list:
        stream.set_epoch(epoch)
        return run(stream)

    tf = train_transform(SIZE, hflip=True, randaugment=True)
    a, b = (
        ShardStream(shards, transform=tf, seed=11, shuffle_buffer=5),
        ShardStream(shards, transform=tf, seed=11, shuffle_buffer=5),
    )
    a0, a1 = epoch_of(a, 0), epoch_of(a, 1)
    b1 = epoch_of(b, 1)
    keys = lambda run_: [k for k, *_ in run_]  # noqa: E731
    assert keys(a0) != keys(a1) and sorted(keys(a0)) == sorted(keys(a1))
    assert keys(a1) == keys(b1)
    assert all(torch.equal(x[-1], y[-1]) for x, y in zip(a1, b1))  # the same augmentation, sample by sample
    aug0 = {k: img for k, *_, img in a0}
    assert any(not torch.equal(aug0[k], img) for k, *_, img in a1)  # a new epoch augments anew
    assert keys(epoch_of(ShardStream(shards, transform=tf, seed=12, shuffle_buffer=5), 1)) != keys(a1)


def test_set_epoch_reaches_persistent_workers(tmp_path):
    url = str(tmp_path / "web")
    write_shards(url, [3, 3, 3, 3])
    shards = list_shards(url)
    stream = ShardStream(shards, transform=EVAL, seed=5, shuffle_buffer=2)
    loader = DataLoader(stream, batch_size=2, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in (0, 1):
        stream.set_epoch(epoch)
        orders.append([k for batch in loader for k in batch.key])
    fresh = ShardStream(shards, transform=EVAL, seed=5, shuffle_buffer=2)
    fresh.set_epoch(1)
    assert orders[0] != orders[1]
    assert orders[1] == [k for batch in DataLoader(fresh, batch_size=2, num_workers=2) for k in batch.key]


def test_pad_gives_every_rank_the_same_number_of_steps(tmp_path):
    url = str(tmp_path / "web")
    truth = write_shards(url, [5, 2, 4], corrupt={key_of(0, 0)})
    shards = list_shards(url)
    seen, steps = [], []
    for rank in range(2):
        stream = ShardStream(shards, transform=EVAL, rank=rank, world_size=2, balance="pad", shuffle_buffer=2)
        batches = list(DataLoader(stream, batch_size=2, num_workers=2))
        assert len(batches) == stream.steps_per_epoch(batch_size=2, num_workers=2)
        steps.append(len(batches))
        seen += [k for b in batches for k in b.key]
    assert steps[0] == steps[1]
    assert set(seen) == set(truth) - {key_of(0, 0)}  # padding repeats, never drops


def test_broken_shard_is_counted_not_fatal(tmp_path, caplog):
    url = str(tmp_path / "web")
    truth = write_shards(url, [4, 3])
    tar = tmp_path / "web" / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) * 6 // 10])  # cut inside the third of four samples
    stream = ShardStream(list_shards(url), transform=EVAL)
    with caplog.at_level(logging.ERROR, logger="pipelines.stream"):
        keys = [k for k, *_ in run(stream)]
    assert stream.stats()["broken_units"] == 1
    assert {key_of(0, 0), key_of(0, 1)} | {key_of(1, i) for i in range(3)} <= set(keys) <= set(truth)
    assert any("broken" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ Karpathy


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("per_caption_entries", [True, False], ids=["train-layout", "test-layout"])
def test_karpathy_reader(tmp_path, where, per_caption_entries):
    root = str(tmp_path) if where == "local" else memory_url()
    truth = write_karpathy(root, 5, per_caption_entries=per_caption_entries)
    ds = KarpathyDataset(f"{root}/ann.json", f"{root}/images", transform=EVAL)
    assert len(ds) == 5
    for i, (path, (caps, data)) in enumerate(truth.items()):
        image, captions, image_id = ds[i]
        assert captions == caps and torch.allclose(image, image_of(data))
        assert image_id == (f"coco_{i}" if per_caption_entries else posixpath.splitext(path)[0])
    pairs = ds.pairs()
    assert len(pairs) == sum(len(c) for c, _ in truth.values())
    assert [pairs[j][1] for j in range(len(pairs))] == [c for caps, _ in truth.values() for c in caps]
    # The same set as stream units, mixable with shards.
    got = run(ShardStream([KarpathySource(f"{root}/ann.json", f"{root}/images", images_per_unit=2)], transform=EVAL))
    assert Counter(t for _, t, *_ in got) == Counter(c for caps, _ in truth.values() for c in caps)
    assert all(src == "human" and iid.startswith("human:") for _, _, iid, src, _ in got)


def test_karpathy_bad_file_names_the_entry(tmp_path):
    (tmp_path / "ann.json").write_text('[{"image": "a.jpg", "caption": "ok"}, {"caption": "no image"}]')
    with pytest.raises(ValueError, match="entry 1 needs 'image'"):
        KarpathyDataset(str(tmp_path / "ann.json"), str(tmp_path))


# ------------------------------------------------------------------------------------------------ bootstrapped


def capfilt_rows(truth: dict) -> list[dict]:
    """Per web key: its web text (kept for even keys), two synthetic captions (the first always kept)."""
    rows = []
    for n, (key, t) in enumerate(sorted(truth.items())):
        rows.append(
            {
                "key": key,
                "shard": t["shard"],
                "url": t["url"],
                "text": t["text"],
                "source": "web",
                "candidate": None,
                "keep": n % 2 == 0,
            }
        )
        for c in range(2):
            rows.append(
                {
                    "key": key,
                    "shard": t["shard"],
                    "url": t["url"],
                    "text": f"synthetic {c} for {key}",
                    "source": "synthetic",
                    "candidate": c,
                    "keep": c == 0 or n % 3 == 0,
                }
            )
    return rows


@pytest.mark.parametrize("where", ["local", "memory"])
def test_bootstrapped_join_yields_human_pairs_and_kept_texts_with_their_images(tmp_path, where):
    root = str(tmp_path / "run") if where == "local" else memory_url() + "/run"
    shards_url = f"{root}/ingest/web"
    truth = write_shards(shards_url, [4, 3, 2], corrupt={key_of(2, 1)})
    human = write_karpathy(f"{root}/world", 3)
    rows = capfilt_rows(truth)
    rows.append(
        {
            "key": "000099999",
            "shard": "00001",
            "url": None,
            "text": "image never downloaded",
            "source": "web",
            "candidate": None,
            "keep": True,
        }
    )
    capfilt = f"{root}/round=0/capfilt"
    fs, path = fsspec.core.url_to_fs(capfilt)
    fs.makedirs(path, exist_ok=True)
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2 :])):  # a directory of Parquet files
        with fs.open(f"{path}/part-{part}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(chunk), f, compression="zstd")
    storage.commit(capfilt)
    dataset_dir = f"{root}/round=0/dataset"
    write_manifest(
        dataset_dir,
        round=0,
        human_annotations=f"{root}/world/ann.json",
        human_image_root=f"{root}/world/images",
        shards=shards_url,
        capfilt=capfilt,
        counts={"rows": len(rows)},
    )
    with pytest.raises(NotCommittedError):
        bootstrapped_stream(dataset_dir)
    storage.commit(dataset_dir)

    manifest = storage.read_json(f"{dataset_dir}/manifest.json")
    assert manifest["shards"] == "../../ingest/web" and manifest["capfilt"] == "../capfilt"
    assert read_manifest(dataset_dir).shards.rstrip("/") == shards_url.rstrip("/")

    stream = bootstrapped_stream(dataset_dir, transform=EVAL, images_per_unit=2, shuffle_buffer=4)
    got = []
    for rank in range(2):  # and split over 2 ranks x 2 workers, still every pair once
        s = bootstrapped_stream(
            dataset_dir, transform=EVAL, images_per_unit=2, shuffle_buffer=4, rank=rank, world_size=2
        )
        got += run(s, num_workers=2)
    expected = Counter((f"human:coco_{i}", c, "human") for i, (caps, _) in enumerate(human.values()) for c in caps)
    expected += Counter(
        (f"web:{r['key']}", r["text"], r["source"])
        for r in rows
        if r["keep"] and r["key"] in truth and r["key"] != key_of(2, 1)
    )
    assert Counter((iid, text, src) for _, text, iid, src, _ in got) == expected
    images = {f"web:{k}": t["image"] for k, t in truth.items()}
    images.update({f"human:coco_{i}": data for i, (_, data) in enumerate(human.values())})
    for _, _, iid, _, image in got:
        assert torch.allclose(image, image_of(images[iid]))
    # Bad rows were counted, not fatal: the corrupt image's kept texts and the row whose image is missing.
    list(stream)
    kept_for_corrupt = sum(r["keep"] for r in rows if r["key"] == key_of(2, 1))
    assert stream.stats()["corrupt"] == kept_for_corrupt and stream.stats()["missing"] == 1


def test_manifest_locations_resolve_relative_to_the_manifest():
    base = "s3://bucket/run/round=1/dataset"
    assert relativize(base, "s3://bucket/run/ingest/web") == "../../ingest/web"
    assert resolve(base, "../../ingest/web") == "s3://bucket/run/ingest/web"
    assert relativize(base, "s3://other/x") == "s3://other/x"
    assert resolve("/data/run/round=0/dataset", "../capfilt") == "/data/run/round=0/capfilt"
    assert resolve(base, "/abs/path") == "/abs/path"


@pytest.mark.parametrize("where", ["at a header", "in a header", "in a member's data"])
def test_a_shard_cut_anywhere_inside_a_block_raises_after_its_whole_samples(tmp_path, where):
    """tarfile itself ends quietly when the file stops at or inside a header (the test's 60% cut of a shard lands on
    a block boundary); iter_shard must still report the cut (the CapFilt stage records it as a shard error) and never
    yield the sample the cut broke."""
    import io
    import tarfile

    from pipelines.shards import iter_shard

    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            for ext, data in (("jpg", jpeg((i, 0, 0))), ("txt", f"caption {i}".encode())):
                offsets.append(buf.tell())  # where this member's header starts
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    txt2 = offsets[5]  # the header of sample 2's text
    cut = {"at a header": txt2, "in a header": txt2 + 100, "in a member's data": txt2 + 512 + 3}[where]
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[:cut])
    got = []
    with pytest.raises(tarfile.ReadError):
        for sample in iter_shard(str(path)):
            got.append(sample.key)
    assert got == ["00000", "00001"]
    (tmp_path / "whole.tar").write_bytes(whole)
    assert [s.key for s in iter_shard(str(tmp_path / "whole.tar"))] == ["00000", "00001", "00002", "00003"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_sort_shard_puts_samples_in_key_order_once_and_keeps_every_member(tmp_path, where):
    """img2dataset writes samples as their downloads finish; sort_shard rewrites the tar (and its Parquet) in key
    order with every member's bytes and header, and leaves a shard already in order untouched."""
    import io
    import tarfile

    from pipelines.shards import sort_shard

    base = str(tmp_path) if where == "local" else memory_url()
    fs, root = storage.filesystem(base)
    order = ["000000003", "000000000", "000000002", "000000001"]  # download-completion order
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in order:
            for ext, data in (
                ("jpg", jpeg((int(key), 0, 0))),
                ("txt", f"caption {key}".encode()),
                ("json", f'{{"key": "{key}"}}'.encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000 + int(key)
                tar.addfile(info, io.BytesIO(data))
    tar_path, table_path = posixpath.join(root, "00000.tar"), posixpath.join(root, "00000.parquet")
    fs.makedirs(root, exist_ok=True)
    with fs.open(tar_path, "wb") as f:
        f.write(buf.getvalue())
    rows = pa.table(
        {
            "url": [f"http://x/{k}" for k in order + ["000000004"]],
            "key": order + ["000000004"],
            "status": ["success"] * 4 + ["failed_to_download"],
        }
    )
    with fs.open(table_path, "wb") as f:
        pq.write_table(rows, f)
    url = storage.join(base, "00000.tar")

    before = {s.key: s for s in iter_shard(url)}
    assert sort_shard(url) is True
    after = list(iter_shard(url))
    assert [s.key for s in after] == sorted(order)
    assert all(
        s.image == before[s.key].image and s.text == before[s.key].text and s.meta == before[s.key].meta for s in after
    )
    with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f) as tar:
        members = tar.getmembers()
    assert [m.name for m in members][:3] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert {m.name: m.mtime for m in members}["000000003.txt"] == 1_700_000_003
    with fs.open(table_path, "rb") as f:
        table = pq.read_table(f)
    assert table.column("key").to_pylist() == sorted(order) + ["000000004"]
    assert table.column("url").to_pylist()[0] == "http://x/000000000"
    assert not fs.exists(tar_path + ".sorting")

    with fs.open(tar_path, "rb") as f:
        sorted_bytes = f.read()
    assert sort_shard(url) is False  # in order: not written again
    with fs.open(tar_path, "rb") as f:
        assert f.read() == sorted_bytes
