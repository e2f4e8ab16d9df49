"""The training jobs' pure parts: config, schedule, batches, frozen parameters, metrics, retrieval, job inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from blip_core import BlipConfig, BlipLosses, BlipModel, BlipTokenizer
from pipelines import storage
from pipelines.config import ConfigError, load_config, validate_config
from pipelines.modeling import ensure_tokenizer, human_set
from pipelines.optim import build_optimizer, build_scheduler, lr_at
from pipelines.sources import Sample
from pipelines.train.data import Collate, image_key, pre_caption
from pipelines.train.logs import MetricsLog
from pipelines.train.losses import SeparateLMLosses, freeze_unused
from pipelines.train.metrics import itc_retrieval_metrics
from pipelines.train.spec import ROLES, TrainError, resolve_job

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "flows" / "configs" / "tiny.yaml")


# ------------------------------------------------------------------------------------------------- config
def test_train_defaults_are_the_papers():
    cfg = validate_config({"world": {"size": "tiny"}})
    pre, cap, fil = cfg.train.pretrain, cfg.train.captioner, cfg.train.filter
    assert (pre.lr, pre.warmup_lr, pre.warmup_steps, pre.weight_decay, pre.image_size) == (2e-4, 1e-6, 3000, 0.05, 224)
    assert (pre.batch_size, pre.epochs, pre.init) == (2880, 20, "scratch")
    for job in (cap, fil):
        assert (job.lr, job.weight_decay, job.image_size, job.batch_size, job.init) == (
            1e-5,
            0.05,
            384,
            256,
            "pretrain",
        )
    assert (cap.epochs, fil.epochs) == (5, 6)


def test_train_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.pretrain: .*batch_size \(30\) must be divisible by workers \(4\)"):
        load_config(TINY, ["train.pretrain.batch_size=30", "train.pretrain.workers=4"])
    with pytest.raises(ConfigError, match=r"train\.filter\.learning_rate: unknown (field|key)"):
        load_config(TINY, ["train.filter.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"train\.captioner\.lr"):
        load_config(TINY, ["train.captioner.lr=-1"])
    cfg = load_config(TINY, ["train.captioner.lr=3e-5", "train.filter.max_steps=7"])
    assert cfg.train.captioner.lr == 3e-5 and cfg.train.filter.max_steps == 7


def test_the_shared_job_takes_the_captioners_settings_unless_it_sets_its_own():
    cfg = load_config(TINY, ["train.captioner.lr=3e-4", "train.captioner.epochs=4"])
    assert cfg.train.shared.model_dump() == cfg.train.captioner.model_dump()
    cfg = load_config(TINY, ["train.captioner.lr=3e-4", "train.shared.epochs=2"])
    assert (cfg.train.shared.lr, cfg.train.shared.epochs) == (3e-4, 2) and cfg.train.captioner.epochs != 2
    assert validate_config(cfg.model_dump()) == cfg  # the merged job survives the trip to the Ray workers
    # Checked as merged: the captioner's batch size, the shared job's workers.
    with pytest.raises(ConfigError, match=r"train\.shared: .*batch_size \(24\) must be divisible by workers \(5\)"):
        load_config(TINY, ["train.captioner.batch_size=24", "train.shared.workers=5"])
    with pytest.raises(ConfigError, match=r"train\.shared\.learning_rate: unknown"):
        load_config(TINY, ["train.shared.learning_rate=1"])
    assert "shared" in ROLES
    assert validate_config({"world": {"size": "tiny"}}).train.shared.epochs == 5  # the captioner's default


def test_tiny_config_trains_with_two_workers_and_without_flips():
    cfg = load_config(TINY)
    for job in (cfg.train.pretrain, cfg.train.captioner, cfg.train.filter):
        assert job.workers == 2 and not job.hflip and job.image_size == 64
    assert cfg.model.tokenizer == "train"


# ----------------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1e-3, total_steps=110, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(5, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    after = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(500, **kw) == pytest.approx(1e-5)  # past the end it stays at the floor


def test_scheduler_follows_lr_at_and_restores_from_its_state():
    kw = dict(lr=2e-4, total_steps=50, warmup_steps=5, warmup_lr=1e-6, min_lr=1e-6)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([w], lr=2e-4, weight_decay=0.05)
    sched = build_scheduler(opt, **kw)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, **kw) for s in range(20)])
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(3))], lr=2e-4, weight_decay=0.05)
    sched2 = build_scheduler(opt2, **kw)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr()[0] == pytest.approx(lr_at(20, **kw))
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_optimizer_refuses_nothing_to_train():
    with pytest.raises(ValueError, match="nothing to optimise"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], lr=1e-3, weight_decay=0.05)


# ------------------------------------------------------------------------------------------------ batches
def _tiny_model() -> BlipModel:
    tok = BlipTokenizer.train(["a red circle on the left", "two blue squares", "a picture of a star"], vocab_size=80)
    cfg = BlipConfig.preset("tiny", text=tok.special_ids())
    torch.manual_seed(0)
    return BlipModel(cfg, tok)


def test_collate_prefixes_the_prompt_and_hashes_image_ids_stably():
    model = _tiny_model()
    samples = [
        Sample(image=torch.zeros(3, 64, 64), text=t, key=k, image_id=i, source="human")
        for t, k, i in [
            ("A red circle.", "a", "human:1"),
            ("two  blue squares", "b", "human:1"),
            ("a star", "c", "web:7"),
        ]
    ]
    batch = Collate(model.tokenizer, 20, prompt="a picture of ")(samples)
    assert batch["images"].shape == (3, 3, 64, 64)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 3
    ids = batch["image_ids"].tolist()
    assert ids[0] == ids[1] != ids[2] and ids[0] == image_key("human:1")
    text = model.tokenizer.decode(batch["input_ids"][0].tolist())
    assert text.startswith("a picture of") and "." not in text
    assert pre_caption('a "red" circle.  (left)') == "a red circle left"


def test_the_shared_job_trains_lm_on_the_prompted_caption_and_itc_itm_on_the_caption_alone():
    model = _tiny_model()
    samples = [
        Sample(image=torch.rand(3, 64, 64), text=t, key=str(i), image_id=f"human:{i}", source="human")
        for i, t in enumerate(["a red circle", "two blue squares", "a star", "a red circle on the left"])
    ]
    batch = Collate(model.tokenizer, 20, prompt="a picture of ", separate_lm=True)(samples)
    decode = model.tokenizer.decode
    assert decode(batch["input_ids"][0].tolist()) == "a red circle"
    assert decode(batch["lm_input_ids"][0].tolist()) == "a picture of a red circle"
    prompt_length = model.tokenizer(["a picture of "], add_sep=False)[0].shape[1]

    # One forward of the wrapper = LM on the prompted text and ITC + ITM on the plain text, one backward.
    a, b = BlipLosses(model), BlipLosses(_tiny_model())
    kw = dict(image_ids=batch["image_ids"], alpha=0.4)
    torch.manual_seed(1)
    out = SeparateLMLosses(a)(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        lm_input_ids=batch["lm_input_ids"],
        lm_attention_mask=batch["lm_attention_mask"],
        objectives=("itc", "itm", "lm"),
        prompt_length=prompt_length,
        **kw,
    )
    torch.manual_seed(1)
    ref = b(
        batch["images"],
        batch["lm_input_ids"],
        batch["lm_attention_mask"],
        objectives=("lm",),
        prompt_length=prompt_length,
        **kw,
    )
    ref.update(b(batch["images"], batch["input_ids"], batch["attention_mask"], objectives=("itc", "itm"), **kw))
    assert set(out) == {"itc", "itm", "lm"}
    for k in out:
        assert torch.allclose(out[k], ref[k]), k
    sum(out.values()).backward()
    assert model.itm_head.weight.grad is not None and model.text_proj.weight.grad is not None


def test_unused_parameters_are_frozen_per_objective():
    def frozen(objectives):
        m = _tiny_model()
        freeze_unused(m, objectives)
        return {n for n, p in m.named_parameters() if not p.requires_grad}

    assert frozen(("itc", "itm", "lm")) == set()
    cap = frozen(("lm",))
    assert {"itm_head.weight", "text_proj.weight", "vision_proj.weight", "temp"} <= cap
    assert not any(n.startswith("vision.") for n in cap)  # the captioner trains its image encoder
    fil = frozen(("itc", "itm"))
    assert "itm_head.weight" not in fil and "temp" not in fil and fil  # the decoder's own parts are frozen
    assert not fil & cap  # what one role freezes, the other trains


# ------------------------------------------------------------------------------------------- evaluation
def test_itc_retrieval_metrics_count_rank_one_and_five():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 0, 1, 2, 3, 3]]  # six captions, owners 0 0 1 2 3 3
    owner = torch.tensor([0, 0, 1, 2, 3, 3])
    m = itc_retrieval_metrics(img, torch.arange(4), txt, owner)
    assert m["t2i_r1"] == 100.0 and m["i2t_r1"] == 100.0 and (m["images"], m["texts"]) == (4, 6)
    wrong = itc_retrieval_metrics(img, torch.arange(4), torch.eye(4)[[1, 1, 2, 3, 0, 0]], owner)
    assert wrong["t2i_r1"] == 0.0 and wrong["i2t_r1"] == 0.0
    assert wrong["t2i_r5"] == 100.0  # four images: everything is in the top 5


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_log_keeps_rows_up_to_the_resumed_step(tmp_path):
    url = str(tmp_path / "job" / "metrics.jsonl")
    log = MetricsLog(url)
    for step in (5, 10, 15, 20):
        log.append({"kind": "train", "step": step, "epoch": 0, "loss": 1.0 / step})
    log.append({"kind": "eval", "step": 20, "t2i_r1": 1.0})
    lines = Path(url).read_text().splitlines()
    assert len(lines) == 5
    with open(url, "a") as f:
        f.write('{"kind": "train", "st')  # a line cut by a kill
    resumed = MetricsLog(url, keep_through=10)
    assert [r["step"] for r in resumed.rows] == [5, 10]
    fresh = MetricsLog(url)  # a job that never checkpointed starts over
    fresh.flush()
    assert Path(url).read_text() == ""


# --------------------------------------------------------------------------------------------- job inputs
def _fake_world(root: Path) -> None:
    world = root / "world"
    (world / "images").mkdir(parents=True)
    ann = [
        {"image": "human/000000.jpg", "caption": "a red circle", "image_id": "h0"},
        {"image": "human/000000.jpg", "caption": "a big red circle", "image_id": "h0"},
    ]
    (world / "human_train.json").write_text(json.dumps(ann))
    (world / "human_test.json").write_text(json.dumps([{"image": "t.jpg", "caption": ["x"], "image_id": "t"}]))


def test_a_relative_root_reaches_the_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Ray Train runs each worker in a directory of its own, so a relative root (``make demo``'s runs/demo) must
    reach the job spec resolved against the driver's directory, the trained tokenizer and the human set included."""
    root = tmp_path / "run"
    _fake_world(root)
    storage.commit(str(root / "ingest" / "web"))
    (root / "tokenizer").mkdir()
    storage.commit(str(root / "tokenizer"))
    monkeypatch.chdir(tmp_path)
    spec = resolve_job(load_config(TINY, ["model.tokenizer=train"]), "run", 1, "pretrain")
    assert spec.root == spec.job_dir.rsplit("/round=", 1)[0] == str(root)
    assert spec.tokenizer == str(root / "tokenizer")
    assert spec.test["ann"] == str(root / "world" / "human_test.json")
    assert spec.sources == [
        {"kind": "shards", "url": str(root / "ingest" / "web")},
        {
            "kind": "karpathy",
            "ann": str(root / "world" / "human_train.json"),
            "image_root": str(root / "world" / "images"),
        },
    ]


