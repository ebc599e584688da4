"""The memory and time guard of ``attribute()``: the estimate counts every array the path
holds (gradients, the eigendecomposition's matrix, eigenvectors and LAPACK workspace, the
explained side, the score matrix), checked against hand arithmetic and against the peak
resident memory of the real eigendecomposition; a call above the budget is refused before
any gradient, one between the warning level and the budget warns once before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import tdatune.curvature.eigen as eigen_module
import tdatune.features.budget as budget
from counting import CALLS, counting_loss, counting_margin
from tdatune.curvature.eigen import fisher_eigensystem
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import (
    BudgetWarning,
    DoesNotFit,
    check_attribution,
    eigh_bytes,
    estimate_attribution,
    estimate_gradients,
)
from tdatune.features.kernel import FactoredGradients, factored_numbers
from tdatune.models.task import make_task
from tdatune.study.attribute import attribute, attribute_estimate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = 8  # the eigendecompositions run in float64


# ---------------------------------------------------------------- (1) hand arithmetic


def test_unprojected_kernel_estimate_grows_at_least_like_n_squared():
    n, p = 20_000, 109_386  # the finding: 20,000 examples, no projection, an MLP's p > n
    kernel = n * n * F64
    assert kernel == 3_200_000_000  # the n x n matrix alone: 3.2 GB in float64
    est = estimate_attribution(n, p)  # default arguments: no projection, rows formed
    assert est.form == "kernel" and est.eig_size == n
    eig = est.phases["eigendecomposition"]
    assert eig["n x n matrix"] == kernel and eig["eigenvectors"] == kernel
    assert eig["LAPACK workspace"] >= 2 * kernel  # ?syevd: 1 + 6 n + 2 n^2 reals
    assert est.memory_bytes >= 4 * kernel + n * p * 4  # + the float32 training gradients
    # Twice the examples: the n^2 terms alone add 3 x (4 n^2 x 8 bytes).
    assert estimate_attribution(2 * n, p).memory_bytes - est.memory_bytes >= 12 * kernel


def test_default_arguments_do_not_assume_a_projection_or_a_store():
    n, p = 2_000_000, 19_500
    rows = n * p * 4  # [n, p] float32: 156 GB, not the 0.037 GiB of two gradient chunks
    assert estimate_attribution(n, p).memory_bytes >= rows + 4 * p * p * F64
    params = {"w": torch.zeros(p)}
    assert estimate_gradients(params, n).memory_bytes >= rows  # per_example_grads keeps them
    # A store keeps one chunk of rows: its estimate does not grow with n.
    small = estimate_gradients(params, n, store_chunk_rows=1024).memory_bytes
    assert small < 1 << 30


def test_parameter_form_counts_p_squared_and_the_coordinates():
    n, p = 50_000, 3_000
    est = estimate_attribution(n, p)
    assert est.form == "parameter" and est.eig_size == p
    assert est.phases["eigendecomposition"]["p x p matrix"] == p * p * F64
    coords = est.phases["training coordinates"]
    assert coords["training coordinates"] == n * p * F64  # G U, k <= p eigenpairs
    assert est.memory_bytes >= n * p * 4 + 4 * p * p * F64


def test_explained_side_and_score_matrix_are_counted():
    n, p, m = 10_000, 109_386, 5_000
    est = estimate_attribution(n, p, explained=m, validation=200)
    scores = est.phases["scores"]
    assert scores["score matrix (float64)"] == m * n * F64
    assert scores["score matrix (float32)"] == m * n * 4
    assert est.phases["explained"]["explained gradients"] == m * p * 4
    assert est.memory_bytes >= m * n * 12


def test_a_projection_shrinks_the_estimate_to_d():
    n, p, d = 20_000, 109_386, 1_024
    est = estimate_attribution(n, p, proj_dim=d)
    assert est.form == "parameter" and est.eig_size == d
    assert est.memory_bytes < estimate_attribution(n, p).memory_bytes / 10


# ------------------------------------------------ (2) against the real eigendecomposition

MEASURE = textwrap.dedent("""
    import json, sys, torch
    from tdatune.curvature.eigen import fisher_eigensystem
    torch.set_num_threads(1)
    n, w = int(sys.argv[1]), int(sys.argv[2])
    grads = torch.randn(n, w, generator=torch.Generator().manual_seed(0))
    # Before the baseline: load LAPACK and let BLAS size its buffers for products of this width
    fisher_eigensystem(grads[:64], form="kernel")
    fisher_eigensystem(grads[:, :64], form="parameter")

    def status(key):  # VmRSS: resident now; VmHWM: its peak (ru_maxrss would also count
        # the parent's peak, inherited through fork and exec)
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                    if line.startswith(key))

    current, peak = (lambda: status("VmRSS:")), (lambda: status("VmHWM:"))

    entering, eigh = [], torch.linalg.eigh
    def recorded(matrix):
        entering.append(current())
        return eigh(matrix)
    torch.linalg.eigh = recorded
    now = current()
    eig = fisher_eigensystem(grads)
    print(json.dumps({"growth": peak() - now, "entering": entering[0] - now, "form": eig.form}))
