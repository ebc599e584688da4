"""Memory and disk that featurization and attribution need, estimated before any long work,
and a refusal, naming the numbers and the fix, of a run that would not fit.

What featurization counts (the arrays tdatune allocates; the model's activations and the input
batch are not, pass them as ``extra_bytes`` when they are large):

* gradients in flight: 2 x [chunk, p] in the parameters' dtype (the per-layer pieces of one
  batched backward pass and the flat rows they are written into);
* the projected chunk [chunk, d] and the projection matrix (p x d when it is cached whole,
  ``Projector`` does so up to ``CACHE_LIMIT`` entries, else one block of rows);
* the parameters, twice (the model's and the detached copies differentiated);
* with a store: one chunk of store rows [chunk_rows, d] plus the float64 copy its checksum is
  taken on; on disk n x d float32 (``features.npy``) and one small record per chunk;
* in memory: the whole [n, d] result (the default unless a store is given).

What attribution with an eigensystem of the empirical Fisher counts
(:func:`estimate_attribution`, phase by phase, the peak being the largest phase): the training
gradients [n, d] (or the hooks' factors), the eigendecomposition of the p x p (parameter form,
d <= n) or n x n (kernel form) matrix in float64 with its eigenvectors and LAPACK's workspace,
the training coordinates, the explained side and the [m, n] score matrix.
:func:`check_attribution` refuses above the memory available (or a budget) and warns once
above ``WARN_FRACTION`` of it or before an eigendecomposition larger than ``EIGH_WARN_SIZE``.

Every other attributor's path is estimated by its own ``memory_estimate`` as a
:class:`PathEstimate` (the same phases, with the fixes that fit it: :class:`Knob` settings found
by search, and other attributors), written with the small pieces below (the scores of a
lambda-path, an ensemble path, training gradients kept or streamed, the exact Hessian, the
Kronecker factors), checked by the same :func:`check_attribution`.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tdatune.features.projection import BLOCK_ROWS, CACHE_LIMIT

RECORD_BYTES = 4096  # one chunk record on disk (a small JSON file: one file-system block)
HEADER_BYTES = 128  # the .npy header
EIG_ITEMSIZE = 8  # eigendecompositions run in float64 (tdatune.curvature.eigen)
WARN_FRACTION = 0.5  # warn above this share of the memory available (or of the budget)
RANGE_OVERSAMPLE = 10  # extra columns of a randomised top-k eigendecomposition
EIGH_NOTICE_SIZE = 4_000  # an eigendecomposition above this order says so before it starts
EIGH_WARN_SIZE = 8_000  # attribute() warns before an eigendecomposition above this order
EIGH_SECONDS_2000 = 2.0  # float64 eigh of order 2,000 on one core (measured 1.5-6.9 s)
LAPACK_ALLOWANCE = 16 << 20  # LAPACK's and BLAS's own buffers around an eigh, beyond lwork


class DoesNotFit(RuntimeError):
    """A featurization or attribution run needs more memory or disk than there is."""


class BudgetWarning(UserWarning):
    """An attribution run will use much of the memory available, or eigendecompose a matrix
    large enough to take minutes."""


@dataclass(frozen=True)
class FeaturizationEstimate:
    """Bytes of memory and disk a featurization run needs, with the memory by part."""

    n: int
    width: int
    grad_width: int
    chunk_rows: int
    store_chunk_rows: int | None
    in_memory: bool
    itemsize: int
    store_itemsize: int
    extra_bytes: int
    memory_parts: dict[str, int] = field(default_factory=dict)
    disk_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        """Resident memory needed, all parts together."""
        return sum(self.memory_parts.values())

    def describe(self) -> str:
        """One line: the memory by part and the disk."""
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.memory_parts.items() if v)
        disk = f"; disk {format_bytes(self.disk_bytes)}" if self.disk_bytes else ""
        return f"memory {format_bytes(self.memory_bytes)} ({parts}){disk}"

    def parts_line(self) -> str:
        """The memory parts, largest first, for a message."""
        return _parts_line(self.memory_parts)

    def fixes(self, available: int) -> list[str]:
        """What would bring the memory under ``available`` bytes: a feature store, the largest
        projection dimension, gradient chunk or store chunk that fits."""
        fixes = []
        if self.in_memory and self.store_chunk_rows is None:
            fixes.append("keep the features on disk with a feature store "
                         "(tdatune.features.store.build_gradient_store), which holds one chunk")
        d = _largest(lambda w: _with(self, width=w).memory_bytes <= available, self.width - 1)
        if d and self.width > 1:
            fixes.append(f"a smaller projection, proj_dim <= {d}")
        c = _largest(lambda r: _with(self, chunk_rows=r).memory_bytes <= available,
                     self.chunk_rows - 1)
        if c:
            fixes.append(f"a smaller gradient chunk, chunk size <= {c} (now {self.chunk_rows})")
        if self.store_chunk_rows is not None:
            s = _largest(lambda r: _with(self, store_chunk_rows=r).memory_bytes <= available,
                         self.store_chunk_rows - 1)
            if s:
                fixes.append(f"smaller store chunks, chunk_rows <= {s} "
                             f"(now {self.store_chunk_rows})")
        return fixes


def format_bytes(size: float) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def projector_bytes(grad_width: int, width: int, itemsize: int = 4) -> int:
    """Memory of a ``Projector`` from ``grad_width`` to ``width`` (0 when nothing is projected):
    the whole p x d matrix when it is cached, else one block of rows and its cast."""
    if width >= grad_width:
        return 0
    if grad_width * width <= CACHE_LIMIT:
        return grad_width * width * itemsize
    return 2 * min(BLOCK_ROWS, grad_width) * width * itemsize


def estimate_featurization(
    n: int, width: int, *, grad_width: int, chunk_rows: int = 256,
    dtype: torch.dtype | np.dtype | str = torch.float32, store_chunk_rows: int | None = None,
    in_memory: bool | None = None, num_params: int | None = None,
    proj_bytes: int | None = None, extra_bytes: int = 0,
) -> FeaturizationEstimate:
    """Memory and disk for per-example gradients of ``n`` examples, ``grad_width`` = p
    gradient dimensions each, kept at ``width`` = d (d < p: projected), ``chunk_rows``
    examples differentiated at a time; ``store_chunk_rows`` set: written to a feature store
    in chunks of that many rows; ``in_memory``: the whole [n, d] result kept in memory
    (default: unless a store is given, as ``per_example_grads`` does).
    ``proj_bytes`` defaults to what a ``Projector`` holds, ``num_params`` to ``grad_width``."""
    if min(n, width, grad_width, chunk_rows) < 1 or (store_chunk_rows or 1) < 1:
        raise ValueError(f"an estimate needs n, width, grad_width and chunk sizes >= 1; got n={n}"
                         f", width={width}, grad_width={grad_width}, chunk_rows={chunk_rows}, "
                         f"store_chunk_rows={store_chunk_rows}")
    item = _itemsize(dtype)
    if in_memory is None:
        in_memory = store_chunk_rows is None
    chunk = min(chunk_rows, n if store_chunk_rows is None else min(n, store_chunk_rows))
    projected = width < grad_width
    parts = {
        "gradients in flight": 2 * chunk * grad_width * item,
        "projected chunk": chunk * width * item if projected else 0,
        "projection matrix": (projector_bytes(grad_width, width, item) if proj_bytes is None
                              else int(proj_bytes)),
        "parameters": 2 * (grad_width if num_params is None else num_params) * item,
    }
    disk = 0
    if store_chunk_rows is not None:
        rows = min(n, store_chunk_rows)
        parts["store chunk"] = rows * width * (item + 8)  # rows + float64 copy for the checksum
        disk = n * width * 4 + HEADER_BYTES + math.ceil(n / store_chunk_rows) * RECORD_BYTES
    if in_memory:
        parts["features in memory"] = n * width * item
    if extra_bytes:
        parts["other (given)"] = int(extra_bytes)
    return FeaturizationEstimate(
        n=n, width=width, grad_width=grad_width, chunk_rows=chunk_rows,
        store_chunk_rows=store_chunk_rows, in_memory=in_memory, itemsize=item, store_itemsize=4,
        extra_bytes=int(extra_bytes), memory_parts=parts, disk_bytes=disk)


def estimate_gradients(params: dict[str, torch.Tensor], n: int, *, projector: object = None,
                       chunk_size: int = 256, store_chunk_rows: int | None = None,
                       in_memory: bool | None = None, extra_bytes: int = 0
                       ) -> FeaturizationEstimate:
    """:func:`estimate_featurization` for per-example gradients w.r.t. ``params`` (projected by
    ``projector``: a ``Projector``, a per-layer ``KroneckerProjector`` or None), as
    ``per_example_grads`` (the default: in memory) or ``build_gradient_store``
    (``store_chunk_rows``) compute them. For a per-layer projection the gradient chunk is an
    upper bound: layers projected from their factors never form their rows."""
    p = sum(v.numel() for v in params.values())
    first = next(iter(params.values()))
    width = int(getattr(projector, "d", p)) if projector is not None else p
    return estimate_featurization(n, width, grad_width=p, chunk_rows=chunk_size,
                                  dtype=first.dtype, store_chunk_rows=store_chunk_rows,
                                  in_memory=in_memory, num_params=p,
                                  proj_bytes=_held_by(projector), extra_bytes=extra_bytes)


def _held_by(projector: object) -> int | None:
    """Bytes a projector holds (None: as a ``Projector`` of its width would)."""
    if projector is None or getattr(projector, "kind", "") == "identity":
        return 0
    cached = getattr(projector, "_cached", None)
    if isinstance(cached, torch.Tensor):
        return cached.numel() * cached.element_size()
    sides = getattr(projector, "sides", None)
    if sides is None:
        return None
    held = sum(t.numel() * t.element_size() for side in sides
               for t in (getattr(side, "p_in", None), getattr(side, "p_out", None))
               if isinstance(t, torch.Tensor))
    dense = getattr(projector, "dense", None)  # the parameters outside factored layers
    if dense is not None:
        held += _held_by(dense) or projector_bytes(dense.p, dense.d)
    return held


# ---------------------------------------------------------------------- attribution


class _Phased:
    """The peak of an estimate given phase by phase (``phases``: the parts alive at once)."""

    phases: dict[str, dict[str, int]]

    @property
    def peak_phase(self) -> str:
        """The phase that needs the most memory."""
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def memory_bytes(self) -> int:
        """Resident memory at the peak."""
        return sum(self.phases[self.peak_phase].values())

    def parts_line(self) -> str:
        """The peak phase's parts, largest first, for a message."""
        return f"at its peak, {self.peak_phase}: " + _parts_line(self.phases[self.peak_phase])


