"""IF CG: score = -v^T (H + lambda I)^-1 g_i, with (H + lambda I) x = v solved by conjugate
gradient on Hessian-vector products of the training objective (mean loss over the *full*
training set, in chunks, plus weight_decay/2 ||theta||^2), one CG per explained example,
batched over explained examples with ``vmap``. Computation runs in float64 by default.

Reuse. A CG run for one explained set and one (lambda, early_stop, tol) keeps its state
(x, residual, direction), so asking for more iterations later continues it instead of
starting over, and ``score_grid`` records the iterates of every requested ``max_iter`` from
one run. Scores are cached per (explained set, lambda, early_stop, tol, max_iter).

With ``early_stop=False`` CG runs exactly ``max_iter`` iterations. With ``early_stop=True``
an example stops once ||r|| <= tol ||v||. For a non-convex model H + lambda I may be
indefinite; CG is then undefined at a direction of non-positive curvature (d^T A d <= 0),
and that example's iterate is frozen there (counted in ``self.breakdowns``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from tdatune.attributors.base import (
    CHECKPOINT,
    AttributionContext,
    Attributor,
    HyperParameter,
    boolean,
    positive_float,
    positive_int,
)
from tdatune.attributors.common import HVP_ADVICE, HVP_PRECISION, HVPProblem, HVPSizes
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import PathEstimate, explained_knob
from tdatune.models.task import Params, Task
from tdatune.utils.progress import progress

CG_BATCH = 64  # explained examples solved together
STEP_COPIES = 6  # [b, p] vectors one CG step makes at once (d, H d, lam d, A d, x and r updates)
FLOAT32_ADVICE = ("precision='float32' (every vector and gradient of the solve in half the "
                  "bytes)")


@dataclass
class _CGState:
    """CG iterates for one batch of right-hand sides."""

    x: torch.Tensor
    r: torch.Tensor
    d: torch.Tensor
    rs: torch.Tensor
    vnorm: torch.Tensor
    done: torch.Tensor
    breakdown: torch.Tensor


@dataclass
class _CGRun:
    """All batches of one (explained set, lambda, early_stop, tol) solve, at iteration ``it``."""

    states: list[_CGState]
    it: int = 0
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


class IFCG(HVPProblem, Attributor):
    """Influence function by conjugate gradient on Hessian-vector products."""

    name = "if_cg"
    hyperparameters = (
        HyperParameter("lam", 1e-2, "score", positive_float, "damping added to H (mean loss)"),
        HyperParameter("max_iter", 10, "score", positive_int, "CG iterations"),
        HyperParameter("early_stop", True, "score", boolean,
                       "stop an example once ||r|| <= tol ||v|| (False: exactly max_iter)"),
        HyperParameter("tol", 1e-10, "score", positive_float, "relative residual for early stop"),
        CHECKPOINT,
        HVP_PRECISION,
    )

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """CG's path: the training gradients (kept whole up to ``GRAD_CACHE_LIMIT`` numbers,
        else recomputed in chunks), the [m, p] explained gradients and the iterates x, r, d of
        every batch, one batch's step, and the [m, n] scores with their negated copy."""
        return cg_estimate(self._sizes(params, train, explained=explained,
                                       validation=validation, chunk_size=chunk_size))

    def _fit(self, context: AttributionContext) -> None:
        self._fit_problem(context)
        self._runs: dict[tuple[Any, ...], _CGRun] = {}
        self.breakdowns = 0

    def _new_run(self, v: torch.Tensor) -> _CGRun:
        states = []
        for s in range(0, v.shape[0], CG_BATCH):
            b = v[s : s + CG_BATCH].to(self.objective.device, self.objective.theta.dtype)
            rs = (b * b).sum(1)
            zero = rs == 0
            states.append(_CGState(x=torch.zeros_like(b), r=b.clone(), d=b.clone(), rs=rs,
                                   vnorm=rs.sqrt(), done=zero.clone(),
                                   breakdown=torch.zeros_like(zero)))
        return _CGRun(states)

    def _step(self, st: _CGState, lam: float, early_stop: bool, tol: float) -> None:
        active = ~st.done
        if not bool(active.any()):
            return
        d = st.d[active]
        ad = self.objective.hvp(d) + lam * d
        dad = (d * ad).sum(1)
        ok = dad > 0
        rs = st.rs[active]
        alpha = torch.where(ok, rs / torch.where(ok, dad, torch.ones_like(dad)),
                            torch.zeros_like(dad))
        x = st.x[active] + alpha[:, None] * d
        r = st.r[active] - alpha[:, None] * ad
        rs_new = (r * r).sum(1)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        st.x[active], st.r[active] = x, r
        st.d[active] = r + beta[:, None] * d
        st.rs[active] = rs_new
        newly_broken = active.clone()
        newly_broken[active] = ~ok
        st.breakdown |= newly_broken
        solved = torch.zeros_like(active)
        solved[active] = rs_new == 0  # exact solution reached: nothing left to do
        stop = newly_broken | solved
        if early_stop:
            conv = torch.zeros_like(active)
            conv[active] = rs_new.sqrt() <= tol * st.vnorm[active]
            stop |= conv
        st.done |= stop

    def _advance(self, run: _CGRun, target: int, record: Iterable[int], lam: float,
                 early_stop: bool, tol: float) -> None:
        wanted = {int(k) for k in record if k > run.it}
        ctx = self._require_fit()
        bar = progress(range(run.it, target), enabled=ctx.show_progress, desc=f"CG lam={lam:g}")
        for _ in bar:
            for st in run.states:
                self._step(st, lam, early_stop, tol)
            run.it += 1
            if run.it in wanted:
                run.scores[run.it] = self._scores_now(run)
        self.breakdowns = int(sum(int(st.breakdown.sum()) for st in run.states))

    def _scores_now(self, run: _CGRun) -> torch.Tensor:
        x = torch.cat([st.x for st in run.states])
        return -self.train_grads.products(x).float().cpu()

    def _run_for(self, explained: ArrayDataset, lam: float, early_stop: bool, tol: float,
                 iters: list[int]) -> _CGRun:
        key = (explained.fingerprint(), lam, early_stop, tol)
        run = self._runs.get(key)
        missing = [k for k in iters if k not in (run.scores if run else {})]
        if run is None or any(k <= run.it for k in missing):
            run = self._new_run(self.explained_grads(explained))
            self._runs[key] = run
            missing = iters
        if missing:
            self._advance(run, max(missing), missing, lam, early_stop, tol)
        return run

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] after ``max_iter`` CG iterations at ``lam``."""
        v = self.score_params(values)
        self._require_fit()
        run = self._run_for(explained, v["lam"], v["early_stop"], v["tol"], [v["max_iter"]])
        return run.scores[v["max_iter"]]

    def score_grid(self, explained: ArrayDataset, grid: Iterable[dict[str, Any]]
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Scores for each setting in ``grid``; settings sharing (lam, early_stop, tol) are
        read off one CG run at their ``max_iter``."""
        self._require_fit()
        settings = [(values, self.score_params(values)) for values in grid]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for _, v in settings:
            groups.setdefault((v["lam"], v["early_stop"], v["tol"]), []).append(v["max_iter"])
        for (lam, early_stop, tol), iters in groups.items():
            self._run_for(explained, lam, early_stop, tol, sorted(set(iters)))
        key = explained.fingerprint()
        for values, v in settings:
            run = self._runs[(key, v["lam"], v["early_stop"], v["tol"])]
            yield values, run.scores[v["max_iter"]]


def cg_estimate(z: HVPSizes) -> PathEstimate:
    """The phases of :class:`IFCG` for the sizes ``z`` (see ``IFCG.memory_estimate``)."""
    m, p, q = z.m, z.p, z.prec
    solve = {**z.held(), "explained gradients": m * p * q, "CG iterates (x, r, d)": 3 * m * p * q}
    phases = {
        "training gradients": z.training(),
        "explained gradients": {**z.held(), **z.gradients(m)},
        "conjugate gradient": {**solve, "one batch's step": STEP_COPIES * min(m, CG_BATCH) * p * q},
        "scores": {**solve, "iterates concatenated": m * p * q, **z.products(m),
                   **z.negated()},
    }
    return PathEstimate("if_cg", z.n, m, phases,
                        advice=((FLOAT32_ADVICE,) if q > 4 else ()) + (HVP_ADVICE,),
                        knobs=explained_knob(lambda k: cg_estimate(replace(z, m=k)), m))
