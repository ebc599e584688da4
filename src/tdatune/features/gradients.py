"""Per-example gradients with torch.func (vmap over grad), in chunks so memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, vmap

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, batch_len, tree_map
from tdatune.features.layerwise import LayerRanTwice, LinearTaps
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task
from tdatune.utils.checks import check_choice, check_finite_rows
from tdatune.utils.progress import progress

GRADIENT_TARGETS = ("loss", "output")
_VMAP_FIX = (
    "per-example gradients call the model on one example at a time under torch.func.vmap, "
    "and its forward used a tensor's value in Python control flow (an `if` on a tensor, "
    ".item(), .all()), which vmap cannot do. Hugging Face models do this with a 2-D "
    "attention_mask; give forward=, a module-level function that hands the model a 4-D "
    "additive mask instead, e.g. model(input_ids=x['input_ids'], attention_mask=(1.0 - "
    "x['attention_mask'][:, None, None, :].float()) * torch.finfo(torch.float32).min), or no "
    "mask when nothing is padded")


def num_params(params: Params) -> int:
    """Total number of scalars in a parameter dict."""
    return sum(p.numel() for p in params.values())


def flatten(tree: Params, names: list[str], batch: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate a dict of [batch, *shape] tensors into [batch, p] in ``names`` order
    (into ``out`` when given)."""
    return torch.cat([tree[k].reshape(batch, -1) for k in names], dim=1, out=out)


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

    def unsqueeze(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(0)

    def single(p: Params, x: Tree, y: Tree) -> torch.Tensor:
        o = task.call(model, p, tree_map(unsqueeze, x))
        return fn(o, tree_map(unsqueeze, y))[0]

    per_example = vmap(grad(single), in_dims=(None, 0, 0))

    def generic(x: Tree, y: Tree, dest: torch.Tensor) -> bool:
        # Gradients are data here: no graph back to parameters outside ``params`` (grad
        # transforms ignore an outer no_grad, so the per-example gradients are unaffected).
        with torch.no_grad():
            try:
                grads = per_example(detached, x, y)
            except RuntimeError as exc:
                if "vmap" in str(exc) and "control flow" in str(exc):
                    raise RuntimeError(f"{task.name}: {_VMAP_FIX}") from exc
                raise
            flatten(grads, names, dest.shape[0], out=dest)
        return True

    compute = generic
    layers = _linear_layout(model, names)
    if layers is not None and len(data) > 0:
        outer = _OuterProductGrads(task, model, detached, fn, layers)
        probe = min(4, len(data))
        _, x, y = next(data.slice(0, probe).batches(probe, device))
        fast, slow = (torch.empty(probe, width, dtype=dtype, device=device) for _ in range(2))
        if outer(x, y, fast) and generic(x, y, slow) and _same(fast, slow):
            compute = outer

    for start, x, y in progress(data.batches(chunk_size, device), enabled=show_progress,
                                desc=desc, total=data.num_batches(chunk_size)):
        b = x.shape[0] if isinstance(x, torch.Tensor) else batch_len(x)
        g = (out[start : start + b] if out is not None
             else torch.empty(b, width, dtype=dtype, device=device))
        if not compute(x, y, g):  # the linear path refused this chunk's shapes
            generic(x, y, g)
        check_finite_rows(f"per-example {target} gradients", g, offset=start)
        if projector is not None:
            g = projector.project(g)
        yield start, g


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))


def _linear_layout(model: nn.Module, names: list[str]) -> list[_LinearColumns] | None:
    """Where each nn.Linear owning differentiated parameters writes in the flat ``names``
    layout; None when some differentiated parameter does not belong to an nn.Linear."""
    owner: dict[str, tuple[str, nn.Linear, str]] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            for attr in ("weight", "bias"):
                if getattr(module, attr) is not None:
                    owner[f"{mod_name}.{attr}" if mod_name else attr] = (mod_name, module, attr)
    if not names or any(k not in owner for k in names):
        return None
    layers: dict[str, _LinearColumns] = {}
    col = 0
    for k in names:
        mod_name, module, attr = owner[k]
        entry = layers.setdefault(mod_name, _LinearColumns(mod_name, module))
        setattr(entry, f"{attr}_col", col)
        col += getattr(module, attr).numel()
    return list(layers.values())


@dataclass
class _LinearColumns:
    """A linear layer and the first columns of its weight and bias in the flat gradient
    (-1: that parameter is not differentiated)."""

    name: str
    layer: nn.Linear
    weight_col: int = -1
    bias_col: int = -1


class _OuterProductGrads:
    """Per-example gradients of linear-layer parameters from one batched backward pass."""

    def __init__(self, task: Task, model: nn.Module, params: Params,
                 fn: Callable[[object, Tree], torch.Tensor],
                 layers: list[_LinearColumns]) -> None:
        self.task, self.model, self.fn, self.layers = task, model, fn, layers
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}

    def __call__(self, x: Tree, y: Tree, dest: torch.Tensor) -> bool:
        """Fill ``dest`` [b, p]; False (dest untouched) when a layer's input is not
        [b, features] or a layer ran other than once."""
        with LinearTaps([(c.name, c.layer) for c in self.layers]) as taps, torch.enable_grad():
            try:
                values = self.fn(self.task.call(self.model, self.params, x), y)
            except LayerRanTwice:
                return False
            b = dest.shape[0]
            acts = [taps.inputs.get(c.name) for c in self.layers]
            if values.shape != (b,) or any(
                    a is None or a.dim() != 2 or a.shape[0] != b for a in acts):
                return False
            # Examples do not interact (eval mode), so d(sum of values)/d(output row i) is
            # example i's own output gradient.
            deltas = taps.output_grads(values.sum())
        with torch.no_grad():
            for c, a, delta in zip(self.layers, acts, deltas, strict=True):
                rows, cols = delta.shape[1], a.shape[1]
                if c.weight_col >= 0:
                    view = dest[:, c.weight_col : c.weight_col + rows * cols]
                    torch.mul(delta[:, :, None], a[:, None, :], out=view.unflatten(1, (rows, cols)))
                if c.bias_col >= 0:
                    dest[:, c.bias_col : c.bias_col + rows] = delta
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
