"""Lock-step SGD for M stacked models that are chains of Linear layers and ReLUs.

The MLPs of the benchmark settings (and logistic regression trained by SGD) are chains:
Linear, ReLU, ..., Linear on flattened inputs, trained on the cross-entropy. For them
:func:`tdatune.models.batched.train_batched` does not go through autograd. The forward pass,
the backward pass and SGD's momentum update are written out with batched matrix products,
and each weight's gradient goes straight into its momentum buffer
(``buf <- momentum * buf + a^T delta``, one ``baddbmm``). So no gradient tensor is written
and read back, and no autograd graph is built per step. The arithmetic is ``train_model``'s
(SGD with momentum, weight decay added to the gradient, no dampening or Nesterov) up to float
rounding.

A model counts as a chain only when (1) its leaf modules are Linear, ReLU, Flatten or
Identity, (2) its parameters are exactly those Linears', and (3) on probe inputs with random
parameters, the chain computes what the task's own forward computes. Anything else trains
through autograd.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tdatune.models.outputs import cross_entropy
from tdatune.models.task import Params, Task
from tdatune.models.training import TrainRecipe

CACHE_SHARE = 0.5  # the share of the last-level cache a chain's chunk may fill

_PASS_THROUGH = (nn.Flatten, nn.Identity)


@dataclass(frozen=True)
class ChainLayer:
    """One Linear of a chain: its parameter names and whether a ReLU follows it."""

    weight: str
    bias: str | None
    relu: bool
    in_features: int
    out_features: int


def find_linear_chain(task: Task, model: nn.Module, example: torch.Tensor) -> \
        tuple[ChainLayer, ...] | None:
    """The chain of Linear layers (each maybe followed by a ReLU) that ``task``'s forward
    computes on flattened inputs shaped like ``example`` (one example), or None when the
    model is not such a chain (checked on probe inputs with random parameters)."""
    layers: list[ChainLayer] = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            layers.append(ChainLayer(f"{prefix}weight",
                                     f"{prefix}bias" if module.bias is not None else None,
                                     False, module.in_features, module.out_features))
        elif isinstance(module, nn.ReLU) and layers and not layers[-1].relu:
            last = layers[-1]
            layers[-1] = ChainLayer(last.weight, last.bias, True, last.in_features,
                                    last.out_features)
        elif not isinstance(module, _PASS_THROUGH):
            return None
    named = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    if not layers or named != {k for k, _ in model.named_parameters()}:
        return None
    if layers[0].in_features != example.numel() or any(
            a.out_features != b.in_features for a, b in itertools.pairwise(layers)):
        return None
    chain = tuple(layers)
    return chain if _computes_the_forward(task, model, chain, example) else None


def _computes_the_forward(task: Task, model: nn.Module, chain: tuple[ChainLayer, ...],
                          example: torch.Tensor) -> bool:
    """Whether the chain's forward equals ``task.call`` on random parameters and inputs."""
    gen = torch.Generator().manual_seed(0)
    first = next(model.parameters())
    dtype, device = first.dtype, first.device
    params = {k: (torch.randn(v.shape, generator=gen, dtype=dtype)
                  / max(v.shape[-1], 1) ** 0.5).to(device)
              for k, v in model.named_parameters()}
    probe = torch.randn((6, *example.shape), generator=gen, dtype=dtype).to(device)
    with torch.no_grad():
        try:
            got = task.call(model, params, probe)
        except Exception:  # any failure means "not this chain"
            return False
        h = probe.reshape(len(probe), -1)
        for layer in chain:
            h = F.linear(h, params[layer.weight], params[layer.bias] if layer.bias else None)
            h = h.clamp_min(0) if layer.relu else h
    return (isinstance(got, torch.Tensor) and got.shape == h.shape
            and torch.allclose(got, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()) + 1e-7))


def chain_for(task: Task, recipe: TrainRecipe, model: nn.Module, inputs: torch.Tensor,
              targets: torch.Tensor) -> tuple[ChainLayer, ...] | None:
    """The model's chain when the written-out path trains it exactly as ``train_model``
    would: an SGD recipe without gradient clipping, the built-in cross-entropy on class
    indices, tensor inputs; else None."""
    if (recipe.optimizer != "sgd" or recipe.grad_clip is not None
            or task.loss_fn is not cross_entropy or not isinstance(inputs, torch.Tensor)
            or not isinstance(targets, torch.Tensor) or targets.dim() != 1
            or targets.dtype not in (torch.int64, torch.int32) or len(inputs) == 0):
        return None
    return find_linear_chain(task, model, inputs[0])


