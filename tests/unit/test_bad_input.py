"""Bad input gets an error that names the problem: images, texts, configs, checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from blip_helpers import images, make_model, tiny_config, tokenizer  # noqa: F401  (fixtures)

from blip_core import BlipConfig, BlipLosses, BlipModel, BlipTokenizer


@pytest.fixture
def model(make_model):
    return make_model()


def _entry_points(model):
    """Every public way an image batch enters the model."""
    return {
        "encode_image": lambda x: model.encode_image(x),
        "itm_score": lambda x: model.itm_score(x, ["a red square"] * _n(x)),
        "itc_similarity": lambda x: model.itc_similarity(x, ["a red square"]),
        "generate": lambda x: model.generate(x, max_length=8, min_length=2),
        "losses": lambda x: BlipLosses(model)(x, *model.tokenize(["a red square"] * _n(x))),
    }


def _n(x) -> int:
    return len(x) if hasattr(x, "__len__") else 1


# --- images -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["encode_image", "itm_score", "itc_similarity", "generate", "losses"])
@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (images(2)[0], ValueError, r"\[B, 3, H, W\], got \[3, 32, 32\]"),
        (images(2)[:, :1], ValueError, r"\[B, 3, H, W\], got \[2, 1, 32, 32\]"),
        (images(2).permute(0, 2, 3, 1), ValueError, r"\[B, 3, H, W\], got \[2, 32, 32, 3\]"),
        ((images(2) * 50).clamp(0, 255).to(torch.uint8), TypeError, "normalised floats, got dtype torch.uint8"),
        (images(2, size=36), ValueError, r"multiples of the patch size 8, got \[36, 36\]"),
        (images(2)[:, :, :, :30], ValueError, r"multiples of the patch size 8, got \[32, 30\]"),
        (images(2).numpy(), TypeError, r"must be a torch.Tensor \[B, 3, H, W\], got ndarray"),
    ],
    ids=["no-batch", "one-channel", "channels-last", "uint8", "not-multiple", "not-multiple-width", "numpy"],
)
def test_bad_images_are_named(model, entry, bad, error, message):
    with pytest.raises(error, match=message):
        _entry_points(model)[entry](bad)


def test_other_float_dtypes_and_sizes_are_accepted(model):
    """float64 is converted; any multiple of the patch size works (positions are interpolated)."""
    x = images(2)
    torch.testing.assert_close(
        model.itm_score(x.double(), ["a red square"] * 2), model.itm_score(x, ["a red square"] * 2)
    )
    assert model.encode_image(images(1, size=48)).shape[1] == 1 + 6 * 6
    out = BlipLosses(model)(x.double(), *model.tokenize(["a red square", "a blue circle"]))
    assert all(torch.isfinite(v) for v in out.values())


# --- texts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts", [[""], ["   \n\t"]])
def test_empty_text_is_named(model, texts):
    with pytest.raises(ValueError, match=r"texts\[0\] is empty"):
        model.itm_score(images(1), texts)
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        model.itc_similarity(images(1), ["a red square"] + texts)


def test_texts_must_be_a_list_of_strings(model):
    with pytest.raises(TypeError, match="not one string"):
        model.itc_similarity(images(1), "a red square on the left")
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType"):
        model.itc_similarity(images(1), ["a red square", None])
    with pytest.raises(ValueError, match="one text per image: 2 images, 1 texts"):
        model.itm_score(images(2), ["a red square"])


def test_a_text_of_ten_thousand_characters_is_truncated(model):
    """Documented: longer texts are cut to ``max_text_length`` tokens (35, as BLIP), keeping [SEP] last."""
    words = ("a red square on the left and " * 400).split()
    long = " ".join(words)[:10_000]
    assert len(long) == 10_000
    ids, mask = model.tokenize([long, "a blue circle"])
    assert ids.shape == (2, model.max_text_length) and mask[0].all()
    assert ids[0, 0] == model.config.text.cls_token_id and ids[0, -1] == model.config.text.sep_token_id
    # the long text scores exactly as its first 33 words do (every word is one token here)
    head = " ".join(words[: model.max_text_length - 2])
    x = images(1)
    score = model.itm_score(x, [long])
    assert 0.0 <= score.item() <= 1.0
    torch.testing.assert_close(score, model.itm_score(x, [head]))
    torch.testing.assert_close(model.itc_similarity(x, [long]), model.itc_similarity(x, [head]))
    # one 10,000-character "word" is [UNK] (WordPiece's per-word limit), and still works
    ids, _ = model.tokenize(["x" * 10_000])
    assert ids[0].tolist() == [
        model.config.text.cls_token_id,
        model.tokenizer.token_id("[UNK]"),
        model.config.text.sep_token_id,
    ]
    assert torch.isfinite(model.itm_score(x, ["x" * 10_000])).all()


def test_sequences_beyond_the_position_table_are_named(model):
    limit = model.config.text.max_positions
    for kw in (dict(num_beams=1), dict(num_beams=3), dict(top_p=0.9, seeds=[0])):
        with pytest.raises(
            ValueError, match=f"max_length \\({limit + 5}\\) would exceed text.max_positions \\({limit}\\)"
        ):
            model.generate(images(1), max_length=limit + 5, **kw)
    too_long = torch.full((1, limit + 1), 7)
    with pytest.raises(ValueError, match=f"{limit + 1} token positions exceed text.max_positions \\({limit}\\)"):
        model.encode_text_ids(too_long)
    model.encode_text_ids(too_long[:, :limit])  # the whole table is usable


def test_loss_batch_mismatch_is_named(model):
    losses = BlipLosses(model)
    ids, mask = model.tokenize(["a red square"])
    with pytest.raises(ValueError, match="one text per image: 2 images"):
        losses(images(2), ids, mask)
    ids, mask = model.tokenize(["a red square", "a blue circle"])
    with pytest.raises(ValueError, match="one id per image: 2 images, 3 ids"):
        losses(images(2), ids, mask, image_ids=torch.tensor([0, 1, 2]))


def test_model_without_tokenizer_says_so(tokenizer):
    bare = BlipModel(tiny_config(tokenizer))
    with pytest.raises(RuntimeError, match="no tokenizer"):
        bare.itm_score(images(1), ["a red square"])
    with pytest.raises(RuntimeError, match="needs a tokenizer"):
        bare.generate(images(1))


# --- configs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"text": {"widht": 64}}, r"text\.widht: unknown key"),
        ({"vision": {"patch": 8}}, r"vision\.patch: unknown key"),
        ({"queue": 10}, r"queue: unknown key"),
        ({"text": {"width": "wide"}}, r"text\.width: .*integer"),
        ({"vision": {"depth": 2.5}}, r"vision\.depth"),
        ({"sharing": "most"}, r"sharing: .*'all'"),
        ({"momentum": 1.5}, r"momentum: .*less than or equal to 1"),
        ({"queue_size": -1}, r"queue_size"),
        ({"text": 5}, r"text: "),
        ({"prompt": 3}, r"prompt: .*string"),
        (
            {"vision": {"image_size": 30, "patch_size": 8}},
            r"vision\.image_size \(30\) must be a multiple of vision\.patch_size \(8\)",
        ),
        ({"text": {"width": 30, "heads": 4}}, r"text\.width \(30\) must be divisible by text\.heads \(4\)"),
        ({"text": {"vocab_size": 100}}, r"text\.cls_token_id \(101\) is outside the vocabulary \(size 100\)"),
    ],
)
def test_bad_config_names_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        BlipConfig.from_dict(data)


def test_preset_overrides_are_validated():
    with pytest.raises(ValueError, match=r"text\.widht: unknown key"):
        BlipConfig.preset("tiny", text={"widht": 8})
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*'base'"):
        BlipConfig.preset("huge")
    assert BlipConfig.preset("tiny", text={"depth": 1}).text.width == BlipConfig.preset("tiny").text.width


def test_tokenizer_and_config_must_agree(tokenizer):
    with pytest.raises(
        ValueError, match=f"tokenizer has {tokenizer.vocab_size} ids but config.text.vocab_size is 30524"
    ):
        BlipModel(BlipConfig.preset("tiny"), tokenizer)


# --- checkpoints -----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(model, tmp_path):
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _with_config(saved, tmp_path, name, change):
    other = tmp_path / name
    shutil.copytree(saved, other)
    meta = json.loads((other / "config.json").read_text())
    change(meta)
    (other / "config.json").write_text(json.dumps(meta))
    return other


def test_checkpoint_of_another_architecture(saved, tmp_path):
    wider = _with_config(saved, tmp_path, "wider", lambda m: m["config"]["text"].update(width=48, intermediate_size=96))
    with pytest.raises(
        ValueError,
        match=r"wider/model.safetensors does not match .*wider/config.json: size mismatch for text\.embeddings\.word\.weight: .*\(and \d+ more\)$",
    ):
        BlipModel.from_pretrained(wider)
    shallower = _with_config(saved, tmp_path, "shallow", lambda m: m["config"]["text"].update(depth=1))
    with pytest.raises(ValueError, match=r"shallow does not match its config: .*unexpected \['text\.decoder\.1"):
        BlipModel.from_pretrained(shallower)
    unshared = _with_config(saved, tmp_path, "unshared", lambda m: m["config"].update(sharing="none"))
    with pytest.raises(ValueError, match=r"unshared does not match its config: missing \['text\.decoder"):
        BlipModel.from_pretrained(unshared)
    typo = _with_config(saved, tmp_path, "typo", lambda m: m["config"]["text"].update(widht=32))
    with pytest.raises(ValueError, match=r"typo/config.json: .*text\.widht: unknown key"):
        BlipModel.from_pretrained(typo)
    newer = _with_config(saved, tmp_path, "newer", lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match="newer capfilt"):
        BlipModel.from_pretrained(newer)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="bert is not a BLIP checkpoint"):
        BlipModel.from_pretrained(bert)
    assert BlipModel.from_pretrained(saved).config.text.width == 32  # the original still loads


def test_broken_checkpoint_files(saved, tmp_path, tokenizer):
    not_json = tmp_path / "not_json"
    shutil.copytree(saved, not_json)
    (not_json / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not_json/config.json is not valid JSON"):
        BlipModel.from_pretrained(not_json)
    no_config = _with_config(saved, tmp_path, "no_config", lambda m: m.pop("config"))
    with pytest.raises(ValueError, match="no_config/config.json has no 'config' object"):
        BlipModel.from_pretrained(no_config)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no_weights has config.json but no model.safetensors"):
        BlipModel.from_pretrained(no_weights)
    garbage = tmp_path / "garbage"
    shutil.copytree(saved, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="garbage/model.safetensors does not match"):
        BlipModel.from_pretrained(garbage)
    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(saved, other_vocab)
    BlipTokenizer.train(["just a few words"], vocab_size=40).save_pretrained(other_vocab)
    with pytest.raises(
        ValueError, match=f"tokenizer has \\d+ ids but config.text.vocab_size is {tokenizer.vocab_size}"
    ):
        BlipModel.from_pretrained(other_vocab)


def test_missing_path(tmp_path):
    for missing in (tmp_path / "nothing", tmp_path / "nothing.pth"):
        with pytest.raises(FileNotFoundError, match=f"no checkpoint at {missing}"):
            BlipModel.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty is neither a checkpoint directory"):
        BlipModel.from_pretrained(empty)
    weights_only = tmp_path / "w.safetensors"
    weights_only.write_bytes(b"x")
    with pytest.raises(
        ValueError, match=r"w.safetensors is neither a checkpoint directory \(with config.json\) nor a .pth file"
    ):
        BlipModel.from_pretrained(weights_only)
