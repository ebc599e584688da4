"""scikit-learn's bundled 8x8 digits: the embedded default data set (no files needed)."""

from __future__ import annotations

import torch

from tdatune.data.base import Splits, make_splits


def load_digits_splits(
    n_train: int = 1000, n_val: int = 200, n_test: int = 200, seed: int = 0
) -> Splits:
    """Digits as flat 64-pixel vectors scaled to [0, 1], split deterministically by ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return make_splits(
        x, y, n_train=n_train, n_val=n_val, n_test=n_test, seed=seed,
        name="digits", source="real: scikit-learn digits (bundled)", num_classes=10,
    )
