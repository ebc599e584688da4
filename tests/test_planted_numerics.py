"""Numbers that a plausible one-line bug would change, each checked against an independent
computation written here: the HVP memory split (counted steps, dense autograd Hessian), IF CG
iterate by iterate against a textbook numpy CG (tolerance, non-positive curvature), the
``negative_loss`` output against hand-worked cross-entropies, and ``attribute()``'s threshold
and weight decay against a dense eigen-decomposition and xi computed in numpy."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from tdatune.attributors import AttributionContext, make_attributor
from tdatune.curvature.hessian import TrainingObjective
from tdatune.data.base import ArrayDataset
from tdatune.features.gradients import per_example_grads
from tdatune.models.outputs import cross_entropy, mse, negative_loss
from tdatune.models.small import LogisticRegression
from tdatune.models.task import Task
from tdatune.models.training import TrainFunction, TrainRecipe
from tdatune.study.attribute import attribute

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


# -- 1. the HVP memory split ---------------------------------------------------------------

class _CountingLoss:
    """Cross-entropy that records how many examples each call sees (one call per vmap step:
    the forward runs once per step of vectors x examples)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(outputs.shape[0]))
        z = outputs - outputs.max(1, keepdim=True).values
        return z.exp().sum(1).log() - z.gather(1, y[:, None])[:, 0]


def _tanh_mlp() -> tuple[nn.Module, dict[str, torch.Tensor], ArrayDataset]:
    """A 3-5-4 tanh MLP (float64, random parameters: curvature of every sign), 11 examples."""
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=F64))
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = ArrayDataset(torch.randn(11, 3, generator=gen, dtype=F64),
                        torch.randint(0, 4, (11,), generator=gen))
    return model, params, data


def _dense_mlp_hessian(model: nn.Module, params: dict[str, torch.Tensor], data: ArrayDataset,
                       wd: float) -> torch.Tensor:
    """Hessian of mean cross-entropy + wd/2 ||theta||^2 by torch.autograd.functional.hessian."""
    names = list(params)
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def objective(theta: torch.Tensor) -> torch.Tensor:
        p, s = {}, 0
        for k in names:
            p[k] = theta[s : s + params[k].numel()].reshape(params[k].shape)
            s += params[k].numel()
        z = functional_call(model, p, (data.inputs,))
        ce = torch.logsumexp(z, 1) - z.gather(1, data.targets[:, None])[:, 0]
        return ce.mean() + 0.5 * wd * (theta * theta).sum()

    return torch.autograd.functional.hessian(objective, flat)


SPLITS = [
    # budget (pairs), chunk_size, then per data set (11 examples, the 6 of SUBSET):
    # (examples of each data chunk, vector steps per data chunk) for 5 vectors
    (3, 256, ([3, 3, 3, 2], 5), ([3, 3], 5)),  # 3 examples x 1 vector per step
    (1, 256, ([1] * 11, 5), ([1] * 6, 5)),  # one pair per step
    (0.4, 256, ([1] * 11, 5), ([1] * 6, 5)),  # less than a pair: still one pair per step
    (22, 256, ([11], 3), ([6], 2)),  # 11 x 2 vectors (6 x 3 vectors) per step
    (40, 4, ([4, 4, 3], 1), ([4, 2], 1)),  # chunk_size caps examples; 40 // 4 >= 5 vectors
    (12, 4, ([4, 4, 3], 2), ([4, 2], 2)),  # 12 // 4 = 3 vectors per step: 2 steps for 5
]
SUBSET = torch.tensor([0, 2, 3, 7, 8, 10])


