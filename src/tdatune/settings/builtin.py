"""The built-in settings. Importing this module registers them."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from tdatune.data.base import Splits
from tdatune.data.digits import load_digits_splits
from tdatune.data.mnist import load_mnist5k_splits
from tdatune.models.small import MLP, LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainRecipe
from tdatune.settings.registry import Setting, register


def _digits(n_train: int, n_val: int, n_test: int, seed: int, data_dir: str | Path | None) -> Splits:
    return load_digits_splits(n_train, n_val, n_test, seed)


def _mnist5k(n_train: int, n_val: int, n_test: int, seed: int, data_dir: str | Path | None) -> Splits:
    path = Path(data_dir) / "mnist_5k.csv.gz" if data_dir is not None else None
    return load_mnist5k_splits(n_train, n_val, n_test, seed, path=path)


def _lr_task(name: str) -> partial:
    def make(splits: Splits) -> Task:
        d = splits.train.inputs[0].numel()
        return Task(make_model=partial(LogisticRegression, d, splits.num_classes), name=name)
    return make


def _mlp_task(name: str, hidden: tuple[int, ...]):
    def make(splits: Splits) -> Task:
        d = splits.train.inputs[0].numel()
        return Task(make_model=partial(MLP, d, hidden, splits.num_classes), name=name)
    return make


LR_RECIPE = TrainRecipe(optimizer="lbfgs", epochs=5, lbfgs_iters=100, weight_decay=1e-3, lr=1.0)

register(Setting(
    name="digits-lr", description="scikit-learn digits + multinomial logistic regression",
    data_source="real", sizes=(1000, 200, 200), load=_digits, make_task=_lr_task("digits-lr"),
    recipe=LR_RECIPE,
))
register(Setting(
    name="digits-mlp", description="scikit-learn digits + MLP 64-32-10",
    data_source="real", sizes=(1000, 200, 200), load=_digits,
    make_task=_mlp_task("digits-mlp", (32,)),
    recipe=TrainRecipe(optimizer="sgd", epochs=20, lr=0.05, batch_size=64, momentum=0.9,
                       weight_decay=1e-3),
))
register(Setting(
    name="mnist-lr", description="MNIST (5000 images) + multinomial logistic regression",
    data_source="real", sizes=(5000 - 1000, 500, 500), load=_mnist5k,
    make_task=_lr_task("mnist-lr"), recipe=LR_RECIPE,
))
register(Setting(
    name="mnist-mlp", description="MNIST (5000 images) + MLP 784-128-64-10",
    data_source="real", sizes=(5000 - 1000, 500, 500), load=_mnist5k,
    make_task=_mlp_task("mnist-mlp", (128, 64)),
    recipe=TrainRecipe(optimizer="sgd", epochs=20, lr=0.05, batch_size=64, momentum=0.9,
                       weight_decay=1e-3),
))
