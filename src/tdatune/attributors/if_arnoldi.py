"""IF Arnoldi: score = -v^T U_k (Sigma_k + lambda I)^-1 U_k^T g_i with (Sigma_k, U_k) the k
largest eigenpairs of the training objective's Hessian (mean loss + L2), found by Lanczos on
Hessian-vector products (:mod:`tdatune.curvature.arnoldi`), as in dattri's and pyDVL's
Arnoldi influence: the inverse is taken on the top-k subspace and the rest is left out.

Only positive eigenvalues are kept (a non-convex model's Hessian may have negative ones
among the k; their directions are dropped, so the path is a PSD spectrum that xi and
Algorithm 1 take like IFFIM's). ``fit`` runs ``iters`` HVPs once and projects the training
gradients on U_k; every lambda afterwards is a small matrix product on the lambda-path.
"""

from __future__ import annotations

from typing import Any

import torch

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    any_int,
    optional_positive_int,
    positive_float,
    positive_int,
)
from tdatune.attributors.common import HVP_PRECISION, HVPProblem
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.arnoldi import top_eigenpairs
from tdatune.data.base import ArrayDataset


class IFArnoldi(HVPProblem, Attributor):
    """Influence on the top-k Hessian eigenpairs (Lanczos on HVPs), along a lambda-path."""

    name = "if_arnoldi"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", positive_float, "damping added to H (mean loss)"),
        HyperParameter("rank", 50, "fit", positive_int, "eigenpairs k kept (at most p)"),
        HyperParameter("iters", None, "fit", optional_positive_int,
                       "Lanczos steps (HVPs); default min(p, 2k + 20)"),
        HyperParameter("seed", 0, "fit", any_int, "seed of the Lanczos start vector"),
        CHECKPOINT,
        HVP_PRECISION,
    )

    def _fit(self, context: AttributionContext) -> None:
        self._fit_problem(context)
        p = self.objective.p
        k = min(self.params["rank"], p)
        sigma, basis = top_eigenpairs(self.objective.hvp, p, k, iters=self.params["iters"],
                                      seed=self.params["seed"], dtype=torch.float64,
                                      device=self.objective.device)
        keep = sigma > 0
        self.sigma, self.basis = sigma[keep].cpu(), basis[:, keep]
        self.dropped = int((~keep).sum())
        self.train_coords = self.train_grads.products(
            self.basis.T.to(self.objective.theta.dtype)).T.double().cpu()
        self._paths: dict[str, LambdaPath] = {}

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The lambda-path for ``explained`` (cached by content)."""
        self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            v = self.explained_grads(explained).to(self.basis)
            coords = (v @ self.basis).double().cpu()
            self._paths[key] = LambdaPath(self.sigma, coords, self.train_coords)
        return self._paths[key]

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam``."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()