@dataclass(frozen=True)
class AttributionEstimate(_Phased):
    """Bytes an attribution with an eigensystem of the empirical Fisher needs, phase by phase
    (each phase: the parts alive at once); the peak is the largest phase.

    ``form``: "parameter" (the d x d matrix, d <= n) or "kernel" (the n x n matrix);
    ``factored``: the kernel form is built from the hooks' factors, never the [n, p] rows;
    ``fitted``: what the eigensystem keeps once fitted (for the paths that hold several)."""

    n: int
    width: int
    grad_width: int
    form: str
    factored: bool
    explained: int
    validation: int
    phases: dict[str, dict[str, int]]
    options: dict[str, object] = field(default_factory=dict, repr=False)
    disk_bytes: int = 0
    fitted: dict[str, int] = field(default_factory=dict, repr=False)
    rank: int | None = None  # the kernel's top eigenpairs kept by randomised iteration

    @property
    def eig_size(self) -> int:
        """Order of the eigendecomposed matrix (the small projected one for a top-k kernel)."""
        if self.rank is not None:
            return range_columns(min(self.n, self.width), self.rank)
        return self.width if self.form == "parameter" else self.n

    @property
    def kept(self) -> int:
        """Eigenpairs kept, at most: min(n, width, rank)."""
        return min(self.n, self.width, self.rank or self.n)

    def describe(self) -> str:
        """One line: the peak memory, its phase and parts, and the eigendecomposition."""
        s = self.eig_size
        return (f"memory {format_bytes(self.memory_bytes)} ({self.parts_line()}); eigh of "
                f"{s:,} x {s:,} ({self.form} form), roughly {format_seconds(eigh_seconds(s))}")

    def with_proj_dim(self, d: int) -> AttributionEstimate:
        """The same attribution with the gradients projected to ``d`` by a ``Projector``."""
        keep = {k: v for k, v in self.options.items()
                if k not in ("proj_bytes", "factored_numbers", "eig_rank")}
        return estimate_attribution(self.n, self.grad_width, proj_dim=d,
                                    explained=self.explained, validation=self.validation,
                                    **keep)  # type: ignore[arg-type]

    def fixes(self, available: int | None, *, max_eig_size: int | None = None) -> list[str]:
        """What would bring the memory under ``available`` bytes (and the eigendecomposition
        under ``max_eig_size``): a projection, K-FAC, fewer explained examples at a time."""
        fixes = []

        def ok(d: int) -> bool:
            small = max_eig_size is None or min(self.n, d) <= max_eig_size
            return small and (available is None or
                              self.with_proj_dim(d).memory_bytes <= available)

        d = _largest(ok, min(self.width, self.grad_width) - 1)
        if d:
            fixes.append(f"a random projection of the gradients, proj_dim <= {d:,} (e.g. "
                         f"params={{'proj_dim': {1 << (min(d, 4096).bit_length() - 1)}}})")
        elif self.width > 1:
            fixes.append("no proj_dim= fits (a projection still forms the [chunk, p] gradient "
                         "rows it projects)")
        fixes.append("K-FAC, attributor='kfac' or attributor='ekfac' (Kronecker factors per "
                     "layer: no n x n or p x p matrix)")
        scores = self.explained * self.n * (EIG_ITEMSIZE + 4)
        if available is not None and self.explained > 1 and scores > available // 4:
            fixes.append(f"fewer explained examples per call (the score matrix is "
                         f"[{self.explained:,}, {self.n:,}]: {format_bytes(scores)})")
        return fixes


