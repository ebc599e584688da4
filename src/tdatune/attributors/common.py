"""Helpers shared by the attributors: dataset keys for caches and training-gradient products
that keep G in memory when it is small and stream it in chunks when it is not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import AttributionContext, HyperParameter, one_of
from tdatune.curvature.hessian import TrainingObjective, cast_problem
from tdatune.data.base import ArrayDataset
from tdatune.features.factored import KroneckerProjector
from tdatune.features.gradients import iter_per_example_grads, num_params, per_example_grads
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task

GRAD_CACHE_LIMIT = 1 << 26  # entries of G (256 MiB in float32) kept in memory


def unit_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit Euclidean norm (zero rows stay zero)."""
    norm = g.norm(dim=1, keepdim=True)
    return g / torch.where(norm > 0, norm, torch.ones_like(norm))


class TrainGradients:
    """Per-example training gradients at one parameter point, used only through products
    ``X @ G^T``. Kept whole when n x width is at most ``limit`` entries, else recomputed in
    chunks on every use so memory stays bounded."""

    def __init__(self, task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
                 target: str = "loss", projector: Projector | KroneckerProjector | None = None,
                 normalize: bool = False, chunk_size: int = 256, show_progress: bool = False,
                 desc: str = "train gradients", limit: int = GRAD_CACHE_LIMIT) -> None:
        self.task, self.model, self.params, self.data = task, model, params, data
        self.target, self.projector, self.normalize = target, projector, normalize
        self.chunk_size, self.show_progress, self.desc = chunk_size, show_progress, desc
        self.width = projector.d if projector is not None else num_params(params)
        self.whole: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        if len(data) * self.width <= limit:
            self.whole = torch.cat([g for _, g in self._chunks()]) if len(data) else None

    def _chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start, g in iter_per_example_grads(
                self.task, self.model, self.params, self.data, target=self.target,
                chunk_size=self.chunk_size, projector=self.projector,
                show_progress=self.show_progress, desc=self.desc):
            yield start, (unit_rows(g) if self.normalize else g)

    def row_norms(self) -> torch.Tensor:
        """Euclidean norm of every training gradient: [n] (computed once)."""
        if getattr(self, "_norms", None) is None:
            if self.whole is not None:
                self._norms = self.whole.norm(dim=1)
            else:
                self._norms = torch.cat([g.norm(dim=1).cpu() for _, g in self._chunks()])
        return self._norms

    def products(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ G^T`` for ``x`` [m, width]: shape [m, n], in x's dtype."""
        if x.shape[-1] != self.width:
            raise ValueError(f"vectors have {x.shape[-1]} columns, training gradients {self.width}")
        if self.whole is not None:
            return x @ self.whole.to(x.device, x.dtype).T
        out = torch.empty(x.shape[0], len(self.data), dtype=x.dtype, device=x.device)
        for start, g in self._chunks():
            out[:, start : start + g.shape[0]] = x @ g.to(x.device, x.dtype).T
        return out


DTYPES = {"float64": torch.float64, "float32": torch.float32}
HVP_PRECISION = HyperParameter("precision", "float64", "fit", one_of(*DTYPES), "HVP arithmetic")
"""The fit-stage ``precision`` of the attributors built on Hessian-vector products."""


class HVPProblem:
    """Shared training side of the Hessian-vector-product influence functions (CG, LiSSA):
    the checkpoint's model cast to the ``precision`` hyperparameter, the training objective,
    training gradients, and output gradients of explained sets cached by content."""

    params: dict[str, Any]

    def _fit_problem(self, context: AttributionContext) -> None:
        model, params = context.model_at(self.params["checkpoint"])
        dtype = DTYPES[self.params["precision"]]
        self._model, self._params, train = cast_problem(model, params, context.train, dtype)
        self.objective = TrainingObjective(context.task, self._model, self._params, train,
                                           context.weight_decay, context.chunk_size)
        self.train_grads = TrainGradients(context.task, self._model, self._params, train,
                                          chunk_size=context.chunk_size,
                                          show_progress=context.show_progress)
        self._v: dict[str, torch.Tensor] = {}

    def explained_grads(self, explained: ArrayDataset) -> torch.Tensor:
        """Output-function gradients v of ``explained`` (cached by content)."""
        ctx = self._require_fit()  # type: ignore[attr-defined]
        key = explained.fingerprint()
        if key not in self._v:
            _, _, data = cast_problem(self._model, self._params, explained,
                                      self.objective.theta.dtype)
            self._v[key] = per_example_grads(ctx.task, self._model, self._params, data,
                                             target="output", chunk_size=ctx.chunk_size)
        return self._v[key]
