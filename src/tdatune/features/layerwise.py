"""Layer-wise Kronecker-projected per-example gradients of nn.Linear layers (LoGra).

For a linear layer y = a W^T + b with input a (one row per example, or per position for
sequence inputs [B, T, in]) and output gradient delta = dl/dy, the per-example gradient of
[W | b] is sum_t delta_t [a_t, 1]^T (bias folded in as a constant-1 input column). LoGra
projects it with two small factors, P_out^T delta and P_in^T [a, 1], so the projected
gradient (P_out^T delta)(P_in^T a)^T = P_out^T (delta a^T) P_in is formed from activations and
output gradients captured by the layer hooks every attributor uses
(:mod:`tdatune.features.capture`), without ever forming the full per-example gradient.

Layout. Each layer contributes k_out * k_in numbers, flattened row-major ([out, in+1] with
identity factors: W's entries in parameter order, then each row's bias in the last column),
and layers are concatenated in module order. With identity factors this is a fixed
permutation of the layers' full parameter gradients; Fisher-based influence is invariant to
permutations, so LoGra with identity factors equals IFFIM on those layers' gradients.

Factors are seeded Gaussian matrices with entries N(0, 1/k). A side whose size is <= k is left
unprojected (identity), so ``k`` only ever reduces dimensions. LoGra projects nn.Linear
modules; a module called several times in one pass contributes every call.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import batch_len
from tdatune.features.capture import plan_capture
from tdatune.features.factored import project_layer
from tdatune.features.gradients import GradientSource
from tdatune.models.task import Task
from tdatune.utils.checks import check_choice, check_finite_rows
from tdatune.utils.progress import progress


def linear_layers(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Linear]]:
    """The model's nn.Linear modules by name (all, in module order, or the given ``names``)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no nn.Linear layers; LoGra hooks only linear layers")
    if names is None:
        return found
    by_name = dict(found)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown linear layer(s) {', '.join(unknown)}; the model's linear "
                         f"layers are: {', '.join(by_name)}")
    return [(n, by_name[n]) for n in names]


@dataclass
class LayerFactors:
    """The two projection factors of one layer (None = identity on that side)."""

    name: str
    d_in: int  # in_features (+1 with bias)
    d_out: int
    p_in: torch.Tensor | None
    p_out: torch.Tensor | None

    @property
    def k_in(self) -> int:
        """Projected input side."""
        return self.d_in if self.p_in is None else int(self.p_in.shape[1])

    @property
    def k_out(self) -> int:
        """Projected output side."""
        return self.d_out if self.p_out is None else int(self.p_out.shape[1])

    @property
    def width(self) -> int:
        """Numbers this layer contributes per example."""
        return self.k_in * self.k_out


def _factor(rows: int, k: int | None, seed: int, device: torch.device) -> torch.Tensor | None:
    if k is None or k >= rows:
        return None
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=gen) / math.sqrt(k)).to(device)


def layer_factors(layers: list[tuple[str, nn.Linear]], k: int | None, seed: int = 0
                  ) -> list[LayerFactors]:
    """Seeded factors for every layer: k_in = min(k, in+1), k_out = min(k, out)."""
    out = []
    for i, (name, layer) in enumerate(layers):
        device = layer.weight.device
        d_in = layer.in_features + (1 if layer.bias is not None else 0)
        d_out = layer.out_features
        out.append(LayerFactors(name, d_in, d_out,
                                _factor(d_in, k, seed * 7_919 + 2 * i, device),
                                _factor(d_out, k, seed * 7_919 + 2 * i + 1, device)))
    return out


def iter_layerwise_grads(
    task: Task, model: nn.Module, data: ArrayDataset, factors: list[LayerFactors],
    layers: list[tuple[str, nn.Linear]], *, target: str = "loss", chunk_size: int = 256,
    show_progress: bool = False, desc: str = "layer-wise gradients",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, chunk)`` of projected per-example gradients [b, sum_l k_out k_in] of the
    loss or output function, from the layer hooks' factors (:mod:`tdatune.features.capture`;
    a layer called several times in a pass adds up its calls)."""
    check_choice("gradient target", target, ("loss", "output"))
    named = dict(model.named_parameters())
    wanted = {f"{name}.{attr}": named[f"{name}.{attr}"] for name, layer in layers
              for attr in ("weight", "bias") if getattr(layer, attr, None) is not None}
    source = GradientSource(task, model, wanted, target=target, probe=data)
    plan = plan_capture(model, list(wanted), {k: v.shape for k, v in wanted.items()})
    by_path = {c.path: c for c in plan.layers}
    for start, x, y in progress(data.batches(chunk_size, source.device), enabled=show_progress,
                                desc=desc, total=data.num_batches(chunk_size)):
        captured = source.captured(x, y, batch_len(x))
        g = torch.cat([project_layer(by_path[name], captured, f.p_in, f.p_out)
                       for (name, _), f in zip(layers, factors, strict=True)], dim=1)
        check_finite_rows(f"layer-wise {target} gradients", g, offset=start)
        yield start, g


def layerwise_grads(task: Task, model: nn.Module, data: ArrayDataset,
                    factors: list[LayerFactors], layers: list[tuple[str, nn.Linear]], *,
                    target: str = "loss", chunk_size: int = 256, show_progress: bool = False,
                    desc: str = "layer-wise gradients") -> torch.Tensor:
    """All projected per-example gradients as one [n, width] tensor on the CPU."""
    width = sum(f.width for f in factors)
    chunks = [g.cpu() for _, g in iter_layerwise_grads(
        task, model, data, factors, layers, target=target, chunk_size=chunk_size,
        show_progress=show_progress, desc=desc)]
    return torch.cat(chunks) if chunks else torch.empty(0, width)
