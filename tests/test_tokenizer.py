"""Tokenizer: training, BOS/EOS/PAD layout, truncation, decode, save/load, foreign tokenizer.json."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from finealign.data.tokenizer import Tokenizer

CAPTIONS = ["A red circle left of a blue square", "two green triangles above a yellow star",
            "a small purple square", "the Big Red Circle is right of the square"] * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CAPTIONS, vocab_size=300)


def test_special_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert 260 <= tok.vocab_size <= 300


def test_layout_and_round_trip(tok):
    texts = ["A red circle", "  two   GREEN triangles above a yellow star  "]
    ids, mask = tok.encode_batch(texts, context_length=64)
    assert ids.shape == mask.shape == (2, 64) and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and m[:n].all() and not m[n:].any()
        assert tok.eos_id not in row[1:n - 1].tolist()
    assert [tok.decode(r) for r in ids] == ["a red circle", "two green triangles above a yellow star"]
    # lower-casing lives in the normalizer: raw and lower-cased text encode identically
    assert torch.equal(tok.encode_batch(["The BIG Red circle"], 16)[0],
                       tok.encode_batch(["the big red circle"], 16)[0])


def test_truncation_keeps_eos(tok):
    long = " ".join(["a red circle left of a blue square"] * 5)
    ids, mask = tok.encode_batch([long], context_length=8)
    assert mask.all()
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert tok.eos_id not in ids[0, 1:-1].tolist()
    full = tok.tokenize([long])[0]
    assert ids[0, 1:-1].tolist() == full[:6]
    with pytest.raises(ValueError):
        tok.encode_batch(["x"], context_length=1)


def test_decode_stops_at_eos_and_skips_specials(tok):
    ids, _ = tok.encode_batch(["a blue square"], 12)
    row = ids[0].tolist()
    n = row.index(tok.eos_id)
    junk = tok.encode_batch(["yellow star"], 12)[0][0, 1:4].tolist()
    assert tok.decode(row[:n + 1] + junk) == "a blue square"        # stops at EOS
    assert tok.decode([tok.pad_id] + row[1:n]) == "a blue square"    # no BOS, pad skipped
    assert tok.decode(row[1:n]) == "a blue square"                   # no BOS: the first word stays
    assert tok.decode([]) == ""


def test_save_load_identical(tok, tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tok.save(path)
    again = Tokenizer.load(path)
    texts = ["A Red circle left of a blue square", "unseen words: zebra!"]
    a, am = tok.encode_batch(texts, 20)
    b, bm = again.encode_batch(texts, 20)
    assert torch.equal(a, b) and torch.equal(am, bm)
    assert again.vocab_size == tok.vocab_size
    assert Tokenizer.load(tmp_path / "tok").pad_id == tok.pad_id   # a directory works too
    s = Tokenizer.from_str(tok.to_str())
    assert torch.equal(s.encode_batch(texts, 20)[0], a)


def test_load_foreign_names_and_error(tmp_path):
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "red": 4, "circle": 5}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["[PAD]", "[CLS]", "[SEP]", "[UNK]"])
    hf.save(str(tmp_path / "bert.json"))
    t = Tokenizer.load(tmp_path / "bert.json")
    assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
    ids, mask = t.encode_batch(["red circle"], 6)
    assert ids[0].tolist() == [1, 4, 5, 2, 0, 0] and mask[0].tolist() == [True] * 4 + [False] * 2

    bare = HFTokenizer(models.WordLevel({"red": 0, "x": 1}, unk_token="x"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="no pad token"):
        Tokenizer.load(tmp_path / "bare.json")
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
