"""Per-example gradients captured by layer hooks: each layer's input on the forward pass and
its output gradient on the backward pass, for a whole chunk of examples in one batched pass.

A layer y = f(x; W) whose weight gradient is a sum over positions of an outer product,
dW = sum_t delta_t a_t^T, is *Kronecker*: its per-example gradient is kept as the factor pair
(a, delta) [b, T, in] x [b, T, out] and only formed when asked (see
:mod:`tdatune.features.factored` for products and projections straight from the factors):

* ``nn.Linear`` (any leading dimensions: tokens, positions),
* Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight stored [in, out]),
* ``nn.Conv2d`` (input unfolded into patches; groups 1, zero padding),
* ``nn.Embedding`` (a one-hot input, kept as token ids).

Affine normalisations (``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``BatchNorm`` in eval mode
with running statistics) give their small per-example gradients from the same pair
(dW = sum delta * x_hat, db = sum delta). Any other differentiated parameter (a raw
``nn.Parameter``, a layer of another kind, a layer called on inputs without a batch dimension)
is a *leftover*, differentiated per example by ``torch.func`` (vmap over grad) or, when the
model cannot run under vmap, by single-example backward passes.

A module called several times in one forward pass contributes every call (its positions are
concatenated); a parameter shared by several modules (tied embeddings) gets the sum of their
contributions. A module called on inputs broadcast over the batch (Hugging Face's position
ids, [1, T]) has its output expanded to the batch, so each example's gradient flows back to it
separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tdatune.data.batches import Tree

ATTRS = ("weight", "bias")


class CaptureRefused(RuntimeError):
    """The hooks saw something they cannot turn into per-example gradients for this batch."""


# --------------------------------------------------------------------------- layer rules


class LayerRule:
    """How one layer kind turns its input and output gradient into per-example gradients."""

    kind: str = ""
    kronecker: bool = False

    def refuse(self, module: nn.Module) -> str | None:
        """Why this module cannot be captured (None: it can)."""
        return None

    def kron(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kronecker factors (a [b, T, in], delta [b, T, out]) of one call."""
        raise NotImplementedError

    def grads(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
              ) -> dict[str, torch.Tensor]:
        """Per-example gradients of one call, {attr: [b, *shape]} (non-Kronecker rules)."""
        raise NotImplementedError