""")


def eigen_path_bytes(n: int, w: int) -> int:
    """The estimate's peak over the eigensystem's phases, less the training gradients (held
    before the baseline was taken)."""
    est = estimate_attribution(n, w)
    return max(sum(v for k, v in est.phases[phase].items() if k != "training gradients")
               for phase in ("accumulation", "eigendecomposition", "training coordinates"))


def test_estimate_holds_the_tensors_the_eigendecomposition_provably_holds_at_once():
    # Kernel form: during eigh the scaled Gram matrix, the eigenvectors and ?syevd's
    # workspace are all alive; parameter form likewise with p x p.
    for n, w, size in ((1_500, 3_000, 1_500), (3_000, 1_500, 1_500)):
        provably = 2 * size * size * F64 + (1 + 6 * size + 2 * size * size) * F64
        assert eigen_path_bytes(n, w) >= provably
        assert sum(eigh_bytes(size).values()) >= provably


@pytest.mark.parametrize(("n", "w"), [(2_000, 2_500), (4_000, 2_000)], ids=["kernel", "parameter"])
def test_estimate_covers_the_measured_peak_of_fisher_eigensystem(n, w):
    """Peak resident memory growth (VmHWM) of a fresh process running the real path (one
    thread, no timing): the estimate must be at least what the process touched.

    glibc's mmap threshold is pinned: by default it rises to the size of a freed block (up to
    32 MiB), so the ~33 MB float64 row chunks of this small problem would stay in the heap
    after being freed and count as resident. At the sizes the guard is for, every matrix and
    chunk is above 32 MiB, always mmapped and returned when freed, as pinning reproduces."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(n), str(w)], capture_output=True,
                         text=True, check=True, timeout=300, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["form"] == ("kernel" if w > n else "parameter")
    estimate = eigen_path_bytes(n, w)
    assert got["growth"] <= estimate, (got, estimate)
    # ... and is not wildly below it: the n^2 (p^2) terms are really there.
    size = min(n, w)
    assert got["growth"] >= 2 * size * size * F64
    # Entering eigh the path holds the matrix alone (scaled in place, the row chunks and
    # products freed), as the estimate's eigendecomposition phase says: no second copy.
    matrix = estimate_attribution(n, w).phases["eigendecomposition"][
        "n x n matrix" if w > n else "p x p matrix"]
    assert matrix <= got["entering"] <= 1.5 * matrix, (got, matrix)


