"""Memory estimates of every attributor ``attribute()`` can run, not only IFFIM's: each is at
least the arrays its path provably holds at once, counted here by hand from the code for a
small model (asymmetric sizes: n training, m explained, p parameters, d projected and each
layer's in and out all differ, so a swapped size changes the number), and a call above a
tiny ``memory_budget=`` is refused before any gradient with a fix that fits the attributor."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tdatune.features.budget as budget
from counting import CALLS, counting_loss, counting_margin
from tdatune.data.base import ArrayDataset
from tdatune.features.budget import BudgetWarning, DoesNotFit, PathEstimate, check_attribution
from tdatune.models.task import make_task
from tdatune.study.attribute import attribute, attribute_estimate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64, F32 = 8, 4
N, M, P = 3_000, 700, 146  # training, explained examples; parameters of mlp()
SIDES = ((7 + 1, 13), (13 + 1, 3))  # (in + bias, out) of its two layers



def mlp():
    """An MLP with p = 146 (layers 7 -> 13 -> 3) on float inputs, its task and state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    assert sum(v.numel() for v in model.parameters()) == P
    return make_task(model, counting_loss, counting_margin, name="counting-mlp"), model.state_dict()


def data(k: int, seed: int = 1) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(k, 7, generator=gen), torch.randint(0, 3, (k,), generator=gen))


def estimate(attributor: str, n: int = N, m: int = M, v: int = 0, task=None, **kw):
    task = task or mlp()[0]
    est = attribute_estimate(task, data(n), data(m, 2), val=data(v, 3) if v else None,
                             attributor=attributor, **kw)
    assert isinstance(est, PathEstimate) and est.method == attributor
    return est


def phase(est: PathEstimate, name: str) -> int:
    return sum(est.phases[name].values())


def workspace(s: int) -> int:
    """LAPACK ?syevd's real workspace for order s (the integers left out)."""
    return (1 + 6 * s + 2 * s * s) * F64


def scores(m: int, n: int, k: int) -> int:
    """LambdaPath.scores: c / (sigma + lam) [m, k], its product [m, n] and the signed copy."""
    return m * k * F64 + 2 * m * n * F64


# ----------------------------------------------------------------------------- TRAK


def test_trak_counts_every_member_and_the_ensemble():
    d, c = 40, 2
    est = estimate("trak", params={"proj_dim": d, "checkpoints": [0, 1]})
    member = (d * d + N * d + N) * F64 + P * d * F32  # eigenvectors, G U, Q; projection
    # Fitting member 2: member 1 kept; its own projection, features [n, d], F, eigh.
    fitting = member + P * d * F32 + N * d * F32 + 2 * d * d * F64 + workspace(d)
    assert phase(est, "eigendecomposition") >= fitting
    # Scoring: both members with their explained coordinates, each member path's weighted
    # training coordinates, the ensemble's concatenations, and the scores.
    at_scores = (c * member + c * M * d * F64 + c * N * d * F64 + N * c * d * F64
                 + M * c * d * F64 + scores(M, N, c * d))
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    s = est.phases["scores"]
    assert s["ensemble training coordinates"] == N * c * d * F64
    assert s["ensemble explained coordinates"] == M * c * d * F64
    assert s["signed score matrix"] == M * N * F64
    assert est.eig_size == d and est.form == "parameter"


def test_trak_unprojected_is_the_kernel_form():
    n = 90  # n < p: the n x n kernel of the [n, p] features
    est = estimate("trak", n=n, params={"proj_dim": None})
    assert est.eig_size == n and est.form == "kernel"
    assert est.phases["eigendecomposition"]["n x n matrix"] == n * n * F64
    assert phase(est, "eigendecomposition") >= n * P * F32 + 2 * n * n * F64 + workspace(n)


# ---------------------------------------------------------------------------- LoGra


def logra_widths(k: int) -> list[int]:
    return [min(k, d_in) * min(k, d_out) for d_in, d_out in SIDES]


def test_logra_joint_counts_the_features_twice_and_one_eigensystem():
    k = 4
    w = sum(logra_widths(k))
    assert w == 16 + 12
    est = estimate("logra", params={"proj_dim": k})
    # layerwise_grads: the list of chunks and their concatenation
    assert est.phases["training gradients"]["feature chunks"] == N * w * F32
    assert phase(est, "training gradients") >= 2 * N * w * F32
    assert phase(est, "eigendecomposition") >= N * w * F32 + 2 * w * w * F64 + workspace(w)
    at_scores = (w * w + N * w + M * w) * F64 + scores(M, N, w)
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    assert est.eig_size == w


