"""IF LiSSA: score = -v^T (H + lambda I)^-1 g_i with the inverse-HVP from the LiSSA recursion

    x_0 = v,   x_{t+1} = v + (I - (H_t + lambda I) / scale) x_t,   result x_depth / scale,

where H_t is the Hessian of the training objective on a random minibatch of ``batch_size``
training examples (drawn with replacement-free sampling from a generator seeded by ``seed``;
the same minibatch sequence serves every explained example, batched with ``vmap``).

Convergence needs the eigenvalues of (H + lambda I) / scale in (0, 2). ``fit`` estimates the
top Hessian eigenvalue by 20 power-iteration steps on full-data HVPs (cheap: 20 HVPs), and
``score`` refuses a ``scale`` below (top + lambda) / 2, where the recursion certainly diverges.
Power iteration estimates from below and minibatch Hessians are noisier than the full one,
so a scale that passes can still diverge: every step checks the iterates, and a non-finite
value or a norm above 10 (t + 1) ||v|| (impossible while the recursion is contractive)
stops with ``LiSSADivergence`` naming ``scale``; NaNs are never returned.
Reuse: scores are cached per setting, and ``score_grid`` reads several depths off one run.
Arithmetic is float32 by default (the recursion's minibatch noise is far above float32
rounding, and it halves the cost of the 1000 default steps); ``precision="float64"`` is there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
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
    positive_float,
    positive_int,
)
from tdatune.attributors.common import DTYPES, HVP_ADVICE, HVPProblem, HVPSizes
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import PathEstimate, explained_knob
from tdatune.models.task import Params, Task
from tdatune.utils.progress import progress

POWER_ITERS = 20
BLOWUP = 10.0
LISSA_BATCH = 256  # explained examples per vmap batch
STEP_COPIES = 6  # [b, p] vectors one recursion step makes at once (x, H x, lam x, the update)


class LiSSADivergence(FloatingPointError):
    """The LiSSA recursion diverged (scale too small for the curvature, or H indefinite)."""


class IFLiSSA(HVPProblem, Attributor):
    """Influence function with the stochastic LiSSA inverse-HVP recursion."""

    name = "if_lissa"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", positive_float, "damping added to H (mean loss)"),
        HyperParameter("scale", 5.0, "score", positive_float,
                       "divides H + lam I; must exceed (top eigenvalue + lam) / 2"),
        HyperParameter("depth", 1000, "score", positive_int, "recursion steps"),
        HyperParameter("batch_size", 50, "score", positive_int, "training examples per HVP"),
        HyperParameter("seed", 0, "score", any_int, "minibatch sampling seed"),
        CHECKPOINT,
        HyperParameter("precision", "float32", "fit", one_of(*DTYPES),
                       "HVP arithmetic (float32: minibatch noise dwarfs its rounding)"),
    )

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """LiSSA's path: the training gradients (kept whole up to ``GRAD_CACHE_LIMIT``
        numbers, else recomputed in chunks), the [m, p] explained gradients, the finished
        batches' results and one batch's recursion, their concatenation and the [m, n]
        scores with their negated copy."""
        return lissa_estimate(self._sizes(params, train, explained=explained,
                                          validation=validation, chunk_size=chunk_size))

    def _fit(self, context: AttributionContext) -> None:
        self._fit_problem(context)
        self.top_eigenvalue = self.objective.top_eigenvalue(iters=POWER_ITERS)
        self._scores: dict[tuple[Any, ...], torch.Tensor] = {}

    def check_scale(self, scale: float, lam: float) -> None:
        """Refuse a scale for which the recursion cannot converge (from the estimated top
        eigenvalue of H)."""
        need = (self.top_eigenvalue + lam) / 2
        if scale <= need:
            raise ValueError(
                f"{self.name}: scale={scale:g} is too small: the top Hessian eigenvalue is about "
                f"{self.top_eigenvalue:.4g}, so the recursion diverges unless scale > "
                f"(top + lam) / 2 = {need:.4g}; use e.g. scale={2 * (self.top_eigenvalue + lam):.3g}")

    def _batches(self, depth: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        n = self.objective.n
        gen = torch.Generator().manual_seed(int(seed))
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(depth):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            yield perm[pos : pos + batch_size]
            pos += batch_size

    def _recursion(self, v: torch.Tensor, lam: float, scale: float, depths: list[int],
                   batch_size: int, seed: int) -> dict[int, torch.Tensor]:
        """x_depth / scale for every requested depth, for right-hand sides ``v`` [b, p]."""
        ctx = self._require_fit()
        v = v.to(self.objective.device, self.objective.theta.dtype)
        vnorm = v.norm(dim=1)
        x = v.clone()
        out: dict[int, torch.Tensor] = {}
        wanted = set(depths)
        batches = self._batches(max(depths), min(batch_size, self.objective.n), seed)
        bar = progress(batches, enabled=ctx.show_progress, total=max(depths),
                       desc=f"LiSSA lam={lam:g} scale={scale:g}")
        for t, idx in enumerate(bar, start=1):
            hx = self.objective.hvp(x, idx) + lam * x
            x = v + x - hx / scale
            norm = x.norm(dim=1)
            if not bool(torch.isfinite(norm).all()) or bool((norm > BLOWUP * (t + 1) * vnorm
                                                             ).any()):
                raise LiSSADivergence(
                    f"{self.name}: the LiSSA recursion diverged at step {t} of {max(depths)} "
                    f"(iterate norm {float(norm.max()):.3g}, non-finite: "
                    f"{not bool(torch.isfinite(norm).all())}): scale={scale:g} is too small "
                    f"for the minibatch curvature (top full-data eigenvalue ~ "
                    f"{self.top_eigenvalue:.4g}); raise scale (e.g. to {4 * scale:g}) or, if the "
                    f"Hessian is indefinite, raise lam={lam:g}")
            if t in wanted:
                out[t] = x / scale
        return out

    def _solve_and_score(self, explained: ArrayDataset, lam: float, scale: float,
                         depths: list[int], batch_size: int, seed: int) -> None:
        self.check_scale(scale, lam)
        v = self.explained_grads(explained)
        parts: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
        for s in range(0, v.shape[0], LISSA_BATCH):
            for d, x in self._recursion(v[s : s + LISSA_BATCH], lam, scale, depths, batch_size,
                                        seed).items():
                parts[d].append(x)
        key = explained.fingerprint()
        for d in depths:
            scores = -self.train_grads.products(torch.cat(parts[d])).float().cpu()
            self._scores[(key, lam, scale, d, batch_size, seed)] = scores

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] from the LiSSA recursion at the given settings (cached)."""
        v = self.score_params(values)
        self._require_fit()
        key = (explained.fingerprint(), v["lam"], v["scale"], v["depth"], v["batch_size"], v["seed"])
        if key not in self._scores:
            self._solve_and_score(explained, v["lam"], v["scale"], [v["depth"]],
                                  v["batch_size"], v["seed"])
        return self._scores[key]

    def score_grid(self, explained: ArrayDataset, grid: Iterable[dict[str, Any]]
                   ) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
        """Scores for each setting in ``grid``; settings differing only in ``depth`` share
        one recursion."""
        self._require_fit()
        settings = [(values, self.score_params(values)) for values in grid]
        groups: dict[tuple[Any, ...], set[int]] = {}
        for _, v in settings:
            groups.setdefault((v["lam"], v["scale"], v["batch_size"], v["seed"]), set()).add(
                v["depth"])
        key = explained.fingerprint()
        for (lam, scale, batch_size, seed), depths in groups.items():
            todo = sorted(d for d in depths if (key, lam, scale, d, batch_size, seed)
                          not in self._scores)
            if todo:
                self._solve_and_score(explained, lam, scale, todo, batch_size, seed)
        for values, v in settings:
            yield values, self._scores[(key, v["lam"], v["scale"], v["depth"], v["batch_size"],
                                        v["seed"])]


def lissa_estimate(z: HVPSizes) -> PathEstimate:
    """The phases of :class:`IFLiSSA` for the sizes ``z`` (see ``IFLiSSA.memory_estimate``)."""
    m, p, q = z.m, z.p, z.prec
    solved = {**z.held(), "explained gradients": m * p * q, "recursion results": m * p * q}
    phases = {
        "training gradients": z.training(),
        "explained gradients": {**z.held(), **z.gradients(m)},
        "recursion": {**solved,
                      "one batch's recursion": STEP_COPIES * min(m, LISSA_BATCH) * p * q},
        "scores": {**solved, "results concatenated": m * p * q, **z.products(m),
                   **z.negated()},
    }
    return PathEstimate("if_lissa", z.n, m, phases, advice=(HVP_ADVICE,),
                        knobs=explained_knob(lambda k: lissa_estimate(replace(z, m=k)), m))
