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

from typing import Any

import torch

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
from tdatune.attributors.common import TrainGradients
from tdatune.data.base import ArrayDataset
from tdatune.features.factored import KroneckerProjector, make_projector
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.features.kernel import FactoredGradients
from tdatune.features.projection import Projector

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
