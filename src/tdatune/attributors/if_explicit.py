"""IF explicit: score = -v^T (H + lambda I)^-1 g_i with H the exact Hessian of the training
objective (mean loss + weight_decay/2 ||theta||^2, so H includes weight_decay * I).

``fit`` builds H once in float64 and eigendecomposes it, H = U diag(sigma) U^T, keeping every
eigenvalue *with its sign* (for a non-convex model H may be indefinite: nothing is clipped or
dropped, so the result is exactly (H + lambda I)^-1 for any lambda where it exists). Every
lambda afterwards is a small matrix product on the stored lambda-path. A lambda that makes
H + lambda I singular or nearly so (|sigma_k + lambda| <= 1e-12 max |sigma|) is refused;
a lambda below -min(sigma) gives an indefinite H + lambda I, which is allowed but noted in
``self.indefinite(lam)``. Limited to models with at most 12,000 parameters (a dense p x p).

A model that is one linear layer (logistic regression) takes the Kronecker path of
``curvature.hessian``: H formed from the logits' Hessians and the inputs by GEMMs, and only
its non-trivial block eigendecomposed (mnist-lr, p = 7,850: fit 127 s -> see
docs/performance.md). ``precision`` is the dtype of the eigendecomposition and of the basis
products; the Hessian and the gradients are always float64. float32 was measured against
float64 on the LDS curve of mnist-lr (docs/performance.md, bench/sweep.py --precision).
"""

from __future__ import annotations

from typing import Any

import torch

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    one_of,
    positive_float,
)
from tdatune.attributors.common import DTYPES
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.hessian import TrainingObjective, cast_problem
from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import per_example_grads


class IFExplicit(Attributor):
    """Influence function with the exact (eigendecomposed) Hessian of the training objective."""

    name = "if_explicit"
    hyperparameters = (
        HyperParameter("lam", 1e-5, "score", positive_float,
                       "damping added to the mean-objective Hessian"),
        CHECKPOINT,
        HyperParameter("precision", "float64", "fit", one_of(*DTYPES),
                       "dtype of the eigendecomposition (the Hessian is formed in float64)"),
    )

    def _fit(self, context: AttributionContext) -> None:
        model, params = context.model_at(self.params["checkpoint"])
        self._model, self._params, train = cast_problem(model, params, context.train, torch.float64)
        objective = TrainingObjective(context.task, self._model, self._params, train,
                                      context.weight_decay, context.chunk_size)
        self.eigensystem = objective.eigensystem(DTYPES[self.params["precision"]])
        self.sigma = self.eigensystem.sigma.cpu().to(torch.float64)
        grads = per_example_grads(context.task, self._model, self._params, train, target="loss",
                                  chunk_size=context.chunk_size,
                                  show_progress=context.show_progress, desc="train gradients")
        self.train_coords = self.eigensystem.coords(grads).cpu()
        self._paths: dict[str, LambdaPath] = {}

    @property
    def basis(self) -> torch.Tensor:
        """The eigenvector matrix U [p, p] (formed on demand for the Kronecker path)."""
        self._require_fit()
        return self.eigensystem.basis

    def indefinite(self, lam: float) -> bool:
        """Whether H + lam I has a negative eigenvalue (possible for non-convex models)."""
        self._require_fit()
        return bool(float(self.sigma.min()) + lam < 0)

    def explained_grads(self, explained: ArrayDataset) -> torch.Tensor:
        """Output-function gradients v of ``explained`` (float64)."""
        ctx = self._require_fit()
        _, _, data = cast_problem(self._model, self._params, explained, torch.float64)
        return per_example_grads(ctx.task, self._model, self._params, data, target="output",
                                 chunk_size=ctx.chunk_size)

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The lambda-path over H's full (signed) spectrum for ``explained`` (cached)."""
        self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            coords = self.eigensystem.coords(self.explained_grads(explained)).cpu()
            self._paths[key] = LambdaPath(self.sigma, coords, self.train_coords, sign=-1.0)
        return self._paths[key]

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam``."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()
