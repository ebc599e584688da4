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

from dataclasses import replace
from typing import Any

import torch
from torch import nn

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
from tdatune.attributors.common import HVP_ADVICE, HVP_PRECISION, HVPProblem, HVPSizes
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.arnoldi import top_eigenpairs
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    PathEstimate,
    explained_knob,
    lambda_path_scores,
)
from tdatune.models.task import Params, Task


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

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """Arnoldi's path: the training gradients (kept whole up to ``GRAD_CACHE_LIMIT``
        numbers, else recomputed in chunks), the Lanczos basis [p, iters] and the k
        eigenvectors (twice while the positive ones are kept), the training coordinates
        [n, k], the explained gradients and coordinates, and the [m, n] scores."""
        z = self._sizes(params, train, explained=explained, validation=validation,
                        chunk_size=chunk_size)
        k = min(self.params["rank"], z.p)
        return arnoldi_estimate(z, k, min(z.p, self.params["iters"] or 2 * k + 20))

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


def arnoldi_estimate(z: HVPSizes, k: int, steps: int) -> PathEstimate:
    """The phases of :class:`IFArnoldi` for the sizes ``z``, ``k`` eigenpairs from ``steps``
    Lanczos steps (see ``IFArnoldi.memory_estimate``)."""
    e, q, n, p, m, v = EIG_ITEMSIZE, z.prec, z.n, z.p, z.m, z.v
    cast = 0 if q == e else 1  # the float64 copies made of float32 vectors
    eigen = {**z.held(), "eigenvectors kept": p * k * e}
    fitted = {**eigen, "training coordinates": n * k * e}
    rows = max(m, v)
    phases = {
        "training gradients": z.training(),
        "Lanczos": {**eigen, "Lanczos basis": p * steps * e, "Ritz vectors": p * k * e},
        "training coordinates": {**eigen, "eigenvectors cast": cast * p * k * q,
                                 **z.products(k), "training coordinates": cast * n * k * e},
        "explained": {**fitted, **z.gradients(rows), "validation gradients": v * p * q,
                      "explained gradients (float64)": cast * rows * p * e,
                      "explained coordinates": rows * k * e,
                      "validation coordinates": v * k * e},
        "scores": {**fitted, "explained gradients": m * p * q, "validation gradients": v * p * q,
                   "validation coordinates": v * k * e, "explained coordinates": m * k * e,
                   **lambda_path_scores(m, n, k)},
    }
    return PathEstimate("if_arnoldi", n, m, phases, advice=(HVP_ADVICE,),
                        knobs=explained_knob(lambda j: arnoldi_estimate(replace(z, m=j), k,
                                                                        steps), m))
