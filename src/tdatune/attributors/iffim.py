"""IFFIM: influence with the empirical Fisher, score = -v^T (F + lambda I)^-1 g_i.

Optionally with a seeded random projection of all gradients. ``fit`` computes the training
gradients and one eigendecomposition; every lambda afterwards is a small matrix product.
Unprojected with fewer training examples than parameters, the eigensystem is the kernel
form built from the layer hooks' factors (G G^T and V G^T by the FLOP rule of
:mod:`tdatune.features.factored`), so the [n, p] gradient matrix is never formed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    any_int,
    one_of,
    optional_positive_int,
    positive_float,
)
from tdatune.attributors.lambda_path import LambdaPath, TruncatedLambdaPath
from tdatune.curvature.eigen import Eigensystem, fisher_eigensystem, gram_eigensystem
from tdatune.data.base import ArrayDataset
from tdatune.features import budget
from tdatune.features.budget import AttributionEstimate, estimate_attribution
from tdatune.features.factored import KroneckerProjector, make_projector
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.features.kernel import FactoredGradients, factored_numbers
from tdatune.features.projection import Projector
from tdatune.models.task import Params, Task
from tdatune.utils.atomic import notice

EXACT_EIGH_LIMIT = budget.EIGH_WARN_SIZE  # larger eigensystems take the top-k route by default
TOP_RANK = 1_000  # eigenpairs that route keeps by default


def top_rank(size: int, rank: int | None) -> int | None:
    """The top-k route's k for a size x size eigensystem (None: the exact eigh)."""
    if rank is None:
        return TOP_RANK if size > EXACT_EIGH_LIMIT else None
    return rank if rank < size else None


class IFFIM(Attributor):
    """Influence function with the empirical Fisher, scored along a lambda-path."""

    name = "iffim"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", positive_float, "damping added to F (mean-loss scale)"),
        HyperParameter("proj_dim", None, "fit", optional_positive_int, "random projection dim"),
        HyperParameter("proj_kind", "gaussian", "fit",
                       one_of("gaussian", "rademacher", "identity", "kronecker"),
                       "projection matrix entries, or kronecker: per layer from the hooks' "
                       "factors (proj_dim = total width, at most)"),
        HyperParameter("proj_seed", 0, "fit", any_int, "projection seed"),
        HyperParameter("eig_rank", None, "fit", optional_positive_int,
                       "keep the Fisher's top r eigenpairs (the rest count as zero curvature, "
                       "1 / lambda) instead of eigendecomposing its min(n, p) x min(n, p) "
                       "form; None: exact up to EXACT_EIGH_LIMIT, else TOP_RANK",
                       named_at_default=False),
        CHECKPOINT,
    )

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> AttributionEstimate:
        """The memory of ``fit`` and ``score``: [n, d] gradients and a d x d eigensystem when
        projected (or n x n when d > n); unprojected, the p x p eigensystem of the [n, p]
        rows when n >= p, else the n x n kernel from the hooks' factors."""
        p, n = num_params(params), len(train)
        kind, d = self.params["proj_kind"], self.params["proj_dim"]
        common = {"explained": explained, "validation": validation, "chunk_rows": chunk_size,
                  "dtype": next(iter(params.values())).dtype}
        if d is None and kind != "identity":
            held = factored_numbers(task, model, params, train) if n < p else None
            return estimate_attribution(n, p, factored_numbers=held,
                                        eig_rank=top_rank(min(n, p), self.params["eig_rank"]),
                                        **common)
        width = p if kind == "identity" or d is None else min(d, p)
        return estimate_attribution(n, p, proj_dim=None if kind == "identity" else d,
                                    proj_bytes=0 if kind in ("identity", "kronecker") else None,
                                    eig_rank=top_rank(min(n, width), self.params["eig_rank"]),
                                    **common)

    def _fit(self, context: AttributionContext) -> None:
        model, params = context.model_at(self.params["checkpoint"])
        self.projector: Projector | KroneckerProjector | None = None
        if self.params["proj_dim"] is not None or self.params["proj_kind"] == "identity":
            self.projector = make_projector(self.params["proj_kind"], model, params,
                                            self.params["proj_dim"],
                                            seed=self.params["proj_seed"], device=context.device)
        self._paths: dict[str, LambdaPath] = {}
        self.factored: FactoredGradients | None = None
        n = len(context.train)
        width = num_params(params) if self.projector is None else self.projector.d
        size = self._full_rank = min(n, width)  # the whole spectrum's size, taken as full rank
        rank = top_rank(size, self.params["eig_rank"])
        if rank is not None:
            notice(f"{self.name}: the Fisher of {n:,} training examples x {width:,} gradient "
                   f"dimensions: its top {rank:,} eigenpairs by randomised subspace iteration "
                   f"(the rest count as zero curvature) instead of eigendecomposing the "
                   f"{size:,} x {size:,} {'parameter' if width <= n else 'kernel'} form "
                   f"(roughly {budget.format_seconds(budget.eigh_seconds(size))}); "
                   "params={'eig_rank': r} sets r, r >= that size the exact route")
        if self.projector is None and n < num_params(params):
            # kernel form from the factors: G G^T and V G^T, never the [n, p] matrix
            self.factored = FactoredGradients(
                context.task, model, params, context.train, target="loss",
                chunk_size=context.chunk_size, show_progress=context.show_progress,
                desc="train gradients")
            self.eigen: Eigensystem = gram_eigensystem(self.factored.gram(), overwrite=True,
                                                       rank=rank)
            return
        grads = per_example_grads(context.task, model, params, context.train, target="loss",
                                  chunk_size=context.chunk_size, projector=self.projector,
                                  show_progress=context.show_progress, desc="train gradients")
        self.eigen = fisher_eigensystem(grads, rank=rank)

    def explained_grads(self, explained: ArrayDataset) -> torch.Tensor:
        """Gradients of the output function for ``explained`` (projected like the training side)."""
        ctx = self._require_fit()
        model, params = ctx.model_at(self.params["checkpoint"])
        return per_example_grads(ctx.task, model, params, explained, target="output",
                                 chunk_size=ctx.chunk_size, projector=self.projector)

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The lambda-path for ``explained`` (cached by content)."""
        self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            if self.factored is not None:
                ctx = self._require_fit()
                model, params = ctx.model_at(self.params["checkpoint"])
                v = FactoredGradients(ctx.task, model, params, explained, target="output",
                                      chunk_size=ctx.chunk_size)
                vg = self.factored.products(v)
                coords = self.eigen.coords_from_products(vg)
            elif self.eigen.truncated:  # V G^T once: the kernel form's coordinates and the rest
                grads = self.explained_grads(explained)
                vg = self.eigen.products(grads)
                coords = (self.eigen.coords(grads) if self.eigen.basis is not None
                          else self.eigen.coords_from_products(vg))
            else:
                coords = self.eigen.coords(self.explained_grads(explained))
            if self.eigen.truncated:  # what lies outside the top k
                a = self.eigen.train_coords
                self._paths[key] = TruncatedLambdaPath(
                    self.eigen.sigma, coords, a, vg.double() - coords @ a.T,
                    self.eigen.train_sq - a.square().sum(1), full_rank=self._full_rank)
            else:
                self._paths[key] = LambdaPath(self.eigen.sigma, coords, self.eigen.train_coords)
        return self._paths[key]

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam`` (default from the constructor)."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()
