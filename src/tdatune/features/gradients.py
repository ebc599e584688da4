"""Per-example gradients with torch.func (vmap over grad), in chunks so memory stays bounded."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tdatune.data.base import ArrayDataset
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task
from tdatune.utils.checks import check_choice, check_finite_rows
from tdatune.utils.progress import progress

GRADIENT_TARGETS = ("loss", "output")


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter dict."""
    return sum(p.numel() for p in params.values())


def flatten(tree: Params, names: list[str], batch: int) -> torch.Tensor:
    """Concatenate a dict of [batch, *shape] tensors into [batch, p] in ``names`` order."""
    return torch.cat([tree[k].reshape(batch, -1) for k in names], dim=1)


def iter_per_example_grads(
    task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", chunk_size: int = 256, projector: Projector | None = None,
    show_progress: bool = False, desc: str = "gradients",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, G_chunk)``: gradients of each example's loss or output w.r.t. ``params``.

    ``params`` are the trainable parameters differentiated (buffers stay in ``model``).
    The model is put in eval mode, so normalisation layers use stored statistics and
    examples do not interact. Chunks are float32 [b, p], or [b, d] after projection.
    """
    check_choice("gradient target", target, GRADIENT_TARGETS)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    fn = task.loss_fn if target == "loss" else task.output_fn
    model.eval()
    names = list(params)
    device = next(iter(params.values())).device
    detached = {k: v.detach() for k, v in params.items()}

    def single(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x.unsqueeze(0),))
        return fn(out, y.unsqueeze(0))[0]

    per_example = vmap(grad(single), in_dims=(None, 0, 0))
    n = len(data)
    for start in progress(range(0, n, chunk_size), enabled=show_progress, desc=desc,
                          total=(n + chunk_size - 1) // chunk_size):
        x = data.inputs[start : start + chunk_size].to(device)
        y = data.targets[start : start + chunk_size].to(device)
        g = flatten(per_example(detached, x, y), names, x.shape[0])
        check_finite_rows(f"per-example {target} gradients", g, offset=start)
        if projector is not None:
            g = projector.project(g)
        yield start, g


def per_example_grads(
    task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", chunk_size: int = 256, projector: Projector | None = None,
    show_progress: bool = False, desc: str = "gradients",
) -> torch.Tensor:
    """All per-example gradients as one [n, p] (or [n, d]) tensor on the CPU, in the
    parameters' dtype (the projection's after projection)."""
    width = projector.d if projector is not None else num_params(params)
    out: torch.Tensor | None = None
    for start, g in iter_per_example_grads(
            task, model, params, data, target=target, chunk_size=chunk_size, projector=projector,
            show_progress=show_progress, desc=desc):
        if out is None:  # the parameters' (or projection's) dtype, preallocated once
            out = torch.empty(len(data), width, dtype=g.dtype)
        out[start : start + g.shape[0]] = g
    return out if out is not None else torch.empty(0, width)
