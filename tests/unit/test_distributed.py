"""Two gloo ranks with half the batch each compute the ITC loss and queues of one process with the whole batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from blip_helpers import CORPUS, images, tiny_config

from blip_core import BlipLosses, BlipModel, BlipTokenizer

WORLD = 2
BATCH = 6  # whole batch; each rank takes BATCH // WORLD
TEXTS = CORPUS[:BATCH]
# step 1: every sample its own image (default ids); step 2: explicit ids with positives across the two ranks
STEP2_IDS = torch.tensor([40, 41, 42, 40, 43, 41])
GRADS = (
    "vision_proj.weight",
    "text_proj.weight",
    "temp",
    "text.encoder.0.self_attn.q.weight",
    "vision.patch_embed.proj.weight",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(losses: BlipLosses, imgs, ids, mask, rows: slice) -> dict:
    """Two ITC steps on ``rows`` of the batch (no optimiser: the momentum model and the queues still move)."""
    record = {}
    first = losses(imgs[rows], ids[rows], mask[rows], objectives=("itc",))["itc"]
    first.backward()
    record["loss1"] = first.detach()
    record["grads"] = {n: p.grad.clone() for n, p in losses.model.named_parameters() if n in GRADS}
    record["queues1"] = {k: getattr(losses, k).clone() for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}
    with torch.no_grad():
        second = losses(imgs[rows], ids[rows], mask[rows], image_ids=STEP2_IDS[rows], objectives=("itc",))["itc"]
    record["loss2"] = second
    record["queues2"] = {k: getattr(losses, k).clone() for k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}
    return record


def _build(config, state) -> BlipLosses:
    model = BlipModel(config)
    model.load_state_dict(state)  # as DDP broadcasts rank 0's weights; the queues are BlipLosses' own
    return BlipLosses(model).train()


def _rank_main(rank: int, port: int, config, state, imgs, ids, mask, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        losses = _build(config, state)
        b = BATCH // WORLD
        torch.save(_steps(losses, imgs, ids, mask, slice(rank * b, (rank + 1) * b)), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch and timm: about 10 s on 2 cores
def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    tokenizer = BlipTokenizer.train(CORPUS, vocab_size=120)
    config = tiny_config(tokenizer, queue_size=10)  # not a multiple of the world batch: wraps on step 2
    torch.manual_seed(0)
    state = BlipModel(config).state_dict()
    imgs = images(BATCH, seed=3)
    ids, mask = tokenizer(TEXTS)

    single = _steps(_build(config, state), imgs, ids, mask, slice(0, BATCH))

    mp.spawn(_rank_main, args=(_free_port(), config, state, imgs, ids, mask, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for step in ("loss1", "loss2"):
        mean = sum(r[step] for r in ranks) / WORLD
        torch.testing.assert_close(mean, single[step], rtol=1e-5, atol=1e-6, msg=step)
        assert not torch.isclose(ranks[0][step], ranks[1][step])  # the halves differ: the test is not vacuous
    for name in GRADS:  # what DDP's gradient averaging would apply
        mean = sum(r["grads"][name] for r in ranks) / WORLD
        torch.testing.assert_close(mean, single["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    for step in ("queues1", "queues2"):
        for key, value in single[step].items():
            assert torch.equal(ranks[0][step][key], ranks[1][step][key]), (step, key)
            torch.testing.assert_close(ranks[0][step][key], value, rtol=1e-5, atol=1e-6, msg=f"{step} {key}")
    assert single["queues1"]["idx_queue"][:BATCH].tolist() == list(range(BATCH))  # rank-major sample ids
    assert int(single["queues2"]["queue_ptr"]) == (2 * BATCH) % 10