def test_jobs_refuse_to_start_without_their_inputs(tmp_path):
    root = tmp_path / "run"
    _fake_world(root)
    cfg = load_config(TINY, ["model.tokenizer=bert-base-uncased"])
    with pytest.raises(TrainError, match="capfilt ingest"):
        resolve_job(cfg, str(root), 1, "pretrain")
    with pytest.raises(TrainError, match=r"round=1/dataset.*capfilt assemble --round 1"):
        resolve_job(cfg, str(root), 2, "pretrain")
    with pytest.raises(TrainError, match=r"capfilt pretrain --round 1"):
        resolve_job(cfg, str(root), 1, "captioner")
    with pytest.raises(TrainError, match="rounds count from 1"):
        resolve_job(cfg, str(root), 0, "filter")
    with pytest.raises(TrainError, match="no checkpoint at"):
        resolve_job(load_config(TINY, ["train.filter.init=/nowhere/model"]), str(root), 1, "filter")
    storage.commit(str(root / "ingest" / "web"))
    spec = resolve_job(cfg, str(root), 1, "pretrain")
    assert [s["kind"] for s in spec.sources] == ["shards", "karpathy"]
    assert spec.init == "scratch" and spec.tokenizer == "bert-base-uncased"
    assert spec.test["ann"].endswith("world/human_test.json")
    storage.commit(str(root / "round=1" / "pretrain"))
    fil = resolve_job(cfg, str(root), 1, "filter")
    assert fil.init.endswith("round=1/pretrain/model") and fil.sources[0]["kind"] == "karpathy"
    shared = resolve_job(cfg, str(root), 1, "shared")
    assert shared.init == fil.init and shared.sources == fil.sources and shared.objectives == ("itc", "itm", "lm")
    assert shared.job_dir.endswith("round=1/shared") and shared.train == cfg.train.shared
    assert fil.tokenizer is None  # a fine-tune takes its checkpoint's tokenizer
    storage.commit(str(root / "round=1" / "dataset"))
    nxt = resolve_job(cfg, str(root), 2, "pretrain")
    assert nxt.sources == [{"kind": "bootstrapped", "manifest": str(root / "round=1" / "dataset")}]


