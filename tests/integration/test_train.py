"""Training jobs on a real local Ray with 2 Ray Train workers, on the tiny world: pre-training, the captioner and
the filter fine-tunes, resuming after a SIGKILL (with a worker crash on the way), and the distributed loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from integration_helpers import CAPFILT, REPO, TINY

from pipelines import storage
from pipelines.config import load_config
from pipelines.train import METRICS, RAY_DIR, first_step_losses, run_job
from pipelines.train.faults import FAULT_ENV

pytestmark = pytest.mark.integration

JOBS = ("pretrain", "captioner", "filter")
LOSSES = {"pretrain": ("itc", "itm", "lm"), "captioner": ("lm",), "filter": ("itc", "itm")}
TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "data_wait", "step_time_s", "peak_rss_mib")


def link_inputs(src_root: str, dst_root: Path, names: tuple[str, ...] = ("world", "ingest", "tokenizer")) -> str:
    """A new run root whose inputs are those of ``src_root`` (read-only), linked rather than copied."""
    dst_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(src_root) / name).exists():
            (dst_root / name).symlink_to(Path(src_root) / name, target_is_directory=True)
    return str(dst_root)


def _rows(job_dir: str, kind: str | None = "train") -> list[dict]:
    with open(Path(job_dir) / METRICS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


@pytest.fixture(scope="module")
def trained(tiny_world: str, ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The three jobs of round 1, run in-process one after the other, as the flow runs them."""
    root = link_inputs(tiny_world, tmp_path_factory.mktemp("train") / "run")
    cfg = load_config(TINY)
    out: dict = {"root": root, "summary": {}, "seconds": {}}
    for job in JOBS:
        t0 = time.time()
        out["summary"][job] = run_job(cfg, root, 1, job)
        out["seconds"][job] = time.time() - t0
    return out


def test_three_jobs_commit_models_that_load_and_whose_losses_fall(trained):
    from blip_core import BlipModel

    root = trained["root"]
    cfg = load_config(TINY)
    for job in JOBS:
        job_dir = storage.RunRoot(root).round(1, job)
        assert storage.is_committed(job_dir), job
        rows = _rows(job_dir)
        assert len(rows) >= 4, (job, rows)
        model = BlipModel.from_pretrained(Path(job_dir) / "model")
        for loss in LOSSES[job]:
            usable = rows
            if job == "filter" and loss == "itc":
                # A fine-tune's feature queue starts as random vectors (easy negatives for a trained model): the
                # windows with steps taken before real features filled it are not comparable with later ones.
                fill = math.ceil(model.config.queue_size / cfg.train.filter.batch_size)
                usable = [r for prev, r in zip([{"step": 0}, *rows], rows) if prev["step"] >= fill]
            window = max(1, len(usable) // 4)
            first = sum(r[loss] for r in usable[:window]) / window
            last = sum(r[loss] for r in usable[-window:]) / window
            if job == "filter" and loss == "itm":
                # The tiny filter's ITM starts (from pre-training) and stays near the class prior H(1/3) = 0.6365
                # (one positive, two hard negatives): tiny models do not learn grounding in ~40 steps. Not rising
                # is what can be asserted here; pre-training's ITM has to fall.
                assert last <= first + 0.005, f"{job}: {loss} went from {first:.4f} to {last:.4f}"
            else:
                assert last < first, f"{job}: {loss} went from {first:.4f} to {last:.4f} ({usable})"
        summary = trained["summary"][job]
        assert summary["final_step"] == rows[-1]["step"]
        assert (Path(job_dir) / "model" / "tokenizer.json").exists()
        assert model.config.vision.image_size == 64
        assert any((Path(job_dir) / RAY_DIR).glob("step_*/state.pt")), f"{job}: no Ray Train checkpoint"
        assert any((Path(job_dir) / "tensorboard").glob("events.out.tfevents.*")), f"{job}: no TensorBoard events"
    # the captioner writes text from its prompt; the fine-tunes are different models from the pre-trained one
    captioner = BlipModel.from_pretrained(Path(storage.RunRoot(root).round(1, "captioner")) / "model")
    import torch

    caption = captioner.generate(torch.zeros(1, 3, 64, 64), num_beams=1, max_length=12, min_length=3)[0]
    assert isinstance(caption, str) and caption
    ids = {trained["summary"][job]["model_id"] for job in JOBS}
    assert len(ids) == 3


def test_metrics_and_evaluation_have_the_documented_fields(trained):
    root = trained["root"]
    for job in JOBS:
        job_dir = storage.RunRoot(root).round(1, job)
        rows = _rows(job_dir)
        for r in rows:
            for field in (*TRAIN_FIELDS, *LOSSES[job]):
                assert field in r, (job, field, r)
            assert 0.0 <= r["data_wait"] <= 1.0 and r["samples_per_s"] > 0 and r["lr"] > 0
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)), f"{job}: steps repeat or go back: {steps}"
        evals = _rows(job_dir, "eval")
        assert len(evals) == 1 and evals[0]["step"] == steps[-1]
        with open(Path(job_dir) / "eval.json") as f:
            ev = json.load(f)
        metrics = ev["metrics"]
        if job == "captioner":
            assert metrics["caption_loss"] > 0 and metrics["caption_tokens"] > 0
        else:
            for k in ("t2i_r1", "i2t_r1", "t2i_r5", "i2t_r5"):
                assert 0.0 <= metrics[k] <= 100.0
            assert metrics["images"] == 40 and metrics["texts"] == 120  # the tiny world's held-out set
        assert ev["model_id"] == trained["summary"][job]["model_id"]
    # the schedule: warm-up, then a cosine down to min_lr
    lrs = [r["lr"] for r in _rows(storage.RunRoot(root).round(1, "pretrain"))]
    peak = max(lrs)
    assert lrs.index(peak) < len(lrs) // 3 and lrs[-1] < peak / 10


