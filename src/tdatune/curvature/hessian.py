"""The Hessian of the training objective: Hessian-vector products and the exact Hessian.

The training objective is the one ``models.training`` minimises,

    L(theta) = (1/n) sum_i l(z_i; theta) + weight_decay / 2 * ||theta||^2,

so its Hessian is H = (1/n) sum_i grad^2 l(z_i; theta) + weight_decay * I. Everything here
works on one flat parameter vector (the trainable parameters concatenated in ``params``
order, the order of ``features.gradients``' per-example rows) and runs over the data in
chunks, so memory stays bounded in n. HVPs are reverse-over-reverse (``grad`` of v . ``grad``),
batched over several vectors with ``vmap``: on this project's CPU that measured 1.2-1.7x
faster than forward-over-reverse (``jvp`` of ``grad``) for the MNIST MLP and digits LR.

Memory of the batched HVP. The second backward runs once per (vector, example) pair at a
time, and each pair holds about as many bytes as autograd saves for one example's
create-graph gradient (resident memory measured at 1.0-1.3x that on ResNet-9 and two small
transformers, ``bench/hvp.py``). That size is measured once per objective with saved-tensor
hooks, and ``hvp`` then splits vectors (``vmap(chunk_size=...)``) and examples so that one
step keeps about ``memory_bytes`` (default ``HVP_MEMORY_BYTES``). Without it, 64 vectors x
256 examples of a width-8 ResNet-9 in float64 needed about 50 GB.

Eigensystems (``TrainingObjective.eigensystem``). For a model that is one ``nn.Linear`` of the
flattened input (logistic regression), the logits are linear in theta, so the Hessian is
exactly its Gauss-Newton part,

    H = (1/n) sum_i A_i kron x_i x_i^T + weight_decay I,   A_i = d^2 l_i / dz^2  (C x C),

with x_i the input with a trailing 1 for the bias. It is formed with a few GEMMs instead of p
Hessian-vector products, and it is block diagonal in the basis Q_c kron Q_x, where Q_c spans
the range of the A_i (softmax cross-entropy: the complement of the all-ones vector) and Q_x
the range of the inputs (MNIST: pixels that are zero in every training image drop out). Every
direction outside range(Q_c) kron range(Q_x) is an exact eigenvector with eigenvalue
weight_decay, so only the (r_c r_x)-sized block is eigendecomposed (mnist-lr: 6,255 of 7,850
parameters, about half the time of the full matrix). Other models form the dense Hessian
(p batched HVPs per data chunk, ``hessian``) and eigendecompose it whole. On the CPU the
symmetric eigensolver is LAPACK's divide and conquer through SciPy, which measured 1.4-7x
faster than torch.linalg.eigh (MKL) on this project's AMD machine (``symmetric_eigh``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, hessian, vmap

from tdatune.data.base import ArrayDataset
from tdatune.data.batches import Tree, batch_len, tree_map
from tdatune.models.task import Params, Task

EXACT_HESSIAN_MAX_PARAMS = 12_000
HVP_MEMORY_BYTES = 3 << 30  # what one batched HVP step may hold (vectors x examples)


def flatten_params(params: Params) -> torch.Tensor:
    """The parameters as one flat vector, in dict order."""
    return torch.cat([v.detach().reshape(-1) for v in params.values()])


def unflatten_params(flat: torch.Tensor, like: Params) -> Params:
    """Split a flat vector back into tensors shaped like ``like`` (same order)."""
    out, start = {}, 0
    for name, ref in like.items():
        out[name] = flat[start : start + ref.numel()].reshape(ref.shape)
        start += ref.numel()
    if start != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters need {start}")
    return out


def cast_problem(model: nn.Module, params: Params, data: ArrayDataset,
                 dtype: torch.dtype) -> tuple[nn.Module, Params, ArrayDataset]:
    """Copies of model, parameters and (floating) inputs in ``dtype`` (e.g. float64 for
    exact curvature); integer inputs such as tokens are left as they are."""
    model = copy.deepcopy(model).to(dtype)
    params = {k: v.detach().to(dtype) for k, v in params.items()}
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    if data.whole_batch:
        return model, params, ArrayDataset(tree_map(cast, data.inputs))
    return model, params, ArrayDataset(tree_map(cast, data.inputs), data.targets)


class TrainingObjective:
    """Curvature of the training objective at ``params`` on ``data`` (mean loss + L2)."""

    def __init__(self, task: Task, model: nn.Module, params: Params, data: ArrayDataset,
                 weight_decay: float = 0.0, chunk_size: int = 256,
                 memory_bytes: int = HVP_MEMORY_BYTES) -> None:
        if len(data) == 0:
            raise ValueError("the training set is empty: the objective has no curvature")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {memory_bytes}")
        self.task, self.model, self.params = task, model, params
        self.data, self.weight_decay, self.chunk_size = data, float(weight_decay), chunk_size
        self.memory_bytes = int(memory_bytes)
        self._pair_bytes: int | None = None
        self.theta = flatten_params(params)
        self.device = self.theta.device
        model.eval()

    @property
    def p(self) -> int:
        """Number of parameters."""
        return int(self.theta.numel())

    @property
    def n(self) -> int:
        """Number of training examples."""
        return len(self.data)

    def _summed_loss(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        like, model, task = self.params, self.model, self.task

        def summed(flat: torch.Tensor, x: Tree, y: Tree) -> torch.Tensor:
            outputs = task.call(model, unflatten_params(flat, like), x)
            return task.loss_fn(outputs, y).sum()
        return summed

    def _batches(self, index: torch.Tensor | None,
                 size: int | None = None) -> list[tuple[Tree, Tree]]:
        data = self.data if index is None else self.data.subset(index)
        return [(x, y) for _, x, y in data.batches(size or self.chunk_size, self.device)]

    def pair_bytes(self) -> int:
        """Bytes autograd saves for one training example's create-graph gradient (the
        parameters themselves excluded): what one (vector, example) HVP pair holds."""
        if self._pair_bytes is None:
            theta = self.theta.detach().clone().requires_grad_()
            own = theta.untyped_storage().data_ptr()
            total = 0

            def pack(t: torch.Tensor) -> torch.Tensor:
                nonlocal total
                if t.untyped_storage().data_ptr() != own:
                    total += t.numel() * t.element_size()
                return t

            (x, y), *_ = self._batches(torch.arange(1), 1)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                torch.autograd.grad(self._summed_loss()(theta, x, y), theta, create_graph=True)
            self._pair_bytes = max(total, 1)
        return self._pair_bytes

    def hvp_split(self, n_vectors: int, n_examples: int) -> tuple[int, int]:
        """(vectors per vmap step, examples per chunk) whose pairs fit ``memory_bytes``."""
        pairs = max(1, self.memory_bytes // self.pair_bytes())
        examples = max(1, min(self.chunk_size, n_examples, pairs))
        return max(1, min(n_vectors, pairs // examples)), examples

    def hvp(self, vectors: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """H @ v for each row of ``vectors`` [b, p] (or a single [p]); with ``index``, the
        Hessian of the mean loss over those training examples only (plus the L2 term)."""
        single = vectors.dim() == 1
        vecs = vectors[None] if single else vectors
        if vecs.shape[-1] != self.p:
            raise ValueError(f"vectors have {vecs.shape[-1]} entries, the model has p={self.p}")
        vecs = vecs.to(self.device, self.theta.dtype)
        summed = self._summed_loss()
        g = grad(summed)
        theta = self.theta
        out = torch.zeros_like(vecs)
        count = 0
        data = self.data if index is None else self.data.subset(index)
        per_step, examples = self.hvp_split(vecs.shape[0], len(data))
        for _, x, y in data.batches(examples, self.device):
            def one(v: torch.Tensor, x: Tree = x, y: Tree = y) -> torch.Tensor:
                return grad(lambda t: (g(t, x, y) * v).sum())(theta)
            out += vmap(one, chunk_size=per_step)(vecs)
            count += batch_len(x)
        out = out / count + self.weight_decay * vecs
        return out[0] if single else out

    def gradient(self) -> torch.Tensor:
        """Gradient of the objective (about zero at a minimum; useful as a check)."""
        summed = self._summed_loss()
        total = torch.zeros_like(self.theta)
        for x, y in self._batches(None):
            total += grad(summed)(self.theta, x, y)
        return total / self.n + self.weight_decay * self.theta

    def exact(self, max_params: int = EXACT_HESSIAN_MAX_PARAMS) -> torch.Tensor:
        """The dense p x p Hessian (symmetrised), for models with at most ``max_params``."""
        if self.p > max_params:
            raise ValueError(
                f"the exact Hessian of {self.p} parameters needs a {self.p} x {self.p} matrix; "
                f"if_explicit is limited to p <= {max_params}. Use if_cg or if_lissa (HVPs) or "
                "iffim/logra/trak for this model"
            )
        summed = self._summed_loss()
        h = torch.zeros(self.p, self.p, dtype=self.theta.dtype, device=self.device)
        for x, y in self._batches(None):
            h += hessian(summed)(self.theta, x, y)
        h = h / self.n
        h = 0.5 * (h + h.T)
        h.diagonal().add_(self.weight_decay)
        return h

    def linear_layer(self) -> tuple[str, str | None] | None:
        """(weight name, bias name or None) when the model is one ``nn.Linear`` applied to the
        flattened input and ``params`` are exactly its parameters (checked on a probe batch
        against ``F.linear``); None otherwise."""
        linears = [(name, m) for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        if len(linears) != 1:
            return None
        prefix, layer = linears[0]
        w_name = f"{prefix}.weight" if prefix else "weight"
        b_name = (f"{prefix}.bias" if prefix else "bias") if layer.bias is not None else None
        if set(self.params) != {w_name} | ({b_name} if b_name else set()):
            return None
        inputs, targets = self.data.inputs, getattr(self.data, "targets", None)
        if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)
                and inputs.is_floating_point()):
            return None
        x = inputs[:8].to(self.device)
        with torch.no_grad():
            try:
                logits = self.task.call(self.model, self.params, x)
            except (RuntimeError, TypeError, ValueError):
                return None
            if not isinstance(logits, torch.Tensor):
                return None
            ref = nn.functional.linear(x.flatten(1), self.params[w_name],
                                       self.params[b_name] if b_name else None)
        if logits.shape != ref.shape or logits.dim() != 2:
            return None
        tol = 1e-5 if logits.dtype == torch.float32 else 1e-10
        if not torch.allclose(logits, ref, rtol=tol, atol=tol * float(ref.abs().max() + 1)):
            return None
        return w_name, b_name

    def logit_hessians(self, w_name: str, b_name: str | None) -> torch.Tensor:
        """A_i = d^2 l(z_i, y_i) / dz^2 for every training example: [n, C, C]."""
        loss_fn = self.task.loss_fn

        def one(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(z[None], y[None])[0]

        w, b = self.params[w_name], (self.params[b_name] if b_name else None)
        out = []
        for x, y in self._batches(None):
            z = nn.functional.linear(x.flatten(1), w, b)
            out.append(vmap(hessian(one))(z, y))
        return torch.cat(out)

    def eigensystem(self, precision: torch.dtype | None = None,
                    max_params: int = EXACT_HESSIAN_MAX_PARAMS) -> HessianEigensystem:
        """H = U diag(sigma) U^T with every eigenvalue (signed, descending).

        ``precision`` is the dtype of the eigendecomposition and of the basis products
        (default: the objective's dtype; the Hessian itself is always formed in the
        objective's dtype). A single linear layer takes the Kronecker path of the module
        docstring; any other model the dense ``exact`` Hessian."""
        dtype = precision or self.theta.dtype
        layer = self.linear_layer()
        if layer is None:
            sigma, basis = symmetric_eigh(self.exact(max_params).to(dtype))
            return DenseEigensystem(sigma.flip(0), basis.flip(1))
        if self.p > max_params:
            raise ValueError(
                f"the exact Hessian of {self.p} parameters is refused (limit {max_params}); "
                "use if_cg or if_lissa (HVPs) or iffim/logra/trak for this model")
        return self._kronecker_eigensystem(*layer, dtype)

    def _kronecker_eigensystem(self, w_name: str, b_name: str | None,
                               dtype: torch.dtype) -> KroneckerEigensystem:
        ftype = self.theta.dtype
        a = self.logit_hessians(w_name, b_name)  # [n, C, C]
        a = 0.5 * (a + a.transpose(1, 2))
        x = self.data.inputs.to(self.device, ftype).flatten(1)
        if b_name is not None:
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=ftype, device=self.device)], 1)
        qc, rc = _range_basis(torch.einsum("ncd,ned->ce", a, a))  # range of all A_i
        qx, rx = _range_basis(x.T @ x)  # range of the inputs
        xh = x @ qx[:, :rx]  # [n, rx]
        ah = qc[:, :rc].T @ a @ qc[:, :rc]  # [n, rc, rc]
        k = rc * rx
        block = torch.empty(k, k, dtype=ftype, device=self.device)
        for c in range(rc):
            for e in range(c, rc):
                m = (xh * ah[:, c, e, None]).T @ xh / self.n
                block[c * rx : (c + 1) * rx, e * rx : (e + 1) * rx] = m
                if e != c:
                    block[e * rx : (e + 1) * rx, c * rx : (c + 1) * rx] = m.T
        block.diagonal().add_(self.weight_decay)
        sigma_k, w = symmetric_eigh(block.to(dtype))
        del block
        n_classes, width = qc.shape[0], qx.shape[0]
        sigma = torch.cat([sigma_k.to(ftype),
                           torch.full((self.p - k,), self.weight_decay, dtype=ftype,
                                      device=sigma_k.device)])
        order = torch.argsort(sigma, descending=True, stable=True)
        return KroneckerEigensystem(sigma=sigma[order], order=order, qc=qc.to(dtype),
                                    qx=qx.to(dtype), w=w, rc=rc, rx=rx, n_classes=n_classes,
                                    width=width, bias=b_name is not None)

    def top_eigenvalue(self, iters: int = 20, seed: int = 0,
                       index: torch.Tensor | None = None) -> float:
        """Power-iteration estimate of the largest |eigenvalue| of H (from below)."""
        return power_iteration(lambda v: self.hvp(v, index), self.p, iters=iters, seed=seed,
                               dtype=self.theta.dtype, device=self.device)


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], p: int, *, iters: int = 20,
                    seed: int = 0, dtype: torch.dtype = torch.float64,
                    device: torch.device | str = "cpu") -> float:
    """Estimate the largest |eigenvalue| of a symmetric operator by ``iters`` power steps."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(p, generator=gen, dtype=dtype).to(device)
    v /= v.norm()
    estimate = 0.0
    for _ in range(max(1, iters)):
        w = matvec(v)
        norm = w.norm()  # ||H v|| for unit v: a lower bound on the top |eigenvalue|
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            break
        estimate = max(estimate, float(norm))
        v = w / norm
    return estimate


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, in its dtype.

    On the CPU this calls LAPACK's divide-and-conquer ``?syevd`` through SciPy (OpenBLAS):
    on the 2-core AMD machine of docs/performance.md it took 0.96 s for p = 2000 in float64
    against 6.85 s for torch.linalg.eigh (MKL), and 9.7 s against 13.3 s for p = 4000. On
    other devices torch.linalg.eigh is used."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    import scipy.linalg

    try:  # SciPy's BLAS gets as many threads as torch (a scikit-learn dependency)
        from threadpoolctl import threadpool_limits
        limits: contextlib.AbstractContextManager = threadpool_limits(torch.get_num_threads(),
                                                                      user_api="blas")
    except ImportError:
        limits = contextlib.nullcontext()
    with limits:
        vals, vecs = scipy.linalg.eigh(matrix.detach().numpy(), driver="evd", check_finite=False)
    return torch.from_numpy(np.ascontiguousarray(vals)), torch.from_numpy(np.ascontiguousarray(vecs))


def _range_basis(gram: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A full orthonormal basis of R^d (columns, from ``gram``'s eigenvectors) whose first r
    columns span the numerical range of the PSD matrix ``gram`` (eigenvalues above
    d * eps * the largest, as in ``torch.linalg.matrix_rank``)."""
    vals, vecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    vals, vecs = vals.flip(0), vecs.flip(1)
    top = float(vals[0]) if vals.numel() else 0.0
    tol = gram.shape[0] * torch.finfo(gram.dtype).eps * max(top, 0.0)
    rank = int((vals > tol).sum())
    return vecs, rank


class HessianEigensystem:
    """H = U diag(sigma) U^T. ``sigma`` [p] descending; ``coords(v)`` = v U for rows of v."""

    sigma: torch.Tensor

    def coords(self, vectors: torch.Tensor) -> torch.Tensor:
        """Coordinates [m, p] of the rows of ``vectors`` [m, p] in the eigenbasis."""
        raise NotImplementedError

    @property
    def basis(self) -> torch.Tensor:
        """The dense eigenvector matrix U [p, p] (columns, ordered like ``sigma``)."""
        p = self.sigma.shape[0]
        return self.coords(torch.eye(p, dtype=self.sigma.dtype))  # row j: e_j U


@dataclass
class DenseEigensystem(HessianEigensystem):
    """An explicit eigenvector matrix."""

    sigma: torch.Tensor
    matrix: torch.Tensor

    def coords(self, vectors: torch.Tensor) -> torch.Tensor:
        """v U, computed in U's dtype and returned in v's."""
        return (vectors.to(self.matrix.device, self.matrix.dtype) @ self.matrix).to(vectors.dtype)

    @property
    def basis(self) -> torch.Tensor:
        """U itself."""
        return self.matrix


@dataclass
class KroneckerEigensystem(HessianEigensystem):
    """Eigensystem of a one-linear-layer Hessian, U = (Q_c kron Q_x) diag(W, I) P: the
    eigenvectors W of the (rc rx)-block, identity on its complement (eigenvalue
    weight_decay), and the permutation P that sorts sigma."""

    sigma: torch.Tensor  # [p] descending
    order: torch.Tensor  # [p]: position k of sigma is unsorted coordinate order[k]
    qc: torch.Tensor  # [C, C]
    qx: torch.Tensor  # [d, d]
    w: torch.Tensor  # [rc*rx, rc*rx]
    rc: int
    rx: int
    n_classes: int
    width: int  # d: input features (+1 for the bias)
    bias: bool

    def coords(self, vectors: torch.Tensor) -> torch.Tensor:
        """Rows of ``vectors`` in parameter order (weight [C, d_in] row-major, then bias [C])
        mapped to eigen-coordinates, in ``vectors``' dtype."""
        m, c, d = vectors.shape[0], self.n_classes, self.width
        v = vectors.to(self.w.device, self.w.dtype)
        d_in = d - 1 if self.bias else d
        mat = v[:, : c * d_in].reshape(m, c, d_in)
        if self.bias:
            mat = torch.cat([mat, v[:, c * d_in :].reshape(m, c, 1)], 2)
        rot = self.qc.T @ mat @ self.qx  # [m, C, d]
        kept = rot[:, : self.rc, : self.rx].reshape(m, -1) @ self.w
        rest = torch.cat([rot[:, : self.rc, self.rx :].reshape(m, -1),
                          rot[:, self.rc :, :].reshape(m, -1)], 1)
        return torch.cat([kept, rest], 1)[:, self.order.to(kept.device)].to(vectors.dtype)


@dataclass
class KrylovCGPath:
    """Conjugate gradient on (H + lambda I) x = v for every lambda from one Lanczos run.

    Krylov spaces are shift invariant: K_s(H + lambda I, v) = K_s(H, v). So ``s`` Lanczos
    steps on H (s HVPs per right-hand side), H Q_s = Q_{s+1} T~ with T~ tridiagonal
    [(s+1) x s], hold every CG iterate of every lambda: CG is replayed on the (s+1)-dim
    coordinates, where (H + lambda I) acts as T~ + lambda I exactly. ``x0='zero'`` is
    textbook CG (x_k = Q_k (T_k + lambda I)^-1 ||v|| e_1, k HVPs); ``x0='rhs'`` starts at
    x0 = v, as dattri 0.3.0's ``ihvp_cg`` does (k + 1 HVPs). No reorthogonalisation: like CG
    itself in floating point, the three-term recurrence is what both compute.

    Only products with fixed ``probes`` (e.g. subset masks times the training gradients) are
    kept, so memory is O(m s P), not O(m s p).
    """

    tri: torch.Tensor  # [m, s+1, s]
    vnorm: torch.Tensor  # [m]
    probe_coords: torch.Tensor  # [m, s+1, P]: probes . q_j
    iters: int
    x0: str

    def coefficients(self, lambdas: list[float] | torch.Tensor) -> torch.Tensor:
        """CG's ``iters``-th iterate at each lambda in Lanczos coordinates: [L, m, s+1]."""
        lam = torch.as_tensor(lambdas, dtype=self.tri.dtype).reshape(-1)
        m, s1, s = self.tri.shape
        big_l = lam.shape[0]

        def apply(y: torch.Tensor) -> torch.Tensor:  # (T~ + lambda I) y for y supported on :s
            out = torch.einsum("mij,lmj->lmi", self.tri, y[..., :s])
            return out + lam[:, None, None] * y

        b = torch.zeros(big_l, m, s1, dtype=self.tri.dtype)
        b[..., 0] = self.vnorm
        x = b.clone() if self.x0 == "rhs" else torch.zeros_like(b)
        r = b - apply(x) if self.x0 == "rhs" else b.clone()
        d = r.clone()
        rs = (r * r).sum(-1)
        for _ in range(self.iters):
            ad = apply(d)
            dad = (d * ad).sum(-1)
            alpha = torch.where(dad != 0, rs / torch.where(dad != 0, dad, 1.0), 0.0)
            x = x + alpha[..., None] * d
            r = r - alpha[..., None] * ad
            rs_new = (r * r).sum(-1)
            d = r + torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)[..., None] * d
            rs = rs_new
        return x

    def probe_products(self, lambdas: list[float] | torch.Tensor) -> torch.Tensor:
        """probes . x(lambda) for every explained example: [L, m, P]."""
        return torch.einsum("lms,msp->lmp", self.coefficients(lambdas), self.probe_coords)


def krylov_cg_path(hvp: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor,
                   probes: torch.Tensor, iters: int, x0: str = "zero",
                   batch: int = 64) -> KrylovCGPath:
    """Lanczos on ``hvp`` (H @ rows of a [b, p] tensor) from each row of ``vectors`` [m, p];
    see ``KrylovCGPath``. ``probes`` [P, p]. Runs ``iters`` (x0='zero') or ``iters + 1``
    (x0='rhs') HVP steps for ``batch`` right-hand sides at a time."""
    if x0 not in ("zero", "rhs"):
        raise ValueError(f"x0 must be 'zero' or 'rhs', got {x0!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    steps = iters + (x0 == "rhs")
    tris, norms, coords = [], [], []
    for start in range(0, vectors.shape[0], batch):
        v = vectors[start : start + batch]
        nb = v.shape[0]
        vnorm = v.norm(dim=1)
        q = v / torch.where(vnorm > 0, vnorm, torch.ones_like(vnorm))[:, None]
        q_prev = torch.zeros_like(q)
        beta_prev = torch.zeros(nb, dtype=v.dtype, device=v.device)
        tri = torch.zeros(nb, steps + 1, steps, dtype=v.dtype, device=v.device)
        pc = [q @ probes.T]
        for j in range(steps):
            w = hvp(q) - beta_prev[:, None] * q_prev
            alpha = (q * w).sum(1)
            w = w - alpha[:, None] * q
            beta = w.norm(dim=1)
            tri[:, j, j] = alpha
            tri[:, j + 1, j] = beta
            if j + 1 < steps:
                tri[:, j, j + 1] = beta
            q_prev, q = q, w / torch.where(beta > 0, beta, torch.ones_like(beta))[:, None]
            beta_prev = beta
            pc.append(q @ probes.T)
        tris.append(tri.cpu())
        norms.append(vnorm.cpu())
        coords.append(torch.stack(pc, 1).cpu())
    return KrylovCGPath(torch.cat(tris), torch.cat(norms), torch.cat(coords), iters, x0)