def test_a_trained_tokenizer_is_learned_once_per_run_root(tmp_path):
    root = tmp_path / "run"
    _fake_world(root)
    cfg = load_config(TINY)
    assert cfg.model.tokenizer == "train"
    url = ensure_tokenizer(cfg, str(root))
    assert storage.is_committed(url)
    first = (Path(url) / "tokenizer.json").read_bytes()
    assert ensure_tokenizer(cfg, str(root)) == url and (Path(url) / "tokenizer.json").read_bytes() == first
    tok = BlipTokenizer.from_pretrained(url)
    assert tok.decode(tok(["a big red circle"])[0][0].tolist()) == "a big red circle"


def test_human_set_defaults_to_the_world_and_needs_paths_without_one(tmp_path):
    cfg = load_config(TINY)
    h = human_set(cfg, "/r")
    assert h == {
        "train": "/r/world/human_train.json",
        "test": "/r/world/human_test.json",
        "image_root": "/r/world/images",
    }
    no_world = validate_config(
        {"world": None, "ingest": {"url_list": "u.parquet"}, "human": {"train": "a.json", "test": "b.json"}}
    )
    with pytest.raises(ValueError, match="human.image_root"):
        human_set(no_world, "/r")
    assert math.isfinite(lr_at(0, lr=1.0, total_steps=0))


