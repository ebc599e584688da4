"""Per-example gradients in chunks so memory stays bounded: layer hooks where the layers allow
(:mod:`tdatune.features.capture`), torch.func (vmap over grad) or single-example backward
passes for the rest."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import grad, vmap

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, batch_len, tree_map, tree_slice
from tdatune.features.budget import check_fits, estimate_gradients
from tdatune.features.capture import (
    Captured,
    CaptureRefused,
    Hooks,
    ModifiedInPlace,
    UncalledLayers,
    capture,
    plan_capture,
    single_example_grads,
    write_flat,
)
from tdatune.features.factored import KroneckerProjector
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task
from tdatune.utils.atomic import notice
from tdatune.utils.checks import check_choice, check_finite_rows
from tdatune.utils.progress import progress

GRADIENT_TARGETS = ("loss", "output")
SAID_BATCHING: set[tuple[str, tuple[str, ...]]] = set()  # (task, operations): said once a process
_BATCHING_RULE = re.compile(r"not yet implemented the batching rule for (\S+?)\.? ")

def num_params(params: Params) -> int:
    """Total number of scalars in a parameter dict."""
    return sum(p.numel() for p in params.values())


class GradientSource:
    """Per-example gradients of one task's loss or output w.r.t. ``params``, a batch at a time.

    The parameters of hooked layers (:mod:`tdatune.features.capture`) come from one batched
    forward and backward pass; leftovers from vmap over grad, or single-example backward
    passes when the model cannot run under vmap. On construction the hooked gradients of the
    first examples are checked against single-example backward passes (any model, no vmap);
    a model on which they disagree (a module coupling the examples of a batch, a parameter
    also used outside its module) is differentiated without hooks, and ``reason`` says why.
    """

    def __init__(self, task: Task, model: nn.Module, params: Params, *, target: str = "loss",
                 probe: ArrayDataset | None = None) -> None:
        check_choice("gradient target", target, GRADIENT_TARGETS)
        self.task, self.model, self.target = task, model, target
        self.fn = task.loss_fn if target == "loss" else task.output_fn
        model.eval()
        self.names = list(params)
        self.detached = {k: v.detach() for k, v in params.items()}
        self.width = num_params(params)
        self.dtype = next(iter(params.values())).dtype
        self.device = next(iter(params.values())).device
        self.plan = plan_capture(model, self.names, {k: v.shape for k, v in params.items()})
        self.mode = "hooks" if self.plan.layers else "vmap"
        self.reason = "" if self.plan.layers else "no layer of a hooked kind"
        self._vmap_ok = True
        if self.mode == "hooks" and probe is not None and len(probe) > 0:
            self._verify(probe)

    # -- the two reference paths ----------------------------------------------------------

    def _loop(self, names: list[str], x: Tree, y: Tree, b: int) -> dict[str, torch.Tensor]:
        req = {k: v.detach().requires_grad_(True) if k in names else v
               for k, v in self.detached.items()}

        def call(xy: tuple[Tree, Tree]) -> torch.Tensor:
            return self.fn(self.task.call(self.model, req, xy[0]), xy[1])

        return single_example_grads(call, (x, y), b, req, names,
                                    lambda t, i: tree_slice(t, i, i + 1))

    def _vmap(self, names: list[str], x: Tree, y: Tree, b: int) -> dict[str, torch.Tensor]:
        fixed = {k: v for k, v in self.detached.items() if k not in names}

        def single(p: Params, xi: Tree, yi: Tree) -> torch.Tensor:
            o = self.task.call(self.model, {**fixed, **p}, tree_map(_unsqueeze, xi))
            return self.fn(o, tree_map(_unsqueeze, yi))[0]

        # Gradients are data here: no graph back to parameters outside ``params`` (grad
        # transforms ignore an outer no_grad, so the per-example gradients are unaffected).
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = vmap(grad(single), in_dims=(None, 0, 0))(
                {k: self.detached[k] for k in names}, x, y)
        self._pass_on(caught, names)
        return {k: grads[k].reshape(b, -1) for k in names}

    def _pass_on(self, caught: list[warnings.WarningMessage], names: list[str]) -> None:
        """Re-issue the warnings of one vmap call, except PyTorch's "no batching rule" one
        (repeated on every chunk): that is said once per process for a task and its operations,
        in tdatune's words (a sweep builds many gradient sources for one model)."""
        slow: list[str] = []
        for w in caught:
            op = _BATCHING_RULE.search(str(w.message))
            if op is None:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                       source=w.source)
            elif op.group(1) not in slow:
                slow.append(op.group(1))
        said = (self.task.name, tuple(sorted(slow)))
        if slow and said not in SAID_BATCHING:
            SAID_BATCHING.add(said)
            warnings.warn(
                f"tdatune: {self.task.name}: torch.func.vmap has no batching rule for "
                f"{', '.join(slow)}, so PyTorch runs these one example at a time (slower; the "
                f"gradients are the same) for the parameters differentiated without layer "
                f"hooks ({_short(names)}). Said once here instead of PyTorch's warning on "
                "every chunk",
                UserWarning, stacklevel=2)

    def per_example(self, names: list[str], x: Tree, y: Tree, b: int
                    ) -> dict[str, torch.Tensor]:
        """{name: [b, numel]} without hooks: vmap over grad, or single-example passes when
        the model cannot run under vmap (said once on stderr)."""
        if self._vmap_ok:
            try:
                return self._vmap(names, x, y, b)
            except RuntimeError as exc:
                if "vmap" not in str(exc):
                    raise
                self._vmap_ok = False
                notice(f"{self.task.name}: the model cannot run under torch.func.vmap "
                       f"({str(exc).splitlines()[0][:120]}); the parameters it differentiates "
                       f"without layer hooks ({_short(names)}) are differentiated one example "
                       "at a time, which is slow")
        return self._loop(names, x, y, b)

    # -- hooks ----------------------------------------------------------------------------

    def _captured(self, x: Tree, y: Tree, b: int) -> Captured:
        req = {k: v.detach().requires_grad_(True) for k, v in self.detached.items()}
        with Hooks(self.plan) as hooks:
            return capture(self.plan, hooks,
                           lambda: self.fn(self.task.call(self.model, req, x), y), b,
                           lambda names: self.per_example(names, x, y, b))

    def _verify(self, probe: ArrayDataset) -> None:
        n = min(4, len(probe))
        _, x, y = next(probe.slice(0, n).batches(n, self.device))
        reference = self._loop(self.names, x, y, n)
        for _ in range(2 * len(self.plan.layers) + 2):
            try:
                got = self._captured(x, y, n)
            except UncalledLayers as exc:
                self.plan = self.plan.without(exc.paths)
                if not self.plan.layers:
                    break
                continue
            except ModifiedInPlace as exc:
                if exc.paths <= self.plan.copied:
                    self.mode, self.reason = "vmap", str(exc)
                    return
                self.plan.copied |= exc.paths
                continue
            except CaptureRefused as exc:
                self.mode, self.reason = "vmap", str(exc)
                return
            except (RuntimeError, ValueError, IndexError) as exc:  # the model broke on hooks
                self.mode, self.reason = "vmap", f"the model failed under the hooks: {exc}"
                return
            dest = torch.empty(n, self.width, dtype=self.dtype, device=self.device)
            write_flat(self.plan, got, dest)
            slow = torch.cat([reference[k] for k in self.names], dim=1)
            if not _same(dest, slow):
                self.mode = "vmap"
                self.reason = ("hooked gradients differ from single-example backward passes "
                               "(a module couples the examples of a batch, or a hooked "
                               "parameter is also used outside its module)")
            return
        self.mode, self.reason = "vmap", "no hooked layer is called per example"

    # -- one batch ------------------------------------------------------------------------

    def captured(self, x: Tree, y: Tree, b: int) -> Captured:
        """One batch as :class:`Captured` (factors of hooked Kronecker layers, the rest
        materialised); without hooks every parameter is materialised."""
        if self.mode == "hooks":
            try:
                return self._captured(x, y, b)
            except CaptureRefused:
                pass
        return Captured(b, [], self.per_example(self.names, x, y, b))

    def write(self, x: Tree, y: Tree, dest: torch.Tensor) -> None:
        """Fill ``dest`` [b, p] with the batch's per-example gradients (``names`` layout)."""
        b = dest.shape[0]
        if self.mode == "hooks":
            try:
                write_flat(self.plan, self._captured(x, y, b), dest)
                return
            except CaptureRefused:
                pass
        grads = self.per_example(self.names, x, y, b)
        torch.cat([grads[k] for k in self.names], dim=1, out=dest)