@pytest.mark.parametrize(("budget_pairs", "chunk_size", "full", "subset"), SPLITS)
def test_hvp_splits_vectors_and_examples_to_the_memory_budget(
        budget_pairs: float, chunk_size: int, full: tuple[list[int], int],
        subset: tuple[list[int], int]) -> None:
    """hvp under memory_bytes = k pairs runs the steps that budget implies (counted from the
    loss calls, one per step), no step holds more pairs than the budget, and H @ v equals the
    dense autograd Hessian, on all examples and on a subset."""
    model, params, data = _tanh_mlp()
    counter = _CountingLoss()
    task = Task(make_model=lambda: model, loss_fn=counter)
    per_pair = TrainingObjective(task, model, params, data).pair_bytes()
    assert per_pair > 0
    wd = 0.03
    obj = TrainingObjective(task, model, params, data, weight_decay=wd, chunk_size=chunk_size,
                            memory_bytes=max(1, int(budget_pairs * per_pair)))
    assert obj.pair_bytes() == per_pair  # the same measurement: the budget is what we meant
    vecs = torch.randn(5, obj.p, dtype=F64, generator=torch.Generator().manual_seed(2))
    budget = max(1, int(budget_pairs))
    for index, (chunks, steps) in ((None, full), (SUBSET, subset)):
        counter.sizes.clear()
        got = obj.hvp(vecs, index)
        assert counter.sizes == [e for e in chunks for _ in range(steps)], index
        # the largest step of vectors holds at least ceil(5 / steps) of them
        assert math.ceil(5 / steps) * max(chunks) <= budget
        part = data if index is None else data.subset(index)
        dense = _dense_mlp_hessian(model, params, part, wd)
        assert torch.allclose(got, vecs @ dense, rtol=1e-10, atol=1e-12), index


# -- 2. IF CG against a textbook CG --------------------------------------------------------

class _Point(nn.Module):
    """A model whose output for every example is its parameter vector theta (so the loss below
    is an explicit quadratic in theta and the Hessian a known matrix)."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(x.shape[0], -1) + 0.0 * x[:, :1]


def _quad_loss(outputs: torch.Tensor, y: torch.Tensor, mats: torch.Tensor,
               lin: torch.Tensor) -> torch.Tensor:
    """l(theta; y) = theta^T M_y theta / 2 + b_y . theta: Hessian M_y, gradient M_y theta + b_y."""
    m, b = mats.to(outputs.dtype)[y], lin.to(outputs.dtype)[y]
    return 0.5 * torch.einsum("bi,bij,bj->b", outputs, m, outputs) + (b * outputs).sum(1)


def _linear_output(outputs: torch.Tensor, y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """f(theta; y) = a_y . theta: output gradient a_y."""
    return (table.to(outputs.dtype)[y] * outputs).sum(1)


class Quadratic:
    """Training objective mean_i l_i + wd/2 ||theta||^2 with l_i explicit quadratics, so
    H = mean_i M_{y_i} + wd I, g_i = M_{y_i} theta + b_{y_i} and v_j = a_{y_j} in numpy."""

    def __init__(self, eigs: np.ndarray, seed: int, wd: float, n_explained: int = 3,
                 positive_explained: int = 0) -> None:
        rng = np.random.default_rng(seed)
        p = len(eigs)
        q, _ = np.linalg.qr(rng.standard_normal((p, p)))
        h = q @ np.diag(eigs) @ q.T
        e = rng.standard_normal((p, p))
        e = 0.3 * (e + e.T)
        a = rng.standard_normal((n_explained + positive_explained, p))
        pos = q[:, eigs > 0]  # these explained gradients lie in the positive eigenspace of h
        a[n_explained:] = rng.standard_normal((positive_explained, pos.shape[1])) @ pos.T
        # the model keeps float32 tables and parameters: round once, then everything is exact
        f32 = partial(torch.tensor, dtype=torch.float32)
        mats, lin = f32(np.stack([h + e, h - e, h])), f32(rng.standard_normal((3, p)))
        theta, table = f32(rng.standard_normal(p)), f32(a)
        self.y_train = np.array([0, 1, 2] * 3)
        m64 = mats.double().numpy()[self.y_train]
        self.hessian = m64.mean(0) + wd * np.eye(p)  # mean_i M_{y_i} + wd I
        self.train_grads = (np.einsum("nij,j->ni", m64, theta.double().numpy())
                            + lin.double().numpy()[self.y_train])
        self.v = table.double().numpy()
        task = Task(make_model=partial(_Point, p), name="quadratic",
                    loss_fn=partial(_quad_loss, mats=mats, lin=lin),
                    output=partial(_linear_output, table=table))
        train = ArrayDataset(torch.zeros(len(self.y_train), 1), torch.as_tensor(self.y_train))
        self.explained = ArrayDataset(torch.zeros(len(a), 1), torch.arange(len(a)))
        self.context = AttributionContext(task, train, [{"theta": theta}], weight_decay=wd,
                                          chunk_size=4)


def textbook_cg(a: np.ndarray, b: np.ndarray, iters: int, tol: float | None = None
                ) -> tuple[list[np.ndarray], list[int], list[list[float]]]:
    """Conjugate gradient on A x = b for each row of b, from x0 = 0, in numpy float64.

    Returns the iterates x_0..x_iters of every row ([m, p] each), the iteration at which each
    row met non-positive curvature d^T A d <= 0 (0: never; the iterate is frozen from there),
    and each row's relative residuals ||r_k|| / ||b||. With ``tol`` a row stops once
    ||r_k|| <= tol ||b||."""
    m = b.shape[0]
    xs = [np.zeros_like(b)]
    breakdown = [0] * m
    ratios: list[list[float]] = [[] for _ in range(m)]
    x, r, d = np.zeros_like(b), b.copy(), b.copy()
    rs = (r * r).sum(1)
    bnorm = np.sqrt(rs)
    done = np.zeros(m, dtype=bool)
    for k in range(1, iters + 1):
        for j in range(m):
            if done[j]:
                continue
            ad = a @ d[j]
            dad = d[j] @ ad
            if dad <= 0:
                breakdown[j], done[j] = k, True
                continue
            alpha = rs[j] / dad
            x[j] = x[j] + alpha * d[j]
            r[j] = r[j] - alpha * ad
            rs_new = r[j] @ r[j]
            ratios[j].append(math.sqrt(rs_new) / bnorm[j])
            d[j] = r[j] + (rs_new / rs[j]) * d[j]
            rs[j] = rs_new
            if tol is not None and math.sqrt(rs_new) <= tol * bnorm[j]:
                done[j] = True
        xs.append(x.copy())
    return xs, breakdown, ratios


def _cg_state(attr: object) -> np.ndarray:
    """The float64 iterate x [m, p] of the attributor's (single) CG run."""
    (run,) = attr._runs.values()  # type: ignore[attr-defined]
    return torch.cat([st.x for st in run.states]).numpy()


