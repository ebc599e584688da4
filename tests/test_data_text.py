"""Byte-level BPE, blocks, the WikiText-2 loader on files written by the test, the KJV stand-in."""

from __future__ import annotations

import math

import pytest
import torch

from tdatune.data.text import (
    ByteBPE,
    kjv_text,
    load_text_splits,
    load_wikitext2,
    make_blocks,
    unigram_loss,
)

SAMPLE = (" = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a "
          "tactical role @-@ playing video game developed by Sega . The game began development "
          "in 2010 , carrying over a large portion of the work done on Valkyria Chronicles II . ")


def write_wikitext(directory, repeat=(40, 8, 8)):
    directory.mkdir(parents=True, exist_ok=True)
    for name, r in zip(("train", "valid", "test"), repeat, strict=True):
        (directory / f"wiki.{name}.tokens").write_text(SAMPLE * r, encoding="utf-8")


def test_bpe_round_trip_and_determinism():
    tok = ByteBPE.train(SAMPLE * 5, 300)
    assert tok.vocab_size == 300
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges compress
    assert ByteBPE.train(SAMPLE * 5, 300).merges == tok.merges
    again = ByteBPE.from_dict(tok.to_dict())
    assert again.encode("unseen wörds 123") == tok.encode("unseen wörds 123")
    assert again.decode(again.encode("unseen wörds 123")) == "unseen wörds 123"


def test_bpe_merges_most_frequent_pair_first():
    tok = ByteBPE.train("ab ab ab cd", 257)
    assert tok.merges == [(ord("a"), ord("b"))]
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        ByteBPE.train("x", 100)


def test_bpe_save_load(tmp_path):
    tok = ByteBPE.train(SAMPLE, 280)
    tok.save(tmp_path / "tok.json")
    assert ByteBPE.load(tmp_path / "tok.json").merges == tok.merges


def test_make_blocks_and_unigram():
    blocks = make_blocks(list(range(11)), 4)
    assert blocks.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]
    assert make_blocks([1, 2], 4).shape == (0, 5)
    uniform = unigram_loss(torch.arange(4), torch.tensor([0, 1]), 4)
    assert math.isclose(uniform, math.log(4))


def test_wikitext_loader_reads_written_files(tmp_path):
    write_wikitext(tmp_path / "wikitext-2")
    texts = load_wikitext2(tmp_path)
    assert texts["train"] == SAMPLE * 40 and texts["val"] == SAMPLE * 8
    splits = load_text_splits(20, 4, 4, seed=0, data_dir=tmp_path, block_len=8, vocab_size=300)
    assert splits.source.startswith("real: WikiText-2")
    assert splits.train.inputs.shape == (20, 8) and splits.train.inputs.dtype == torch.long
    assert torch.equal(splits.train.inputs[:, 1:], splits.train.targets[:, :-1])
    tok = ByteBPE.from_dict(splits.info["tokenizer"])
    assert tok.decode(splits.val.inputs[0].tolist()) in SAMPLE * 8
    assert splits.info["unigram_loss_val"] > 0


def test_wikitext_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens"):
        load_wikitext2(tmp_path / "missing")
    write_wikitext(tmp_path)
    (tmp_path / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"wiki\.valid\.tokens"):
        load_wikitext2(tmp_path)
    write_wikitext(tmp_path)
    (tmp_path / "wiki.valid.tokens").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_wikitext2(tmp_path)
    write_wikitext(tmp_path, repeat=(1, 1, 1))
    with pytest.raises(ValueError, match="blocks"):
        load_text_splits(500, 4, 4, data_dir=tmp_path, block_len=8, vocab_size=260)


def test_kjv_standin_is_clean_text():
    text = kjv_text()
    assert text.startswith("In the beginning God created the heaven and the earth.")
    assert "[" not in text and len(text) > 4_000_000
    splits = load_text_splits(16, 4, 4, seed=0, block_len=16, vocab_size=270, max_chars=20_000)
    assert splits.source.startswith("stand-in: King James Bible")
    every = torch.cat([splits.train.inputs, splits.val.inputs, splits.test.inputs])
    assert torch.unique(every, dim=0).shape[0] == 24