def range_columns(size: int, rank: int) -> int:
    """Columns of the top-``rank`` route's blocks on a size x size matrix: rank +
    ``RANGE_OVERSAMPLE``, at most the size (also the order of its small eigh)."""
    return min(size, rank + RANGE_OVERSAMPLE)


def eigh_bytes(size: int, itemsize: int = EIG_ITEMSIZE) -> dict[str, int]:
    """What ``torch.linalg.eigh`` of a size x size matrix holds at once: the matrix, the
    eigenvectors (a copy) and LAPACK ``?syevd``'s workspace (1 + 6 size + 2 size^2 reals and
    3 + 5 size integers; counted as 8 bytes each), the eigenvalues, and an allowance for
    the library's own buffers (measured with MKL: 5-9 MB for sizes 1,000-3,000)."""
    return {"matrix": size * size * itemsize, "eigenvectors": size * size * itemsize,
            "LAPACK workspace": (1 + 6 * size + 2 * size * size) * itemsize + (3 + 5 * size) * 8,
            "eigenvalues": size * itemsize, "LAPACK internals": LAPACK_ALLOWANCE + 2048 * size}


def eigh_seconds(size: int, threads: int | None = None) -> float:
    """A rough time for a float64 eigendecomposition of order ``size``: ``EIGH_SECONDS_2000``
    at 2,000 on one core, growing as size^3, divided by the torch threads (optimistic:
    the tridiagonal reduction scales worse than that)."""
    threads = threads or torch.get_num_threads()
    return EIGH_SECONDS_2000 * (size / 2000) ** 3 / max(1, threads)