def test_logra_per_layer_counts_every_block_and_the_ensemble():
    widths = logra_widths(4)
    total = sum(widths)
    est = estimate("logra", params={"proj_dim": 4, "blocks": "layer"})
    blocks = sum(b * b + N * b for b in widths) * F64  # each block's eigenvectors and G U
    at_scores = blocks + M * total * F64 + (N + M) * total * F64 + scores(M, N, total)
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    assert est.phases["scores"]["ensemble training coordinates"] == N * total * F64
    assert est.eig_size == max(widths)


# ------------------------------------------------------------------------ IF explicit


def test_if_explicit_counts_four_p_squared_and_the_coordinates():
    est = estimate("if_explicit")
    cast = 3 * P * F64 + N * 7 * F64  # parameters and training inputs in float64
    eig = est.phases["eigendecomposition"]
    assert eig["Hessian"] == P * P * F64
    # eigh: the Hessian, SciPy's copy (overwritten by the eigenvectors), ?syevd's workspace
    assert sum(eig.values()) >= cast + 2 * P * P * F64 + workspace(P)
    assert phase(est, "Hessian") >= cast + 3 * P * P * F64  # H, H + H^T, 0.5 (H + H^T)
    assert est.phases["Hessian"]["symmetrised Hessian"] == P * P * F64  # p x p, not n x n
    assert phase(est, "training coordinates") >= cast + (P * P + 2 * N * P) * F64
    at_scores = cast + (P * P + N * P + M * P) * F64 + scores(M, N, P)
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    assert est.phases["scores"]["training coordinates"] == N * P * F64
    assert est.eig_size == P


def test_if_explicit_with_a_hundred_thousand_parameters_is_refused_with_the_fix():
    model = nn.Linear(1_000, 100)  # p = 100,100
    task = make_task(model, counting_loss, counting_margin, name="wide")
    gen = torch.Generator().manual_seed(0)
    train = ArrayDataset(torch.randn(20, 1_000, generator=gen), torch.randint(0, 100, (20,)))
    est = attribute_estimate(task, train, train, attributor="if_explicit")
    p = 100_100
    assert est.memory_bytes >= 4 * p * p * F64  # 320 GB
    CALLS["grad"] = 0
    with pytest.raises(DoesNotFit) as err:
        attribute(task, train, train, checkpoints=model.state_dict(), attributor="if_explicit",
                  lam=1e-3, memory_budget=64 << 30)
    assert CALLS["grad"] == 0
    msg = str(err.value)
    assert "iffim" in msg and "proj_dim" in msg and "kfac" in msg and "if_cg" in msg


# ---------------------------------------------------------------------- K-FAC, EK-FAC


