"""Helpers shared by the attributors: dataset keys for caches, training-gradient products
that keep G in memory when it is small and stream it in chunks when it is not, and the sizes
the memory estimates of the Hessian-vector-product methods are written in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import AttributionContext, HyperParameter, one_of
from tdatune.curvature.hessian import TrainingObjective, cast_problem
from tdatune.data.base import ArrayDataset
from tdatune.data.batches import leaves
from tdatune.features.budget import (
    cast_copies,
    gradient_products,
    gradients_in_flight,
    kept_gradients,
    kept_gradients_built,
)
from tdatune.features.factored import KroneckerProjector
from tdatune.features.gradients import iter_per_example_grads, num_params, per_example_grads
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task

GRAD_CACHE_LIMIT = 1 << 26  # entries of G (256 MiB in float32) kept in memory
HVP_ADVICE = ("IFFIM with a random projection (attributor='iffim', params={'proj_dim': 1024}) "
              "or K-FAC (attributor='kfac'): no [m, p] vectors per explained example")


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

    def _sizes(self, params: Params, train: ArrayDataset, *, explained: int, validation: int,
               chunk_size: int) -> HVPSizes:
        """The sizes of this problem for a memory estimate (no gradient computed)."""
        dtype = DTYPES[self.params["precision"]]
        first = next(iter(params.values()))
        return HVPSizes(n=len(train), p=num_params(params), m=explained, v=validation,
                        chunk=chunk_size, item=first.element_size(),
                        prec=torch.empty(0, dtype=dtype).element_size(),
                        inputs=cast_input_numbers(train, dtype))

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


def cast_input_numbers(data: ArrayDataset, dtype: torch.dtype) -> int:
    """Floating input numbers ``cast_problem`` copies to ``dtype`` (those not in it already)."""
    inputs = getattr(data, "inputs", None)
    if inputs is None:  # a stream: its batches are cast as they are read
        return 0
    return sum(t.numel() for t in leaves(inputs) if t.is_floating_point() and t.dtype != dtype)


@dataclass(frozen=True)
class HVPSizes:
    """What the memory of a Hessian-vector-product method's path is written in: n training,
    ``m`` explained and ``v`` validation examples, p parameters, the model's and the
    curvature's (``prec``) bytes a number, the training inputs cast, the gradient chunk."""

    n: int
    p: int
    m: int
    v: int
    chunk: int
    item: int
    prec: int
    inputs: int
    limit: int = GRAD_CACHE_LIMIT

    def held(self) -> dict[str, int]:
        """Alive throughout: the model's parameters, the problem cast to the precision and
        the training gradients when they are kept (``TrainGradients``)."""
        return {"parameters": 2 * self.p * self.item,
                **cast_copies(self.p, self.inputs, self.prec),
                **kept_gradients(self.n, self.p, self.prec, self.limit)}

    def training(self) -> dict[str, int]:
        """The phase in which the training gradients are computed (and concatenated)."""
        return {**self.held(), **kept_gradients_built(self.n, self.p, self.p, self.prec,
                                                      self.chunk, self.limit)}

    def gradients(self, rows: int) -> dict[str, int]:
        """Output gradients of ``rows`` explained examples (cached by ``HVPProblem``) with
        one chunk of them in flight."""
        return {"explained gradients": rows * self.p * self.prec,
                **gradients_in_flight(min(self.chunk, max(rows, 1)), self.p, self.p, self.prec)}

    def products(self, rows: int) -> dict[str, int]:
        """``TrainGradients.products`` of ``rows`` vectors: the [rows, n] result (and a
        streamed chunk)."""
        return gradient_products(rows, self.n, self.p, self.p, self.prec, self.prec,
                                 self.chunk, self.limit)

    def negated(self) -> dict[str, int]:
        """``-products(x).float()``: beside the [m, n] products, their float32 copy (none in
        float32), then its negation, one float32 [m, n] at a time."""
        return {"float32 scores (copy or negation)": self.m * self.n * 4}
