"""TracIn: score = - sum_t eta_t grad f(z'; theta_t)^T grad l(z_i; theta_t).

Sign. An SGD step on z_i with step size eta moves theta by -eta grad l(z_i), which changes f
by about -eta grad f . grad l: so including z_i raises f when grad f . (-grad l) > 0, and the
score is that product summed over checkpoints (for f = -loss it is TracIn's original
grad l(z') . grad l(z_i)). With ``normalize`` both gradients are unit-normalised first
(after the optional projection), giving a cosine per checkpoint.

Checkpoints default to the last 10 epochs available; the weights eta_t come from
``context.learning_rates`` (one per saved epoch) or are 1. Work accumulates per checkpoint:
each checkpoint's raw products (and gradient norms) are cached per explained set, so adding
a checkpoint (``add_checkpoint``) or switching ``normalize`` costs at most one checkpoint's
work. Training gradients are kept in memory only when small (see ``TrainGradients``);
unprojected with fewer training examples than parameters, the products come from the layer
hooks' factors (``FactoredGradients``), never forming the [n, p] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import (
    AttributionContext,
    Attributor,
    HyperParameter,
    any_int,
    boolean,
    one_of,
    optional_int_list,
    optional_positive_int,
)
from tdatune.attributors.common import GRAD_CACHE_LIMIT, TrainGradients
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    Knob,
    PathEstimate,
    explained_knob,
    gradient_products,
    gradients_in_flight,
    kept_gradients,
    kept_gradients_built,
    projector_bytes,
)
from tdatune.features.factored import KroneckerProjector, make_projector
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.features.kernel import FactoredGradients, factored_numbers
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task

DEFAULT_LAST = 10


class TracIn(Attributor):
    """TracIn-CP: learning-rate-weighted gradient products over checkpoints."""

    name = "tracin"
    hyperparameters = (
        HyperParameter("checkpoints", None, "fit", optional_int_list,
                       f"epochs summed over (default: the last {DEFAULT_LAST} available)"),
        HyperParameter("proj_dim", None, "fit", optional_positive_int, "random projection dim"),
        HyperParameter("proj_kind", "gaussian", "fit",
                       one_of("gaussian", "rademacher", "kronecker"),
                       "projection matrix entries, or kronecker: per layer from the hooks' "
                       "factors (proj_dim = total width, at most)"),
        HyperParameter("proj_seed", 0, "fit", any_int, "projection seed"),
        HyperParameter("normalize", False, "score", boolean,
                       "unit-normalise gradients (cosine products)"),
    )

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """TracIn's path over C checkpoints (the ``checkpoints`` chosen, else the last 10 of
        those there are, 10 when that is not known): per checkpoint its projection and its
        training gradients, kept whole up to ``GRAD_CACHE_LIMIT`` numbers (else recomputed
        in chunks; unprojected with n < p the hooks' factors); per checkpoint the [m, n]
        products, cached; the explained gradients (float64) and the kept gradients cast to
        float64 while a product is made; the summed [m, n] scores and their temporaries."""
        chosen = self.params["checkpoints"]
        count = len(chosen) if chosen else min(DEFAULT_LAST, checkpoints or DEFAULT_LAST)
        n, p = len(train), num_params(params)
        factored = self.params["proj_dim"] is None and n < p
        return tracin_estimate(_Sizes(
            n=n, p=p, width=min(self.params["proj_dim"] or p, p), m=explained, checkpoints=count,
            chunk=chunk_size, item=next(iter(params.values())).element_size(),
            kronecker=self.params["proj_kind"] == "kronecker",
            normalize=self.params["normalize"],
            factored=factored_numbers(task, model, params, train) if factored else 0,
            factored_out=(factored_numbers(task, model, params, train, target="output")
                          if factored else 0)))

    def _fit(self, context: AttributionContext) -> None:
        k = len(context.checkpoints)
        if context.learning_rates is not None and len(context.learning_rates) != k:
            raise ValueError(f"{self.name}: context.learning_rates has "
                             f"{len(context.learning_rates)} entries but {k} epochs are saved; "
                             "give one learning rate per saved epoch (or None for weights of 1)")
        chosen = self.params["checkpoints"] or list(range(max(0, k - DEFAULT_LAST), k))
        self.train_grads: dict[int, TrainGradients | FactoredGradients] = {}
        self._projectors: dict[int, Projector | KroneckerProjector | None] = {}
        self._parts: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for c in chosen:
            self.add_checkpoint(c)

    def add_checkpoint(self, checkpoint: int) -> None:
        """Add one checkpoint to the sum (its training gradients are prepared now)."""
        ctx = self._require_fit()
        idx = ctx.checkpoint_index(checkpoint)
        if idx in self.train_grads:
            return
        model, params = ctx.model_at(idx)
        p = num_params(params)
        d = self.params["proj_dim"]
        projector = None
        if d is not None:
            if d > p:
                raise ValueError(f"{self.name}: proj_dim={d} exceeds the number of parameters "
                                 f"p={p}; use proj_dim <= {p}, or None for full gradients")
            projector = make_projector(self.params["proj_kind"], model, params, d,
                                       seed=self.params["proj_seed"], device=ctx.device)
        self._projectors[idx] = projector
        if projector is None and len(ctx.train) < p:  # products from the hooks' factors
            self.train_grads[idx] = FactoredGradients(
                ctx.task, model, params, ctx.train, target="loss", chunk_size=ctx.chunk_size,
                show_progress=ctx.show_progress, desc=f"TracIn train gradients ep{idx}")
            return
        self.train_grads[idx] = TrainGradients(
            ctx.task, model, params, ctx.train, target="loss", projector=projector,
            chunk_size=ctx.chunk_size, show_progress=ctx.show_progress,
            desc=f"TracIn train gradients ep{idx}")

    def learning_rate(self, idx: int) -> float:
        """eta_t of saved epoch ``idx`` (1 without ``context.learning_rates``)."""
        ctx = self._require_fit()
        return 1.0 if ctx.learning_rates is None else float(ctx.learning_rates[idx])

    def _part(self, explained: ArrayDataset, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw products grad f . grad l [m, n] and explained gradient norms [m] at one epoch."""
        ctx = self._require_fit()
        key = (explained.fingerprint(), idx)
        if key not in self._parts:
            model, params = ctx.model_at(idx)
            train = self.train_grads[idx]
            if isinstance(train, FactoredGradients):
                vf = FactoredGradients(ctx.task, model, params, explained, target="output",
                                       chunk_size=ctx.chunk_size)
                self._parts[key] = (train.products(vf), vf.row_norms())
                return self._parts[key]
            v = per_example_grads(ctx.task, model, params, explained, target="output",
                                  chunk_size=ctx.chunk_size, projector=self._projectors[idx])
            v = v.double()
            self._parts[key] = (train.products(v), v.norm(dim=1))
        return self._parts[key]

    def self_influence(self) -> torch.Tensor:
        """TracIn's self-influence sum_t eta_t ||grad l(z_i; theta_t)||^2 [n] (float64), the
        detector of mislabelled examples of Pruthi et al. (2020); without ``normalize``, which
        would make it 1 for every example."""
        self._require_fit()
        total = torch.zeros(len(self._require_fit().train), dtype=torch.float64)
        for idx in sorted(self.train_grads):
            total += self.learning_rate(idx) * self.train_grads[idx].row_norms().double() ** 2
        return total

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n]: the sum over the chosen checkpoints."""
        normalize = self.score_params(values)["normalize"]
        self._require_fit()
        total = torch.zeros(len(explained), len(self._require_fit().train), dtype=torch.float64)
        for idx in sorted(self.train_grads):
            prod, vnorm = self._part(explained, idx)
            if normalize:
                gnorm = self.train_grads[idx].row_norms().double()
                denom = vnorm[:, None] * gnorm[None, :]
                prod = prod / torch.where(denom > 0, denom, torch.ones_like(denom))
            total -= self.learning_rate(idx) * prod
        return total.float()


@dataclass(frozen=True)
class _Sizes:
    """n training and m explained examples, p parameters projected to ``width`` (= p:
    unprojected; ``factored``/``factored_out`` numbers a training/explained example when its
    gradients are kept as the hooks' factors, else 0), C ``checkpoints``, the chunk and the
    gradients' bytes a number."""

    n: int
    p: int
    width: int
    m: int
    checkpoints: int
    chunk: int
    item: int
    kronecker: bool
    normalize: bool
    factored: int
    factored_out: int

    @property
    def projection(self) -> int:
        """A checkpoint's projection matrix (a Kronecker projection's factors: not counted)."""
        return 0 if self.kronecker else projector_bytes(self.p, self.width, self.item)

    def kept(self) -> int:
        """What one checkpoint keeps: its projection and its gradients (or their factors)."""
        if self.factored:
            return self.n * self.factored * self.item
        return self.projection + sum(kept_gradients(self.n, self.width, self.item,
                                                    GRAD_CACHE_LIMIT).values())


def tracin_estimate(z: _Sizes) -> PathEstimate:
    """The phases of :class:`TracIn` for the sizes ``z`` (see ``TracIn.memory_estimate``)."""
    e, n, m, c, item = EIG_ITEMSIZE, z.n, z.m, z.checkpoints, z.item
    held = {"parameters": 2 * z.p * item}
    chunk = min(z.chunk, n)
    if z.factored:
        building = {"factored training gradients": n * z.factored * item,
                    "captured chunk and its compacted copy": 2 * chunk * z.factored * item}
        product = {"factored explained gradients": m * z.factored_out * item,
                   "products": m * n * e}
    else:
        building = {"projection matrix": z.projection,
                    **kept_gradients_built(n, z.p, z.width, item, z.chunk, GRAD_CACHE_LIMIT)}
        product = {"explained gradients": m * z.width * item,
                   "explained gradients (float64)": m * z.width * e,
                   **gradients_in_flight(min(z.chunk, max(m, 1)), z.p, z.width, item),
                   **gradient_products(m, n, z.p, z.width, item, e, z.chunk, GRAD_CACHE_LIMIT)}
    phases = {"training gradients": {**held, **building,
                                     "earlier checkpoints": (c - 1) * z.kept()}}
    if m:
        kept = {**held, "checkpoints' gradients": c * z.kept()}
        phases["products"] = {**kept, **product,
                              "earlier checkpoints' products": (c - 1) * m * n * e}
        temporaries = 3 if z.normalize else 1  # lr x products (and the denominator, quotient)
        phases["scores"] = {**kept, "cached products": c * m * n * e, "summed scores": m * n * e,
                            "temporaries": temporaries * m * n * e}
    knobs = [Knob("a random projection, proj_dim <= {value:,} (now {now:,})", z.width,
                  lambda d: tracin_estimate(replace(z, width=d, factored=0, factored_out=0)))]
    if c > 1:
        knobs.append(Knob("fewer checkpoints, at most {value:,} epochs in checkpoints= "
                          "(now {now:,})", c, lambda j: tracin_estimate(replace(z, checkpoints=j))))
    knobs += explained_knob(lambda j: tracin_estimate(replace(z, m=j)), m)
    return PathEstimate("tracin", n, m, phases, knobs=tuple(knobs))