def embedding_task():
    """Embedding(50, 6) -> Linear(6, 3): K-FAC's embedding A is diagonal (50 numbers), so
    swapping a layer's in and out changes the count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 6), nn.Flatten(), nn.Linear(6, 3))
    return make_task(model, counting_loss, counting_margin, name="counting-embedding"), model


def tokens(k: int, seed: int) -> ArrayDataset:
    gen = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 50, (k, 1), generator=gen),
                        torch.randint(0, 3, (k,), generator=gen))


def kfac_estimate(name: str, n: int, m: int) -> PathEstimate:
    est = attribute_estimate(embedding_task()[0], tokens(n, 1), tokens(m, 2), attributor=name)
    assert isinstance(est, PathEstimate)
    return est


P_EMB = 50 * 6 + 6 * 3 + 3  # 321


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_kfac_counts_the_factors_the_coordinates_and_the_scores(name):
    est = kfac_estimate(name, N, M)
    covariances = (50 + 6 * 6 + 7 * 7 + 3 * 3) * F64  # A diagonal for the embedding
    vectors = (6 * 6 + 7 * 7 + 3 * 3) * F64  # Q_S, Q_A (no Q_A for the embedding)
    values = (50 + 6 + 7 + 3) * F64
    grid = (50 * 6 + 7 * 3) * F64  # the [out, in] eigenvalues, p of them
    assert est.phases["factors"]["covariances"] == covariances
    assert phase(est, "factors") >= covariances + vectors + values + grid
    if name == "ekfac":
        assert phase(est, "EK-FAC correction") >= covariances + vectors + values + 2 * grid
    assert est.eig_size == 7  # the largest factor eigendecomposed (the embedding's A is not)
    # n p <= 2^26: the path holds the [n, p] training coordinates (float32), the explained
    # ones [m, p] in float64, c / (sigma + lam) and its float32 cast, and the signed product
    # (float32) as it is written into the float64 score matrix.
    s = est.phases["scores"]
    assert s["explained coordinates"] == M * P_EMB * F64
    assert s["training coordinates"] == N * P_EMB * F32
    at_scores = (vectors + grid + N * P_EMB * F32 + M * P_EMB * (F64 + F64 + F32)
                 + M * N * (F64 + F32))
    assert est.memory_bytes >= phase(est, "scores") >= at_scores


def test_kfac_streamed_scores_hold_one_weighted_copy():
    n = 300_000  # n p > 2^26: the training side is streamed, the coordinates weighted back
    est = kfac_estimate("kfac", n, M)
    s = est.phases["scores"]
    assert "training coordinates" not in s
    assert s["weighted copy (weighted_back)"] == M * P_EMB * F32
    at_scores = M * P_EMB * (F64 + F32) + M * n * F64
    assert est.memory_bytes >= phase(est, "scores") >= at_scores


@pytest.mark.parametrize(("rank", "numbers"), [(None, P_EMB), (1, (6 + 50) + (3 + 7))])
def test_kfac_wide_explained_sets_are_weighted_in_groups_without_coordinates(rank, numbers):
    """m p > 2^26 numbers: no explained coordinates; one group's weighted gradients (in the
    gradients' dtype) as query_memory allows: 1,000 examples of 321 numbers each, or with
    rank 1 the embedding's [6, 50] block as 6 + 50 numbers and the linear [3, 7] as 3 + 7."""
    m = 250_000
    est = attribute_estimate(embedding_task()[0], tokens(100, 1), tokens(m, 2),
                             attributor="kfac", params={"query_rank": rank,
                                                        "query_memory": 1000 * numbers * F32})
    scores = est.phases["scores"]
    assert "explained coordinates" not in scores
    assert "explained coordinates" not in est.phases  # no path is built for them
    assert scores["weighted gradients of one group"] == 1000 * numbers * F32
    assert scores["score matrix"] == m * 100 * F32


# ---------------------------------------------------------------------------- TracIn


def test_tracin_counts_each_checkpoint_and_its_cached_products():
    c = 3
    est = estimate("tracin", params={"checkpoints": [0, 1, 2]})
    kept = N * P * F32  # n p <= GRAD_CACHE_LIMIT: every checkpoint's [n, p] kept
    # The third checkpoint's product: the first two's [m, n] cached, v and its float64
    # copy, the kept gradients cast to float64 and the product.
    product = (c * kept + (c - 1) * M * N * F64 + M * P * (F32 + F64) + N * P * F64
               + M * N * F64)
    assert phase(est, "products") >= product
    at_scores = c * kept + c * M * N * F64 + 2 * M * N * F64  # cached, sum, lr x product
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    assert est.phases["scores"]["cached products"] == c * M * N * F64


def test_tracin_unprojected_small_n_keeps_the_factors():
    n = 90  # n < p: the hooks' factors, in + out numbers per layer and example
    est = estimate("tracin", n=n, m=5)
    per_example = (7 + 13) + (13 + 3)
    assert est.phases["training gradients"]["factored training gradients"] == n * per_example * F32


def test_tracin_counts_the_checkpoints_given():
    task = mlp()[0]
    est = attribute_estimate(task, data(N), data(M, 2), attributor="tracin", checkpoints=4)
    one = attribute_estimate(task, data(N), data(M, 2), attributor="tracin", checkpoints=1)
    assert est.phases["scores"]["cached products"] == 4 * M * N * F64
    assert one.phases["scores"]["cached products"] == M * N * F64


# ---------------------------------------------------------- CG, LiSSA, Arnoldi (HVPs)


def test_if_cg_counts_the_iterates_and_the_scores():
    est = estimate("if_cg")
    held = 3 * P * F64 + N * 7 * F64 + N * P * F64  # cast problem; G kept (n p <= 2^26)
    assert est.phases["conjugate gradient"]["CG iterates (x, r, d)"] == 3 * M * P * F64
    # v, x r d, x concatenated; the [m, n] products and their float32 copy
    at_scores = held + M * P * F64 * 5 + M * N * (F64 + F32)
    assert est.memory_bytes >= phase(est, "scores") >= at_scores


