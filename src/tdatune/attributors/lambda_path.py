"""Scores for every lambda from one eigensystem.

With F = U diag(sigma) U^T, c = V U (explained) and a = G U (training):
    score(lambda)[j, i] = sign * sum_k c[j, k] a[i, k] / (sigma_k + lambda)
Subset sums for LDS need no score matrix: project the subset masks once, B = masks @ a
([M, k]), and each lambda costs one [m, k] x [k, M] product.

Null space. Eigenvalues at or below ``NULL_RTOL`` x the largest magnitude are the curvature's
null space: kernel and parameter eigensystems drop them, and paths that keep them (Kronecker
factors with a zero eigenvalue, e.g. an input feature that is always 0) give them no weight,
1 / (sigma_k + lambda) -> 0 (:func:`damped_inverse`). So every lambda >= 0 of a path's own
default grid is accepted and lambda = 0 is the pseudo-inverse (TRAK's default). The training
coordinates along a null direction are zero (up to rounding), so at lambda > 0 this changes no
score beyond rounding, and at tiny lambda it keeps rounding from being amplified by 1 / lambda.
Signed spectra (an indefinite exact Hessian) are allowed too; a lambda that puts a non-null
sigma_k + lambda at or near zero is refused.

Ensembles (TRAK over checkpoints, LoGra with one Fisher block per layer) are sums of
member paths. A sum of paths is again a path over the *concatenated* spectrum, because
sum_c w_c sum_k c_ck a_ick / (sigma_ck + lambda) is the single-path formula for the
block-diagonal matrix diag(F_1, ..., F_C). ``EnsembleLambdaPath`` stores exactly that, so
``scores``, ``subset_predictions`` and the surrogate's spectrum work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tdatune.attributors.damping import Damping, block_lambdas
from tdatune.utils.checks import check_shape

SINGULAR_RTOL = 1e-12
HOLD_LIMIT = 1 << 27  # training coordinates a streamed path agrees to hold (1 GiB in float64)
NULL_RTOL = 1e-10  # |eigenvalues| at or below this fraction of the largest are the null space


def null_space(sigma: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the eigenvalues that count as zero: |sigma_k| <= NULL_RTOL max |sigma|."""
    s = sigma.abs()
    top = float(s.max()) if s.numel() else 0.0
    return s <= NULL_RTOL * top


FILTERS = ("damping", "flow")


def damped_inverse(sigma: torch.Tensor, lam: float | torch.Tensor, filter: str = "damping",
                   null: torch.Tensor | None = None) -> torch.Tensor:
    """The spectral filter h(sigma), broadcast, with the null space's entries 0 (``null``, by
    default :func:`null_space` of the whole of ``sigma``):

    * ``"damping"``: h = 1 / (sigma + lam), the damped inverse (ridge);
    * ``"flow"``: h = (1 - exp(-sigma / lam)) / sigma, gradient flow on the quadratic model for
      a time T = 1 / lam (SOURCE's filter with one segment, eta T = 1 / lam). Both equal
      1 / sigma where sigma >> lam and ~1 / lam where sigma << lam, so lam means the same; the
      flow filter switches between the two more sharply (at sigma = lam it is 0.63 / lam
      against damping's 0.5 / lam).
    """
    if filter == "damping":
        h = 1.0 / (sigma + lam)
    elif filter == "flow":
        s = torch.as_tensor(sigma)
        x = s / lam
        h = torch.where(x.abs() > 1e-8, -torch.expm1(-x) / torch.where(s == 0, 1.0, s),
                        (1.0 - x / 2) / lam)  # the series near 0
    else:
        raise ValueError(f"unknown spectral filter {filter!r}; choose one of {', '.join(FILTERS)}")
    return torch.where(null_space(sigma) if null is None else null, torch.zeros_like(h), h)


