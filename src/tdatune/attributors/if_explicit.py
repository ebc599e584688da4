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

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    one_of,
    positive_float,
)
from tdatune.attributors.common import DTYPES, HVPSizes, cast_input_numbers
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.hessian import TrainingObjective, cast_problem
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    PathEstimate,
    cast_copies,
    eigenvector_copies,
    eigh_bytes,
    explained_knob,
    gradients_in_flight,
    hessian_parts,
    lambda_path_scores,
)
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.models.task import Params, Task

ADVICE = (
    "IFFIM with a random projection, attributor='iffim', params={'proj_dim': 1024} (a d x d "
    "Fisher eigensystem, no p x p Hessian)",
    "K-FAC, attributor='kfac' or attributor='ekfac' (Kronecker factors per layer)",
    "if_cg, attributor='if_cg' with lam= (Hessian-vector products: no p x p matrix)",
)


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

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """The exact Hessian's path, as a dense model takes it (a one-layer model's Kronecker
        path eigendecomposes a block of order <= p, so this bounds it too): the p x p Hessian
        in float64 (three copies while it is symmetrised), its eigendecomposition (the matrix,
        eigenvectors and LAPACK's workspace: about 4 p^2 numbers), the [n, p] training
        gradients and their coordinates, the explained side and the [m, n] scores."""
        dtype = DTYPES[self.params["precision"]]
        first = next(iter(params.values()))
        return explicit_estimate(HVPSizes(
            n=len(train), p=num_params(params), m=explained, v=validation, chunk=chunk_size,
            item=first.element_size(), prec=torch.empty(0, dtype=dtype).element_size(),
            inputs=cast_input_numbers(train, torch.float64)))

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


def explicit_estimate(z: HVPSizes) -> PathEstimate:
    """The phases of :class:`IFExplicit` for the sizes ``z`` (see its ``memory_estimate``)."""
    e, q, n, p, m = EIG_ITEMSIZE, z.prec, z.n, z.p, z.m
    held = {"parameters": 2 * p * z.item, **cast_copies(p, z.inputs, e)}
    eig = eigh_bytes(p, q)
    eig["Hessian"] = eig.pop("matrix")
    basis = {**held, "eigenvectors": p * p * q, "eigenvalues": p * e}
    fitted = {**basis, "training coordinates": n * p * e, "validation coordinates": z.v * p * e}
    rows = max(m, z.v)
    phases = {
        "Hessian": {**held, **hessian_parts(p)},
        "Hessian cast": {**held, "Hessian": p * p * e, "Hessian cast": p * p * q if q != e else 0},
        "eigendecomposition": {**held, **eig},
        "eigenvectors": {**held, **eigenvector_copies(p, q)},
        "training gradients": {**basis, "training gradients": n * p * e,
                               **gradients_in_flight(min(z.chunk, n), p, p, e)},
        "training coordinates": {**basis, "training gradients": n * p * e,
                                 **_coordinates(n, p, q)},
        "explained": {**fitted, "explained gradients": rows * p * e,
                      **gradients_in_flight(min(z.chunk, max(rows, 1)), p, p, e),
                      **_coordinates(rows, p, q, "explained")},
        "scores": {**fitted, "explained coordinates": m * p * e,
                   **lambda_path_scores(m, n, p)},
    }
    return PathEstimate("if_explicit", n, m, phases, advice=ADVICE, eig_size=p,
                        form="exact Hessian",
                        knobs=explained_knob(lambda k: explicit_estimate(replace(z, m=k)), m))


def _coordinates(rows: int, p: int, prec: int, what: str = "training") -> dict[str, int]:
    """``DenseEigensystem.coords`` of [rows, p] float64 gradients: their cast to the
    eigenvectors' precision (a copy unless float64), the product, and its float64 copy."""
    cast = 0 if prec == EIG_ITEMSIZE else 1
    return {f"{what} gradients cast": cast * rows * p * prec,
            f"{what} coordinates": rows * p * prec,
            f"{what} coordinates (float64)": cast * rows * p * EIG_ITEMSIZE}