def _close(got: torch.Tensor | np.ndarray, want: np.ndarray, rtol: float) -> bool:
    """max |got - want| <= rtol * max |want|."""
    got = np.asarray(got, dtype=np.float64)
    return float(np.abs(got - want).max()) <= rtol * float(np.abs(want).max())


SPD_EIGS = np.logspace(-1.3, 1.0, 10)


def test_cg_iterates_equal_textbook_cg_iterate_by_iterate() -> None:
    """max_iter=k scores (and the float64 iterate) are the k-th textbook CG iterate on
    (H + wd I + lam I) x = v, for k = 1..4, fresh and from one score_grid run."""
    quad = Quadratic(SPD_EIGS, seed=100, wd=0.05)
    lam = 0.01
    a = quad.hessian + lam * np.eye(len(SPD_EIGS))
    xs, breakdown, _ = textbook_cg(a, quad.v, 4)
    assert breakdown == [0, 0, 0]
    refs = [-x @ quad.train_grads.T for x in xs]
    for k in range(1, 5):  # consecutive iterates differ: an off-by-one cannot pass
        assert not _close(refs[k - 1], refs[k], 1e-2)
    for k in (1, 2, 3, 4):
        attr = make_attributor("if_cg").fit(quad.context)
        got = attr.score(quad.explained, lam=lam, max_iter=k, early_stop=False)
        assert _close(got, refs[k], 1e-6), k
        assert _close(_cg_state(attr), xs[k], 1e-10), k
    attr = make_attributor("if_cg").fit(quad.context)
    grid = [{"lam": lam, "max_iter": k, "early_stop": False} for k in (3, 1, 2)]
    for values, got in attr.score_grid(quad.explained, grid):
        assert _close(got, refs[values["max_iter"]], 1e-6), values