def format_seconds(seconds: float) -> str:
    """``95`` -> ``'1.6 min'``."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else "under a second"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_attribution(
    n: int, grad_width: int, *, proj_dim: int | None = None, explained: int = 0,
    validation: int = 0, factored_numbers: int | None = None, chunk_rows: int = 256,
    eig_chunk_rows: int = 2048, dtype: torch.dtype | np.dtype | str = torch.float32,
    proj_bytes: int | None = None, eig_rank: int | None = None,
) -> AttributionEstimate:
    """Memory of an eigensystem of the empirical Fisher on ``n`` training gradients of
    ``grad_width`` = p dimensions (projected to ``proj_dim`` = d < p when given), the
    ``validation`` examples mapped to its eigenbasis (the lambda selection) and ``explained``
    examples scored against all n: IFFIM's path (TRAK's and LoGra's per eigensystem).

    The defaults are the honest upper bound: no projection, the [n, p] rows formed in
    ``dtype``. ``factored_numbers``: the kernel form is built from the hooks' factors holding
    that many numbers per example (:func:`tdatune.features.kernel.factored_numbers`).
    ``chunk_rows``: examples differentiated at a time; ``eig_chunk_rows``: rows of G read at a
    time by :func:`tdatune.curvature.eigen.fisher_eigensystem`. ``eig_rank`` < min(n, width):
    either form keeps its top ``eig_rank`` eigenpairs by randomised subspace iteration
    (:func:`tdatune.curvature.eigen.top_psd_eigenpairs`) and each explained example's
    products with every training gradient (what lies outside them)."""
    if min(n, grad_width, chunk_rows, eig_chunk_rows) < 1 or (proj_dim or 1) < 1:
        raise ValueError(f"an estimate needs n, grad_width, proj_dim and chunk sizes >= 1; got "
                         f"n={n}, grad_width={grad_width}, proj_dim={proj_dim}")
    item = _itemsize(dtype)
    w = min(proj_dim, grad_width) if proj_dim is not None else grad_width
    form = "parameter" if w <= n else "kernel"
    factored = factored_numbers is not None and form == "kernel" and w == grad_width
    row_numbers = int(factored_numbers) if factored else w  # type: ignore[arg-type]
    rank = eig_rank if eig_rank is not None and eig_rank < min(n, w) else None
    held = {"parameters": 2 * grad_width * item,
            "projection matrix": (projector_bytes(grad_width, w, item) if proj_bytes is None
                                  else int(proj_bytes))}
    train = {"training gradients": n * row_numbers * item}
    sizes = _Sizes(n, w, item, min(chunk_rows, n), min(eig_chunk_rows, n),
                   max(explained, validation), row_numbers, factored, rank)
    phases = {"training gradients": {**train, **_in_flight(sizes, grad_width)},
              **{k: {**train, **v} for k, v in _eigen_phases(sizes, form).items()},
              **_explained_phases(sizes, form, grad_width, explained, validation, train)}
    options = {"chunk_rows": chunk_rows, "eig_chunk_rows": eig_chunk_rows, "dtype": dtype,
               "proj_bytes": proj_bytes, "factored_numbers": factored_numbers,
               "eig_rank": eig_rank}
    return AttributionEstimate(
        n=n, width=w, grad_width=grad_width, form=form, factored=factored, rank=rank,
        explained=explained,
        validation=validation, phases={k: {**held, **v} for k, v in phases.items()},
        options=options, fitted=_system(sizes, form, train))


@dataclass(frozen=True)
class _Sizes:
    """The sizes every phase of :func:`estimate_attribution` is written in."""

    n: int
    w: int  # gradient width (d or p)
    item: int  # bytes of one gradient number
    chunk: int  # examples differentiated at a time
    eig_chunk: int  # rows of G read at a time by the eigensystem
    m: int  # the larger explained set
    row_numbers: int  # numbers held per training example (w, or the factors)
    factored: bool
    rank: int | None = None  # the kernel's top eigenpairs kept (None: all)

    @property
    def k(self) -> int:
        """Eigenpairs kept, at most."""
        return min(self.n, self.w, self.rank or self.n)


def gradients_in_flight(chunk: int, p: int, width: int, item: int) -> dict[str, int]:
    """One chunk of per-example gradients being computed: 2 x [chunk, p] (the per-layer
    pieces of one batched backward pass and the rows they are written into), and its
    projection [chunk, width] when width < p."""
    return {"gradients in flight": 2 * chunk * p * item,
            "projected chunk": chunk * width * item if width < p else 0}


def _in_flight(z: _Sizes, p: int) -> dict[str, int]:
    """One chunk of per-example gradients being computed (and projected); from the hooks'
    factors, the captured chunk and its compacted copy."""
    if z.factored:
        return {"gradients in flight": 2 * z.chunk * z.row_numbers * z.item}
    return gradients_in_flight(z.chunk, p, z.w, z.item)


def _eigen_phases(z: _Sizes, form: str) -> dict[str, dict[str, int]]:
    """Building the matrix, eigh, and the training coordinates, as
    ``tdatune.curvature.eigen`` does them (float64; the matrix scaled in place)."""
    e, k = EIG_ITEMSIZE, z.k
    if form == "parameter":
        s, name = z.w, "p x p matrix"
        build = {name: s * s * e,
                 "row chunk (float64)": z.eig_chunk * z.w * e}
        coords = {"eigenvectors kept": s * k * e, "training coordinates": z.n * k * e,
                  "row chunk (float64)": z.eig_chunk * z.w * e,
                  "chunk coordinates": z.eig_chunk * k * e}
    else:
        s, name = z.n, "n x n matrix"
        build = {name: s * s * e, "Gram block": z.eig_chunk * z.eig_chunk * e}
        if not z.factored:  # two chunks of rows (one when they are all in one chunk)
            build["row chunks (float64)"] = (1 + (z.n > z.eig_chunk)) * z.eig_chunk * z.w * e
        coords = {name: s * s * e, "eigenvectors": s * s * e, "eigenvectors kept": s * k * e}
    if z.rank is not None:  # randomised subspace iteration: blocks of s x (rank + oversample)
        cols = range_columns(s, z.rank)
        eig = {name: s * s * e, "range finder blocks": 3 * s * cols * e,
               **{f"small eigh: {k_}": v for k_, v in eigh_bytes(cols).items()}}
        if form == "kernel":  # no n x n eigenvectors of eigh beside the kept ones
            coords = {name: s * s * e, "eigenvectors kept": s * k * e}
        return {"accumulation": build, "eigendecomposition": eig, "training coordinates": coords}
    eig = eigh_bytes(s)
    eig[name] = eig.pop("matrix")
    return {"accumulation": build, "eigendecomposition": eig, "training coordinates": coords}


def _system(z: _Sizes, form: str, train: dict[str, int]) -> dict[str, int]:
    """What a fitted eigensystem keeps: the kept eigenvectors (parameter form) or kernel
    vectors, the training coordinates and, in kernel form, the training gradients that
    explained gradients are mapped through."""
    e, k = EIG_ITEMSIZE, z.k
    system = {"eigenvectors kept": (z.w if form == "parameter" else z.n) * k * e,
              "training coordinates": z.n * k * e}
    if form == "kernel":
        system.update(train)
    return system


def _explained_phases(z: _Sizes, form: str, p: int, explained: int, validation: int,
                      train: dict[str, int]) -> dict[str, dict[str, int]]:
    """Mapping the explained (and validation) examples to the eigenbasis, and scoring."""
    e, k = EIG_ITEMSIZE, z.k
    system = {**_system(z, form, train), "validation coordinates": validation * k * e}
    if not z.m:
        return {}
    if z.factored:
        side = {"explained gradients": z.m * z.row_numbers * z.item, "V G^T": z.m * z.n * e}
    else:
        side = {"explained gradients": z.m * z.w * z.item,
                "explained gradients (float64)": z.m * z.w * e,
                **_in_flight(z, p)}
        if form == "kernel":
            side.update({"row chunk (float64)": z.eig_chunk * z.w * e,
                         "V G^T block": z.m * z.eig_chunk * e})
    side["explained coordinates"] = z.m * k * e
    rest = {"products outside the top eigenpairs": z.m * z.n * e} if z.rank else {}
    side.update(rest)
    scores = {**rest, "explained coordinates": explained * k * e,
              "weighted coordinates": explained * k * e,
              "score matrix (float64)": explained * z.n * e,
              "score matrix, signed copy (float64)": explained * z.n * e,
              "score matrix (float32)": explained * z.n * 4}
    return {"explained": {**system, **side}, "scores": {**system, **scores}}


# ------------------------------------------------- the other attributors' paths


@dataclass(frozen=True)
class Knob:
    """A setting of an attributor whose smaller values need less memory: the fix as a message
    says it (``{value}``: the largest value that fits, ``{now}``: the value now), the value
    now, and the estimate at another value (arithmetic only: it is called many times)."""

    said: str
    now: int
    at: Callable[[int], PathEstimate]

    def largest(self, available: int | None, max_eig_size: int | None = None) -> int:
        """The largest value below ``now`` whose estimate needs at most ``available`` bytes
        and eigendecomposes nothing larger than ``max_eig_size``; 0: none, or no limit."""
        if available is None and max_eig_size is None:
            return 0

        def ok(value: int) -> bool:
            est = self.at(value)
            return ((available is None or est.memory_bytes <= available)
                    and (max_eig_size is None or est.eig_size <= max_eig_size))

        return _largest(ok, self.now - 1)


@dataclass(frozen=True)
class PathEstimate(_Phased):
    """Bytes an attributor's own path needs (TRAK, LoGra, the exact Hessian, K-FAC, TracIn,
    the Hessian-vector-product methods), phase by phase as :class:`AttributionEstimate`, with
    the fixes that fit that attributor: ``knobs`` (a smaller setting that fits, found by
    search) and ``advice`` (another attributor). ``eig_size``: the order of its largest
    eigendecomposition (0: none), ``form`` what is eigendecomposed."""

    method: str
    n: int
    explained: int
    phases: dict[str, dict[str, int]]
    advice: tuple[str, ...] = ()
    knobs: tuple[Knob, ...] = field(default=(), repr=False)
    eig_size: int = 0
    form: str = ""
    disk_bytes: int = 0

    def describe(self) -> str:
        """One line: the peak memory, its phase and parts (and the largest eigendecomposition)."""
        s = self.eig_size
        eig = (f"; eigh of {s:,} x {s:,} ({self.form} form), roughly "
               f"{format_seconds(eigh_seconds(s))}" if s else "")
        return f"{self.method}: memory {format_bytes(self.memory_bytes)} ({self.parts_line()}){eig}"

    def fixes(self, available: int | None, *, max_eig_size: int | None = None) -> list[str]:
        """The settings that would bring the memory under ``available`` bytes (and the
        eigendecomposition under ``max_eig_size``), then the other attributors to use."""
        fixes = []
        for knob in self.knobs:
            value = knob.largest(available, max_eig_size)
            if value:
                fixes.append(knob.said.format(value=value, now=knob.now))
        return fixes + list(self.advice)


def explained_knob(at: Callable[[int], PathEstimate], m: int) -> tuple[Knob, ...]:
    """The fix every attributor shares: fewer explained examples per call (its score matrix
    and explained-side arrays grow with them); none for one example."""
    if m <= 1:
        return ()
    return (Knob("fewer explained examples per call, at most {value:,} (now {now:,}): score "
                 "the rest in further calls", m, at),)


def lambda_path_scores(m: int, n: int, k: int, item: int = EIG_ITEMSIZE) -> dict[str, int]:
    """What ``LambdaPath.scores`` holds beside its path: the weighted explained coordinates
    [m, k], the product with the training coordinates [m, n] and its signed copy, both alive
    at once (the float32 copy returned afterwards is smaller than the two)."""
    return {"weighted coordinates": m * k * item, "score product": m * n * item,
            "signed score matrix": m * n * item}


def ensemble_parts(n: int, m: int, total_k: int, *, building: bool) -> dict[str, int]:
    """What ``EnsembleLambdaPath`` holds over members of ``total_k`` eigenpairs in all: the
    concatenated explained [m, K] and training [n, K] coordinates (float64) and, while it is
    being built, the members' weighted training coordinates that are concatenated."""
    e = EIG_ITEMSIZE
    parts = {"ensemble explained coordinates": m * total_k * e,
             "ensemble training coordinates": n * total_k * e}
    if building:
        parts["members' weighted training coordinates"] = n * total_k * e
    return parts