def flip_then_mask(fisher: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenpairs as fisher_eigensystem took them before it saved copies: eigh of a
    scaled copy, both flipped, then a boolean mask (three copies of the eigenvectors)."""
    sigma, vectors = torch.linalg.eigh(fisher)
    sigma, vectors = sigma.flip(0), vectors.flip(1)
    keep = sigma > rtol * sigma[0].clamp_min(torch.finfo(sigma.dtype).tiny)
    return sigma[keep], vectors[:, keep]


def test_the_copy_savings_leave_every_number_bit_identical():
    gen = torch.Generator().manual_seed(3)
    chunk, rtol = 16, 1e-10
    for n, w in ((40, 90), (90, 40)):
        g = torch.randn(n, w, generator=gen)
        g[:, :5] = 0  # a null space, so some eigenvalues are dropped
        rows = [g[s : s + chunk].double() for s in range(0, n, chunk)]
        fisher = torch.zeros(w, w, dtype=torch.float64)
        for r in rows:
            fisher.addmm_(r.T, r)  # accumulated in place, as fisher_eigensystem does
        sigma, basis = flip_then_mask(fisher / n, rtol)
        got = fisher_eigensystem(g, form="parameter", chunk_rows=chunk, rtol=rtol)
        assert torch.equal(got.sigma, sigma) and torch.equal(got.basis, basis)
        assert torch.equal(got.train_coords, torch.cat([r @ basis for r in rows]))
        gram = torch.zeros(n, n, dtype=torch.float64)
        for i, ri in enumerate(rows):
            for j, rj in enumerate(rows[: i + 1]):
                block = ri @ rj.T
                gram[i * chunk : i * chunk + len(ri), j * chunk : j * chunk + len(rj)] = block
                gram[j * chunk : j * chunk + len(rj), i * chunk : i * chunk + len(ri)] = block.T
        sigma, w_ = flip_then_mask(gram / n, rtol)
        got = fisher_eigensystem(g, form="kernel", chunk_rows=chunk, rtol=rtol)
        assert torch.equal(got.sigma, sigma) and torch.equal(got.kernel_vectors, w_)
        assert torch.equal(got.train_coords, w_ * torch.sqrt(n * sigma))


# --------------------------------------------------------- (3), (4) attribute()'s guard



def mlp_problem(n: int = 1_000):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))  # p = 1,539
    task = make_task(model, counting_loss, counting_margin, name="counting-mlp")
    gen = torch.Generator().manual_seed(1)

    def data(k: int) -> ArrayDataset:
        return ArrayDataset(torch.randn(k, 20, generator=gen), torch.randint(0, 3, (k,), generator=gen))

    return task, model.state_dict(), data(n), data(40), data(30)


def test_factored_numbers_are_what_the_factored_gradients_hold():
    task, state, train, _, _ = mlp_problem(50)
    model = task.make_model()
    model.load_state_dict(state)
    params = {k: v.detach() for k, v in model.named_parameters()}
    CALLS["grad"] = 0
    per_example = factored_numbers(task, model, params, train)
    assert CALLS["grad"] == 0  # one forward pass without gradients
    assert per_example == (20 + 64) + (64 + 3)  # input and output gradient of each Linear
    held = FactoredGradients(task, model, params, train).stored
    assert held == 50 * per_example


def test_attribute_refuses_above_the_budget_before_any_gradient(monkeypatch):
    task, state, train, val, explained = mlp_problem()
    est = attribute_estimate(task, train, explained, val=val)
    assert est is not None and est.form == "kernel" and est.factored
    assert est.memory_bytes >= 4 * 1_000 * 1_000 * F64
    CALLS["grad"] = 0
    with pytest.raises(DoesNotFit) as err:
        attribute(task, train, explained, val=val, checkpoints=state,
                  memory_budget=est.memory_bytes - 1)
    assert CALLS["grad"] == 0  # refused before any gradient
    msg = str(err.value)
    assert "1,000 examples" in msg and "proj_dim" in msg and "kfac" in msg and "ekfac" in msg
    assert "n x n matrix" in msg and "check_fit=False" in msg
    # The parameter form (n > p, the 300,000-example case in miniature) is refused the same way.
    big = mlp_problem(3_000)[2]
    big_est = attribute_estimate(task, big, explained, val=val)
    assert big_est.form == "parameter"
    with pytest.raises(DoesNotFit, match=r"(?s)proj_dim.*kfac"):
        attribute(task, big, explained, val=val, checkpoints=state, memory_budget=1 << 20)
    assert CALLS["grad"] == 0


def test_refusal_names_a_projection_that_fits():
    n, p = 20_000, 109_386
    est = estimate_attribution(n, p)
    limit = est.memory_bytes // 20
    with pytest.raises(DoesNotFit, match=r"proj_dim") as err:
        check_attribution(est, budget=limit)
    d = int(str(err.value).split("proj_dim <= ")[1].split(" ")[0].replace(",", ""))
    assert estimate_attribution(n, p, proj_dim=d).memory_bytes <= limit
    assert estimate_attribution(n, p, proj_dim=d + 1).memory_bytes > limit


def test_attribute_warns_once_between_the_warning_level_and_the_budget(monkeypatch):
    task, state, train, val, explained = mlp_problem()
    est = attribute_estimate(task, train, explained, val=val)
    between = int(est.memory_bytes / (0.5 * (1 + budget.WARN_FRACTION)))  # 75% of the budget
    CALLS["grad"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # the warning comes before any work
        with pytest.raises(BudgetWarning, match=r"(?s)of memory.*proj_dim.*kfac"):
            attribute(task, train, explained, val=val, checkpoints=state, memory_budget=between)
    assert CALLS["grad"] == 0
    with pytest.warns(BudgetWarning) as record:
        result = attribute(task, train, explained, val=val, checkpoints=state,
                           memory_budget=between)
    assert len([w for w in record if issubclass(w.category, BudgetWarning)]) == 1
    assert result.scores.shape == (30, 1_000)
    # Slow as well as large: still one warning, naming both.
    monkeypatch.setattr(budget, "EIGH_WARN_SIZE", 100)
    with pytest.warns(BudgetWarning) as record:
        attribute(task, train, explained, val=val, checkpoints=state, memory_budget=between,
                  lam=1e-3)
    said = [str(w.message) for w in record if issubclass(w.category, BudgetWarning)]
    assert len(said) == 1 and "1,000 x 1,000" in said[0] and "of memory" in said[0]


def test_no_warning_well_below_the_budget():
    task, state, train, _, explained = mlp_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        attribute(task, train, explained, checkpoints=state, lam=1e-3, memory_budget=1 << 40)


def test_check_fit_false_runs_anyway():
    task, state, train, _, explained = mlp_problem()
    result = attribute(task, train, explained, checkpoints=state, lam=1e-3,
                       memory_budget=1 << 10, check_fit=False)
    assert result.scores.shape == (30, 1_000)


def test_long_eigendecompositions_say_so(monkeypatch, capsys):
    monkeypatch.setattr(budget, "EIGH_NOTICE_SIZE", 50)
    fisher_eigensystem(torch.randn(60, 200, generator=torch.Generator().manual_seed(0)))
    err = capsys.readouterr().err
    assert "60 x 60" in err and "kernel" in err and "roughly" in err
    fisher_eigensystem(torch.randn(60, 40, generator=torch.Generator().manual_seed(0)))
    assert capsys.readouterr().err == ""  # 40 x 40: below the size, nothing said
    assert eigen_module.fisher_eigensystem is fisher_eigensystem