def chain_models_in_cache(chain: tuple[ChainLayer, ...], batch_rows: int, itemsize: int,
                          cache_bytes: int) -> int:
    """How many models' parameters, momentum, and one step's activations and their
    gradients fill ``CACHE_SHARE`` of a ``cache_bytes`` cache (at least 1)."""
    params = sum(layer.in_features * layer.out_features + layer.out_features for layer in chain)
    widths = chain[0].in_features + sum(layer.out_features for layer in chain)
    per_model = itemsize * (2 * params + 2 * batch_rows * widths)
    return max(1, int(CACHE_SHARE * cache_bytes) // per_model)


class ChainStepper:
    """SGD steps of M stacked chains, written out: ``step`` takes the ``[M, B]`` example
    indices of each model's batch and returns the M objectives before the step (mean loss
    plus the L2 term), as the autograd path does."""

    kind = "linear-chain"

    def __init__(self, chain: tuple[ChainLayer, ...], params: Params, inputs: torch.Tensor,
                 targets: torch.Tensor, recipe: TrainRecipe) -> None:
        self.chain = chain
        self.x = inputs.reshape(len(inputs), -1)
        self.y = targets.long()
        self.momentum, self.wd = float(recipe.momentum), float(recipe.weight_decay)
        # Every model's parameters in one [M, P] tensor and the momentum in another, so the
        # update and the squared norms are one pass each. Weights are [M, in, out] views (the
        # transpose of nn.Linear's layout): h @ W forward, and the gradient a^T delta comes
        # out in this layout; biases [M, 1, out] views.
        first = params[chain[0].weight]
        m = first.shape[0]
        total = sum(layer.in_features * layer.out_features
                    + (layer.out_features if layer.bias else 0) for layer in chain)
        self.flat = torch.empty(m, total, dtype=first.dtype, device=first.device)
        self.buf = torch.zeros_like(self.flat)
        at = 0

        def carve(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
            """The next [M, ...] views of the parameters and of the momentum."""
            nonlocal at
            size = shape[1] * shape[2]
            views = (self.flat[:, at : at + size].view(shape),
                     self.buf[:, at : at + size].view(shape))
            at += size
            return views

        self.weights, self.buf_w, self.biases, self.buf_b = [], [], [], []
        for layer in chain:
            w, bw = carve((m, layer.in_features, layer.out_features))
            b, bb = carve((m, 1, layer.out_features)) if layer.bias else (None, None)
            self.weights.append(w)
            self.buf_w.append(bw)
            self.biases.append(b)
            self.buf_b.append(bb)
        with torch.no_grad():
            for layer, w, b in zip(chain, self.weights, self.biases, strict=True):
                w.copy_(params[layer.weight].detach().transpose(-1, -2))
                if b is not None:
                    b.copy_(params[layer.bias].detach().reshape(b.shape))
        self._rows = torch.empty(0, dtype=self.x.dtype, device=self.x.device)
        self._neg: torch.Tensor | None = None
        self._one: torch.Tensor | None = None

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch's inputs ``[M, B, d]``, gathered into one reused buffer."""
        count = idx.numel()
        if self._rows.shape[0] < count:
            self._rows = torch.empty(count, self.x.shape[1], dtype=self.x.dtype,
                                     device=self.x.device)
        rows = self._rows[:count]
        torch.index_select(self.x, 0, idx.reshape(-1), out=rows)
        return rows.view(*idx.shape, -1)

    def step(self, idx: torch.Tensor, lr: float) -> torch.Tensor:
        """One SGD step of every model on its rows ``idx``; the objectives before it."""
        batch = idx.shape[1]
        acts = [self._gather(idx)]
        for layer, w, b in zip(self.chain, self.weights, self.biases, strict=True):
            h = torch.bmm(acts[-1], w) if b is None else torch.baddbmm(b, acts[-1], w)
            acts.append(h.clamp_min_(0) if layer.relu else h)
        delta = torch.log_softmax(acts[-1], dim=-1)
        target = self.y[idx].unsqueeze(-1)
        losses = delta.gather(-1, target).squeeze(-1).mean(1).neg_()
        # B * d(mean CE)/d(logits) = softmax - one-hot; the 1 / B goes into each product.
        delta.exp_().scatter_add_(-1, target, self._minus_ones(target))
        ones = self._ones(batch)
        for i in range(len(self.chain) - 1, -1, -1):
            if self.chain[i].relu:
                delta = torch.ops.aten.threshold_backward(delta, acts[i + 1], 0.0)
            self.buf_w[i].baddbmm_(acts[i].transpose(-1, -2), delta, beta=self.momentum,
                                   alpha=1.0 / batch)
            if self.buf_b[i] is not None:
                self.buf_b[i].baddbmm_(ones, delta, beta=self.momentum, alpha=1.0 / batch)
            if i > 0:
                delta = torch.bmm(delta, self.weights[i].transpose(-1, -2))
        if self.wd:
            norms = torch.linalg.vector_norm(self.flat, dim=1)
            losses += 0.5 * self.wd * norms * norms
            self.buf.add_(self.flat, alpha=self.wd)
        self.flat.add_(self.buf, alpha=-lr)
        return losses

    def _minus_ones(self, target: torch.Tensor) -> torch.Tensor:
        """-1 at every target position (the one-hot's sign), cached by shape."""
        if self._neg is None or self._neg.shape != target.shape:
            self._neg = torch.full(target.shape, -1.0, dtype=self.x.dtype, device=self.x.device)
        return self._neg

    def _ones(self, batch: int) -> torch.Tensor:
        """``[M, 1, B]`` ones: the bias gradient is ones @ delta."""
        num_models = self.weights[0].shape[0]
        if self._one is None or self._one.shape[-1] != batch:
            self._one = torch.ones(num_models, 1, batch, dtype=self.x.dtype, device=self.x.device)
        return self._one

    def state(self) -> dict:
        """What a resumed run needs: the parameters and the momentum buffers."""
        return {"flat": self.flat, "buf": self.buf}

    def load(self, saved: dict) -> None:
        """Continue from a :meth:`state` saved by a run of the same models."""
        with torch.no_grad():
            self.flat.copy_(saved["flat"])
            self.buf.copy_(saved["buf"])

    def params(self) -> Params:
        """The stacked parameters in the model's own layout ``[M, ...]``."""
        out: Params = {}
        for layer, w, b in zip(self.chain, self.weights, self.biases, strict=True):
            out[layer.weight] = w.transpose(-1, -2).contiguous()
            if layer.bias is not None and b is not None:
                out[layer.bias] = b.reshape(b.shape[0], -1).clone()
        return out


__all__ = ["CACHE_SHARE", "ChainLayer", "ChainStepper", "chain_for", "chain_models_in_cache",
           "find_linear_chain"]
