"""TRAK: score = phi'^T (Phi^T Phi + lambda_TRAK I)^-1 Phi^T Q, averaged over checkpoints.

Features are projected output gradients, phi = P^T grad m(z; theta_c), with m the
correct-class margin on the *training* side (TRAK's choice, which makes Q exact: the loss
gradient is g_i = -(1 - p_y) grad m_i) and the task's output function f on the explained
side (the margin by default); Q = diag(1 - p_y) of the training examples. The sign is TRAK's:
positive means including z_i raises f.

Lambda convention (docs/lambda_convention.md). ``lam`` is added to the curvature of the
*mean* loss, Phi^T Phi / n, like every tdatune method; TRAK's native damping on Phi^T Phi is
lambda_TRAK = n * lam, and with it the formula above is computed exactly:
    phi' (Phi^T Phi + n lam I)^-1 Phi^T Q = (1/n) phi' (Phi^T Phi / n + lam I)^-1 Phi^T Q.
lam = 0 (TRAK's default) is the pseudo-inverse: the eigensystem drops zero eigenvalues.

Ensembles. Each member is one (model, checkpoint) with its own projected features, Q and
eigensystem: checkpoints of the fitted context (``checkpoints``, ``add_checkpoint``) and of
independently trained models on the same training set (``add_model(context)``). The score is
the *average of the members' scores* (TRAK's reference implementation averages the kernel
part and Q separately; averaging whole scores keeps the ensemble a sum of lambda-paths).
Adding a member costs one checkpoint's work; members' explained coordinates are cached per
explained set. Members are keyed (model, epoch), model 0 being the fitted context.
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
    nonnegative_float,
    one_of,
    optional_int_list,
    optional_positive_int,
)
from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath
from tdatune.curvature.eigen import Eigensystem, fisher_eigensystem
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    Knob,
    PathEstimate,
    ensemble_parts,
    estimate_attribution,
    explained_knob,
    lambda_path_scores,
)
from tdatune.features.factored import KroneckerProjector, make_projector
from tdatune.features.gradients import num_params, per_example_grads
from tdatune.features.projection import Projector
from tdatune.models.outputs import cross_entropy
from tdatune.models.task import Params, Task


@dataclass
class TRAKMember:
    """One checkpoint's share of TRAK: projection, eigensystem of Phi^T Phi / n, and Q."""

    model: int  # 0: the fitted context; k: the k-th context given to add_model
    checkpoint: int
    projector: Projector | KroneckerProjector | None
    eigen: Eigensystem
    q: torch.Tensor  # [n] 1 - p_y


def one_minus_p(task: Task, model: torch.nn.Module, params: Params,
                data: ArrayDataset, batch_size: int = 1024) -> torch.Tensor:
    """Q's diagonal for every example, float64: 1 - p_y (correct-class probability) for
    cross-entropy tasks, the task's ``trak_weights`` otherwise (see ``Task.trak_q``)."""
    device = next(iter(params.values())).device
    out = []
    with torch.no_grad():
        for _, x, y in data.batches(batch_size, device):
            out.append(task.trak_q(task.call(model, params, x), y).double())
    return torch.cat(out).cpu()


