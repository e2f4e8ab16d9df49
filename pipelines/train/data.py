"""A job's data: its stream and epoch plan, BLIP's caption clean-up, image keys and the collates."""

from __future__ import annotations

import re

import torch

from blip_core.transforms import train_transform

from ..bootstrapped import bootstrapped_sources
from ..config import TrainJob
from ..karpathy import KarpathySource, read_karpathy
from ..shards import list_shards
from ..sources import ShardSource, Source
from ..stream import ShardStream, derive_seed
from .spec import JobSpec, TrainError

_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_caption(text: str) -> str:
    """BLIP's caption clean-up (punctuation to spaces, one space between words); lower-casing is the
    tokenizer's job, and length is cut in tokens."""
    return " ".join(_PUNCT.sub(" ", text).split())


def image_key(image_id: str) -> int:
    """A stable int64 for an image id string (``web:000123``): equal on every rank, so positives agree."""
    return derive_seed("image", image_id)


class Collate:
    """Samples -> a batch: images stacked, ``prompt + caption`` tokenised, image ids hashed (runs in the
    DataLoader workers). ``separate_lm``: the prompted text goes to ``lm_input_ids`` / ``lm_attention_mask``
    and ``input_ids`` holds the caption alone, for a job that also trains ITC/ITM (the shared fine-tune)."""

    def __init__(self, tokenizer, max_length: int, prompt: str = "", separate_lm: bool = False):
        self.tokenizer, self.max_length, self.prompt = tokenizer, max_length, prompt
        self.separate_lm = separate_lm

    def __call__(self, samples: list) -> dict:
        captions = [pre_caption(s.text) for s in samples]
        lm_ids, lm_mask = self.tokenizer([self.prompt + c for c in captions], max_length=self.max_length)
        batch = {
            "images": torch.stack([s.image for s in samples]),
            "input_ids": lm_ids,
            "attention_mask": lm_mask,
            "image_ids": torch.tensor([image_key(s.image_id) for s in samples], dtype=torch.long),
        }
        if self.separate_lm:
            batch["input_ids"], batch["attention_mask"] = self.tokenizer(captions, max_length=self.max_length)
            batch["lm_input_ids"], batch["lm_attention_mask"] = lm_ids, lm_mask
        return batch


def eval_collate(items: list) -> tuple[torch.Tensor, list[list[str]], list[str]]:
    """Held-out items -> images stacked, each image's captions, image ids."""
    images, captions, ids = zip(*items)
    return torch.stack(images), [list(c) for c in captions], list(ids)


def build_sources(spec: JobSpec, n_slots: int) -> list[Source]:
    """The job's stream sources. The human set is cut into at least ~4 units per stream slot, so that every
    rank and DataLoader worker gets its own part of a small set rather than a padded copy of one unit."""
    sources: list[Source] = []
    for s in spec.sources:
        if s["kind"] == "shards":
            sources.append(ShardSource(list_shards(s["url"])))
        elif s["kind"] == "karpathy":
            entries = read_karpathy(s["ann"])
            per_unit = max(1, min(256, len(entries) // (4 * n_slots)))
            sources.append(KarpathySource(s["ann"], s["image_root"], images_per_unit=per_unit, entries=entries))
        elif s["kind"] == "bootstrapped":
            sources.extend(bootstrapped_sources(s["manifest"], images_per_unit=64))
        else:
            raise TrainError(f"unknown source kind {s['kind']!r}")
    return sources


def build_stream(spec: JobSpec, jc: TrainJob, rank: int, world: int) -> ShardStream:
    """This rank's shard of the job's stream, padded so that every rank runs the same number of steps."""
    return ShardStream(
        build_sources(spec, world * max(1, jc.dataloader_workers)),
        transform=train_transform(
            jc.image_size, hflip=jc.hflip, randaugment=jc.randaugment, random_crop=jc.random_crop
        ),
        seed=derive_seed(spec.seed, "data"),
        shuffle_buffer=jc.shuffle_buffer,
        rank=rank,
        world_size=world,
        balance="pad",
    )


def epoch_plan(
    stream: ShardStream, batch: int, num_workers: int, *, epochs: int, max_steps: int | None, job: str
) -> list[int]:
    """Steps of every epoch (the same on every rank): ``epochs`` of them, or as many as ``max_steps`` needs,
    the last one cut short."""
    plan: list[int] = []
    while True:
        e = len(plan)
        if max_steps is None and e >= epochs:
            break
        steps = stream.steps_per_epoch(batch, num_workers, epoch=e)
        if max_steps is not None:
            steps = min(steps, max_steps - sum(plan))
            if steps <= 0:
                break
        plan.append(steps)
    if not plan or sum(plan) == 0:
        raise TrainError(f"{job}: the stream has no data")
    return plan
