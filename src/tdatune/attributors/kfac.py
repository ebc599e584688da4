"""K-FAC and EK-FAC influence: score = -v^T (F_K + lambda I)^-1 g_i with F_K the Kronecker-
factored Fisher of :mod:`tdatune.curvature.kfac`, scored along a damping path.

``fit`` runs the covariance pass (and, for EK-FAC, the eigenvalue-correction pass) once;
every damping afterwards changes only 1 / (Lambda + lambda) in the Kronecker eigenbasis, so a
whole lambda-path, the surrogate indicator xi and Algorithm 1 come from one fit. The path's
blocks are the layers (then one block of the diagonal parameters), so ``score`` takes one
damping per block (a list, ``{layer: value}``, or ``"per_layer"``: Kronfluence's 0.1 x mean
eigenvalue per module; :mod:`tdatune.attributors.damping`), and ``blockwise_predictions``
scores per-block dampings for LDS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
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
)
from tdatune.attributors.damping import block_mean_dampings, check_damping
from tdatune.attributors.lambda_path import LambdaPath, StreamedLambdaPath, damped_inverse
from tdatune.attributors.logra import optional_names
from tdatune.curvature.kfac import ROWS_BUDGET, KroneckerFit, fit_kronecker
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    EIG_ITEMSIZE,
    PathEstimate,
    available_memory,
    eigh_bytes,
    explained_knob,
    kronecker_factor_parts,
    rotated_rows,
)
from tdatune.features.capture import EmbeddingRule
from tdatune.features.factored import layer_sides
from tdatune.features.gradients import GradientSource, num_params
from tdatune.features.low_rank import compresses
from tdatune.models.task import Params, Task
from tdatune.utils.atomic import notice

COORDS_KEEP_LIMIT = 1 << 26  # training coordinates (n x p float64 numbers) held in memory
FALLBACK_QUERY_MEMORY = 4 << 30  # query_memory where the memory available cannot be read


def query_group_size(m: int, per_example: int, budget: int | None) -> int:
    """Explained examples whose weighted gradients (``per_example`` bytes each) fit ``budget``
    bytes (default: half the memory available, else ``FALLBACK_QUERY_MEMORY``), 1 to m."""
    if budget is None:
        free = available_memory()
        budget = free // 2 if free else FALLBACK_QUERY_MEMORY
    return max(1, min(m, budget // max(1, per_example)))


def query_numbers(block_sizes: list[int], kron_shapes: list[tuple[int, int]],
                  rank: int | None) -> int:
    """Numbers one explained example's weighted gradients hold: every block whole, or a
    Kronecker block [out, in] as rank-r factors r (out + in) where that is smaller."""
    total = 0
    for j, size in enumerate(block_sizes):
        if rank is not None and j < len(kron_shapes) and compresses(rank, *kron_shapes[j]):
            d_out, d_in = kron_shapes[j]
            total += min(rank, d_out, d_in) * (d_out + d_in)
        else:
            total += size
    return total


class KFAC(Attributor):
    """Influence with the K-FAC Fisher (Kronecker eigenvalues l_S l_A)."""

    name = "kfac"
    strategy = "kfac"
    hyperparameters = (
        HyperParameter("lam", 1e-3, "score", check_damping,
                       "damping added to the Kronecker-factored Fisher (mean-loss scale): a "
                       "number, one per block (layer), {layer: value} or 'per_layer'"),
        HyperParameter("fisher", "empirical", "fit", one_of("empirical", "true"),
                       "empirical (true labels) or true (labels sampled from the model)"),
        HyperParameter("layers", None, "fit", optional_names,
                       "modules whose parameters are attributed (default: all parameters)"),
        HyperParameter("seed", 0, "fit", any_int, "seed of the sampled labels (fisher='true')"),
        HyperParameter("query_rank", None, "score", optional_positive_int,
                       "keep each explained example's weighted per-layer gradient as rank r "
                       "(less memory and time for wide layers; approximate, exact at r >= "
                       "the layer's smaller side); None: exact", named_at_default=False),
        HyperParameter("query_memory", None, "score", optional_positive_int,
                       "bytes the explained examples' weighted gradients may hold at once; "
                       "more explained examples are scored in groups, one training pass each "
                       "(None: half the memory available)", named_at_default=False),
        CHECKPOINT,
    )

    def _chosen(self, model: nn.Module, params: Params) -> Params:
        """The parameters of the ``layers`` modules (all without them); unknown names are
        refused with the modules there are."""
        names = self.params["layers"]
        if names is None:
            return params
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ValueError(f"{self.name}: unknown module(s) {', '.join(unknown)}; the "
                             f"model's modules with parameters are: " + ", ".join(
                                 n for n, m in modules.items()
                                 if n and any(True for _ in m.parameters(recurse=False))))
        return {k: v for k, v in params.items() if any(k.startswith(f"{n}.") for n in names)}

    def memory_estimate(self, task: Task, model: nn.Module, params: Params, train: ArrayDataset,
                        *, explained: int, validation: int = 0, chunk_size: int = 256,
                        checkpoints: int | None = None) -> PathEstimate:
        """K-FAC's path over the p attributed parameters: per Kronecker layer the float64
        factors A (in x in) and S (out x out), their eigenvectors and eigenvalues and the
        [out, in] eigenvalue grid (EK-FAC: its moments and one chunk's rotated gradients); a
        path per explained set holding its eigen-coordinates [m, p] (float64 when m p <=
        ``COORDS_KEEP_LIMIT`` numbers, else the gradients' dtype) and, when n p is within
        that limit, the [n, p] training coordinates; scores hold one weighted copy of the
        coordinates (``KroneckerFit.weighted_back``), one training chunk's rows and the
        [m, n] score matrix."""
        chosen = self._chosen(model, params)
        plan = GradientSource(task, model, chosen, target="loss").plan
        sides = tuple((*layer_sides(c), isinstance(c.rule, EmbeddingRule))
                      for c in plan.layers if c.factored)
        p = num_params(chosen)
        return kfac_estimate(_Sizes(
            n=len(train), p=p, all_params=num_params(params), m=explained, v=validation,
            chunk=chunk_size, item=next(iter(params.values())).element_size(), sides=sides,
            diagonal=p - sum(d_in * d_out for d_in, d_out, _ in sides),
            method=self.name, ekfac=self.strategy == "ekfac", rank=self.params["query_rank"],
            query_memory=self.params["query_memory"]))

    def _fit(self, context: AttributionContext) -> None:
        model, params = context.model_at(self.params["checkpoint"])
        params = self._chosen(model, params)
        self._params = params
        self.fit_: KroneckerFit = fit_kronecker(
            context.task, model, params, context.train, strategy=self.strategy,
            fisher=self.params["fisher"], seed=self.params["seed"],
            chunk_size=context.chunk_size, show_progress=context.show_progress)
        self._paths: dict[str, LambdaPath] = {}
        self._spectrum_path: StreamedLambdaPath | None = None

    def lambda_path(self, explained: ArrayDataset) -> LambdaPath:
        """The damping path for ``explained`` (training coordinates streamed when large)."""
        ctx = self._require_fit()
        key = explained.fingerprint()
        if key not in self._paths:
            fit = self.fit_
            coords = self._explained_coords(explained)
            sigma = fit.sigma

            def train_chunks() -> Iterator[tuple[int, torch.Tensor]]:
                return fit.iter_coords(ctx.train, target="loss", chunk_size=ctx.chunk_size,
                                       show_progress=ctx.show_progress,
                                       desc=f"{self.name} training coordinates")

            def products(h: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
                return fit.products(coords, h, ctx.train, target="loss",
                                    chunk_size=ctx.chunk_size, show_progress=ctx.show_progress,
                                    desc=f"{self.name} training products")

            def masked_sums(masks: torch.Tensor) -> torch.Tensor:
                return fit.masked_sums(masks, ctx.train, target="loss",
                                       chunk_size=ctx.chunk_size,
                                       show_progress=ctx.show_progress)

            keep = len(ctx.train) * sigma.numel() <= COORDS_KEEP_LIMIT
            self._paths[key] = StreamedLambdaPath(
                sigma, coords, train_chunks, len(ctx.train), sizes=fit.block_sizes, keep=keep,
                products=products, masked_sums=masked_sums, names=fit.block_names)
        return self._paths[key]

    def _explained_coords(self, explained: ArrayDataset) -> torch.Tensor:
        """The explained examples' eigen-coordinates [m, p], written chunk by chunk into one
        preallocated tensor (float64 unless that is gigabytes): no concatenation copy."""
        ctx = self._require_fit()
        p = self.fit_.sigma.numel()
        coords: torch.Tensor | None = None
        for start, c in self.fit_.iter_coords(explained, target="output",
                                              chunk_size=ctx.chunk_size):
            if coords is None:
                wide = len(explained) * p > COORDS_KEEP_LIMIT
                coords = torch.empty(len(explained), p, dtype=c.dtype if wide else torch.float64)
            coords[start : start + c.shape[0]] = c
        if coords is None:
            raise ValueError("no explained examples to score")
        return coords

    def score(self, explained: ArrayDataset, **values: Any) -> torch.Tensor:
        """Scores [m, n] at ``lam``: one damping, one per block (in ``block_names`` order),
        ``{block name: value}`` (``"*"`` for the rest) or ``"per_layer"``.

        A small explained set goes through its lambda-path (cached, so other dampings cost
        one product). A wide one (m x p above ``COORDS_KEEP_LIMIT`` numbers) or any call with
        ``query_rank`` never holds its eigen-coordinates: each group of explained examples
        whose weighted gradients fit ``query_memory`` is weighted straight from its gradients
        (``KroneckerFit.weighted_explained``) and scored in one training pass."""
        v = self.score_params(values)
        lam, rank = v["lam"], v["query_rank"]
        self._require_fit()
        p = self.fit_.sigma.numel()
        if rank is None and (explained.fingerprint() in self._paths
                             or len(explained) * p <= COORDS_KEEP_LIMIT):
            return self.lambda_path(explained).scores(lam).float()
        return self._grouped_scores(explained, lam, rank, v["query_memory"])

    def _spectrum(self) -> StreamedLambdaPath:
        """A path with no examples: what a damping means for this fit (blocks, names, null
        space and the checks of ``entry_lambdas``)."""
        if self._spectrum_path is None:
            sigma = self.fit_.sigma
            self._spectrum_path = StreamedLambdaPath(
                sigma, sigma.new_empty(0, sigma.numel()), lambda: iter(()),
                len(self._require_fit().train), sizes=self.fit_.block_sizes,
                names=self.fit_.block_names)
        return self._spectrum_path

    def query_groups(self, m: int, rank: int | None = None, budget: int | None = None
                     ) -> list[range]:
        """The explained examples [0, m) in groups whose weighted gradients fit ``budget``
        bytes (default: half the memory available, else ``FALLBACK_QUERY_MEMORY``); each
        group costs one training pass."""
        self._require_fit()
        item = next(iter(self._params.values())).element_size()
        numbers = query_numbers(self.fit_.block_sizes, self._kron_shapes(), rank)
        size = query_group_size(m, numbers * item, budget)
        return [range(i, min(m, i + size)) for i in range(0, m, size)]

    def _kron_shapes(self) -> list[tuple[int, int]]:
        return [tuple(b.sigma.shape) for b in self.fit_.blocks]  # type: ignore[misc]

    def _grouped_scores(self, explained: ArrayDataset, lam: Any, rank: int | None,
                        budget: int | None) -> torch.Tensor:
        ctx = self._require_fit()
        path = self._spectrum()
        filt = damped_inverse(path.sigma, path.entry_lambdas(lam), "damping", path.null_mask())
        groups = self.query_groups(len(explained), rank, budget)
        if len(groups) > 1:
            notice(f"{self.name}: scoring {len(explained):,} explained examples in "
                   f"{len(groups)} groups of up to {len(groups[0]):,} (one pass over the "
                   f"{len(ctx.train):,} training examples each) to keep their weighted "
                   "gradients within query_memory; query_rank=r holds fewer numbers per "
                   "example")
        out = torch.empty(len(explained), len(ctx.train))
        for group in groups:
            part = explained.subset(torch.arange(group.start, group.stop))
            weighted = self.fit_.weighted_explained(
                part, filt, rank=rank, target="output", chunk_size=ctx.chunk_size,
                show_progress=ctx.show_progress, desc=f"{self.name} explained gradients")
            for start, prod in self.fit_.weighted_products(
                    weighted, ctx.train, target="loss", chunk_size=ctx.chunk_size,
                    show_progress=ctx.show_progress, desc=f"{self.name} training products"):
                out[group.start : group.stop, start : start + prod.shape[1]] = -prod
            del weighted
        return out

    @property
    def block_names(self) -> list[str]:
        """The damping blocks: one per Kronecker layer (its module path), then ``diagonal``."""
        return self.fit_.block_names

    def module_heuristic_dampings(self, fraction: float = 0.1) -> list[float]:
        """Kronfluence's heuristic per block: ``fraction`` x the block's mean eigenvalue."""
        self._require_fit()
        return block_mean_dampings(self.fit_.sigma, self.fit_.block_sizes, fraction)


@dataclass(frozen=True)
class _Sizes:
    """n training, m explained, v validation examples, p attributed parameters (of all
    ``all_params``), the Kronecker layers' (in, out, diagonal input factor) sides and the
    ``diagonal`` other parameters, the chunk and the gradients' bytes a number."""

    n: int
    p: int
    all_params: int
    m: int
    v: int
    chunk: int
    item: int
    sides: tuple[tuple[int, int, bool], ...]
    diagonal: int
    method: str
    ekfac: bool
    rank: int | None = None
    query_memory: int | None = None

    @property
    def grouped(self) -> bool:
        """Whether ``score`` weighs the explained examples straight from their gradients, in
        groups, holding no coordinates (``KFAC.score``)."""
        return self.rank is not None or self.m * self.p > COORDS_KEEP_LIMIT

    @property
    def query_numbers(self) -> int:
        """Numbers one explained example's weighted gradients hold (:func:`query_numbers`)."""
        return query_numbers(self.blocks, [(d_out, d_in) for d_in, d_out, _ in self.sides],
                             self.rank)

    @property
    def group(self) -> int:
        """Explained examples per group (``KFAC.query_groups``)."""
        return query_group_size(self.m, self.query_numbers * self.item, self.query_memory)

    def coords_item(self, rows: int) -> int:
        """Bytes a number of the eigen-coordinates of ``rows`` examples: float64 unless that
        is more than ``COORDS_KEEP_LIMIT`` numbers (``KFAC._explained_coords``)."""
        return EIG_ITEMSIZE if rows * self.p <= COORDS_KEEP_LIMIT else self.item

    @property
    def keep(self) -> bool:
        """Whether a path holds the [n, p] training coordinates."""
        return self.n * self.p <= COORDS_KEEP_LIMIT

    def path(self, rows: int) -> int:
        """What a cached path of ``rows`` examples holds: coordinates, eigenvalues and, when
        kept, its own concatenation of the training coordinates."""
        return (rows * self.p * self.coords_item(rows) + self.p * EIG_ITEMSIZE
                + self.keep * self.n * self.p * self.item)

    @property
    def blocks(self) -> list[int]:
        """Coordinates per block: each layer's out x in, then the diagonal parameters."""
        return [d_in * d_out for d_in, d_out, _ in self.sides] + [self.diagonal]

    def chunk_rows(self, size: int) -> int:
        """Rows of a block of ``size`` coordinates formed at once."""
        return rotated_rows(min(self.chunk, self.n), size, self.item, ROWS_BUDGET)


def kfac_estimate(z: _Sizes) -> PathEstimate:
    """The phases of :class:`KFAC` and :class:`EKFAC` for the sizes ``z`` (see
    ``KFAC.memory_estimate``)."""
    e, item, n, p = EIG_ITEMSIZE, z.item, z.n, z.p
    rows = max(0 if z.grouped else z.m, z.v)  # explained sets that get a path
    factors = kronecker_factor_parts(list(z.sides), z.diagonal, ekfac=z.ekfac)
    side = max([d_out for _, d_out, _ in z.sides]
               + [d_in for d_in, _, diag in z.sides if not diag], default=0)
    kept = {"parameters": 2 * z.all_params * item,
            **{k: v for k, v in factors.items() if k not in ("covariances", "EK-FAC moments")}}
    grid = max(z.blocks[:-1], default=0)
    phases = {"factors": {**kept, "covariances": factors["covariances"],
                          "diagonal sums": z.diagonal * e,
                          "captured chunk's dense gradients": min(z.chunk, n) * z.diagonal * item,
                          "largest factor's eigh": sum(eigh_bytes(side).values()) if side else 0,
                          "its symmetrised copy": 2 * side * side * e}}
    if z.ekfac:
        phases["EK-FAC correction"] = {**kept, **factors,
                                       "rotated chunk and its square": 2 * z.chunk_rows(grid)
                                       * grid * item}
    validation = {"validation path": z.path(z.v) if z.v else 0}
    if rows:
        phases["explained coordinates"] = {
            **kept, **validation, "explained coordinates": rows * p * z.coords_item(rows),
            "a chunk's coordinates and their parts": 2 * z.chunk_rows(p) * p * item}
        if z.keep:
            phases["training coordinates"] = {
                **kept, **validation, "explained coordinates": rows * p * z.coords_item(rows),
                "training coordinates": n * p * item, "their chunks": n * p * item}
    if z.m:
        scoring = _grouped_phases(z) if z.grouped else _score_phases(z)
        phases.update({name: {**kept, **validation, **parts} for name, parts in scoring.items()})
    return PathEstimate(
        z.method, n, z.m, phases, eig_size=side, form="Kronecker factor",
        advice=("fewer attributed modules, params={'layers': [...]} (the coordinates are "
                f"[m, p] over their parameters, p = {p:,} now)",),
        knobs=explained_knob(lambda j: kfac_estimate(replace(z, m=j)), z.m))


def _score_phases(z: _Sizes) -> dict[str, dict[str, int]]:
    """``StreamedLambdaPath.scores`` of the m explained examples into an [m, n] matrix of the
    coordinates' dtype (its pages touched as it is written): with the training coordinates
    held, the weighted coordinates (and their cast) and the signed product; streamed, one
    weighted copy in the parameter basis (``weighted_back``), one block being weighted, one
    chunk's rows of a block and its products; then ``score`` returns a float32 copy."""
    e, item, m, n, p = EIG_ITEMSIZE, z.item, z.m, z.n, z.p
    ci = z.coords_item(m)
    path = {"explained coordinates": m * p * ci, "eigenvalues and filter": 2 * p * e,
            "score matrix": m * n * ci}
    if z.keep:  # the product is freed before its signed copy is written into the matrix
        loop = {"training coordinates": n * p * item, "weighted coordinates": m * p * ci,
                "weighted coordinates cast": m * p * item if ci != item else 0,
                "signed product": m * n * item}
    else:
        loop = {"weighted copy (weighted_back)": m * p * item,
                "one block being weighted": m * max(z.blocks) * (ci + 2 * item),
                "a chunk's rows of a block": max(z.chunk_rows(size) * size for size in z.blocks)
                * item, "chunk products": 3 * m * min(z.chunk, n) * item}
    return {"scores": {**path, **loop},
            "scores returned": {**path, "score matrix (float32)": m * n * 4 if ci != 4 else 0}}


def _grouped_phases(z: _Sizes) -> dict[str, dict[str, int]]:
    """``KFAC.score`` without a path: per group of explained examples its weighted gradients
    (whole blocks, or rank-r factors), one chunk's rotated block and its two back-rotated
    copies while they are built, then the training pass's rows and products; the [m, n]
    float32 score matrix throughout."""
    item, g, n = z.item, z.group, z.n
    scores = {"eigenvalues and filter": 2 * z.p * EIG_ITEMSIZE, "score matrix": z.m * n * 4,
              "weighted gradients of one group": g * z.query_numbers * item}
    return {
        "explained gradients weighted": {
            **scores, "a few examples' block rotated, weighted and turned back":
                3 * z.chunk_rows(z.p) * max(z.blocks) * item},
        "scores": {**scores,
                   "a chunk's rows of a block": max(z.chunk_rows(size) * size
                                                    for size in z.blocks) * item,
                   "chunk products": 3 * g * min(z.chunk, n) * item}}


class EKFAC(KFAC):
    """Influence with the eigenvalue-corrected K-FAC Fisher (EK-FAC)."""

    name = "ekfac"
    strategy = "ekfac"