def check_path_lambdas(sigma: torch.Tensor, lambdas: torch.Tensor | Sequence[float] | float
                       ) -> torch.Tensor:
    """``lambdas`` as float64 [L]: finite, >= 0, and keeping every sigma_k + lambda outside the
    null space away from 0."""
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1)
    if lam.numel() == 0:
        raise ValueError("lambdas is empty: pass at least one damping value >= 0")
    bad = ~torch.isfinite(lam) | (lam < 0)
    if bool(bad.any()):
        raise ValueError(
            f"lambda must be a finite number >= 0, got {lam[bad][0].item()!r}; use a damping such "
            "as 1e-3 (a log grid spanning the spectrum works best)")
    if sigma.numel():
        s = sigma.to(torch.float64)
        top = float(s.abs().max())
        denom = (s[None, :] + lam[:, None]).abs()
        near = (denom <= SINGULAR_RTOL * max(top, torch.finfo(torch.float64).tiny)) & ~null_space(s)
        if bool(near.any()):
            li, ki = (int(t) for t in near.nonzero()[0])
            raise ValueError(
                f"lambda={float(lam[li]):.6g} makes the curvature + lambda I singular or nearly so "
                f"(eigenvalue {float(s[ki]):.6g} + lambda ~ 0); choose lambda away from "
                f"{-float(s[ki]):.6g}, e.g. larger than the most negative eigenvalue's magnitude "
                f"({max(0.0, -float(s.min())):.6g})")
    return lam