def test_cg_early_stop_uses_the_given_tolerance() -> None:
    """With early_stop, each example stops at the first ||r_k|| <= tol ||v|| of the textbook
    CG (iteration 18 at tol = 1e-4; 1000x tol would stop at 6-7), and its scores and iterate
    are that iteration's; without early_stop the same problem goes on to the exact solve."""
    eigs = np.logspace(-1.0, 0.5, 30)
    quad = Quadratic(eigs, seed=101, wd=0.05)
    lam, tol = 0.01, 1e-4
    a = quad.hessian + lam * np.eye(len(eigs))
    xs, _, ratios = textbook_cg(a, quad.v, 40, tol=tol)
    stops = [next(k for k, q in enumerate(rs, 1) if q <= tol) for rs in ratios]
    loose = [next(k for k, q in enumerate(rs, 1) if q <= 1000 * tol) for rs in ratios]
    assert all(s >= lo + 5 for s, lo in zip(stops, loose, strict=True)), (stops, loose)
    # no relative residual lies within 3 % of either tolerance: rounding cannot move a stop
    for rs in ratios:
        for q in rs:
            assert abs(math.log(q / tol)) > 0.03 and abs(math.log(q / (1000 * tol))) > 0.03
    ref = -xs[-1] @ quad.train_grads.T
    xs_loose, _, _ = textbook_cg(a, quad.v, 40, tol=1000 * tol)
    assert not _close(-xs_loose[-1] @ quad.train_grads.T, ref, 1e-3)
    attr = make_attributor("if_cg").fit(quad.context)
    got = attr.score(quad.explained, lam=lam, max_iter=40, early_stop=True, tol=tol)
    assert _close(got, ref, 1e-6)
    assert _close(_cg_state(attr), xs[-1], 1e-10)
    # one iteration more or less is resolved by that comparison
    xs_all, _, _ = textbook_cg(a, quad.v, 40)
    for j, s in enumerate(stops):
        for other in (s - 1, s + 1):
            assert not _close(xs_all[other][j], xs_all[s][j], 1e-6), (j, other)
    exact = -np.linalg.solve(a, quad.v.T).T @ quad.train_grads.T
    assert not _close(ref, exact, 1e-5)
    full = attr.score(quad.explained, lam=lam, max_iter=40, early_stop=False)
    assert _close(full, exact, 1e-6)


def test_cg_freezes_an_example_at_non_positive_curvature() -> None:
    """On an indefinite H + lam I, an example whose direction has d^T A d <= 0 keeps the
    iterate it had (textbook CG stopped there) while the others go on; breakdowns are counted.
    Checked for max_iter = 1..5 against the numpy CG that freezes."""
    eigs = np.array([4.0, 3.0, 2.0, 1.0, 0.5, -0.2, -0.5, -1.0])
    quad = Quadratic(eigs, seed=6, wd=0.0, n_explained=3, positive_explained=1)
    lam = 0.01
    a = quad.hessian + lam * np.eye(len(eigs))
    assert np.linalg.eigvalsh(a).min() < -0.5  # indefinite
    xs, breakdown, _ = textbook_cg(a, quad.v, 5)
    # examples 0-2 meet negative curvature at iteration 2 (after one ordinary step); example 3
    # (in the positive eigenspace of H) never does within 5 iterations
    assert breakdown == [2, 2, 2, 0], breakdown
    # what CG without the freeze would give differs after the breakdown
    unfrozen = _cg_no_freeze(a, quad.v, 5)
    assert not _close(unfrozen[5][:3], xs[5][:3], 1e-2)
    for k in range(1, 6):
        attr = make_attributor("if_cg").fit(quad.context)
        got = attr.score(quad.explained, lam=lam, max_iter=k, early_stop=False)
        assert _close(got, -xs[k] @ quad.train_grads.T, 1e-6), k
        assert _close(_cg_state(attr), xs[k], 1e-10), k
        assert attr.breakdowns == sum(1 for b in breakdown if 0 < b <= k), k


def _cg_no_freeze(a: np.ndarray, b: np.ndarray, iters: int) -> list[np.ndarray]:
    """CG that ignores the sign of d^T A d (what an unguarded implementation computes)."""
    x, r, d = np.zeros_like(b), b.copy(), b.copy()
    xs = [x.copy()]
    for _ in range(iters):
        ad = d @ a
        rs = (r * r).sum(1)
        alpha = rs / (d * ad).sum(1)
        x = x + alpha[:, None] * d
        r = r - alpha[:, None] * ad
        d = r + ((r * r).sum(1) / rs)[:, None] * d
        xs.append(x.copy())
    return xs


