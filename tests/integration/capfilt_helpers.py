"""Helpers for the CapFilt integration tests: a tiny CLIP checkpoint, run roots that link another's inputs, and
process plumbing for the kill test. The tiny captioner and filter they run with are trained by
``benchmarks/_common.py`` (``train_models``, ``link_models``), which ``benchmarks/bench_capfilt.py`` shares.

A plain module (not a conftest) so test files say where their helpers come from.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from integration_helpers import CAPFILT, REPO


def tiny_clip_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A randomly initialised small open_clip model saved as safetensors, with its architecture's JSON config
    (open_clip has no architecture this small built in). Returns (config file, weights file)."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    name = "capfilt-tiny-clip"
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    cfg_path = directory / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = directory / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return cfg_path, weights


# --------------------------------------------------------------------------------------------- processes


def processes_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (``NAME=value``): everything a test's ``capfilt``
    process started, Ray's raylet, GCS and workers included (they inherit the environment; workers rename
    themselves, so command lines would not do)."""
    needle = marker.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            state = next(
                (ln for ln in Path(f"/proc/{entry}/status").read_text().splitlines() if ln.startswith("State:")), ""
            )
        except OSError:
            continue
        if "zombie" not in state:
            pids.append(int(entry))
    return pids


def start_capfilt(*args: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``capfilt ...`` in its own session (process group), so the test can SIGKILL all of it at once.
    ``env`` is the whole environment of the process."""
    with open(log_path, "wb") as logf:  # the child keeps its own descriptor
        return subprocess.Popen(
            [CAPFILT, *args], stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def link_inputs(src_root: str, dst_root: Path, names: tuple[str, ...] = ("world", "ingest")) -> str:
    """A new run root whose inputs are those of ``src_root`` (read-only), linked rather than copied."""
    dst_root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(src_root) / name).exists():
            (dst_root / name).symlink_to(Path(src_root) / name, target_is_directory=True)
    return str(dst_root)