def _unsqueeze(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def _short(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def iter_per_example_grads(
    task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", chunk_size: int = 256,
    projector: Projector | KroneckerProjector | None = None,
    show_progress: bool = False, desc: str = "gradients", out: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, G_chunk)``: gradients of each example's loss or output w.r.t. ``params``.

    ``params`` are the trainable parameters differentiated (buffers stay in ``model``).
    The model is put in eval mode, so normalisation layers use stored statistics and
    examples do not interact. Chunks are [b, p] in the parameters' dtype, or [b, d] after
    projection. With ``out`` ([n, p], unprojected only) each chunk is written into
    ``out[start : start + b]`` and that view is yielded. How the gradients are computed:
    :class:`GradientSource` (layer hooks, checked against single-example passes).
    """
    check_choice("gradient target", target, GRADIENT_TARGETS)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if out is not None and projector is not None:
        raise ValueError("out= holds unprojected gradients; it cannot be combined with a projector")
    source = GradientSource(task, model, params, target=target, probe=data)
    for start, x, y in progress(data.batches(chunk_size, source.device), enabled=show_progress,
                                desc=desc, total=data.num_batches(chunk_size)):
        b = x.shape[0] if isinstance(x, torch.Tensor) else batch_len(x)
        if isinstance(projector, KroneckerProjector):
            g = projector.project_captured(source.captured(x, y, b))
            check_finite_rows(f"projected per-example {target} gradients", g, offset=start)
            yield start, g
            continue
        g = (out[start : start + b] if out is not None
             else torch.empty(b, source.width, dtype=source.dtype, device=source.device))
        source.write(x, y, g)
        check_finite_rows(f"per-example {target} gradients", g, offset=start)
        if projector is not None:
            g = projector.project(g)
        yield start, g


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)))


def per_example_grads(
    task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
    target: str = "loss", chunk_size: int = 256,
    projector: Projector | KroneckerProjector | None = None,
    show_progress: bool = False, desc: str = "gradients",
) -> torch.Tensor:
    """All per-example gradients as one [n, p] (or [n, d]) tensor on the CPU, in the
    parameters' dtype (the projection's after projection). A run whose memory would not fit
    is refused first, with the projection dimension or chunk size that would
    (:func:`tdatune.features.budget.check_fits`)."""
    first = next(iter(params.values()))
    width = projector.d if projector is not None else num_params(params)
    check_fits(estimate_gradients(params, len(data), projector=projector, chunk_size=chunk_size,
                                  in_memory=True), what=desc)
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