# -- 3. the negative_loss output -------------------------------------------------------------

# Hand-worked batch, p_y = exp(z_y) / sum_k exp(z_k): logits (0, 0) label 0 -> p = 1/2;
# (ln 3, 0) label 1 -> p = 1/4; (ln 4, ln 4) label 1 -> p = 1/2; (0, ln 7) label 1 -> p = 7/8.
# Cross-entropy is -ln p.
HAND_LOGITS = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [math.log(4.0), math.log(4.0)],
                            [0.0, math.log(7.0)]], dtype=F64)
HAND_LABELS = torch.tensor([0, 1, 1, 1])
HAND_CE = torch.tensor([math.log(2.0), math.log(4.0), math.log(2.0), math.log(8.0 / 7.0)],
                       dtype=F64)


def test_negative_loss_is_minus_the_hand_worked_cross_entropy() -> None:
    """negative_loss, and a Task's output_fn and evaluate() for output='negative_loss', give
    -ln p_y of the hand-worked batch (and output='loss' gives +ln p_y)."""
    assert torch.allclose(negative_loss(HAND_LOGITS, HAND_LABELS), -HAND_CE, atol=1e-12)
    assert torch.allclose(cross_entropy(HAND_LOGITS, HAND_LABELS), HAND_CE, atol=1e-12)
    task = Task(make_model=partial(LogisticRegression, 2, 2), output="negative_loss")
    assert torch.allclose(task.output_fn(HAND_LOGITS, HAND_LABELS), -HAND_CE, atol=1e-12)
    loss_task = Task(make_model=partial(LogisticRegression, 2, 2), output="loss")
    assert torch.allclose(loss_task.output_fn(HAND_LOGITS, HAND_LABELS), HAND_CE, atol=1e-12)
    # evaluate(): a 2->2 linear layer with identity weight and zero bias passes logits = x
    model = LogisticRegression(2, 2).double()
    params = {"linear.weight": torch.eye(2, dtype=F64), "linear.bias": torch.zeros(2, dtype=F64)}
    got = task.evaluate(model, params, HAND_LOGITS, HAND_LABELS)
    assert torch.allclose(got, -HAND_CE, atol=1e-12)


def test_negative_loss_of_a_sequence_and_of_a_custom_loss() -> None:
    """Sequences: minus the mean token cross-entropy (tokens with p = 1/2 and 1/4 -> -(ln 2 +
    ln 4) / 2); a task whose loss is mse: negative_loss is minus the squared error."""
    seq = HAND_LOGITS[:2][None]  # one sequence of two tokens
    want = -(math.log(2.0) + math.log(4.0)) / 2
    assert abs(float(negative_loss(seq, HAND_LABELS[:2][None])[0]) - want) < 1e-12
    task = Task(make_model=partial(LogisticRegression, 2, 1), loss_fn=mse, output="negative_loss")
    pred = torch.tensor([[1.5], [-2.0], [0.25]], dtype=F64)
    target = torch.tensor([1.0, 1.0, 0.25], dtype=F64)
    got = task.output_fn(pred, target)
    assert torch.allclose(got, torch.tensor([-0.25, -9.0, 0.0], dtype=F64), atol=1e-12)


