"""Training with the run root on ``s3://`` (SeaweedFS on loopback): Ray Train's storage, checkpoints, metrics,
TensorBoard events and the model go to S3, and a fine-tune starts from a model it reads back from S3."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
from integration_helpers import TINY, capfilt

from pipelines import storage

pytestmark = pytest.mark.integration

SHORT = [
    "--set",
    "train.pretrain.max_steps=6",
    "--set",
    "train.pretrain.checkpoint_every_steps=3",
    "--set",
    "train.captioner.max_steps=4",
]


def test_pretrain_and_finetune_with_the_root_on_s3(s3_server, s3_root, tiny_world):
    fs = fsspec.filesystem("s3")
    base = s3_root.removeprefix("s3://")
    for name in ("world", "ingest"):  # the tiny world's inputs, uploaded as they are
        fs.put(str(Path(tiny_world) / name), f"{base}/{name}", recursive=True)
    fs.invalidate_cache()
    assert storage.is_committed(f"{s3_root}/ingest/web")

    proc, _ = capfilt("pretrain", "--config", TINY, "--root", s3_root, "--round", "1", *SHORT, env=s3_server.env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc, _ = capfilt(
        "finetune",
        "--config",
        TINY,
        "--root",
        s3_root,
        "--round",
        "1",
        "--role",
        "captioner",
        *SHORT,
        env=s3_server.env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    fs.invalidate_cache()
    for job, steps in (("pretrain", 6), ("captioner", 4)):
        job_dir = storage.RunRoot(s3_root).round(1, job)
        assert storage.is_committed(job_dir)
        jd = job_dir.removeprefix("s3://")
        rows = [json.loads(line) for line in fs.cat_file(f"{jd}/metrics.jsonl").decode().splitlines() if line]
        assert [r["step"] for r in rows if r["kind"] == "train"][-1] == steps
        assert fs.exists(f"{jd}/model/model.safetensors") and fs.exists(f"{jd}/eval.json")
        assert fs.glob(f"{jd}/ray_train/step_*/state.pt"), f"{job}: no Ray Train checkpoint on S3"
        assert fs.glob(f"{jd}/tensorboard/events.out.tfevents.*")
    assert storage.is_committed(f"{s3_root}/tokenizer")
    from pipelines.modeling import load_model

    model = load_model(storage.RunRoot(s3_root).round(1, "captioner") + "/model")
    assert model.tokenizer is not None
