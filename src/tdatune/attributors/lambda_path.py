"""Scores for every lambda from one eigensystem.

With F = U diag(sigma) U^T, c = V U (explained) and a = G U (training):
    score(lambda)[j, i] = sign * scale * sum_k c[j, k] a[i, k] / (sigma_k + scale_lambda * lambda)
Subset sums for LDS need no score matrix: project the subset masks once, B = masks @ a
([M, k]), and each lambda costs one [m, k] x [k, M] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdatune.utils.checks import check_positive_lambdas, check_shape


@dataclass
class LambdaPath:
    """Eigenvalues, explained and training coordinates: everything a lambda sweep needs."""

    sigma: torch.Tensor  # [k]
    explained_coords: torch.Tensor  # [m, k]
    train_coords: torch.Tensor  # [n, k]
    sign: float = -1.0

    def __post_init__(self) -> None:
        k = self.sigma.shape[0]
        check_shape("explained_coords", self.explained_coords, [None, k])
        check_shape("train_coords", self.train_coords, [None, k])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.train_coords.shape[0])

    def _weighted(self, lam: float) -> torch.Tensor:
        return self.explained_coords / (self.sigma + lam)

    def scores(self, lam: float) -> torch.Tensor:
        """Score matrix [m, n] at one lambda."""
        lam_t = check_positive_lambdas(lam)
        return self.sign * (self._weighted(float(lam_t[0])) @ self.train_coords.T)

    def project_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Subset masks [M, n] through the eigenbasis: B = masks @ a, shape [M, k]."""
        check_shape("subset masks", masks, [None, self.n_train])
        return masks.to(self.train_coords.dtype) @ self.train_coords

    def subset_predictions(self, masks: torch.Tensor, lambdas: torch.Tensor | list[float],
                           projected: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted subset sums sum_{i in S_m} score[j, i] for every lambda: [L, m, M]."""
        lam = check_positive_lambdas(lambdas)
        b = self.project_masks(masks) if projected is None else projected
        return torch.stack([self.sign * (self._weighted(float(x)) @ b.T) for x in lam])