def kept_gradients(n: int, width: int, item: int, limit: int) -> dict[str, int]:
    """Training gradients [n, width] kept whole when n x width <= ``limit`` numbers (else none:
    recomputed in chunks on every use), as ``attributors.common.TrainGradients`` does."""
    return {"training gradients (kept)": n * width * item} if n * width <= limit else {}


def kept_gradients_built(n: int, p: int, width: int, item: int, chunk: int,
                         limit: int) -> dict[str, int]:
    """Building the kept gradients: the chunks, then their concatenation (both alive as it
    is made) and one chunk in flight; streamed, one chunk in flight only."""
    kept = kept_gradients(n, width, item, limit)
    if kept:
        kept["their chunks before the concatenation"] = n * width * item
    return {**kept, **gradients_in_flight(min(chunk, n), p, width, item)}


def gradient_products(m: int, n: int, p: int, width: int, item: int, x_item: int, chunk: int,
                      limit: int) -> dict[str, int]:
    """``TrainGradients.products(x)`` for x [m, width] in ``x_item`` bytes a number: the kept
    gradients cast to x's dtype (a copy when it differs) and the [m, n] product; streamed,
    one chunk recomputed, its cast and its [m, chunk] block, written into the [m, n] result."""
    kept = kept_gradients(n, width, item, limit)
    cast = x_item if x_item != item else 0
    if kept:
        return {**kept, "training gradients cast": n * width * cast,
                "products": m * n * x_item}
    c = min(chunk, n)
    return {**gradients_in_flight(c, p, width, item), "chunk cast": c * width * cast,
            "block of products": m * c * x_item, "products": m * n * x_item}