@dataclass
class LambdaPath:
    """Eigenvalues, explained and training coordinates: everything a lambda sweep needs."""

    sigma: torch.Tensor  # [k]
    explained_coords: torch.Tensor  # [m, k]
    train_coords: torch.Tensor  # [n, k]
    sign: float = -1.0
    names: list[str] | None = None  # one per block (layers); None: "all" or block0, block1, ...

    def __post_init__(self) -> None:
        k = self.sigma.shape[0]
        check_shape("explained_coords", self.explained_coords, [None, k])
        check_shape("train_coords", self.train_coords, [None, k])

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return int(self.train_coords.shape[0])

    def _weighted(self, lam: float | torch.Tensor, filter: str = "damping") -> torch.Tensor:
        return self.explained_coords * damped_inverse(self.sigma, lam, filter, self.null_mask())

    def null_mask(self) -> torch.Tensor:
        """The null space, block by block: each block is a curvature of its own (a layer, a
        checkpoint), so an eigenvalue is null against its own block's largest. Computed once
        (the spectrum does not change; every damping of a sweep reuses it)."""
        if getattr(self, "_null", None) is None:
            self._null = torch.cat([null_space(part) for part in self._block_parts(self.sigma)])
        return self._null

    def _negative(self) -> int:
        """How many eigenvalues outside the null space are negative."""
        return int(((self.sigma < 0) & ~self.null_mask()).sum())

    def _block_parts(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(values, self.block_sizes()))

    def block_names(self) -> list[str]:
        """The blocks' names, in order (layers for K-FAC and LoGra per layer)."""
        sizes = self.block_sizes()
        if self.names is not None:
            return list(self.names)
        return ["all"] if len(sizes) == 1 else [f"block{i}" for i in range(len(sizes))]

    def entry_lambdas(self, lam: Damping, filter: str = "damping") -> float | torch.Tensor:
        """A damping (a number, one per block, a {block: value} mapping or ``"per_layer"``;
        :mod:`tdatune.attributors.damping`) as added to each eigenvalue: a float, or [k]
        float64 with each block's value repeated over its eigenvalues. Checked block by block
        (the flow filter also needs a PSD spectrum)."""
        if filter != "damping":
            self._check_filter(filter)
        sizes = self.block_sizes()
        values = block_lambdas(lam, self.sigma, sizes, self.block_names())
        per_block = [values] * len(sizes) if isinstance(values, float) else values
        for part, x in zip(self._block_parts(self.sigma), per_block, strict=True):
            check_path_lambdas(part, float(x))  # each against its own block
        if isinstance(values, float):
            return values
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.float64),
                                       torch.tensor(sizes))

    def scores(self, lam: Damping, filter: str = "damping") -> torch.Tensor:
        """Score matrix [m, n] at one damping (one lambda, or one per block), under the spectral
        ``filter`` (:func:`damped_inverse`)."""
        w = self._weighted(self.entry_lambdas(lam, filter), filter)
        return self.sign * (w @ self.train_coords.T)

    def project_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Subset masks [M, n] through the eigenbasis: B = masks @ a, shape [M, k]."""
        check_shape("subset masks", masks, [None, self.n_train])
        return masks.to(self.train_coords.dtype) @ self.train_coords

    def subset_predictions(self, masks: torch.Tensor, lambdas: torch.Tensor | list[float],
                           projected: torch.Tensor | None = None, filter: str = "damping"
                           ) -> torch.Tensor:
        """Predicted subset sums sum_{i in S_m} score[j, i] for every lambda: [L, m, M]."""
        lam = self._checked(lambdas, filter)
        b = self.project_masks(masks) if projected is None else projected
        return torch.stack([self.sign * (self._weighted(float(x), filter) @ b.T) for x in lam])

    def _checked(self, lambdas: torch.Tensor | Sequence[float] | float, filter: str
                 ) -> torch.Tensor:
        if filter != "damping":
            self._check_filter(filter)
        lam = check_path_lambdas(self.sigma[:0], lambdas)  # finite and >= 0
        for part in self._block_parts(self.sigma):
            check_path_lambdas(part, lam)
        return lam

    def _check_filter(self, filter: str) -> None:
        if filter not in FILTERS:
            raise ValueError(f"unknown spectral filter {filter!r}; choose one of {', '.join(FILTERS)}")
        negative = self._negative()
        if negative:
            raise ValueError(f"the {filter} filter needs a PSD curvature; this one has "
                             f"{negative} negative eigenvalue(s)")

    def self_influence(self, lambdas: torch.Tensor | Sequence[Damping]) -> torch.Tensor:
        """Each training example's influence on its own loss, sum_k a_ik^2 / (sigma_k +
        lambda), for every damping: [L, n] (float64); an entry may hold one damping per block
        (a list or mapping, as :meth:`entry_lambdas` takes). A large value marks an example the
        model fits only by bending to it (the classic detector of mislabelled data)."""
        items = lambdas.tolist() if isinstance(lambdas, torch.Tensor) else list(lambdas)
        if not items:
            raise ValueError("lambdas is empty: pass at least one damping value >= 0")
        k = self.sigma.numel()
        lam = torch.stack([torch.as_tensor(self.entry_lambdas(x), dtype=torch.float64).expand(k)
                           for x in items])
        inv = damped_inverse(self.sigma.double()[None, :], lam, null=self.null_mask())  # [L, k]
        out = torch.empty(len(items), self.n_train, dtype=torch.float64)
        for start, c in self._train_chunks():
            out[:, start : start + c.shape[0]] = inv @ c.double().square().T
        return out

    def _train_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, training coordinates)`` in chunks (one chunk when they are held)."""
        yield 0, self.train_coords

    def block_sizes(self) -> list[int]:
        """Eigenvalue counts of the path's blocks, in order (one block for a single path)."""
        return [int(self.sigma.numel())]

    def blockwise_predictions(self, masks: torch.Tensor, block_lambdas: Damping,
                              projected: torch.Tensor | None = None, filter: str = "damping"
                              ) -> torch.Tensor:
        """Predicted subset sums [m, M] at one damping per block (``block_lambdas[b]`` added to
        every eigenvalue of block b; any form :meth:`entry_lambdas` takes): per-module damping
        on a block-diagonal matrix."""
        lam = self.entry_lambdas(block_lambdas, filter)
        b = self.project_masks(masks) if projected is None else projected
        return self.sign * (self._weighted(lam, filter).to(b.dtype) @ b.T)

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, explained_coords) for the surrogate indicator, the null space's eigenvalues
        set to 0 (they carry no weight); needs a PSD spectrum."""
        negative = self._negative()
        if negative:
            raise ValueError(
                f"the curvature has {negative} negative eigenvalue(s) (most "
                f"negative {float(self.sigma.min()):.3g}); the surrogate indicator is defined for "
                "PSD matrices (Fisher, TRAK's Phi^T Phi, LoGra's projected Fisher)")
        sigma = torch.where(self.null_mask(), torch.zeros_like(self.sigma), self.sigma)
        return sigma, self.explained_coords


class TruncatedLambdaPath(LambdaPath):
    """A path over the top k eigenpairs of a curvature whose other directions count as zero
    curvature (a truncated kernel eigensystem, IFFIM's route for large n). With R = V G^T -
    c a^T [m, n] (each explained gradient's inner products outside the top k directions) and
    h(0) = 1 / lambda (both filters' limit at sigma -> 0),

        score(lambda) = sign (c h(sigma) a^T + R / lambda),

    exact when the dropped eigenvalues are << lambda, and equal to the full path when k
    covers the whole non-null spectrum (R = 0). ``train_rest`` [n]: each training gradient's
    squared norm outside the top k, |g_i|^2 - |a_i|^2, for self-influence. lambda must be > 0.
    ``full_rank``: how many non-null eigenvalues the whole spectrum has (at most min(n, p));
    the quantile rule reads its quantile at its place in that spectrum."""

    def __init__(self, sigma: torch.Tensor, explained_coords: torch.Tensor,
                 train_coords: torch.Tensor, rest: torch.Tensor, train_rest: torch.Tensor,
                 sign: float = -1.0, full_rank: int | None = None) -> None:
        super().__init__(sigma, explained_coords, train_coords, sign)
        self.full_rank = full_rank
        check_shape("rest", rest, [explained_coords.shape[0], train_coords.shape[0]])
        check_shape("train_rest", train_rest, [train_coords.shape[0]])
        self.rest, self.train_rest = rest.double(), train_rest.double()

    def _rest_weight(self, lam: float | torch.Tensor) -> float:
        value = float(lam)
        if not value > 0:
            raise ValueError("this path keeps only the top eigenpairs (the rest count as zero "
                             "curvature), so lambda must be > 0")
        return 1.0 / value

    def scores(self, lam: Damping, filter: str = "damping") -> torch.Tensor:
        """Score matrix [m, n] at one damping, the top eigenpairs and the rest."""
        entries = self.entry_lambdas(lam, filter)
        return super().scores(lam, filter) + (
            self.sign * self._rest_weight(entries) * self.rest).to(self.explained_coords.dtype)

    def subset_predictions(self, masks: torch.Tensor, lambdas: torch.Tensor | list[float],
                           projected: torch.Tensor | None = None, filter: str = "damping"
                           ) -> torch.Tensor:
        """Predicted subset sums [L, m, M], the rest's share included."""
        lam = self._checked(lambdas, filter)
        top = super().subset_predictions(masks, lam, projected, filter)
        rest = self.sign * (self.rest @ masks.double().T)
        return top + torch.stack([self._rest_weight(x) * rest for x in lam]).to(top.dtype)

    def blockwise_predictions(self, masks: torch.Tensor, block_lambdas: Damping,
                              projected: torch.Tensor | None = None, filter: str = "damping"
                              ) -> torch.Tensor:
        """Predicted subset sums [m, M] at one damping (one block)."""
        top = super().blockwise_predictions(masks, block_lambdas, projected, filter)
        weight = self._rest_weight(self.entry_lambdas(block_lambdas, filter))
        return top + (self.sign * weight * (self.rest @ masks.double().T)).to(top.dtype)

    def self_influence(self, lambdas: torch.Tensor | Sequence[Damping]) -> torch.Tensor:
        """Self-influence [L, n], the rest's |g_i|^2 - |a_i|^2 weighted by 1 / lambda."""
        items = lambdas.tolist() if isinstance(lambdas, torch.Tensor) else list(lambdas)
        top = super().self_influence(items)
        weights = torch.tensor([self._rest_weight(self.entry_lambdas(x)) for x in items],
                               dtype=torch.float64)
        return top + weights[:, None] * self.train_rest[None, :]


class EnsembleLambdaPath(LambdaPath):
    """The weighted sum of member paths, stored as one path over the concatenated spectrum.

    ``scores(lam) = sum_c weights[c] * members[c].scores(lam)`` (each with its own sign);
    ``sigma`` and ``explained_coords`` are the members' concatenated, so the surrogate sees
    the block-diagonal matrix diag(F_1, ..., F_C). Weights default to 1 / C (an average).
    """

    def __init__(self, members: Sequence[LambdaPath], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None) -> None:
        members = list(members)
        if not members:
            raise ValueError("an ensemble lambda-path needs at least one member path")
        w = [1.0 / len(members)] * len(members) if weights is None else [float(x) for x in weights]
        if len(w) != len(members):
            raise ValueError(f"{len(members)} member paths but {len(w)} weights")
        n = {m.n_train for m in members}
        e = {int(m.explained_coords.shape[0]) for m in members}
        if len(n) != 1 or len(e) != 1:
            raise ValueError(f"member paths disagree on training ({sorted(n)}) or explained "
                             f"({sorted(e)}) example counts")
        f64 = torch.float64
        super().__init__(
            sigma=torch.cat([m.sigma.to(f64) for m in members]),
            explained_coords=torch.cat([m.explained_coords.to(f64) for m in members], dim=1),
            train_coords=torch.cat([m.train_coords.to(f64) * (m.sign * wc)
                                    for m, wc in zip(members, w, strict=True)], dim=1),
            sign=1.0,
            names=None if names is None else [str(x) for x in names],
        )
        if names is not None and len(names) != len(members):
            raise ValueError(f"{len(members)} member paths but {len(names)} names")
        self.members = members
        self.weights = w

    def block_sizes(self) -> list[int]:
        """One block per member path."""
        return [int(m.sigma.numel()) for m in self.members]


class StreamedLambdaPath(LambdaPath):
    """A lambda-path whose training coordinates are held when small (``keep``) and otherwise
    recomputed chunk by chunk on every use (``chunks()`` yields ``(start, [b, k])``), so a path
    over all p parameters of a model (K-FAC, EK-FAC) never holds n x p numbers: scores stream
    the training side once per call, subset predictions once per set of masks.
    ``sizes`` are the blocks (layers) for per-block damping. ``products(h)`` (yielding
    ``(start, (c_explained * h) @ c_chunk^T)`` for the filter h [k] of one damping) and
    ``masked_sums(masks)`` (``masks @ c``), when given, replace the chunks for scores and mask
    projections while the coordinates are not held (K-FAC computes both without rotating the
    training gradients, nor forming c_explained * h whole)."""

    def __init__(self, sigma: torch.Tensor, explained_coords: torch.Tensor,
                 chunks: Callable[[], Iterator[tuple[int, torch.Tensor]]], n_train: int, *,
                 sign: float = -1.0, sizes: Sequence[int] | None = None, keep: bool = False,
                 products: Callable[[torch.Tensor], Iterator[tuple[int, torch.Tensor]]]
                 | None = None,
                 masked_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 names: Sequence[str] | None = None) -> None:
        check_shape("explained_coords", explained_coords, [None, sigma.shape[0]])
        self.sigma, self.explained_coords, self.sign = sigma, explained_coords, float(sign)
        self._chunks, self._n = chunks, int(n_train)
        self._products, self._masked_sums = products, masked_sums
        self._sizes = [int(sigma.numel())] if sizes is None else [int(s) for s in sizes]
        if sum(self._sizes) != sigma.numel():
            raise ValueError(f"block sizes {self._sizes} do not add up to {sigma.numel()}")
        self.names = None if names is None else [str(x) for x in names]
        if self.names is not None and len(self.names) != len(self._sizes):
            raise ValueError(f"{len(self._sizes)} blocks but {len(self.names)} names")
        self._held: torch.Tensor | None = None
        if keep:
            self._held = torch.cat([c for _, c in chunks()]) if n_train else torch.empty(
                0, sigma.numel(), dtype=sigma.dtype)

    @property  # type: ignore[override]
    def train_coords(self) -> torch.Tensor:
        """[n, k] (computed now when not held; refused above ``HOLD_LIMIT`` numbers)."""
        if self._held is None:
            if self._n * self.sigma.numel() > HOLD_LIMIT:
                raise ValueError(
                    f"the training coordinates would be {self._n} x {self.sigma.numel()} "
                    "numbers; this path streams them (scores, subset_predictions) and does "
                    "not hold them")
            self._held = torch.cat([c for _, c in self._chunks()])
        return self._held

    @property
    def n_train(self) -> int:
        """Number of training examples."""
        return self._n

    def _weighted(self, lam: float | torch.Tensor, filter: str = "damping") -> torch.Tensor:
        """c h(sigma) (c / (sigma + lam) for damping) at the explained coordinates' precision (a
        wide model's are float32)."""
        h = damped_inverse(self.sigma, lam, filter, self.null_mask())
        return self.explained_coords * h.to(self.explained_coords.dtype)

    def subset_predictions(self, masks: torch.Tensor, lambdas: torch.Tensor | list[float],
                           projected: torch.Tensor | None = None, filter: str = "damping"
                           ) -> torch.Tensor:
        """Predicted subset sums [L, m, M] (float64), one pass over the training side."""
        lam = self._checked(lambdas, filter)
        b = (self.project_masks(masks) if projected is None else projected).to(
            self.explained_coords.dtype)
        return torch.stack([self.sign * (self._weighted(float(x), filter) @ b.T).double()
                            for x in lam])

    def _train_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self._held is not None:
            yield 0, self._held
        else:
            yield from self._chunks()

    def scores(self, lam: Damping, filter: str = "damping") -> torch.Tensor:
        """Score matrix [m, n] at one damping, one lambda or one per block, under ``filter``
        (one pass over the training side)."""
        entries = self.entry_lambdas(lam, filter)
        if self._held is None and self._products is not None:  # the filter, not c x filter
            h = damped_inverse(self.sigma, entries, filter, self.null_mask())  # [k]
            out = torch.empty(self.explained_coords.shape[0], self._n,
                              dtype=self.explained_coords.dtype)
            for start, prod in self._products(h):
                out[:, start : start + prod.shape[1]] = self.sign * prod
            return out
        w = self._weighted(entries, filter)
        out = torch.empty(w.shape[0], self._n, dtype=w.dtype)
        for start, c in self._train_chunks():  # at the training coordinates' precision
            out[:, start : start + c.shape[0]] = self.sign * (w.to(c.dtype) @ c.T)
        return out

    def project_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """masks @ a [M, k], in one pass over the training side."""
        check_shape("subset masks", masks, [None, self._n])
        if self._held is None and self._masked_sums is not None:
            return self._masked_sums(masks).to(self.sigma.dtype)
        out = torch.zeros(masks.shape[0], self.sigma.numel(), dtype=self.sigma.dtype)
        for start, c in self._train_chunks():
            out += masks[:, start : start + c.shape[0]].to(out.dtype) @ c.to(out.dtype)
        return out

    def block_sizes(self) -> list[int]:
        """The blocks given at construction."""
        return list(self._sizes)