class TRAK(Attributor):
    """TRAK with projected margin-gradient features, ensembled over checkpoints."""

    name = "trak"
    hyperparameters = (
        HyperParameter("lam", 0.0, "score", nonnegative_float,
                       "damping on Phi^T Phi / n (TRAK's native lambda is n * lam)"),
        HyperParameter("proj_dim", 512, "fit", optional_positive_int,
                       "projection dim d (default 512, capped at p; an explicit d > p is refused)"),
        HyperParameter("proj_kind", "gaussian", "fit",
                       one_of("gaussian", "rademacher", "kronecker"),
                       "projection matrix entries, or kronecker: per layer from the hooks' "
                       "factors (proj_dim = total width, at most)"),
        HyperParameter("proj_seed", 0, "fit", any_int, "projection seed"),
        HyperParameter("checkpoints", None, "fit", optional_int_list,
                       "epochs to ensemble (default: the last)"),
    )

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self._proj_dim_given = "proj_dim" in values and values["proj_dim"] is not None

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """TRAK's path, member by member (one per epoch of ``checkpoints``): the [n, d]
        projected features and their Fisher eigensystem (IFFIM's phases,
        :func:`~tdatune.features.budget.estimate_attribution`), with the eigensystem, Q and
        projection of every member fitted before; then each member's explained coordinates
        and weighted training coordinates, the ensemble path concatenating them, and the
        [m, n] scores."""
        p = num_params(params)
        d = self.params["proj_dim"]
        return trak_estimate(_Sizes(
            n=len(train), p=p, width=p if d is None or d > p else d,
            members=len(self.params["checkpoints"] or [-1]), m=explained, v=validation,
            chunk=chunk_size, dtype=next(iter(params.values())).dtype,
            kronecker=self.params["proj_kind"] == "kronecker"))

    def _fit(self, context: AttributionContext) -> None:
        self.members: dict[tuple[int, int], TRAKMember] = {}
        self.contexts: list[AttributionContext] = [context]
        self._coords: dict[tuple[str, int, int], torch.Tensor] = {}
        for c in self.params["checkpoints"] or [-1]:
            self.add_checkpoint(c)

    def _projector(self, model: nn.Module, params: Params
                   ) -> Projector | KroneckerProjector | None:
        d = self.params["proj_dim"]
        p = num_params(params)
        if d is None:
            return None
        if d > p:
            if self._proj_dim_given:
                raise ValueError(f"{self.name}: proj_dim={d} exceeds the number of parameters "
                                 f"p={p}; use proj_dim <= {p}, or proj_dim=None for no projection")
            return None  # the default 512 on a model with p <= 512: no projection needed
        ctx = self._require_fit()
        return make_projector(self.params["proj_kind"], model, params, d,
                              seed=self.params["proj_seed"], device=ctx.device)

    def add_model(self, context: AttributionContext, checkpoint: int = -1) -> TRAKMember:
        """Add an independently trained model (same training set) as a member at ``checkpoint``."""
        base = self._require_fit()
        if context.train.fingerprint() != base.train.fingerprint():
            raise ValueError(f"{self.name}: an ensemble member must be trained on the same "
                             "training set as the fitted context (the scores index its examples)")
        if all(c is not context for c in self.contexts):
            self.contexts.append(context)
        number = next(i for i, c in enumerate(self.contexts) if c is context)
        return self.add_checkpoint(checkpoint, model=number)

    def add_checkpoint(self, checkpoint: int, model: int = 0) -> TRAKMember:
        """Fit one more ensemble member (features, Q, eigensystem) at ``checkpoint`` of the
        fitted context (or of the ``model``-th context given to ``add_model``)."""
        self._require_fit()
        ctx = self.contexts[model]
        idx = ctx.checkpoint_index(checkpoint)
        if (model, idx) in self.members:
            return self.members[(model, idx)]
        model_, params = ctx.model_at(idx)
        projector = self._projector(model_, params)
        # Features are output gradients: the correct-class margin for cross-entropy tasks (as in
        # TRAK), the task's own output otherwise (e.g. a regression prediction).
        margin_task = (replace(ctx.task, output="margin") if ctx.task.loss_fn is cross_entropy
                       else ctx.task)
        phi = per_example_grads(margin_task, model_, params, ctx.train, target="output",
                                chunk_size=ctx.chunk_size, projector=projector,
                                show_progress=ctx.show_progress, desc=f"TRAK features ep{idx}")
        member = TRAKMember(model, idx, projector, fisher_eigensystem(phi),
                            one_minus_p(ctx.task, model_, params, ctx.train))
        self.members[(model, idx)] = member
        return member

    def _member_path(self, member: TRAKMember, explained: ArrayDataset) -> LambdaPath:
        self._require_fit()
        ctx = self.contexts[member.model]
        key = (explained.fingerprint(), member.model, member.checkpoint)
        if key not in self._coords:
            model, params = ctx.model_at(member.checkpoint)
            v = per_example_grads(ctx.task, model, params, explained, target="output",
                                  chunk_size=ctx.chunk_size, projector=member.projector)
            self._coords[key] = member.eigen.coords(v)
        n = member.eigen.n
        train = member.eigen.train_coords * (member.q[:, None] / n)
        return LambdaPath(member.eigen.sigma, self._coords[key], train, sign=1.0)

    def lambda_path(self, explained: ArrayDataset) -> EnsembleLambdaPath:
        """The ensemble's lambda-path (mean of member paths) for ``explained``."""
        self._require_fit()
        members = [self.members[k] for k in sorted(self.members)]
        return EnsembleLambdaPath([self._member_path(m, explained) for m in members])

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam`` (mean-loss convention; 0 = pseudo-inverse)."""
        lam = self.score_params(values)["lam"]
        return self.lambda_path(explained).scores(lam).float()


@dataclass(frozen=True)
class _Sizes:
    """n training, m explained, v validation examples, p parameters projected to ``width``
    (= p: unprojected) by a Kronecker or a dense projection, ``members`` checkpoints."""

    n: int
    p: int
    width: int
    members: int
    m: int
    v: int
    chunk: int
    dtype: torch.dtype
    kronecker: bool


def trak_estimate(z: _Sizes) -> PathEstimate:
    """The phases of :class:`TRAK` for the sizes ``z`` (see ``TRAK.memory_estimate``)."""
    one = estimate_attribution(z.n, z.p, proj_dim=z.width if z.width < z.p else None,
                               explained=z.m, validation=z.v, chunk_rows=z.chunk,
                               dtype=z.dtype, proj_bytes=0 if z.kronecker else None)
    e, n, c, k = EIG_ITEMSIZE, z.n, z.members, one.kept
    held = one.phases["training gradients"]
    member = sum(one.fitted.values()) + n * e + held["projection matrix"]  # + Q
    coords = (z.m + z.v) * k * e  # a member's explained and validation coordinates (cached)
    earlier = {"earlier members (eigensystem, Q, projection)": (c - 1) * member}
    phases = {ph: {**one.phases[ph], **earlier} for ph in
              ("training gradients", "accumulation", "eigendecomposition", "training coordinates")}
    members = {"parameters": held["parameters"],
               "members (eigensystem, Q, projection)": c * member,
               "members' coordinates": c * coords,
               "member paths' training coordinates": c * n * k * e,
               "validation ensemble coordinates": z.v * c * k * e}
    if z.m or z.v:
        phases["explained"] = {**one.phases["explained"], **earlier,
                               "earlier members' coordinates": (c - 1) * coords,
                               "earlier member paths' training coordinates": (c - 1) * n * k * e}
        phases["ensemble"] = {**members,
                              **ensemble_parts(n, max(z.m, z.v), c * k, building=True)}
    if z.m:
        phases["scores"] = {**members, **ensemble_parts(n, z.m, c * k, building=False),
                            **lambda_path_scores(z.m, n, c * k)}
    knobs = [Knob("a smaller projection, proj_dim <= {value:,} (now {now:,})", z.width,
                  lambda w: trak_estimate(replace(z, width=w)))]
    if c > 1:
        knobs.append(Knob("fewer checkpoints in the ensemble, at most {value:,} epochs in "
                          "checkpoints= (now {now:,})", c,
                          lambda j: trak_estimate(replace(z, members=j))))
    knobs += explained_knob(lambda j: trak_estimate(replace(z, m=j)), z.m)
    return PathEstimate("trak", n, z.m, phases, knobs=tuple(knobs), eig_size=one.eig_size,
                        form=one.form)
