"""Kronecker-factored curvature (K-FAC) and its eigenvalue correction (EK-FAC), fitted from the
layer hooks' factors in streamed passes over the training data.

For a Kronecker layer with per-example gradient G_n = sum_t delta_nt a_nt^T ([out, in], a bias
as a constant-1 input column), the block of the Fisher F = E_n[vec G_n vec G_n^T] is
approximated by A (x) S with

    A = sum_{n,t} a_nt a_nt^T / (number of positions),   S = sum_{n,t} delta_nt delta_nt^T / n.

With A = Q_A diag(l_A) Q_A^T and S = Q_S diag(l_S) Q_S^T, K-FAC's eigenvalues are
l_S[j] l_A[k]; EK-FAC replaces them by the exact second moments in that basis (a second pass),
Lambda[j, k] = E_n[(Q_S^T G_n Q_A)_jk^2]. For one position per example (an MLP) and the
empirical Fisher, A (x) S is the Fisher's block when a and delta are independent, and EK-FAC's
diagonal is exact in the Kronecker basis. An embedding's input is one-hot, so A is diagonal
(token frequencies) and Q_A is the identity. Every other differentiated parameter (norms,
tied or leftover parameters) gets a diagonal block, E_n[g^2], exact in its own basis.

Everything is on tdatune's mean-loss lambda scale: score = -v^T (F + lambda I)^-1 g_i in the
eigen-coordinates c = Q_S^T V Q_A, and only 1 / (Lambda + lambda) changes with the damping.

Fisher kinds: ``empirical`` (the gradients of the training loss at the true labels, like
IFFIM) or ``true`` (labels sampled from the model's predictive distribution, for the built-in
cross-entropy on [B, C] logits).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import batch_len
from tdatune.features.capture import Captured, CapturedLayer, EmbeddingRule
from tdatune.features.factored import formed, input_factor, project_layer
from tdatune.features.gradients import GradientSource
from tdatune.features.low_rank import LowRank, compresses, low_rank, low_rank_products
from tdatune.models.outputs import cross_entropy, logits_of
from tdatune.models.task import Params, Task
from tdatune.utils.checks import check_choice, check_finite_rows
from tdatune.utils.memory import release_freed_memory
from tdatune.utils.progress import progress

FISHER_KINDS = ("empirical", "true")
ROWS_BUDGET = 1 << 25  # numbers of rotated gradients formed at once (128 MiB in float32)
QUERY_ROWS_BUDGET = 1 << 24  # numbers of one block's explained rows weighted at once
STRATEGIES = ("ekfac", "kfac")


@dataclass
class KronBlock:
    """One Kronecker layer: its eigenbases (None: identity) and eigenvalues [out, in]."""

    layer: CapturedLayer
    q_a: torch.Tensor | None
    q_s: torch.Tensor
    lam_a: torch.Tensor
    lam_s: torch.Tensor
    sigma: torch.Tensor  # [out, in]: K-FAC's l_S l_A^T or EK-FAC's corrected moments

    def rotate(self, captured: Captured) -> torch.Tensor:
        """Q_S^T G Q_A of every example of a captured batch, flattened [b, out * in], in the
        gradients' dtype (the bases are float64; the products run at the model's precision,
        as the training side of every other attributor does): a Kronecker projection with
        the eigenbases as factors."""
        return project_layer(self.layer, captured, self.q_a, self.q_s)


@dataclass
class KroneckerFit:
    """The fitted curvature of one checkpoint: Kronecker blocks and diagonal blocks."""

    strategy: str
    fisher: str
    n: int
    blocks: list[KronBlock]
    diagonal: dict[str, torch.Tensor]  # parameter name -> E_n[g^2] [numel]
    task: Task = field(repr=False)
    source: GradientSource = field(repr=False)  # the Fisher's gradients

    @property
    def sigma(self) -> torch.Tensor:
        """All eigenvalues, in the layout of :meth:`coords` [p]."""
        parts = [b.sigma.reshape(-1) for b in self.blocks]
        parts += [self.diagonal[k] for k in self.diagonal]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)

    @property
    def block_names(self) -> list[str]:
        """One name per block of :attr:`block_sizes`: each Kronecker layer's module path, then
        ``diagonal`` for the parameters kept diagonal."""
        rest = sum(v.numel() for v in self.diagonal.values())
        return [b.layer.path or "(model)" for b in self.blocks] + (["diagonal"] if rest else [])

    @property
    def block_sizes(self) -> list[int]:
        """Coordinates per block (Kronecker layers, then one block of diagonal parameters)."""
        sizes = [b.sigma.numel() for b in self.blocks]
        rest = sum(v.numel() for v in self.diagonal.values())
        return sizes + ([rest] if rest else [])

    def coords(self, captured: Captured) -> torch.Tensor:
        """Eigen-coordinates [b, p] of a captured batch's per-example gradients (their dtype)."""
        return torch.cat([self._block_coords(j, captured)
                          for j in range(len(self.block_sizes))], dim=1)

    def _block_coords(self, j: int, captured: Captured) -> torch.Tensor:
        """Block ``j`` of :meth:`coords`: a Kronecker layer rotated into its eigenbasis, or the
        diagonal parameters' gradients as they are."""
        if j < len(self.blocks):
            return self.blocks[j].rotate(captured)
        return torch.cat([captured.dense[k] for k in self.diagonal], dim=1)

    def _batches(self, data: ArrayDataset, target: str, chunk_size: int, show_progress: bool,
                 desc: str) -> Iterator[tuple[int, Captured]]:
        """``(start, captured)`` over ``data``'s loss or output gradients, one chunk at a time."""
        if target == "loss" and self.fisher == "empirical":
            source = self.source
        else:  # the task's own loss (not the sampled labels) or output
            source = GradientSource(self.task, self.source.model, self.source.detached,
                                    target=target, probe=data)
        for start, x, y in progress(data.batches(chunk_size, source.device),
                                    enabled=show_progress, desc=desc,
                                    total=data.num_batches(chunk_size)):
            yield start, source.captured(x, y, batch_len(x))

    def _chunks(self, data: ArrayDataset, target: str, chunk_size: int, show_progress: bool,
                desc: str) -> Iterator[tuple[int, Captured]]:
        """As ``_batches``, a wide model's examples a few at a time (at most ``ROWS_BUDGET``
        numbers of all its coordinates at once)."""
        step = max(1, ROWS_BUDGET // max(1, int(self.sigma.numel())))
        for start, captured in self._batches(data, target, chunk_size, show_progress, desc):
            for i in range(0, captured.b, step):
                yield start + i, sliced(captured, i, i + step)

    def _rows(self, j: int, captured: Captured) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(examples, rows)``: block ``j``'s parameter-basis rows of a captured batch, as many
        examples at once as ``ROWS_BUDGET`` allows for that block (the products of a wide
        model stay matrix-matrix, not one long matrix-vector pass per few examples)."""
        step = max(1, ROWS_BUDGET // max(1, self.block_sizes[j]))
        for i in range(0, captured.b, step):
            part = sliced(captured, i, i + step)
            if j < len(self.blocks):
                rows = formed(self.blocks[j].layer, part).reshape(part.b, -1)
            else:
                rows = torch.cat([part.dense[k] for k in self.diagonal], dim=1)
            yield slice(i, i + part.b), rows

    def _block_rows(self, captured: Captured) -> Iterator[tuple[int, slice, torch.Tensor]]:
        """``(block, examples, rows)`` of every block (:meth:`_rows`)."""
        for j in range(len(self.block_sizes)):
            for where, rows in self._rows(j, captured):
                yield j, where, rows

    def iter_coords(self, data: ArrayDataset, *, target: str, chunk_size: int,
                    show_progress: bool = False, desc: str = "eigen-coordinates"
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, coords [b, p])`` over ``data``'s loss or output gradients."""
        for start, captured in self._chunks(data, target, chunk_size, show_progress, desc):
            coords = self.coords(captured)
            check_finite_rows(f"per-example {target} gradients", coords, offset=start)
            yield start, coords

    def _back(self, j: int, part: torch.Tensor) -> torch.Tensor:
        """Weighted eigen-coordinates [b, size] of block ``j`` back in the parameter basis
        (Q_S W Q_A^T for a Kronecker block, [b, out, in]; the diagonal block as it is)."""
        if j >= len(self.blocks):
            return part
        b = self.blocks[j]
        part = b.q_s.to(part) @ part.reshape(-1, *b.sigma.shape)
        return part @ b.q_a.to(part).T if b.q_a is not None else part

    def weighted_back(self, coords: torch.Tensor, h: torch.Tensor, dtype: torch.dtype
                      ) -> list[torch.Tensor]:
        """Eigen-coordinates weighted by the filter, ``coords * h`` [m, p], back in the
        parameter basis (Q_S W Q_A^T per Kronecker block) at ``dtype``: one [m, size] matrix
        per entry of ``block_sizes``, built one block at a time, so the only [m, p]-sized
        result is the returned blocks (scoring holds the coordinates and one such copy)."""
        out, start = [], 0
        for j, size in enumerate(self.block_sizes):
            part = (coords[:, start : start + size] * h[start : start + size].to(coords.dtype)
                    ).to(dtype)
            out.append(self._back(j, part).reshape(coords.shape[0], -1).contiguous())
            start += size
        return out

    def weighted_explained(self, data: ArrayDataset, h: torch.Tensor, *, rank: int | None = None,
                           target: str = "output", chunk_size: int = 256,
                           show_progress: bool = False, desc: str = "explained gradients"
                           ) -> list[torch.Tensor | LowRank]:
        """What :meth:`weighted_back` returns for ``data``'s eigen-coordinates, computed from
        its gradients chunk by chunk without ever holding the coordinates: each block rotated,
        weighted by the filter ``h`` [p] and turned back at the gradients' precision, written
        into one preallocated [m, size] matrix per block. With ``rank`` a Kronecker block whose
        rank-r factors are smaller is kept as them (:func:`~tdatune.features.low_rank.low_rank`,
        an approximation). Holds one such copy of ``data`` and one chunk's blocks."""
        sizes, m = self.block_sizes, len(data)
        hs = torch.split(h, sizes)
        out: list[torch.Tensor | LowRank | None] = [None] * len(sizes)
        for start, captured in self._batches(data, target, chunk_size, show_progress, desc):
            for j, size in enumerate(sizes):
                # Block by block, as many examples at once as QUERY_ROWS_BUDGET allows
                # (matrix-matrix rotations, a bounded temporary).
                step = max(1, QUERY_ROWS_BUDGET // max(1, size))
                for i in range(0, captured.b, step):
                    part = sliced(captured, i, i + step)
                    self._weigh_into(out, j, part, hs[j], start + i, m, rank, target)
            del captured
            release_freed_memory()  # the chunk's temporaries, before the next chunk's
        if any(x is None for x in out):
            raise ValueError("no explained examples to score")
        return [x for x in out if x is not None]

    def _weigh_into(self, out: list[torch.Tensor | LowRank | None], j: int, part: Captured,
                    h: torch.Tensor, start: int, m: int, rank: int | None, target: str) -> None:
        """Block ``j`` of a few examples, rotated, weighted by ``h`` and turned back, written
        into ``out[j]`` (allocated for ``m`` examples on first use) at ``start``."""
        b = part.b
        c = self._block_coords(j, part)
        check_finite_rows(f"per-example {target} gradients", c, offset=start)
        w = self._back(j, c * h.to(c.dtype))
        del c
        shape = self.blocks[j].sigma.shape if j < len(self.blocks) else None
        if rank is not None and shape is not None and compresses(rank, *shape):
            low = low_rank(w, rank)
            if out[j] is None:
                r = low.left.shape[2]
                out[j] = LowRank(w.new_empty(m, shape[0], r), w.new_empty(m, r, shape[1]))
            held = out[j]
            assert isinstance(held, LowRank)
            held.left[start : start + b] = low.left
            held.right[start : start + b] = low.right
            return
        rows = w.reshape(b, -1)
        if out[j] is None:
            out[j] = w.new_empty(m, rows.shape[1])
        held = out[j]
        assert isinstance(held, torch.Tensor)
        held[start : start + b] = rows

    def products(self, coords: torch.Tensor, h: torch.Tensor, data: ArrayDataset, *,
                 target: str, chunk_size: int, show_progress: bool = False,
                 desc: str = "inner products") -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, [m, b])``: w c_i for w = ``coords * h`` (eigen-coordinates [m, p] times a
        spectral filter [p]) and every example's coordinates c_i, without rotating the
        examples: w is turned back into the parameter basis once (:meth:`weighted_back`; the
        bases are orthogonal, so <Q_S^T G Q_A, W> = <G, Q_S W Q_A^T>) and the examples'
        gradients are only formed, at their own precision."""
        dtype = next(iter(self.source.detached.values())).dtype
        yield from self.weighted_products(self.weighted_back(coords, h, dtype), data,
                                          target=target, chunk_size=chunk_size,
                                          show_progress=show_progress, desc=desc)

    def weighted_products(self, weighted: list[torch.Tensor | LowRank], data: ArrayDataset, *,
                          target: str, chunk_size: int, show_progress: bool = False,
                          desc: str = "inner products") -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, [g, b])``: the inner products of the parameter-basis blocks ``weighted``
        (:meth:`weighted_back` or :meth:`weighted_explained`) with every example's gradients,
        formed block by block at their own precision (low-rank blocks from the factors)."""
        g = weighted[0].rows if isinstance(weighted[0], LowRank) else weighted[0].shape[0]
        for start, captured in self._batches(data, target, chunk_size, show_progress, desc):
            out: torch.Tensor | None = None
            for j, w in enumerate(weighted):
                if isinstance(w, LowRank):
                    part = low_rank_products(self.blocks[j].layer, captured, w)
                    out = part if out is None else out + part.to(out)
                    continue
                for where, rows in self._rows(j, captured):
                    if out is None:
                        out = rows.new_zeros(g, captured.b)
                    out[:, where] += w.to(rows) @ rows.T
            del captured
            release_freed_memory()
            if out is None:
                continue
            check_finite_rows(f"per-example {target} gradient products", out.T, offset=start)
            yield start, out

    def masked_sums(self, masks: torch.Tensor, data: ArrayDataset, *, target: str,
                    chunk_size: int, show_progress: bool = False) -> torch.Tensor:
        """masks @ coords [M, p] (float64): the masked sums of the examples' gradients in the
        parameter basis, rotated once at the end (rotation is linear)."""
        sums = [torch.zeros(masks.shape[0], size, dtype=torch.float64)
                for size in self.block_sizes]
        for start, captured in self._batches(data, target, chunk_size, show_progress,
                                             "masked sums"):
            m = masks[:, start : start + captured.b].double()
            for j, where, rows in self._block_rows(captured):
                sums[j] += m[:, where] @ rows.double()
        out = []
        for b, acc in zip(self.blocks, sums, strict=False):
            acc = b.q_s.T @ acc.reshape(-1, *b.sigma.shape)
            if b.q_a is not None:
                acc = acc @ b.q_a
            out.append(acc.reshape(masks.shape[0], -1))
        out += sums[len(self.blocks):]
        return torch.cat(out, dim=1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """sum over examples and positions of x x^T for x [b, T, k], as float64 [k, k] (the
    product runs at x's precision)."""
    flat = x.reshape(-1, x.shape[-1])
    return (flat.T @ flat).double()


def sliced(captured: Captured, start: int, stop: int) -> Captured:
    """Examples [start, stop) of a captured batch."""
    stop = min(stop, captured.b)
    return Captured(stop - start,
                    [(c, a[start:stop], d[start:stop]) for c, a, d in captured.factors],
                    {k: g[start:stop] for k, g in captured.dense.items()})


class _SampledCrossEntropy:
    """Cross-entropy at labels drawn from the model's own predictive distribution (the true
    Fisher), from a seeded generator advanced batch by batch."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, outputs: object, targets: object) -> torch.Tensor:
        logits = logits_of(outputs)
        if logits.dim() != 2:
            raise ValueError("fisher='true' samples one class per example from [B, C] logits; "
                             "use fisher='empirical' for this task")
        probs = torch.softmax(logits.detach().float().cpu(), dim=-1)
        sampled = torch.multinomial(probs, 1, generator=self.gen).squeeze(1).to(logits.device)
        return cross_entropy(logits, sampled)


def fisher_task(task: Task, fisher: str, seed: int = 0) -> Task:
    """The task whose loss gradients define the Fisher: the task itself (empirical) or the
    cross-entropy at sampled labels (true)."""
    check_choice("fisher", fisher, FISHER_KINDS)
    if fisher == "empirical":
        return task
    if task.loss_fn is not cross_entropy:
        raise ValueError(f"{task.name}: fisher='true' needs the built-in cross-entropy loss (it "
                         "samples labels from the model's softmax); use fisher='empirical'")
    return replace(task, loss_fn=_SampledCrossEntropy(seed))


def fit_kronecker(task: Task, model: nn.Module, params: Params, data: ArrayDataset, *,
                  strategy: str = "ekfac", fisher: str = "empirical", seed: int = 0,
                  chunk_size: int = 256, show_progress: bool = False) -> KroneckerFit:
    """Covariance factors in one pass, their eigendecompositions, and (EK-FAC) the corrected
    eigenvalues in a second pass over ``data``."""
    check_choice("strategy", strategy, STRATEGIES)
    n = len(data)
    if n == 0:
        raise ValueError("no training examples to fit the curvature on")
    ftask = fisher_task(task, fisher, seed)
    # The hooks are checked on the task's own loss (sampled labels differ between the check's
    # passes), then differentiate the Fisher's loss.
    source = GradientSource(task, model, params, target="loss", probe=data)
    source.task, source.fn = ftask, ftask.loss_fn
    kron = [c for c in source.plan.layers if c.factored]
    a_cov: dict[str, torch.Tensor] = {}
    s_cov: dict[str, torch.Tensor] = {}
    positions: dict[str, int] = {}
    diag: dict[str, torch.Tensor] = {}
    for _, x, y in progress(data.batches(chunk_size, source.device), enabled=show_progress,
                            desc=f"{strategy} factors"):
        captured = source.captured(x, y, batch_len(x))
        got = {c.path: (a, d) for c, a, d in captured.factors}
        for c in kron:
            if c.path in got:
                a, d = got[c.path]
            else:  # this batch was differentiated without hooks: no factors to collect
                raise ValueError(f"{task.name}: layer {c.path} gave no Kronecker factors "
                                 "(the hooks were refused); K-FAC needs them")
            # Each batch's products at the gradients' precision, accumulated in float64.
            s_cov[c.path] = s_cov.get(c.path, 0) + gram(d)
            if isinstance(c.rule, EmbeddingRule):
                counts = torch.bincount(a.reshape(-1), minlength=c.module.weight.shape[0])
                a_cov[c.path] = a_cov.get(c.path, 0) + counts.double()
            else:
                a_cov[c.path] = a_cov.get(c.path, 0) + gram(input_factor(c, a, d))
            positions[c.path] = positions.get(c.path, 0) + a.shape[0] * a.shape[1]
        for k, g in captured.dense.items():
            diag[k] = diag.get(k, 0) + g.double().pow(2).sum(0)
    blocks = []
    for c in kron:
        a = a_cov[c.path] / positions[c.path]
        s = s_cov[c.path] / n
        lam_s, q_s = torch.linalg.eigh((s + s.T) / 2)
        if a.dim() == 1:  # embedding: one-hot inputs, A diagonal
            lam_a, q_a = a, None
        else:
            lam_a, q_a = torch.linalg.eigh((a + a.T) / 2)
        lam_a, lam_s = lam_a.clamp_min(0), lam_s.clamp_min(0)
        blocks.append(KronBlock(c, q_a, q_s, lam_a, lam_s, torch.outer(lam_s, lam_a)))
    fit = KroneckerFit(strategy, fisher, n, blocks, {k: v / n for k, v in diag.items()},
                       task, source)
    if strategy == "ekfac":
        moments = [torch.zeros_like(b.sigma) for b in blocks]
        for _, x, y in progress(data.batches(chunk_size, source.device), enabled=show_progress,
                                desc="ekfac eigenvalue correction"):
            captured = source.captured(x, y, batch_len(x))
            for b, acc in zip(blocks, moments, strict=True):
                step = max(1, ROWS_BUDGET // b.sigma.numel())
                for i in range(0, captured.b, step):
                    part = b.rotate(sliced(captured, i, i + step))
                    acc += part.square().sum(0).double().reshape(acc.shape)
        for b, acc in zip(blocks, moments, strict=True):
            b.sigma = acc / n
    release_freed_memory()  # the passes' temporaries, before scoring allocates its own
    return fit


__all__ = ["FISHER_KINDS", "STRATEGIES", "KronBlock", "KroneckerFit", "fisher_task",
           "fit_kronecker"]
