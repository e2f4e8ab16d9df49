import pytest
import torch

from blip_core import BlipTokenizer


@pytest.fixture(scope="module")
def bert():
    return BlipTokenizer.bert_base_uncased()


def test_bert_base_uncased_ids(bert):
    assert bert.vocab_size == 30524
    assert bert.token_id("[DEC]") == 30522
    assert bert.token_id("[ENC]") == 30523
    assert bert.special_ids() == {
        "vocab_size": 30524,
        "pad_token_id": 0,
        "cls_token_id": 101,
        "sep_token_id": 102,
        "bos_token_id": 30522,
        "enc_token_id": 30523,
    }


def test_encoding_matches_bert_wordpiece(bert):
    ids, mask = bert(["A picture of two red squares.", "hi"])
    # [CLS] a picture of two red squares . [SEP]  — bert-base-uncased ids
    assert ids[0].tolist() == [101, 1037, 3861, 1997, 2048, 2417, 14320, 1012, 102]
    assert ids[1].tolist()[:3] == [101, 7632, 102] and ids[1, 3:].eq(0).all()
    assert mask.sum(1).tolist() == [9, 3]
    assert bert.decode(ids[0].tolist()) == "a picture of two red squares."


def test_truncation_keeps_sep_last(bert):
    ids, mask = bert(["word " * 10_000], max_length=35)
    assert ids.shape == (1, 35) and ids[0, -1].item() == 102 and mask.all()


def test_rejects_a_single_string_and_non_strings(bert):
    with pytest.raises(TypeError, match="sequence of strings"):
        bert("a red circle")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        bert(["ok", None])


def test_trained_vocabulary_round_trip(tmp_path):
    captions = [
        f"a {c} {s} on the {p}"
        for c in ("red", "green", "blue")
        for s in ("circle", "square")
        for p in ("left", "right")
    ]
    tok = BlipTokenizer.train(captions * 5, vocab_size=200)
    ids = tok.special_ids()
    assert ids["bos_token_id"] == tok.vocab_size - 2 and ids["enc_token_id"] == tok.vocab_size - 1
    x, _ = tok(captions)
    assert (x[:, 0] == ids["cls_token_id"]).all()
    assert tok.decode_batch(x.tolist()) == captions
    tok.save_pretrained(tmp_path)
    again = BlipTokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert torch.equal(again(captions)[0], x)


def test_from_pretrained_reads_a_bert_vocab_dir(tmp_path, bert):
    from blip_core.tokenizer import bert_base_uncased_vocab

    (tmp_path / "vocab.txt").write_bytes(bert_base_uncased_vocab().read_bytes())
    tok = BlipTokenizer.from_pretrained(tmp_path)
    assert tok.vocab_size == 30524
    with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.txt"):
        BlipTokenizer.from_pretrained(tmp_path / "nothing")