def test_if_lissa_counts_the_results_and_the_scores():
    est = estimate("if_lissa")  # float32: nothing cast but theta and the model copy
    at_scores = 2 * P * F32 + N * P * F32 + 3 * M * P * F32 + 2 * M * N * F32
    assert est.memory_bytes >= phase(est, "scores") >= at_scores
    assert est.phases["scores"]["results concatenated"] == M * P * F32


def test_if_arnoldi_counts_the_lanczos_basis_and_the_coordinates():
    k, steps = 20, 60  # rank 20, default 2k + 20 Lanczos steps
    est = estimate("if_arnoldi", params={"rank": k})
    kept = N * P * F64
    assert phase(est, "Lanczos") >= kept + P * steps * F64 + P * k * F64
    assert est.phases["Lanczos"]["Lanczos basis"] == P * steps * F64
    at_scores = kept + (P * k + N * k + M * P + M * k) * F64 + scores(M, N, k)
    assert est.memory_bytes >= phase(est, "scores") >= at_scores


# ------------------------------------------------- attribute() refuses before any work

REFUSALS = [
    ("trak", {"proj_dim": 40}, 1e-3, r"proj_dim <= "),
    ("logra", {"proj_dim": 4}, 1e-3, r"proj_dim <= "),
    ("if_explicit", {}, 1e-3, r"(?s)iffim.*kfac.*if_cg"),
    ("kfac", {}, 1e-3, r"fewer explained examples per call"),
    ("ekfac", {}, 1e-3, r"fewer explained examples per call"),
    ("tracin", {}, None, r"fewer explained examples per call"),
    ("if_cg", {}, 1e-3, r"fewer explained examples per call"),
    ("if_lissa", {"scale": 100.0}, 1e-3, r"fewer explained examples per call"),
    ("if_arnoldi", {}, 1e-3, r"fewer explained examples per call"),
]


@pytest.mark.parametrize(("name", "params", "lam", "fix"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_attribute_refuses_above_the_budget_before_any_gradient(name, params, lam, fix):
    task, state = mlp()
    train, explained = data(N), data(M, 2)
    est = attribute_estimate(task, train, explained, attributor=name, params=params,
                             checkpoints=1)
    CALLS["grad"] = 0
    with pytest.raises(DoesNotFit, match=fix) as err:
        attribute(task, train, explained, checkpoints=state, attributor=name, params=params,
                  lam=lam, memory_budget=est.memory_bytes - 1)
    assert CALLS["grad"] == 0  # refused before any gradient
    msg = str(err.value)
    assert f"attribute() with {name} of 3,000 examples" in msg and "check_fit=False" in msg


def test_refusal_names_a_knob_value_that_fits():
    est = kfac_estimate("kfac", N, M)
    limit = est.memory_bytes * 3 // 4
    with pytest.raises(DoesNotFit, match="at most") as err:
        check_attribution(est, budget=limit)
    fits = int(str(err.value).split("at most ")[1].split(" ")[0].replace(",", ""))
    assert kfac_estimate("kfac", N, fits).memory_bytes <= limit
    assert kfac_estimate("kfac", N, fits + 1).memory_bytes > limit


def test_tracin_refusal_counts_the_checkpoints_given():
    task, state = mlp()
    train, explained = data(N), data(M, 2)
    one = attribute_estimate(task, train, explained, attributor="tracin", checkpoints=1)
    CALLS["grad"] = 0
    with pytest.raises(DoesNotFit, match=r"fewer checkpoints, at most 1 epochs"):
        attribute(task, train, explained, checkpoints=[state] * 3, attributor="tracin",
                  memory_budget=one.memory_bytes)
    assert CALLS["grad"] == 0


def test_a_slow_exact_hessian_warns_once_before_any_work(monkeypatch):
    monkeypatch.setattr(budget, "EIGH_WARN_SIZE", 100)  # p = 146 counts as slow
    task, state = mlp()
    CALLS["grad"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # raised where it is given: before work
        with pytest.raises(BudgetWarning, match=r"(?s)146 x 146 matrix \(exact Hessian form\).*"
                                                r"iffim.*kfac.*if_cg"):
            attribute(task, data(50), data(5, 2), checkpoints=state, attributor="if_explicit",
                      lam=1e-3, memory_budget=1 << 40)
    assert CALLS["grad"] == 0