def hessian_parts(p: int) -> dict[str, int]:
    """Forming the exact Hessian (``TrainingObjective.exact``, float64): the accumulated
    p x p matrix with one batch's Hessian beside it, then, symmetrising, the matrix, H + H^T
    and 0.5 (H + H^T) at once."""
    e = EIG_ITEMSIZE
    return {"Hessian": p * p * e, "H + H^T (or a batch's Hessian)": p * p * e,
            "symmetrised Hessian": p * p * e}


def eigenvector_copies(size: int, item: int = EIG_ITEMSIZE) -> dict[str, int]:
    """After SciPy's eigh (``curvature.hessian.symmetric_eigh``): the matrix still referenced,
    the column-major eigenvectors and their row-major copy (then a flipped copy, no more)."""
    return {"matrix": size * size * item, "eigenvectors (column-major)": size * size * item,
            "eigenvectors (row-major copy)": size * size * item}


def cast_copies(p: int, input_numbers: int, item: int) -> dict[str, int]:
    """The problem cast to the curvature's precision (``curvature.hessian.cast_problem`` and
    ``TrainingObjective``): the model's and the detached parameters and the flat theta, and
    the training inputs (``input_numbers`` floating numbers that are copied; 0 if none)."""
    return {"parameters cast": 3 * p * item, "training inputs cast": input_numbers * item}