def test_the_text_side_can_start_from_a_bert_directory():
    from safetensors.torch import load_file

    from blip_core.bert import text_config_from_bert
    from blip_core.tokenizer import minilm_dir
    from pipelines.modeling import build_model, model_config

    cfg = load_config(TINY, ["model.tokenizer=bert-base-uncased", f"model.init_text_from_bert={minilm_dir()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.train.pretrain, "scratch", "bert-base-uncased", cfg.model.init_text_from_bert)
    assert (model.config.text.width, model.config.text.depth) == (384, 6)  # the BERT's shape, not the preset's
    assert model.config.vision.width == 64  # the preset's image side
    bert = load_file(str(minilm_dir() / "model.safetensors"))
    word = next(v for k, v in bert.items() if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.text.embeddings.word.weight[:30522], word)
    small = BlipTokenizer.train(["a red circle"], vocab_size=64)
    with pytest.raises(ValueError, match="vocabulary"):
        model_config(cfg.model, small, cfg.train.pretrain, text_config_from_bert(minilm_dir()))


def test_a_released_checkpoint_starts_round_1_fine_tunes_and_later_rounds_fine_tune_their_own_pretrain(tmp_path):
    from pipelines.train.spec import _init, job_dir

    released = tmp_path / "model_base_caption_capfilt_large.pth"
    released.write_bytes(b"weights")
    root = str(tmp_path / "run")
    assert _init(str(released), root, 1, "captioner") == str(released)
    with pytest.raises(TrainError, match="round 2's pre-trained model"):
        _init(str(released), root, 2, "captioner")
    storage.commit(job_dir(root, 2, "pretrain"))
    assert _init(str(released), root, 2, "filter") == storage.join(job_dir(root, 2, "pretrain"), "model")
    assert _init(str(released), root, 2, "pretrain") == str(released)  # pre-training's own init is kept
