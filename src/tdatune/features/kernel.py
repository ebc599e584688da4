"""A dataset's per-example gradients kept in factored form and used only through inner
products: the Gram matrix G G^T and cross products V G^T, never the [n, p] matrix.

Each Kronecker layer of each chunk is kept as its factors when the FLOP rule of
:mod:`tdatune.features.factored` says products from factors are cheaper (T^2 (in + out) <
in x out for a chunk with T positions), and as formed rows otherwise; every other parameter as
rows. An MLP on mnist keeps 1,252 numbers per example instead of 109,386.
"""

from __future__ import annotations

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import batch_len
from tdatune.features.capture import (
    Captured,
    CapturedLayer,
    CaptureRefused,
    EmbeddingRule,
    Hooks,
    kron_grads,
)
from tdatune.features.factored import factored_is_cheaper, inner_products, layer_sides
from tdatune.features.gradients import GradientSource
from tdatune.models.task import Params, Task
from tdatune.utils.checks import check_finite_rows
from tdatune.utils.progress import progress


class FactoredGradients:
    """Per-example gradients of ``data`` (loss or output) held as captured chunks."""

    def __init__(self, task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
                 target: str = "loss", chunk_size: int = 256, show_progress: bool = False,
                 desc: str = "factored gradients") -> None:
        self.source = GradientSource(task, model, params, target=target, probe=data)
        self.layers = [c for c in self.source.plan.layers if c.factored]
        self.n = len(data)
        self.chunks: list[tuple[int, Captured]] = []
        for start, x, y in progress(data.batches(chunk_size, self.source.device),
                                    enabled=show_progress, desc=desc,
                                    total=data.num_batches(chunk_size)):
            captured = self._compact(self.source.captured(x, y, batch_len(x)))
            for k, g in captured.dense.items():
                check_finite_rows(f"per-example {target} gradients ({k})", g, offset=start)
            for c, _, d in captured.factors:
                check_finite_rows(f"per-example {target} gradients ({c.path})",
                                  d.reshape(d.shape[0], -1), offset=start)
            self.chunks.append((start, captured))

    def _compact(self, captured: Captured) -> Captured:
        """Form the rows of layers whose products are cheaper from rows (FLOP rule)."""
        keep, dense = [], dict(captured.dense)
        for c, a, d in captured.factors:
            d_in, d_out = layer_sides(c)
            t = d.shape[1]
            if factored_is_cheaper(t, t, 1 if isinstance(c.rule, EmbeddingRule) else d_in,
                                   d_out):
                keep.append((c, a, d))
            else:
                dense.update({c.params[attr]: g.reshape(captured.b, -1)
                              for attr, g in kron_grads(c, a, d).items()})
        return Captured(captured.b, keep, dense)

    @property
    def stored(self) -> int:
        """Numbers held (factors and rows), for comparison with n x p."""
        total = 0
        for _, c in self.chunks:
            total += sum(a.numel() + d.numel() for _, a, d in c.factors)
            total += sum(g.numel() for g in c.dense.values())
        return total

    def products(self, other: FactoredGradients) -> torch.Tensor:
        """``V G^T`` [len(other), n]: ``other``'s gradients against these (in float64, like
        the eigensystems)."""
        out = torch.empty(other.n, self.n, dtype=torch.float64)
        for i, ci in other.chunks:
            for j, cj in self.chunks:
                block = inner_products(self.layers, ci, cj, torch.float64)
                out[i : i + ci.b, j : j + cj.b] = block
        return out

    def row_norms(self) -> torch.Tensor:
        """Euclidean norm of every example's gradient [n] (float64, computed once)."""
        if getattr(self, "_norms", None) is None:
            self._norms = torch.cat([
                inner_products(self.layers, c, c, torch.float64).diagonal().clamp_min(0).sqrt()
                for _, c in self.chunks]) if self.chunks else torch.empty(0, dtype=torch.float64)
        return self._norms

    def gram(self) -> torch.Tensor:
        """``G G^T`` [n, n] (float64), each block computed once."""
        out = torch.empty(self.n, self.n, dtype=torch.float64)
        for a, (i, ci) in enumerate(self.chunks):
            for j, cj in self.chunks[: a + 1]:
                block = inner_products(self.layers, ci, cj, torch.float64)
                out[i : i + ci.b, j : j + cj.b] = block
                out[j : j + cj.b, i : i + ci.b] = block.T
        return out


def factored_numbers(task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
                     target: str = "loss") -> int:
    """Numbers :class:`FactoredGradients` holds per example of ``data`` (the factors of the
    layers the FLOP rule keeps factored, the rows of every other parameter), read off one
    forward pass on the first example: no gradient is computed and the loss is not called.
    A memory estimate before any work (:func:`tdatune.features.budget.estimate_attribution`);
    a model the hooks refuse counts all its rows (p, the upper bound)."""
    source = GradientSource(task, model, params, target=target)
    total = source.width
    if not source.plan.layers or len(data) == 0:
        return total
    _, x, _ = next(data.slice(0, 1).batches(1, source.device))
    with Hooks(source.plan) as hooks, torch.no_grad():
        hooks.start(1)
        try:
            task.call(model, source.detached, x)
        except CaptureRefused:
            return total
        finally:
            hooks.active = False
    for c in source.plan.layers:
        if c.factored and hooks.calls.get(c.path):
            total += _factor_saving(c, hooks.calls[c.path], params)
    return total


def _factor_saving(layer: CapturedLayer, calls: list[tuple[torch.Tensor, torch.Tensor, int]],
                   params: Params) -> int:
    """Numbers per example a layer's factors hold less its parameters' (0 when the FLOP
    rule forms its rows, as ``FactoredGradients._compact`` does)."""
    parts = [layer.rule.kron(layer.module, x, torch.zeros_like(out), 1) for x, out, _ in calls]
    t = sum(d.shape[1] for _, d in parts)
    d_in, d_out = layer_sides(layer)
    if not factored_is_cheaper(t, t, 1 if isinstance(layer.rule, EmbeddingRule) else d_in,
                               d_out):
        return 0
    held = sum(a[0].numel() + d[0].numel() for a, d in parts)
    return held - sum(params[k].numel() for k in layer.params.values())


__all__ = ["FactoredGradients", "factored_numbers"]
