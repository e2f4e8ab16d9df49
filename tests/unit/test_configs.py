"""Every shipped config validates offline, and the real-data templates carry the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_core import BlipModel
from blip_core.tokenizer import BlipTokenizer
from pipelines.config import ConfigError, load_config
from pipelines.modeling import model_config

CONFIGS = Path(__file__).resolve().parents[2] / "flows" / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_config_validates(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.name == name.removesuffix(".yaml")


@pytest.mark.parametrize(
    "name,width,depth,pretrain_batch,pretrain_lr",
    [
        ("blip-base.yaml", 768, 12, 2880, 3e-4),
        ("blip-large.yaml", 1024, 24, 2400, 2e-4),
    ],
)
def test_real_data_templates_follow_the_paper_on_gpus(name, width, depth, pretrain_batch, pretrain_lr):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.world is None and cfg.ingest.url_list and cfg.human.train and cfg.human.test
    assert cfg.model.tokenizer == "bert-base-uncased"
    pre, cap, fil = cfg.train.pretrain, cfg.train.captioner, cfg.train.filter
    assert (pre.batch_size, pre.lr, pre.image_size, pre.warmup_steps, pre.epochs) == (
        pretrain_batch,
        pretrain_lr,
        224,
        3000,
        20,
    )
    assert pre.init == "scratch" and pre.weight_decay == 0.05
    assert (cap.image_size, cap.epochs, fil.image_size, fil.epochs) == (384, 5, 384, 6)
    assert all(job.use_gpu and job.bf16 for job in (pre, cap, fil))
    assert (cfg.capfilt.method, cfg.capfilt.top_p, cfg.capfilt.itm_threshold) == ("nucleus", 0.9, 0.5)
    assert cfg.capfilt.use_gpu and cfg.capfilt.captioner_pool.num_gpus == 1 and cfg.capfilt.filter_pool.num_gpus == 1
    assert cfg.eval.retrieval_k == 256 and cfg.eval.num_beams == 3
    # The architecture the template asks for, built on the meta device (no memory, no weights).
    tok = BlipTokenizer.bert_base_uncased()
    arch = model_config(cfg.model, tok, pre)
    assert (arch.vision.width, arch.vision.depth, arch.vision.patch_size, arch.vision.image_size) == (
        width,
        depth,
        16,
        224,
    )
    assert (arch.text.width, arch.text.depth, arch.text.vocab_size) == (768, 12, 30524)
    with torch.device("meta"):
        model = BlipModel(arch)
    params = sum(p.numel() for n, p in model.named_parameters() if "_m." not in n and not n.endswith("_m"))
    assert params > (200e6 if width == 768 else 400e6), params


def test_a_bad_template_edit_names_the_field(tmp_path):
    text = (CONFIGS / "blip-base.yaml").read_text().replace("  batch_size: 2880", "  batch_size: lots", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("    batch_size: 2880", "    batch_size: lots"))
    with pytest.raises(ConfigError, match=r"train\.pretrain\.batch_size"):
        load_config(str(bad))


def test_the_curate_template_uses_released_checkpoints_on_gpus():
    cfg = load_config(str(CONFIGS / "curate-blip-base.yaml"))
    cc = cfg.capfilt
    assert cfg.flow.mode == "curate" and cfg.pretrained_rounds == []
    assert cfg.world is None and cfg.ingest.url_list and cfg.human.train is None  # no human set needed
    assert cc.captioner.endswith("model_base_caption_capfilt_large.pth") and cc.filter.endswith(".pth")
    assert (cc.image_size, cc.amp, cc.use_gpu) == (384, "bf16", True)
    assert (cc.method, cc.top_p, cc.num_samples, cc.itm_threshold) == ("nucleus", 0.9, 1, 0.5)
    for pool in (cc.captioner_pool, cc.filter_pool):
        assert pool.num_gpus == 1 and pool.batch_size >= cc.model_batch_size


TINY = str(CONFIGS / "tiny.yaml")
RELEASED = ["train.captioner.init=/ckpt/model_base_caption.pth", "train.filter.init=/ckpt/blip-itm-base-coco"]


@pytest.mark.parametrize(
    "overrides,rounds",
    [
        ([], [1, 2]),  # the paper's loop: round 1 pre-trains on the web data, round 2 on the bootstrapped data
        (["flow.rounds=2"], [1, 2, 3]),
        (RELEASED[:1], [1, 2]),  # the filter still fine-tunes round 1's pre-trained model
        (RELEASED, [2]),  # both fine-tunes start from released checkpoints: round 1 is not pre-trained
        ([*RELEASED, "flow.rounds=2"], [2, 3]),
        (["flow.mode=curate", "capfilt.captioner=/c.pth", "capfilt.filter=/f.pth"], []),
    ],
)
def test_which_rounds_the_flow_pretrains(overrides, rounds):
    assert load_config(TINY, overrides).pretrained_rounds == rounds


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["flow.mode=curate"], "curate needs capfilt.captioner and capfilt.filter"),
        (["flow.mode=curate", "capfilt.captioner=/c.pth"], "curate needs capfilt.filter"),
        (["flow.mode=curate", "capfilt.captioner=/c", "capfilt.filter=/f", "flow.rounds=2"], "runs one round"),
        ([*RELEASED, "train.pretrain.init=previous"], "round 1 is not pre-trained"),
        (["flow.mode=train"], "flow.mode"),
    ],
)
def test_flow_settings_that_cannot_run_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_only_bootstrap_needs_a_human_set_on_real_data():
    real = ["world=null", "ingest.url_list=/lists/urls.parquet"]
    with pytest.raises(ConfigError, match="human.train and human.test are required"):
        load_config(TINY, real)
    cfg = load_config(TINY, [*real, "flow.mode=curate", "capfilt.captioner=/c.pth", "capfilt.filter=/f"])
    assert cfg.human.train is None
