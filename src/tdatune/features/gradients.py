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
    show_progress: bool = False, desc: str = "gradients", out: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, G_chunk)``: gradients of each example's loss or output w.r.t. ``params``.

    ``params`` are the trainable parameters differentiated (buffers stay in ``model``).
    The model is put in eval mode, so normalisation layers use stored statistics and
    examples do not interact. Chunks are [b, p] in the parameters' dtype, or [b, d] after
    projection. With ``out`` ([n, p], unprojected only) each chunk is written into
    ``out[start : start + b]`` and that view is yielded.

    When every differentiated parameter belongs to an ``nn.Linear`` applied once to
    [batch, features] inputs (logistic regression, MLPs), the gradients come from one
    batched backward pass: example i's weight gradient is the outer product of its output
    gradient and its layer input, written straight into the chunk. This is checked against
    the generic vmap-over-grad path on the first examples; any other model uses that path.
    """
    check_choice("gradient target", target, GRADIENT_TARGETS)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if out is not None and projector is not None:
        raise ValueError("out= holds unprojected gradients; it cannot be combined with a projector")
    fn = task.loss_fn if target == "loss" else task.output_fn
    model.eval()
    names = list(params)
    device = next(iter(params.values())).device
    detached = {k: v.detach() for k, v in params.items()}
    width = num_params(params)
    dtype = next(iter(params.values())).dtype

    def single(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o = functional_call(model, p, (x.unsqueeze(0),))
        return fn(o, y.unsqueeze(0))[0]

    per_example = vmap(grad(single), in_dims=(None, 0, 0))

    def generic(x: torch.Tensor, y: torch.Tensor, dest: torch.Tensor) -> None:
        # Gradients are data here: no graph back to parameters outside ``params`` (grad
        # transforms ignore an outer no_grad, so the per-example gradients are unaffected).
        with torch.no_grad():
            tree = per_example(detached, x, y)
            torch.cat([tree[k].reshape(x.shape[0], -1) for k in names], dim=1, out=dest)

    layers = _linear_layout(model, names)
    outer = None
    if layers is not None and len(data) > 0:
        outer = _OuterProductGrads(model, detached, fn, layers, names)
        probe = min(4, len(data))
        x, y = data.inputs[:probe].to(device), data.targets[:probe].to(device)
        fast, slow = (torch.empty(probe, width, dtype=dtype, device=device) for _ in range(2))
        if not (outer(x, y, fast) and _same(fast, (generic(x, y, slow), slow)[1])):
            outer = None
    compute = outer if outer is not None else generic

    n = len(data)
    for start in progress(range(0, n, chunk_size), enabled=show_progress, desc=desc,
                          total=(n + chunk_size - 1) // chunk_size):
        x = data.inputs[start : start + chunk_size].to(device)
        y = data.targets[start : start + chunk_size].to(device)
        g = (out[start : start + x.shape[0]] if out is not None
             else torch.empty(x.shape[0], width, dtype=dtype, device=device))
        if compute(x, y, g) is False:  # the linear path refused this chunk's shapes
            generic(x, y, g)
        check_finite_rows(f"per-example {target} gradients", g, offset=start)
        if projector is not None:
            g = projector.project(g)
        yield start, g


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))


def _linear_layout(model: nn.Module, names: list[str]) -> list[tuple[nn.Linear, int, int]] | None:
    """For each nn.Linear owning differentiated parameters: (module, column offset of its
    weight, column offset of its bias or -1), in the flat ``names`` layout; None when some
    differentiated parameter does not belong to an nn.Linear."""
    owner: dict[str, tuple[nn.Linear, str]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for attr in ("weight", "bias"):
                if getattr(module, attr) is not None:
                    owner[f"{mod_name}.{attr}" if mod_name else attr] = (module, attr)
    if not names or any(k not in owner for k in names):
        return None
    offsets, col = {}, 0
    for k in names:
        module, attr = owner[k]
        offsets[(id(module), attr)] = col
        col += getattr(module, attr).numel()
    layers = {id(owner[k][0]): owner[k][0] for k in names}
    return [(m, offsets.get((key, "weight"), -1), offsets.get((key, "bias"), -1))
            for key, m in layers.items()]


class _OuterProductGrads:
    """Per-example gradients of linear-layer parameters from one batched backward pass."""

    def __init__(self, model: nn.Module, params: Params, fn, layers: list[tuple[nn.Linear, int, int]],
                 names: list[str]) -> None:
        self.model, self.fn, self.layers = model, fn, layers
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, dest: torch.Tensor) -> bool:
        """Fill ``dest`` [b, p]; False (dest untouched) when a layer's input is not
        [b, features] or a layer ran other than once."""
        captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured.setdefault(id(module), []).append((inputs[0].detach(), output))

        handles = [m.register_forward_hook(hook) for m, _, _ in self.layers]
        try:
            with torch.enable_grad():
                values = self.fn(functional_call(self.model, self.params, (x,)), y)
                calls = [captured.get(id(m), []) for m, _, _ in self.layers]
                if values.shape != (x.shape[0],) or any(
                        len(c) != 1 or c[0][0].shape[:1] != x.shape[:1] or c[0][0].dim() != 2
                        for c in calls):
                    return False
                # Examples do not interact (eval mode), so d(sum of values)/d(output row i)
                # is example i's own output gradient.
                deltas = torch.autograd.grad(values.sum(), [c[0][1] for c in calls])
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for (_, w_col, b_col), c, delta in zip(self.layers, calls, deltas, strict=True):
                acts = c[0][0]
                rows, cols = delta.shape[1], acts.shape[1]
                if w_col >= 0:
                    view = dest[:, w_col : w_col + rows * cols].unflatten(1, (rows, cols))
                    torch.mul(delta[:, :, None], acts[:, None, :], out=view)
                if b_col >= 0:
                    dest[:, b_col : b_col + rows] = delta
        return True


def per_example_grads(
    task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", chunk_size: int = 256, projector: Projector | None = None,
    show_progress: bool = False, desc: str = "gradients",
) -> torch.Tensor:
    """All per-example gradients as one [n, p] (or [n, d]) tensor on the CPU, in the
    parameters' dtype (the projection's after projection)."""
    first = next(iter(params.values()))
    width = projector.d if projector is not None else num_params(params)
    if projector is None and first.device.type == "cpu":  # chunks written in place
        out = torch.empty(len(data), width, dtype=first.dtype)
        for _ in iter_per_example_grads(task, model, params, data, target=target,
                                        chunk_size=chunk_size, show_progress=show_progress,
                                        desc=desc, out=out):
            pass
        return out
    result: torch.Tensor | None = None  # on the CPU: [n, p] need not fit on the GPU
    for start, g in iter_per_example_grads(
            task, model, params, data, target=target, chunk_size=chunk_size, projector=projector,
            show_progress=show_progress, desc=desc):
        if result is None:  # the parameters' (or projection's) dtype, preallocated once
            result = torch.empty(len(data), width, dtype=g.dtype)
        result[start : start + g.shape[0]] = g
    return result if result is not None else torch.empty(0, width)