def test_rerunning_a_committed_job_is_a_no_op(trained):
    root = trained["root"]
    cfg = load_config(TINY)
    for job in JOBS:
        model = Path(storage.RunRoot(root).round(1, job)) / "model" / "model.safetensors"
        before = model.stat().st_mtime_ns
        t0 = time.time()
        summary = run_job(cfg, root, 1, job)
        assert time.time() - t0 < 2.0
        assert summary["model_id"] == trained["summary"][job]["model_id"]
        assert model.stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------ kill and resume
def _session_processes(sid: int) -> set[int]:
    """Every live process of a session (the group leader's session: Ray's actors get groups of their own)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.add(int(entry))
    return pids


def _checkpointed_steps(job_dir: Path) -> list[int]:
    snapshot = job_dir / RAY_DIR / "checkpoint_manager_snapshot.json"
    try:
        data = json.loads(snapshot.read_text())
    except (OSError, ValueError):
        return []
    return [r["metrics"]["step"] for r in data.get("checkpoint_results", [])]


def test_a_killed_pretraining_resumes_where_it_stopped(trained, tmp_path):
    """SIGKILL ``capfilt pretrain`` (its whole session: the CLI, its local Ray, the Ray Train workers) after the
    first checkpoint; the rerun resumes from it, survives a crashed worker (FailureConfig), and ends at the same
    step with the same weights as the uninterrupted run of the same config."""
    root = link_inputs(trained["root"], tmp_path / "run")
    job_dir = Path(storage.RunRoot(root).round(1, "pretrain"))
    reference = trained["summary"]["pretrain"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's run
    # Checkpoints every 10 steps (it changes no weight), so the kill comes early.
    cmd = [
        CAPFILT,
        "pretrain",
        "--config",
        TINY,
        "--root",
        root,
        "--round",
        "1",
        "--set",
        "train.pretrain.checkpoint_every_steps=10",
    ]
    log1 = tmp_path / "first.log"
    with open(log1, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    members: set[int] = set()
    try:
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None and not _checkpointed_steps(job_dir):
            members |= _session_processes(proc.pid)
            time.sleep(0.1)
        assert proc.poll() is None, f"capfilt pretrain ended before it was killed:\n{log1.read_text()[-3000:]}"
        assert _checkpointed_steps(job_dir), f"no checkpoint within the deadline:\n{log1.read_text()[-3000:]}"
        members |= _session_processes(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # Ray's actors sit in process groups of their own; without their raylet they exit within seconds.
        deadline = time.time() + 30
        while time.time() < deadline and _session_processes(proc.pid):
            time.sleep(0.5)
        leaked = _session_processes(proc.pid)
        for pid in leaked:  # clean up by pid whatever outlived the deadline, then fail below
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert len(members) > 5, members  # the CLI, gcs, raylet, controller, workers, ...
    assert not leaked, f"processes of the killed run outlived it: {sorted(leaked)}"
    assert not storage.is_committed(str(job_dir))
    killed_at = max(_checkpointed_steps(job_dir))
    assert 0 < killed_at < reference["final_step"]

    # The rerun: resumes from the checkpoint; one worker crashes later on and is restarted from a checkpoint.
    crash_at = min(killed_at + 15, reference["final_step"] - 1)
    marker = tmp_path / "crashed"
    env2 = {**env, FAULT_ENV: f"{crash_at}:1:{marker}"}
    rerun = subprocess.run(cmd, cwd=REPO, env=env2, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    assert marker.exists(), "the injected worker crash did not happen"
    assert storage.is_committed(str(job_dir))
    ev = json.loads((job_dir / "eval.json").read_text())
    assert ev["resumed_from_step"] is not None and ev["resumed_from_step"] >= killed_at
    assert ev["final_step"] == reference["final_step"]
    steps = [r["step"] for r in _rows(str(job_dir))]
    assert steps == sorted(set(steps)) and steps[-1] == reference["final_step"]
    from blip_core import BlipModel

    BlipModel.from_pretrained(job_dir / "model")
    # Same data order, same per-step random seeds, restored optimiser, scheduler and queues: the same weights.
    assert ev["model_id"] == reference["model_id"]


# ------------------------------------------------------------------------------------ distributed correctness
def test_two_workers_compute_the_first_step_itc_loss_of_one_on_the_same_global_batch(tiny_world, ray_session, tmp_path):
    root = link_inputs(tiny_world, tmp_path / "run")
    cfg = load_config(TINY)
    one = first_step_losses(cfg, root, 1, "pretrain", workers=1, batch_size=16, storage_path=str(tmp_path / "w1"))
    two = first_step_losses(cfg, root, 1, "pretrain", workers=2, batch_size=16, storage_path=str(tmp_path / "w2"))
    assert one["itc"] == pytest.approx(two["itc"], rel=1e-5, abs=1e-6), (one, two)
    assert one["lm"] == pytest.approx(two["lm"], rel=0.05)  # token-weighted per rank: close, not equal