class LinearRule(LayerRule):
    """nn.Linear: a = input, delta = output gradient, weight [out, in]."""

    kind, kronecker = "linear", True

    def kron(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(b, -1, x.shape[-1]), dy.reshape(b, -1, dy.shape[-1])


class Conv1DRule(LinearRule):
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""

    kind = "conv1d"


class Conv2dRule(LayerRule):
    """nn.Conv2d: a = the input's unfolded patches [b, L, C k_h k_w], delta [b, L, out]."""

    kind, kronecker = "conv2d", True

    def refuse(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and module.padding != "valid" and any(
                d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size, strict=True)):
            return "padding='same' with an even receptive field"
        return None

    @staticmethod
    def _padding(module: nn.Conv2d) -> tuple[int, ...]:
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size,
                                                           strict=True))
        return tuple(module.padding)  # type: ignore[arg-type]

    def kron(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        patches = F.unfold(x.reshape(b, *x.shape[-3:]), module.kernel_size,
                           dilation=module.dilation, padding=self._padding(module),
                           stride=module.stride)
        return patches.transpose(1, 2), dy.reshape(b, dy.shape[-3], -1).transpose(1, 2)


class EmbeddingRule(LayerRule):
    """nn.Embedding: a = one-hot token (kept as ids [b, T]), delta [b, T, dim], weight [V, dim].
    Positions at ``padding_idx`` contribute nothing (as in nn.Embedding's own backward)."""

    kind, kronecker = "embedding", True

    def refuse(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises the weight in place"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq couples the examples of a batch"
        return None

    def kron(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = x.reshape(b, -1)
        delta = dy.reshape(b, -1, dy.shape[-1])
        if module.padding_idx is not None:
            delta = delta * (ids != module.padding_idx).unsqueeze(-1).to(delta.dtype)
        return ids, delta


class NormRule(LayerRule):
    """Affine normalisations: dW = sum over positions of delta * x_hat, db = sum of delta."""

    kind = "norm"

    def refuse(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.running_mean is None or module.training):
            return "batch normalisation with batch statistics couples the examples"
        return None

    def _normalised(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x_hat, and the number of trailing dims the affine parameters cover (0: channel 1)."""
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps), len(
                module.normalized_shape)
        if isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, eps=module.eps), len(
                module.normalized_shape)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps), 0
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(
            module.running_var.view(shape) + module.eps)
        return x_hat, 0

    def grads(self, module: nn.Module, x: torch.Tensor, dy: torch.Tensor, b: int
              ) -> dict[str, torch.Tensor]:
        x_hat, trailing = self._normalised(module, x)

        def per_example(t: torch.Tensor) -> torch.Tensor:
            if trailing:
                return t.reshape(b, -1, *t.shape[t.dim() - trailing:]).sum(1)
            return t.reshape(b, t.shape[1], -1).sum(-1)  # channel dim 1

        out = {}
        if getattr(module, "weight", None) is not None:
            out["weight"] = per_example(dy * x_hat)
        if getattr(module, "bias", None) is not None:
            out["bias"] = per_example(dy)
        return out


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The capture rule of a module's kind (None: its parameters are leftovers)."""
    if isinstance(module, nn.Linear):
        return LinearRule()
    if isinstance(module, nn.Conv2d):
        return Conv2dRule()
    if isinstance(module, nn.Embedding):
        return EmbeddingRule()
    if isinstance(module, _NORMS):
        return NormRule()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' Conv1D
        return Conv1DRule()
    return None


# --------------------------------------------------------------------------- the plan


@dataclass
class CapturedLayer:
    """A module whose parameters come from hooks: its rule and its differentiated parameters
    ({attr: flat parameter name})."""

    path: str
    module: nn.Module
    rule: LayerRule
    params: dict[str, str]
    shared: bool = False  # a parameter also belongs to another captured module

    @property
    def factored(self) -> bool:
        """Kept as Kronecker factors (its own parameters only, a Kronecker kind)."""
        return self.rule.kronecker and not self.shared


@dataclass
class CapturePlan:
    """Which differentiated parameters come from which hooked module, and which are leftovers."""

    names: list[str]
    shapes: dict[str, torch.Size]
    layers: list[CapturedLayer]
    leftover: list[str]
    refused: dict[str, str] = field(default_factory=dict)  # module path -> why not hooked
    copied: set[str] = field(default_factory=set)  # outputs handed on as copies (see Hooks)
    layouts: dict[str, str] = field(default_factory=dict)  # path -> batched/broadcast/shared

    @property
    def columns(self) -> dict[str, tuple[int, int]]:
        """Each parameter's columns in the flat [b, p] layout (``names`` order)."""
        out, col = {}, 0
        for k in self.names:
            n = math.prod(self.shapes[k])
            out[k] = (col, col + n)
            col += n
        return out

    def without(self, paths: set[str]) -> CapturePlan:
        """This plan with the given modules' parameters moved to the leftovers."""
        moved = {k for c in self.layers if c.path in paths for k in c.params.values()}
        keep = [c for c in self.layers if c.path not in paths]
        owners: dict[str, int] = {}
        for c in keep:
            for k in c.params.values():
                owners[k] = owners.get(k, 0) + 1
        layers = [CapturedLayer(c.path, c.module, c.rule, c.params,
                                any(owners[k] > 1 for k in c.params.values())) for c in keep]
        still = {k for c in layers for k in c.params.values()}
        leftover = [k for k in self.names if k in moved - still or k in self.leftover]
        return CapturePlan(self.names, self.shapes, layers, leftover,
                           {**self.refused, **{p: "not called per example" for p in paths}},
                           self.copied - paths,
                           {k: v for k, v in self.layouts.items() if k not in paths})


def plan_capture(model: nn.Module, names: list[str], shapes: dict[str, torch.Size]
                 ) -> CapturePlan:
    """Assign every differentiated parameter (``names``, as in ``model.named_parameters()``)
    to the hooked modules that use it; the rest are leftovers."""
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for full, p in model.named_parameters(remove_duplicate=False):
        alias[full] = canonical.setdefault(id(p), full)
    wanted = set(names)
    layers: list[CapturedLayer] = []
    refused: dict[str, str] = {}
    for path, module in model.named_modules():
        rule = rule_for(module)
        own = {a: alias[f"{path}.{a}" if path else a] for a in ATTRS
               if isinstance(getattr(module, a, None), nn.Parameter)}
        own = {a: k for a, k in own.items() if k in wanted}
        if rule is None or not own:
            continue
        extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ATTRS]
        reason = rule.refuse(module) or (f"own parameters {extra}" if extra else None)
        if reason:
            refused[path] = reason
            continue
        layers.append(CapturedLayer(path, module, rule, own))
    owners: dict[str, int] = {}
    for c in layers:
        for k in c.params.values():
            owners[k] = owners.get(k, 0) + 1
    for c in layers:
        c.shared = any(owners[k] > 1 for k in c.params.values())
    covered = set(owners)
    return CapturePlan(list(names), dict(shapes), layers,
                       [k for k in names if k not in covered], refused)


# --------------------------------------------------------------------------- the hooks


@dataclass
class Captured:
    """One chunk's captured layers: for a factored layer its Kronecker factors (calls
    concatenated along positions), for every other captured or leftover parameter its
    materialised per-example gradients [b, numel]."""

    b: int
    factors: list[tuple[CapturedLayer, torch.Tensor, torch.Tensor]]
    dense: dict[str, torch.Tensor]


class Hooks:
    """Forward hooks on a plan's modules for one batch: keep each call's input and output.
    A module whose output the model changes in place (``h += residual``) hands the model a
    copy, so the kept output is the one whose gradient the hooks need."""

    def __init__(self, plan: CapturePlan) -> None:
        self.plan = plan
        self.b = 0
        self.active = False
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.handles = [c.module.register_forward_hook(self._hook(c.path)) for c in plan.layers]

    def _hook(self, path: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not self.active:
                return None
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(
                    output, torch.Tensor):
                raise CaptureRefused(f"{path}: called without a tensor input and output")
            x = args[0].detach()
            layout = self.plan.layouts.get(path) or self._layout(x, output)
            self.plan.layouts.setdefault(path, layout)
            if layout == "broadcast":  # [1, ...] broadcast over the batch (position ids)
                if x.shape[:1] != (1,) or output.shape[:1] != (1,):
                    raise CaptureRefused(f"{path}: input of shape {tuple(x.shape)} in a batch "
                                         f"of {self.b}, [1, ...] before")
                x = x.expand(self.b, *x.shape[1:])
                output = output.expand(self.b, *output.shape[1:])
            elif layout == "shared":  # no batch dimension ([T] positions): one per example
                x = x.expand(self.b, *x.shape)
                output = output.expand(self.b, *output.shape)
            elif x.shape[:1] != (self.b,) or output.shape[:1] != (self.b,):
                raise CaptureRefused(f"{path}: input of shape {tuple(x.shape)} in a batch "
                                     f"of {self.b}")
            self.calls.setdefault(path, []).append((x, output, output._version))
            return output.clone() if path in self.plan.copied else output
        return hook

    def _layout(self, x: torch.Tensor, output: torch.Tensor) -> str:
        """How a module's first call (on the probe batch) relates to the batch: batched
        (leading size b), broadcast (leading size 1) or shared (no batch dimension). Recorded
        once, so a later batch whose size happens to equal a sequence length is not misread;
        a wrong reading is caught by the probe's check against single-example passes."""
        if x.dim() > 0 and x.shape[0] == self.b and output.shape[:1] == (self.b,):
            return "batched"
        if x.dim() > 0 and x.shape[0] == 1 and output.shape[:1] == (1,):
            return "broadcast"
        return "shared"

    def start(self, b: int) -> None:
        """Forget the previous batch."""
        self.b = b
        self.active = True
        self.calls = {}

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture(plan: CapturePlan, hooks: Hooks, values: Callable[[], torch.Tensor], b: int,
            leftover: Callable[[list[str]], dict[str, torch.Tensor]] | None = None) -> Captured:
    """Run ``values()`` (the per-example losses or outputs [b] of one batch, under the hooks)
    and backpropagate their sum once: since examples do not interact (eval mode), the gradient
    of the sum w.r.t. row i of a layer's output is example i's own output gradient.

    ``leftover(names)`` gives {name: [b, numel]} for the leftover parameters."""
    hooks.start(b)
    with torch.enable_grad():
        try:
            out = values()
        finally:
            hooks.active = False
        if out.shape != (b,):
            raise CaptureRefused(f"the per-example values have shape {tuple(out.shape)}, "
                                 f"expected ({b},)")
        uncalled = {c.path for c in plan.layers if c.path not in hooks.calls}
        if uncalled:
            raise UncalledLayers(uncalled)
        seq = [(c, i) for c in plan.layers for i in range(len(hooks.calls[c.path]))]
        outputs = [hooks.calls[c.path][i][1] for c, i in seq]
        changed = sorted({c.path for c, i in seq if hooks.calls[c.path][i][1]._version
                          != hooks.calls[c.path][i][2]})
        if changed:
            raise ModifiedInPlace(set(changed))
        grads = torch.autograd.grad(out.sum(), outputs, allow_unused=True)
    per_call: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (c, i), o, g in zip(seq, outputs, grads, strict=True):
        x = hooks.calls[c.path][i][0]
        per_call.setdefault(c.path, []).append((x, torch.zeros_like(o) if g is None else g))
    factors: list[tuple[CapturedLayer, torch.Tensor, torch.Tensor]] = []
    dense: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for c in plan.layers:
            pairs = per_call[c.path]
            if c.rule.kronecker:
                parts = [c.rule.kron(c.module, x, g, b) for x, g in pairs]
                a = torch.cat([p[0] for p in parts], dim=1)
                d = torch.cat([p[1] for p in parts], dim=1)
                if c.factored:
                    factors.append((c, a, d))
                    continue
                contrib = kron_grads(c, a, d)
            else:
                contrib = {}
                for x, g in pairs:
                    for attr, t in c.rule.grads(c.module, x, g, b).items():
                        contrib[attr] = contrib[attr] + t if attr in contrib else t
            for attr, t in contrib.items():
                k = c.params.get(attr)
                if k is None:
                    continue
                t = t.reshape(b, -1)
                dense[k] = dense[k] + t if k in dense else t
    if plan.leftover:
        if leftover is None:
            raise CaptureRefused(f"leftover parameters {plan.leftover} need a fallback")
        dense.update({k: v.reshape(b, -1) for k, v in leftover(plan.leftover).items()})
    return Captured(b, factors, dense)


class ModifiedInPlace(CaptureRefused):
    """Hooked modules whose outputs the model changed in place."""

    def __init__(self, paths: set[str]) -> None:
        super().__init__(f"outputs of {sorted(paths)} were modified in place")
        self.paths = paths


class UncalledLayers(CaptureRefused):
    """Hooked modules whose forward never ran (their parameters may be used another way)."""

    def __init__(self, paths: set[str]) -> None:
        super().__init__(f"modules never called: {sorted(paths)}")
        self.paths = paths


def kron_grads(layer: CapturedLayer, a: torch.Tensor, d: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Per-example {attr: [b, *shape]} of a Kronecker layer from its factors."""
    b = d.shape[0]
    module = layer.module
    out: dict[str, torch.Tensor] = {}
    if "weight" in layer.params:
        w = module.weight
        if isinstance(layer.rule, EmbeddingRule):
            g = d.new_zeros(b, w.shape[0], d.shape[-1])
            g.scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d)
        elif isinstance(layer.rule, Conv1DRule):
            g = torch.einsum("bti,bto->bio", a, d)
        else:
            g = torch.einsum("bto,bti->boi", d, a)
        out["weight"] = g.reshape(b, *w.shape)
    if "bias" in layer.params:
        out["bias"] = d.sum(1)
    return out


def write_flat(plan: CapturePlan, captured: Captured, dest: torch.Tensor) -> None:
    """Materialise the captured gradients into ``dest`` [b, p] (the ``names`` layout)."""
    cols = plan.columns
    b = captured.b
    with torch.no_grad():
        for c, a, d in captured.factors:
            lo_w = cols[c.params["weight"]] if "weight" in c.params else None
            if (lo_w is not None and a.shape[1] == 1 and isinstance(c.rule, LinearRule)
                    and not isinstance(c.rule, Conv1DRule)):
                view = dest[:, lo_w[0] : lo_w[1]].unflatten(1, (d.shape[-1], a.shape[-1]))
                torch.mul(d[:, 0, :, None], a[:, 0, None, :], out=view)
                if "bias" in c.params:
                    lo, hi = cols[c.params["bias"]]
                    dest[:, lo:hi] = d[:, 0]
                continue
            for attr, t in kron_grads(c, a, d).items():
                lo, hi = cols[c.params[attr]]
                dest[:, lo:hi] = t.reshape(b, -1)
        for k, t in captured.dense.items():
            lo, hi = cols[k]
            dest[:, lo:hi] = t


def single_example_grads(model_call: Callable[[Tree], torch.Tensor], x: Tree, b: int,
                         params: dict[str, torch.Tensor], names: list[str],
                         index: Callable[[Tree, int], Tree]) -> dict[str, torch.Tensor]:
    """{name: [b, numel]} by one forward and backward pass per example (any model)."""
    req = [params[k] for k in names]
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    with torch.enable_grad():
        for i in range(b):
            value = model_call(index(x, i))
            gs = torch.autograd.grad(value.sum(), req, allow_unused=True)
            for k, g, p in zip(names, gs, req, strict=True):
                rows[k].append((torch.zeros_like(p) if g is None else g).reshape(-1))
    return {k: torch.stack(v) for k, v in rows.items()}


__all__ = [
    "CapturePlan",
    "CaptureRefused",
    "Captured",
    "CapturedLayer",
    "Hooks",
    "LayerRule",
    "ModifiedInPlace",
    "UncalledLayers",
    "capture",
    "kron_grads",
    "plan_capture",
    "rule_for",
    "single_example_grads",
    "write_flat",
]
