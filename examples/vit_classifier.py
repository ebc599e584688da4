"""A Hugging Face ViT as a user would bring it: ``ViTForImageClassification`` built from a
``ViTConfig`` (nothing downloaded), trained by the user's own AdamW loop, the correct-class
margin explained.

The task: the ten Fashion-MNIST classes, 28x28 grey images cut into 16 patches of 7x7, read
offline from the IDX files of the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist), ``$TDATUNE_FASHION_MNIST_DIR`` or ``--data-dir``. Used by
``examples/selection_families.toml`` as the ViT family of the selection study::

    tdatune lambda --task examples.vit_classifier:vit_setting --out runs/vit --subsets 20

The setting is built like the built-in ones: the data is read only when the setting is built
(``Setting.build(seed=..., sizes=..., data_dir=...)``), training images a draw fixed by the
seed. The model's own forward is used (``model(pixel_values)``; the built-in cross-entropy and
margin read its ``.logits``). The CLS token and position embeddings are raw parameters,
differentiated per example by ``torch.func``; every other layer by tdatune's layer hooks.

AdamW decays the weights outside the loss, so its ``weight_decay`` is handed to the curvature
attributors as the L2 coefficient only approximately (as for the Hugging Face ``Trainer``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.base import ArrayDataset, Splits
from tdatune.data.cifar import FASHION_CLASSES, FASHION_DIR_DEFAULT, FASHION_DIR_ENV, FASHION_INSTALL
from tdatune.data.mnist import has_mnist_idx, load_mnist_idx
from tdatune.models.task import Task, make_task, model_state
from tdatune.models.training import TrainFunction, TrainResult
from tdatune.settings import Setting

SIZES = (1000, 100, 100)
IMAGE, PATCH = 28, 7
CLASSES = len(FASHION_CLASSES)
EPOCHS, LR, BATCH, WEIGHT_DECAY = 30, 3e-3, 32, 1e-2


def fashion_folder(data_dir: str | os.PathLike[str] | None) -> Path:
    """``data_dir``, else ``$TDATUNE_FASHION_MNIST_DIR`` or the Debian package's folder, with
    the command that installs the files when they are not there."""
    if data_dir is not None:
        return Path(data_dir)  # load_mnist_idx names any file missing there
    env = os.environ.get(FASHION_DIR_ENV)
    folder = Path(env) if env else Path(FASHION_DIR_DEFAULT)
    if not has_mnist_idx(folder):
        raise FileNotFoundError(
            f"vit-fmnist reads the four Fashion-MNIST IDX files from {folder}, which does not hold "
            f"them: install them with {FASHION_INSTALL} (as root), set ${FASHION_DIR_ENV} to a "
            "folder holding them, or pass --data-dir")
    return folder


def load_fashion(n_train: int = SIZES[0], n_val: int = SIZES[1], n_test: int = SIZES[2],
                 seed: int = 0, data_dir: str | os.PathLike[str] | None = None) -> Splits:
    """Images [n, 1, 28, 28] and labels of the ten classes: training images a draw fixed by
    ``seed`` from the 60,000, validation and test disjoint draws from the 10,000 test images;
    pixels standardised by the training draw's mean and standard deviation."""
    folder = fashion_folder(data_dir)
    (x_tr, y_tr), (x_te, y_te) = (load_mnist_idx(folder, split) for split in ("train", "test"))
    if n_train > len(x_tr) or n_val + n_test > len(x_te):
        raise ValueError(f"vit-fmnist: asked for {n_train} train and {n_val} + {n_test} val + "
                         f"test images; {folder} has {len(x_tr)} and {len(x_te)}")
    gen = torch.Generator().manual_seed(seed)
    train = torch.randperm(len(x_tr), generator=gen)[:n_train]
    held = torch.randperm(len(x_te), generator=gen)[: n_val + n_test]
    mean, std = float(x_tr[train].mean()), float(x_tr[train].std())

    def split(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> ArrayDataset:
        images = ((x[index] - mean) / std).reshape(-1, 1, IMAGE, IMAGE).contiguous()
        return ArrayDataset(images, y[index])

    return Splits(split(x_tr, y_tr, train), split(x_te, y_te, held[:n_val]),
                  split(x_te, y_te, held[n_val:]), name="fmnist",
                  source=f"real: Fashion-MNIST, 10 classes (from {folder})", num_classes=CLASSES,
                  info={"pixel_mean": mean, "pixel_std": std})


def vit(num_labels: int = CLASSES) -> nn.Module:
    """A two-layer ViT (hidden 32, two heads, 7x7 patches of a grey 28x28 image), from a config."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=1, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       num_labels=num_labels, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def vit_task(splits: Splits) -> Task:
    """The ViT over the splits' classes; cross-entropy, correct-class margin."""
    return make_task(partial(vit, splits.num_classes), "cross_entropy", "margin",
                     name="fmnist-vit")


def train_vit(data: ArrayDataset, seed: int, *, make_model: Callable[[], nn.Module],
              epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH,
              weight_decay: float = WEIGHT_DECAY) -> TrainResult:
    """The user's loop: AdamW on the mean cross-entropy of shuffled minibatches, the learning
    rate on a cosine schedule over all steps; one checkpoint per epoch. tdatune seeds torch
    with ``seed`` before the call, so the model's initialisation and the order are fixed."""
    model = make_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    states, history = [], []
    for epoch in range(epochs):
        running, count = 0.0, 0
        for x, y in loader:
            loss = F.cross_entropy(model(x).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running, count = running + float(loss.detach()) * len(y), count + len(y)
        states.append(model_state(model))
        history.append({"epoch": epoch, "train_loss": running / count})
    return TrainResult(state=states[-1], checkpoints=states, history=history)


def vit_training(epochs: int = EPOCHS) -> TrainFunction:
    """:func:`train_vit` as a tdatune training function, with the learning rate at the start
    of each epoch (the cosine schedule's, whatever the number of steps: TracIn's weights)."""
    rates = tuple(LR * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs))
    return TrainFunction(partial(train_vit, make_model=partial(vit, CLASSES)),
                         weight_decay=WEIGHT_DECAY, learning_rates=rates,
                         options={"epochs": epochs})


def vit_setting(epochs: int = EPOCHS) -> Setting:
    """``--task examples.vit_classifier:vit_setting``: Fashion-MNIST (10 classes) + tiny ViT
    trained with AdamW, 1000 / 100 / 100 images (``build(sizes=...)`` or a spec's ``sizes``
    for others; ``epochs`` shortens the training for tests)."""
    return Setting(
        name="vit-fmnist", description="Fashion-MNIST (10 classes) + 2-layer ViT, AdamW",
        data_source="real", sizes=SIZES, load=load_fashion, make_task=vit_task,
        recipe=vit_training(epochs),
        real_data=(f"the four Fashion-MNIST IDX files in --data-dir, ${FASHION_DIR_ENV} or "
                   f"{FASHION_DIR_DEFAULT} ({FASHION_INSTALL})"),
        notes=("ViTForImageClassification from a ViTConfig: 28x28x1 images, 7x7 patches, hidden "
               "32, 2 layers, 2 heads, no dropout; AdamW (lr 3e-3, cosine, weight decay 0.01, "
               f"batch {BATCH}, {EPOCHS} epochs) by the example's own loop"))