def kronecker_factor_parts(sides: list[tuple[int, int, bool]], diagonal: int, *,
                           ekfac: bool) -> dict[str, int]:
    """What a K-FAC fit keeps per Kronecker layer of (in, out, input factor diagonal) sides,
    all float64: the covariances A (in x in, or its diagonal for an embedding) and S
    (out x out), their eigenvectors and eigenvalues, the [out, in] eigenvalue grid (EK-FAC:
    and its moments); and E[g^2] of the ``diagonal`` other parameters."""
    e = EIG_ITEMSIZE
    a_vectors = sum(0 if diag else d_in * d_in for d_in, _, diag in sides)
    a_cov = sum(d_in if diag else d_in * d_in for d_in, _, diag in sides)
    s_cov = sum(d_out * d_out for _, d_out, _ in sides)
    grid = sum(d_in * d_out for d_in, d_out, _ in sides)
    return {"covariances": (a_cov + s_cov) * e, "factor eigenvectors": (a_vectors + s_cov) * e,
            "factor eigenvalues": sum(d_in + d_out for d_in, d_out, _ in sides) * e,
            "eigenvalue grid": grid * e, "EK-FAC moments": grid * e if ekfac else 0,
            "diagonal second moments": diagonal * e}


def rotated_rows(chunk: int, size: int, item: int, rows_budget: int) -> int:
    """Examples whose ``size`` coordinates are formed at once: the chunk, cut to
    ``rows_budget`` numbers (at least one example), as ``curvature.kfac`` does."""
    return min(chunk, max(1, rows_budget // max(1, size)))


def check_attribution(estimate: AttributionEstimate | PathEstimate, *, budget: int | None = None,
                      what: str = "attribution", stacklevel: int = 1) -> None:
    """Before an attribution: refuse (:class:`DoesNotFit`, via :func:`check_fits`) above the
    memory available or ``budget``; else warn once (:class:`BudgetWarning`) when it needs
    more than ``WARN_FRACTION`` of that, or eigendecomposes a matrix larger than
    ``EIGH_WARN_SIZE`` (minutes, no progress shown), naming the fixes."""
    check_fits(estimate, what=what, budget=budget)
    limit, which = memory_limit(budget)
    reasons: list[str] = []
    target = None
    if limit is not None and estimate.memory_bytes > WARN_FRACTION * limit:
        target = int(WARN_FRACTION * limit)
        reasons.append(f"it needs about {format_bytes(estimate.memory_bytes)} of memory "
                       f"({estimate.parts_line()}), {estimate.memory_bytes / limit:.0%} of what "
                       f"it may use ({_limit_said(limit, which)}), so it may swap or be killed")
    size = estimate.eig_size
    slow = size > EIGH_WARN_SIZE
    if slow:
        reasons.append(f"it eigendecomposes a {size:,} x {size:,} matrix ({estimate.form} "
                       f"form), roughly {format_seconds(eigh_seconds(size))} with "
                       f"{torch.get_num_threads()} torch thread(s) and no progress shown "
                       "(the time grows as the cube of the size)")
    if reasons:
        fixes = estimate.fixes(target, max_eig_size=EIGH_WARN_SIZE if slow else None)
        warnings.warn(f"{what} of {estimate.n:,} examples: " + "; and ".join(reasons)
                      + ". To need less: " + "; or ".join(fixes) + ".", BudgetWarning,
                      stacklevel=stacklevel + 1)


Estimate = FeaturizationEstimate | AttributionEstimate | PathEstimate


# ---------------------------------------------------------------------- what there is


def available_memory() -> int | None:
    """Bytes of memory available to this process: psutil's ``available`` if psutil is
    installed, else ``MemAvailable`` of /proc/meminfo, lowered to a cgroup's remaining limit;
    None where none of these can be read."""
    found: list[int] = []
    try:
        import psutil

        found.append(int(psutil.virtual_memory().available))
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        found.append(int(line.split()[1]) * 1024)
        except OSError:
            pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and int(cap) < 1 << 60:
            found.append(max(0, int(cap) - int(used)))
    return min(found) if found else None


def free_disk(directory: str | Path) -> int:
    """Free bytes on the file system that holds ``directory`` (or its nearest existing
    parent, when it does not exist yet)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def allocated_bytes(path: str | Path) -> int:
    """Bytes already allocated on disk for ``path`` (0 when it does not exist); a sparse
    ``features.npy`` counts only the chunks written so far."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    blocks = getattr(st, "st_blocks", None)
    return int(blocks) * 512 if blocks is not None else int(st.st_size)


# ---------------------------------------------------------------------- refusal


def memory_limit(budget: int | None = None) -> tuple[int | None, str]:
    """The bytes a run may use, the memory available lowered to ``budget``, and which it is:
    "available" or "budget" (None bytes: neither is known)."""
    available = available_memory()
    if budget is not None and (available is None or int(budget) < available):
        return int(budget), "budget"
    return available, "available"


def _limit_said(limit: int, which: str) -> str:
    """``'1.0 GiB is available'`` or ``'the memory budget (memory_budget=) is 1.0 GiB'``."""
    if which == "budget":
        return f"the memory budget (memory_budget=) is {format_bytes(limit)}"
    return f"{format_bytes(limit)} is available"


def check_fits(estimate: Estimate, *, directory: str | Path | None = None,
               already_on_disk: int = 0, check_memory: bool = True,
               what: str = "featurization", budget: int | None = None) -> None:
    """Refuse (:class:`DoesNotFit`) a run whose estimated memory exceeds the memory available
    (or ``budget`` bytes, when lower), or whose store (in ``directory``) exceeds the free disk
    plus ``already_on_disk`` bytes it has already allocated there; the message names the
    numbers and the fix (a smaller projection dimension, a smaller chunk size, a feature
    store, a larger disk; for an attribution also K-FAC).

    Call it before any long work, e.g. in an attributor before ``per_example_grads``:
    ``check_fits(estimate_gradients(params, len(train), projector=projector,
    chunk_size=chunk, in_memory=True))``."""
    problems: list[str] = []
    memory, which = memory_limit(budget) if check_memory else (None, "")
    if memory is not None and estimate.memory_bytes > memory:
        problems.append(_memory_problem(estimate, memory, which))
    if directory is not None and estimate.disk_bytes:
        need = max(0, estimate.disk_bytes - int(already_on_disk))
        free = free_disk(directory)
        if need > free:
            problems.append(_disk_problem(estimate, need, free, directory))
    if problems:
        raise DoesNotFit(f"{what} of {estimate.n:,} examples would not fit: "
                         + " ".join(problems)
                         + " (The estimate counts tdatune's own arrays; pass check_fit=False "
                           "to run anyway.)")


def _memory_problem(est: Estimate, limit: int, which: str) -> str:
    fixes = est.fixes(limit) or ["free memory, or run on a machine with more"]
    return (f"it needs about {format_bytes(est.memory_bytes)} of memory ({est.parts_line()}) "
            f"but {_limit_said(limit, which)}. Fix: " + "; or ".join(fixes) + ".")


def _parts_line(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in
                     sorted(parts.items(), key=lambda kv: -kv[1]) if v)


def _disk_problem(est: FeaturizationEstimate, need: int, free: int,
                  directory: str | Path) -> str:
    fixes = [f"put the store on a disk with at least {format_bytes(need)} free"]
    rows = est.n * est.store_itemsize  # bytes per projection dimension
    overhead = est.disk_bytes - est.width * rows  # header and chunk records
    d = min(est.width - 1, (free - overhead) // rows)  # a new store of width d fits
    if d >= 1:
        fixes.append(f"a smaller projection, proj_dim <= {d}")
    return (f"its feature store in {directory} needs {format_bytes(need)} more on disk "
            f"([{est.n:,}, {est.width:,}] float32 and chunk records) but "
            f"{format_bytes(free)} is free there. Fix: " + "; or ".join(fixes) + ".")


def _with(est: FeaturizationEstimate, **change: int) -> FeaturizationEstimate:
    """The estimate with another width, chunk size or store chunk size."""
    args = {"width": est.width, "chunk_rows": est.chunk_rows,
            "store_chunk_rows": est.store_chunk_rows, **change}
    proj = est.memory_parts["projection matrix"]
    if args["width"] != est.width:  # as a Projector (gaussian, rademacher) of that width holds
        proj = projector_bytes(est.grad_width, args["width"], est.itemsize)
    return estimate_featurization(
        est.n, args["width"], grad_width=est.grad_width, chunk_rows=args["chunk_rows"],
        dtype=_DTYPES[est.itemsize], store_chunk_rows=args["store_chunk_rows"],
        in_memory=est.in_memory, num_params=est.memory_parts["parameters"] // (2 * est.itemsize),
        proj_bytes=proj, extra_bytes=est.extra_bytes)


def _largest(ok: Callable[[int], bool], upper: int) -> int:
    """The largest k in [1, upper] with ``ok(k)`` (``ok`` increasing as k falls), or 0."""
    if upper < 1 or not ok(1):
        return 0
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


_DTYPES = {1: torch.uint8, 2: torch.float16, 4: torch.float32, 8: torch.float64}


def _itemsize(dtype: torch.dtype | np.dtype | str) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty(0, dtype=dtype).element_size()
    return int(np.dtype(dtype).itemsize)


__all__ = ["AttributionEstimate", "BudgetWarning", "DoesNotFit", "FeaturizationEstimate", "Knob",
           "PathEstimate", "allocated_bytes", "available_memory", "cast_copies",
           "check_attribution", "check_fits", "eigenvector_copies", "eigh_bytes", "eigh_seconds",
           "ensemble_parts", "estimate_attribution", "estimate_featurization",
           "estimate_gradients", "explained_knob", "format_bytes", "format_seconds", "free_disk",
           "gradient_products", "gradients_in_flight", "hessian_parts", "kept_gradients",
           "kept_gradients_built", "kronecker_factor_parts", "lambda_path_scores",
           "memory_limit", "projector_bytes", "rotated_rows"]