def test_negative_loss_gradient_is_onehot_minus_softmax() -> None:
    """The explained gradient that attribution uses: for logistic regression the bias part of
    d(-CE)/dtheta is onehot(y) - softmax(z) and the weight part its outer product with x."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    y = torch.tensor([0, 2, 1, 1, 0])
    w = torch.randn(3, 3, generator=gen, dtype=F64)
    b = torch.randn(3, generator=gen, dtype=F64)
    task = Task(make_model=partial(LogisticRegression, 3, 3), output="negative_loss")
    model = LogisticRegression(3, 3).double()
    params = {"linear.weight": w, "linear.bias": b}
    got = per_example_grads(task, model, params, ArrayDataset(x, y), target="output")
    z = x @ w.T + b
    soft = z.exp() / z.exp().sum(1, keepdim=True)
    delta = torch.eye(3, dtype=F64)[y] - soft  # [n, C]
    want = torch.cat([(delta[:, :, None] * x[:, None, :]).reshape(5, -1), delta], 1)
    assert torch.allclose(got, want, atol=1e-12)


# -- 4. attribute(): threshold and weight decay ----------------------------------------------

def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping Gaussian classes in 4 dimensions (float32, as a user would have)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, -0.5, 0.3], [-1.0, -1.0, 0.0, 0.6]])
    return centres[y] + torch.randn(n, 4, generator=gen), y


def _fixed_state(data: ArrayDataset, seed: int, state: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """A 'training function' that returns given parameters (the reference knows them)."""
    return {k: v.clone() for k, v in state.items()}


LR_STATE = {"linear.weight": torch.tensor([[0.8, -0.2, 0.4, 0.1], [-0.3, 0.9, -0.5, 0.2],
                                           [-0.6, -0.7, 0.1, 0.5]]),
            "linear.bias": torch.tensor([0.1, -0.2, 0.05])}
TRAIN, VAL, EXPLAINED = _blobs(30, 0), _blobs(12, 1), _blobs(5, 2)


def _lr_reference(state: dict[str, torch.Tensor], wd: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(H of mean CE + wd/2 ||theta||^2, training loss gradients G, margin gradients of the
    explained and of the validation examples) for logistic regression, by autograd on
    hand-written formulas, float64, theta = (weight row-major, bias)."""
    w0, b0 = state["linear.weight"].double(), state["linear.bias"].double()
    theta0 = torch.cat([w0.reshape(-1), b0])

    def logits(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ theta[:12].reshape(3, 4).T + theta[12:]

    def ce(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = logits(theta, x)
        return torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]

    def margin(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = logits(theta, x)
        others = z.masked_fill(torch.nn.functional.one_hot(y, 3).bool(), float("-inf"))
        return z.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return ce(theta, *TRAIN).mean() + 0.5 * wd * (theta * theta).sum()

    def rows(fn: object, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return torch.stack([torch.func.grad(lambda t, i=i: fn(t, x[i : i + 1], y[i : i + 1])[0])(
            theta0) for i in range(len(y))]).numpy()

    h = torch.autograd.functional.hessian(objective, theta0).numpy()
    return h, rows(ce, *TRAIN), rows(margin, *EXPLAINED), rows(margin, *VAL)


def _lr_task() -> Task:
    return Task(make_model=partial(LogisticRegression, 4, 3), output="margin", name="blobs")


def _xi_mean(sigma: np.ndarray, c: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Mean over rows of c of xi(lam) = S2 / sqrt(S1 S3), S_j = sum_k w_k / (sigma_k + lam)^j,
    w_k = sigma_k c_k^2."""
    w = sigma * c**2  # [m, k]
    inv = 1.0 / (sigma[:, None] + lam[None, :])  # [k, L]
    s1, s2, s3 = w @ inv, w @ inv**2, w @ inv**3
    return (s2 / np.sqrt(s1 * s3)).mean(0)


def _algorithm1(sigma: np.ndarray, c: np.ndarray, threshold: float) -> float:
    """The smallest lambda in [1e-2 min sigma, 1e2 max sigma] where mean xi reaches the
    threshold: a 20,001-point log scan, then bisection in log lambda."""
    grid = np.logspace(math.log10(1e-2 * sigma.min()), math.log10(1e2 * sigma.max()), 20001)
    curve = _xi_mean(sigma, c, grid)
    first = int(np.argmax(curve >= threshold))
    assert curve[first] >= threshold and first > 0, "the threshold must be crossed inside"
    lo, hi = math.log(grid[first - 1]), math.log(grid[first])
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _xi_mean(sigma, c, np.array([math.exp(mid)]))[0] >= threshold:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def _dense_scores(h: np.ndarray, g: np.ndarray, v: np.ndarray, lam: float) -> np.ndarray:
    """-V (H + lam I)^-1 G^T."""
    return -v @ np.linalg.solve(h + lam * np.eye(h.shape[0]), g.T)


def test_attribute_selects_algorithm_1_lambda_at_the_given_threshold() -> None:
    """attribute(threshold=t) selects the smallest lambda where mean validation xi of
    H + wd I (wd from the TrainFunction) reaches t, as a dense numpy xi scan says, for two
    thresholds other than the default; the higher one selects the larger lambda, and the
    scores are the dense solve at the selected lambda."""
    wd = 0.03
    h, g, v, v_val = _lr_reference(LR_STATE, wd)
    sigma, u = np.linalg.eigh(h)
    assert sigma.min() > 0
    c_val = v_val @ u
    training = TrainFunction(partial(_fixed_state, state=LR_STATE), weight_decay=wd)
    selected = {}
    for threshold in (0.9, 0.97):
        want = _algorithm1(sigma, c_val, threshold)
        res = attribute(_lr_task(), TRAIN, EXPLAINED, val=VAL, training=training,
                        attributor="if_explicit", threshold=threshold, rule="xi")
        assert res.selection is not None and res.selection.status == "crossed"
        assert math.isclose(res.lam, want, rel_tol=1e-6), (threshold, res.lam, want)
        assert _close(res.scores, _dense_scores(h, g, v, want), 1e-5), threshold
        selected[threshold] = res.lam
    assert selected[0.97] > 2 * selected[0.9]
    # without the weight decay (same eigenvectors, sigma - wd, zeros dropped) the curve, and
    # so the selected lambda, is another one
    sigma0 = sigma - wd
    keep = sigma0 > 1e-10 * sigma0.max()
    lam0 = _algorithm1(sigma0[keep], c_val[:, keep], 0.9)
    assert not math.isclose(lam0, selected[0.9], rel_tol=0.2), (lam0, selected[0.9])


@pytest.mark.parametrize("attributor", ["if_explicit", "if_cg"])
def test_attribute_adds_the_training_weight_decay_to_the_hessian(attributor: str) -> None:
    """A TrainFunction's or TrainRecipe's weight_decay reaches the curvature as + wd I: scores
    equal -V (H + wd I + lam I)^-1 G^T from a dense autograd Hessian, measurably different
    from the solve without wd."""
    wd, lam = 0.3, 0.01
    params = {"max_iter": 40} if attributor == "if_cg" else {}
    h, g, v, _ = _lr_reference(LR_STATE, wd)
    want = _dense_scores(h, g, v, lam)
    without = _dense_scores(h - wd * np.eye(h.shape[0]), g, v, lam)
    assert not _close(without, want, 0.1)
    training = TrainFunction(partial(_fixed_state, state=LR_STATE), weight_decay=wd)
    res = attribute(_lr_task(), TRAIN, EXPLAINED, val=VAL, training=training,
                    attributor=attributor, params=params, lam=lam)
    assert _close(res.scores, want, 1e-5)
    # a TrainRecipe: the reference at the parameters it trained
    recipe = TrainRecipe(optimizer="lbfgs", epochs=1, lbfgs_iters=20, weight_decay=wd)
    res = attribute(_lr_task(), TRAIN, EXPLAINED, val=VAL, training=recipe,
                    attributor=attributor, params=params, lam=lam)
    state = res.context.checkpoints[-1]
    assert not torch.allclose(state["linear.weight"], LR_STATE["linear.weight"])
    h, g, v, _ = _lr_reference(state, wd)
    assert _close(res.scores, _dense_scores(h, g, v, lam), 1e-5)


def test_cg_iterates_on_logistic_regression_equal_textbook_cg_on_its_dense_hessian() -> None:
    """The same iterate-by-iterate check on a real model: logistic regression, whose
    H + wd I comes from torch.autograd.functional.hessian of hand-written cross-entropy."""
    wd, lam = 0.02, 0.005
    h, g, v, _ = _lr_reference(LR_STATE, wd)
    xs, breakdown, _ = textbook_cg(h + lam * np.eye(h.shape[0]), v, 3)
    assert breakdown == [0] * len(v)
    context = AttributionContext(_lr_task(), ArrayDataset(*TRAIN), [LR_STATE], weight_decay=wd)
    explained = ArrayDataset(*EXPLAINED)
    for k in (1, 2, 3):
        assert not _close(xs[k - 1], xs[k], 1e-2)
        attr = make_attributor("if_cg").fit(context)
        got = attr.score(explained, lam=lam, max_iter=k, early_stop=False)
        assert _close(got, -xs[k] @ g.T, 1e-6), k
        assert _close(_cg_state(attr), xs[k], 1e-10), k
