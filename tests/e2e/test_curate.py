"""`capfilt curate`: a URL list and released BLIP checkpoints -> the curated CapFilt Parquet, no training.

The README's "Real data quick start" as written: the shipped template `flows/configs/curate-blip-base.yaml` with
the user's own paths (`ingest.url_list`, `capfilt.captioner`, `capfilt.filter`), here a URL list of the tiny
synthetic world's images served on 127.0.0.1 (plus one dead URL), a tiny captioner in the official salesforce/BLIP
`.pth` layout and a tiny filter as a Hugging Face BLIP directory (tests/blip_checkpoints.py writes both); the
template's GPU settings are scaled down to this machine with `--set`. The flow must run ingest -> caption-filter ->
assemble -> report with those checkpoints and train nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from blip_checkpoints import hf_bert_tokenizer, hf_config, official_state, randomize, source_model

REPO = Path(__file__).resolve().parents[2]
CAPFILT = str(Path(sys.executable).parent / "capfilt")
TEMPLATE = "flows/configs/curate-blip-base.yaml"  # as the README says it, from the repository root
TINY = str(REPO / "flows/configs/tiny.yaml")
N_WEB = 40

# The template's GPU pools and sizes, scaled to 2 CPU cores and 64 px images.
ON_THIS_MACHINE = [
    "ingest.image_size=64",
    "ingest.shard_size=20",
    "ingest.processes=1",
    "ingest.threads=8",
    "ingest.retries=0",
    "ingest.min_image_size=10",
    "capfilt.image_size=64",
    "capfilt.use_gpu=false",
    "capfilt.model_batch_size=8",
    "capfilt.decode_num_cpus=0.25",
    "capfilt.captioner_pool={actors: 1, batch_size: 16, num_cpus: 0.5, num_gpus: 0}",
    "capfilt.filter_pool={actors: 1, batch_size: 16, num_cpus: 0.5, num_gpus: 0}",
]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return env


def write_released_checkpoints(directory: Path) -> tuple[Path, Path]:
    """A captioner as an official ``.pth`` and a filter as a Hugging Face directory (with its tokenizer files)."""
    from transformers import BlipForImageTextRetrieval

    captioner = directory / "model_base_caption_capfilt_large.pth"
    torch.save({"model": official_state(source_model(seed=0), "caption")}, captioner)
    filt = directory / "blip-itm-base-coco"
    torch.manual_seed(5)
    hf = BlipForImageTextRetrieval(hf_config(vocab_size=30524, bos=30522)).eval()
    randomize(hf, 5)
    hf.save_pretrained(filt)
    hf_bert_tokenizer().save_pretrained(filt)
    return captioner, filt


def _curate(root: Path, env: dict[str, str], *sets: str, timeout: float = 900) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [CAPFILT, "curate", "--config", TEMPLATE, "--root", str(root), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    from pipelines.config import load_config
    from pipelines.world import run_synth, serve_world, world_files

    base = tmp_path_factory.mktemp("curate")
    world_root = base / "world-run"
    run_synth(load_config(TINY, [f"world.n_web={N_WEB}", "world.n_human=3", "world.n_test=3"]), str(world_root))
    captioner, filt = write_released_checkpoints(base)
    web = pq.read_table(world_files(str(world_root / "world"))["web"], columns=["url", "caption"])
    with serve_world(str(world_root / "world")) as server:
        urls = [u.replace("{base}", server) for u in web["url"].to_pylist()] + [f"{server}/no-such-image.png"]
        url_list = base / "my-urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": web["caption"].to_pylist() + ["a dead link"]}), url_list)
        user_paths = [f"ingest.url_list={url_list}", f"capfilt.captioner={captioner}", f"capfilt.filter={filt}"]
        t0 = time.perf_counter()
        proc = _curate(base / "run", _env(base / "prefect-home"), *user_paths, *ON_THIS_MACHINE)
        seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    print(f"capfilt curate took {seconds:.0f} s")
    return {"root": base / "run", "captioner": captioner, "filter": filt, "stdout": proc.stdout}


def test_curate_runs_ingest_caption_filter_assemble_and_report_without_training(curated):
    root = curated["root"]
    for stage in ("ingest/web", "round=1/capfilt", "round=1/dataset"):
        assert (root / stage / "_COMMITTED").exists(), f"{stage} is not committed"
    html = (root / "round=1/eval/report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and 'id="kept-share"' in html
    # Nothing was trained or evaluated: no tokenizer, no job directories, no round 2, no evaluation.
    assert sorted(p.name for p in root.iterdir()) == ["ingest", "round=1"]
    assert sorted(p.name for p in (root / "round=1").iterdir()) == ["capfilt", "dataset", "eval"]
    assert [p.name for p in (root / "round=1/eval").iterdir()] == ["report.html"]

    dataset = json.loads((root / "round=1/dataset/summary.json").read_text())
    assert dataset["human"] == {"pairs": 0, "images": 0}  # the template has no human set
    assert dataset["web"]["total"] == N_WEB and dataset["synthetic"]["total"] == N_WEB
    assert json.loads((root / "round=1/dataset/manifest.json").read_text())["human"] is None
    out = curated["stdout"]
    assert f"images ingested: {N_WEB} of {N_WEB + 1}" in out, out
    assert str(curated["captioner"]) in out and str(curated["filter"]) in out
    assert "evaluation on the held-out set" not in out


def test_the_capfilt_rows_come_from_the_given_checkpoints(curated):
    from pipelines.capfilt.models import content_id

    files = sorted((curated["root"] / "round=1/capfilt").glob("part-*.parquet"))
    assert files
    for f in files:
        settings = json.loads(pq.read_metadata(f).metadata[b"capfilt.settings"])
        assert settings["captioner"] == str(curated["captioner"])
        assert settings["filter"] == str(curated["filter"])
        assert settings["captioner_id"] == content_id(str(curated["captioner"]))
        assert settings["filter_id"] == content_id(str(curated["filter"]))
        assert settings["image_sizes"] == [64, 64]  # both positional tables interpolated (32 and 48 px originals)
    table = pa.concat_tables(pq.read_table(f) for f in files)
    ok = table.filter(pc.equal(table["status"], "ok"))
    synthetic = ok.filter(pc.equal(ok["source"], "synthetic"))
    assert synthetic.num_rows == N_WEB
    assert all(t.strip() for t in synthetic["text"].to_pylist())  # decoded by the .pth's bert-base-uncased tokenizer
    scores = ok["itm_score"].to_pylist()
    assert len(scores) == 2 * N_WEB and all(0.0 <= s <= 1.0 for s in scores)


def test_curate_without_a_checkpoint_is_a_config_error(tmp_path):
    proc = _curate(tmp_path / "run", _env(tmp_path / "home"), "capfilt.filter=null", timeout=120)
    assert proc.returncode == 2
    assert "capfilt.filter" in proc.stderr and "curate" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, before Prefect or Ray start
    assert not (tmp_path / "run").exists(), "work started before the config was checked"


def test_the_deployment_takes_the_mode_as_a_parameter():
    from flows.bootstrap import capfilt

    mode = capfilt.parameters.model_dump()["properties"]["mode"]  # what `prefect deployment run -p mode=` checks
    assert mode["default"] is None  # unset: the config's flow.mode
    assert {"enum": ["bootstrap", "curate"], "type": "string"} in mode["anyOf"], mode
