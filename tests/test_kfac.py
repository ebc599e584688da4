"""K-FAC and EK-FAC influence against a dense reference built here: the layers' input and
output-gradient covariances from a plain forward pass and per-example autograd, their exact
eigenbases (torch.linalg.eigh), the Fisher block assembled as a dense matrix and solved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdatune.attributors import AttributionContext, make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.models.task import Task


def mlp() -> nn.Module:
    torch.manual_seed(21)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3))


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def margin_out(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.gather(1, y[:, None]).squeeze(1) - out.logsumexp(1)


def layer_pairs(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, fn) -> list:
    """Per layer: inputs with a 1 column [n, in+1] and output gradients [n, out] of fn,
    one example at a time."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = [[] for _ in linears]
    grads = [[] for _ in linears]
    for i in range(len(x)):
        h = x[i : i + 1]
        outs = []
        for m in model:
            if isinstance(m, nn.Linear):
                acts[len(outs)].append(torch.cat([h, torch.ones(1, 1)], 1).detach())
                h = m(h)
                outs.append(h)
            else:
                h = m(h)
        gs = torch.autograd.grad(fn(h, y[i : i + 1])[0], outs)
        for k, g in enumerate(gs):
            grads[k].append(g.detach())
    return [(torch.cat(a).double(), torch.cat(g).double()) for a, g in zip(acts, grads,
                                                                          strict=True)]


def dense_scores(model, train, explained, lam: float | list[float], strategy: str,
                 eigenvalues: list | None = None) -> torch.Tensor:
    """-sum over layers of v_l (F_l + lam I)^-1 g_l with F_l = (Q_S x Q_A) diag(Lambda)
    (Q_S x Q_A)^T, vec in row-major [out, in+1] order (each layer's Lambda appended to
    ``eigenvalues``); ``lam`` one for all layers or one per layer."""
    (x, y), (xe, ye) = train, explained
    total = 0
    pairs = list(zip(layer_pairs(model, x, y, ce), layer_pairs(model, xe, ye, margin_out),
                     strict=True))
    lams = lam if isinstance(lam, list) else [lam] * len(pairs)
    for ((a, d), (ae, de)), lam in zip(pairs, lams, strict=True):
        n = a.shape[0]
        la, qa = torch.linalg.eigh(a.T @ a / n)
        ls, qs = torch.linalg.eigh(d.T @ d / n)
        g = torch.einsum("no,ni->noi", d, a)  # per-example [out, in+1]
        v = torch.einsum("mo,mi->moi", de, ae)
        rot = torch.einsum("oj,noi,ik->njk", qs, g, qa)
        lam_k = (rot**2).mean(0) if strategy == "ekfac" else torch.outer(ls, la)
        if eigenvalues is not None:
            eigenvalues.append(lam_k)
        q = torch.kron(qs, qa)  # vec(Q_S^T G Q_A) = (Q_S x Q_A)^T vec(G), row-major
        fisher = q @ torch.diag(lam_k.reshape(-1)) @ q.T
        solve = torch.linalg.solve(fisher + lam * torch.eye(fisher.shape[0], dtype=a.dtype),
                                   g.reshape(n, -1).T)
        total = total - v.reshape(v.shape[0], -1) @ solve
    return total


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_scores_equal_the_dense_kronecker_fisher(strategy):
    model = mlp().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xe, ye = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=7)
    att = make_attributor(strategy).fit(ctx)
    explained = ArrayDataset(xe, ye)
    for lam in (1e-3, 1e-1):
        want = dense_scores(model, (x, y), (xe, ye), lam, strategy)
        got = att.score(explained, lam=lam).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    path = att.lambda_path(explained)
    assert path.block_sizes() == [5 * 7, 4 * 6, 3 * 5]
    layers: list = []
    dense_scores(model, (x, y), (xe, ye), 1.0, strategy, layers)
    assert att.module_heuristic_dampings() == pytest.approx(
        [0.1 * float(k.mean()) for k in layers], rel=1e-6)
    masks = (torch.rand(5, 30, generator=gen) < 0.5)
    preds = path.subset_predictions(masks, [1e-2])
    torch.testing.assert_close(preds[0], att.score(explained, lam=1e-2).double()
                               @ masks.double().T, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "seq", "conv", "tied"])
def test_streamed_training_side_equals_held_coordinates(monkeypatch, name):
    """Above the memory limit the training side is not held: scores come from the explained
    coordinates turned back into the parameter basis against plain gradients, and subset sums
    from masked gradient sums rotated once. Both equal the held rotated coordinates' on
    linear, embedding, convolution and tied-weight layers."""
    import tdatune.attributors.kfac as kfac_module
    from test_factored import ce, problem

    gen = torch.Generator().manual_seed(4)
    if name == "mlp":
        model = mlp().eval()
        x, y = torch.randn(20, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen)
        task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    else:
        model, x, y = problem(name)
        model.eval()
        task = Task(make_model=lambda: model, loss_fn=ce, output=ce)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=6)
    explained = ArrayDataset(x[:3], y[:3])
    masks = torch.rand(4, len(x), generator=gen) < 0.5
    held_att = make_attributor("ekfac").fit(ctx)
    held = held_att.score(explained, lam=1e-2)
    held_path = held_att.lambda_path(explained)
    held_preds = held_path.subset_predictions(masks, [1e-2, 1.0])
    monkeypatch.setattr(kfac_module, "COORDS_KEEP_LIMIT", 0)
    att = make_attributor("ekfac").fit(ctx)
    path = att.lambda_path(explained)
    assert path._held is None
    # a small row budget: every block's rows come a few examples at a time
    monkeypatch.setattr("tdatune.curvature.kfac.ROWS_BUDGET", 64)
    torch.testing.assert_close(att.score(explained, lam=1e-2), held, rtol=1e-4, atol=1e-6)
    preds = path.subset_predictions(masks, [1e-2, 1.0])
    torch.testing.assert_close(path.self_influence([1e-2]), held_path.self_influence([1e-2]),
                               rtol=1e-4, atol=1e-8)
    assert path._held is None  # no call gathered the training coordinates
    torch.testing.assert_close(preds, held_preds, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["seq", "conv", "tied"])
def test_ekfac_on_embeddings_convolutions_and_tied_weights(name):
    """On layers with many positions, one-hot inputs or shared weights, checked with loop
    gradients: EK-FAC's eigenvalues of each block add up to the block's trace, the mean
    squared gradient norm (the basis is orthonormal and the correction exact on the diagonal),
    and lambda x score -> -v . g as lambda grows (the inverse tends to I / lambda)."""
    from test_capture import loop_grads
    from test_factored import ce, plain_call, problem

    model, x, y = problem(name)
    model.eval()
    task = Task(make_model=lambda: model, loss_fn=ce, output=ce)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=4)
    att = make_attributor("ekfac").fit(ctx)
    g = loop_grads(model, plain_call, ce, x, y, len(x)).double()
    fit = att.fit_
    assert float(fit.sigma.sum()) == pytest.approx(float((g**2).sum(1).mean()), rel=1e-5)
    explained = ArrayDataset(x[:3], y[:3])
    lam = 1e6 * float(fit.sigma.max())
    want = -(g[:3] @ g.T)
    got = lam * att.score(explained, lam=lam).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_true_fisher_samples_labels_reproducibly():
    """fisher='true': the same seed gives the same fit, another seed or the empirical Fisher
    another one; a task without the built-in cross-entropy is refused by name."""
    model = mlp().eval()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    task = Task(make_model=mlp, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=8)
    a, b, c, emp = (make_attributor("ekfac", **kw).fit(ctx).fit_.sigma for kw in (
        {"fisher": "true", "seed": 1}, {"fisher": "true", "seed": 1},
        {"fisher": "true", "seed": 2}, {}))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, emp)
    custom = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    with pytest.raises(ValueError, match="fisher='true' needs the built-in cross-entropy"):
        make_attributor("kfac", fisher="true").fit(
            AttributionContext(custom, ArrayDataset(x, y), [model.state_dict()]))


class Bag(nn.Module):
    """Token embeddings averaged over positions, then a linear head without bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids).mean(1)))


def test_kfac_on_an_embedding_equals_its_one_hot_kronecker_fisher():
    """An embedding's K-FAC block by hand: A = diag(token counts) / positions (one-hot
    inputs, Q_A = I), S from the output gradients of the embedding, scores
    -sum V'_jk G'_jk / (l_S[j] l_A[k] + lam) with G' = Q_S^T G, G = sum_t delta_t onehot_t^T."""
    model = Bag().eval()
    gen = torch.Generator().manual_seed(6)
    ids, y = torch.randint(0, 7, (20, 5), generator=gen), torch.randint(0, 3, (20,), generator=gen)
    task = Task(make_model=Bag, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(ids, y), [model.state_dict()], chunk_size=6)
    att = make_attributor("kfac", layers=["emb"]).fit(ctx)

    def emb_grads(fn, x, t):  # per example [D, V] by autograd through the embedding's output
        rows = []
        for i in range(len(x)):
            e = model.emb(x[i : i + 1])
            out = model.head(torch.tanh(e.mean(1)))
            (d,) = torch.autograd.grad(fn(out, t[i : i + 1])[0], e)
            onehot = F.one_hot(x[i], 7).double()
            rows.append((d[0].double(), d[0].double().T @ onehot))
        return rows

    train = emb_grads(ce, ids, y)
    s = sum(d.T @ d for d, _ in train) / len(train)
    l_s, q_s = torch.linalg.eigh(s)
    l_a = torch.bincount(ids.reshape(-1), minlength=7).double() / ids.numel()
    g = torch.stack([q_s.T @ m for _, m in train])
    v = torch.stack([q_s.T @ m for _, m in emb_grads(margin_out, ids[:3], y[:3])])
    lam = 1e-3
    want = -torch.einsum("mjk,njk->mn", v / (torch.outer(l_s, l_a) + lam), g)
    got = att.score(ArrayDataset(ids[:3], y[:3]), lam=lam).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_a_dead_input_feature_accepts_every_lambda_of_its_own_default_grid(strategy):
    """An input feature that is always 0 gives the first layer's input factor a zero eigenvalue.
    Every lambda of ``default_lambda_grid(path.sigma)`` must be accepted (as the kernel paths
    accept theirs: before, ~1e-13 x top was refused as "singular"), and the scores at a middle
    lambda equal (at the smallest, correlate with) the dense damped solve worked here, whose
    null-space rows meet zero training gradients."""
    from tdatune.select.surrogate import default_lambda_grid

    model = mlp().eval()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xe, ye = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    x[:, 2], xe[:, 2] = 0.0, 0.0  # dead: a zero eigenvalue of the first input factor
    x[:, 4], xe[:, 4] = x[:, 4] * 1e-3, xe[:, 4] * 1e-3  # faint: the grid reaches 1e-13 x top
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    att = make_attributor(strategy).fit(AttributionContext(task, ArrayDataset(x, y),
                                                           [model.state_dict()], chunk_size=7))
    explained = ArrayDataset(xe, ye)
    path = att.lambda_path(explained)
    assert int((path.sigma <= 1e-12 * path.sigma.max()).sum()) >= 5  # the dead feature, block 1
    grid = default_lambda_grid(path.sigma, num=25)
    masks = torch.rand(6, 30, generator=gen) < 0.5
    preds = path.subset_predictions(masks, grid)
    assert bool(torch.isfinite(preds).all())
    mid = float(grid[12])
    want = dense_scores(model, (x, y), (xe, ye), mid, strategy)
    torch.testing.assert_close(att.score(explained, lam=mid).double(), want, rtol=1e-3,
                               atol=1e-6 * float(want.abs().max()))
    # at 1e-13 x top the float32 training coordinates limit agreement to a few per cent
    want = dense_scores(model, (x, y), (xe, ye), float(grid[0]), strategy).reshape(-1)
    got = att.score(explained, lam=float(grid[0])).double().reshape(-1)
    assert float(torch.corrcoef(torch.stack([got, want]))[0, 1]) > 0.99


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_one_damping_per_layer_equals_the_dense_solve_layer_by_layer(strategy):
    """``score(lam=[...])``, ``{layer: value}`` and ``"per_layer"`` against the dense Kronecker
    Fisher solved layer by layer with each layer's own damping (hand-picked, three decades
    apart, so a damping applied to the wrong layer shows)."""
    model = mlp().eval()
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xe, ye = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    att = make_attributor(strategy).fit(AttributionContext(task, ArrayDataset(x, y),
                                                           [model.state_dict()], chunk_size=7))
    explained = ArrayDataset(xe, ye)
    assert att.block_names == ["0", "2", "4"]
    lams = [2e-1, 1e-4, 3e-2]
    want = dense_scores(model, (x, y), (xe, ye), lams, strategy)
    tol = {"rtol": 1e-4, "atol": 1e-6 * float(want.abs().max())}
    torch.testing.assert_close(att.score(explained, lam=lams).double(), want, **tol)
    by_name = att.score(explained, lam={"4": 3e-2, "0": 2e-1, "*": 1e-4}).double()
    torch.testing.assert_close(by_name, want, **tol)
    layers: list = []
    dense_scores(model, (x, y), (xe, ye), 1.0, strategy, layers)
    heuristic = [0.1 * float(k.mean()) for k in layers]
    torch.testing.assert_close(att.score(explained, lam="per_layer").double(),
                               dense_scores(model, (x, y), (xe, ye), heuristic, strategy), **tol)
    half = [0.05 * float(k.mean()) for k in layers]
    torch.testing.assert_close(att.score(explained, lam="per_layer:0.05").double(),
                               dense_scores(model, (x, y), (xe, ye), half, strategy), **tol)
    masks = torch.rand(5, 30, generator=gen) < 0.5
    torch.testing.assert_close(att.lambda_path(explained).blockwise_predictions(masks, lams),
                               want @ masks.double().T, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="2 dampings given for 3 blocks"):
        att.score(explained, lam=[1e-3, 1e-2])
    with pytest.raises(ValueError, match="no block named 9; the blocks are: 0, 2, 4"):
        att.score(explained, lam={"9": 1e-3, "*": 1e-2})
    with pytest.raises(ValueError, match="no damping for block"):
        att.score(explained, lam={"0": 1e-3})
    with pytest.raises(ValueError, match="unknown damping rule"):
        att.score(explained, lam="per_module")


def test_logra_per_layer_damping_is_the_sum_of_single_layer_logras():
    """LoGra with one block per layer and one damping per layer equals the sum of LoGra fitted
    on each layer alone at that layer's damping."""
    model = mlp().eval()
    gen = torch.Generator().manual_seed(12)
    x, y = torch.randn(25, 6, generator=gen), torch.randint(0, 3, (25,), generator=gen)
    xe, ye = torch.randn(3, 6, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()])
    explained = ArrayDataset(xe, ye)
    lams = {"0": 5e-3, "2": 2e-1, "4": 1e-5}
    att = make_attributor("logra", proj_dim=None, blocks="layer").fit(ctx)  # no random factors
    got = att.score(explained, lam=lams).double()
    want = sum(make_attributor("logra", proj_dim=None, layers=[name]).fit(ctx).score(
        explained, lam=value).double() for name, value in lams.items())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def problem(seed: int, n_val: int) -> tuple:
    """The MLP at its fixed weights, 30 training, ``n_val`` validation and 4 explained examples
    drawn from ``seed``, and its task."""
    model = mlp().eval()
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    xv, yv = torch.randn(n_val, 6, generator=gen), torch.randint(0, 3, (n_val,), generator=gen)
    xe, ye = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    return model, (x, y), (xv, yv), (xe, ye), Task(make_model=mlp, loss_fn=ce, output=margin_out)


@pytest.mark.filterwarnings("ignore:the selected damping")
def test_attribute_picks_one_damping_per_layer_for_kfac_by_rule_per_layer():
    """``attribute()`` with K-FAC and rule per_layer: 0.1 x each layer's mean Kronecker
    eigenvalue (worked densely here), and the scores are the dense layer-by-layer solve at
    those dampings; an explicit {layer: value} is used as given."""
    from tdatune.study.attribute import attribute

    model, (x, y), (xv, yv), (xe, ye), task = problem(13, 6)
    result = attribute(task, (x, y), (xe, ye), val=(xv, yv), checkpoints=[model.state_dict()],
                       attributor="kfac", rule="per_layer")
    layers: list = []
    dense_scores(model, (x, y), (xe, ye), 1.0, "kfac", layers)
    want_lams = [0.1 * float(k.mean()) for k in layers]
    assert result.damping.rule == "per_layer"
    assert result.lam == pytest.approx(want_lams, rel=1e-6)
    assert result.damping.by_block() == pytest.approx(dict(zip(["0", "2", "4"], want_lams, strict=True)),
                                                      rel=1e-6)
    want = dense_scores(model, (x, y), (xe, ye), want_lams, "kfac")
    torch.testing.assert_close(result.scores.double(), want, rtol=1e-4,
                               atol=1e-6 * float(want.abs().max()))
    given = attribute(task, (x, y), (xe, ye), checkpoints=[model.state_dict()],
                      attributor="kfac", lam={"2": 0.5, "*": 1e-3})
    assert given.lam == [1e-3, 0.5, 1e-3] and given.damping is None
    plain = attribute(task, (x, y), (xe, ye), val=(xv, yv), checkpoints=[model.state_dict()],
                      attributor="kfac", rule="quantile")
    assert isinstance(plain.lam, float) and plain.damping.rule == "quantile"


@pytest.mark.filterwarnings("ignore:the selected damping")
def test_a_cells_default_selection_is_kfacs_agreement_damping_and_its_lds(tmp_path):
    """What a sweep cell records as the product's own choice for K-FAC (rule "agree"): the
    per-layer dampings 0.1 x each layer's mean eigenvalue (dense); the agreement curve, each
    grid lambda's dense K-FAC subset sums on the validation set against IFFIM's at its own
    damping (scipy's Spearman per example, averaged); the lowered damping exactly when the
    curve's first maximum is below the largest per-layer damping; and the LDS of the dense
    scores at the damping used."""
    import numpy as np
    from scipy.stats import spearmanr

    from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig
    from tdatune.select.damping_choice import choose_damping
    from tdatune.study.diagnosis import default_selection

    model, (x, y), (xv, yv), (xe, ye), task = problem(14, 5)
    context = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()])
    att = make_attributor("kfac").fit(context)
    rng = np.random.default_rng(0)
    masks = rng.random((10, 30)) < 0.5
    outputs = rng.standard_normal((10, 1, 4))
    gt = GroundTruth(torch.from_numpy(masks), outputs, GroundTruthConfig(n_subsets=10), tmp_path)
    record = default_selection(att, att.lambda_path(ArrayDataset(xe, ye)), ArrayDataset(xv, yv),
                               gt, 0.5)
    layers: list = []
    dense_scores(model, (x, y), (xe, ye), 1.0, "kfac", layers)
    lams = [0.1 * float(k.mean()) for k in layers]
    agreement = record["agreement"]
    assert record["rule"] == "agree"
    assert agreement["per_layer"] == pytest.approx(lams, rel=1e-6)
    # The curve, recomputed: the same 50 seeded half-subsets, dense K-FAC on the validation set.
    subsets = (torch.rand(50, 30, generator=torch.Generator().manual_seed(0)) < 0.5).numpy()
    reference = make_attributor("iffim").fit(context)
    ref_lam = choose_damping(reference, ArrayDataset(xv, yv)).lam
    ref = reference.lambda_path(ArrayDataset(xv, yv)).subset_predictions(
        torch.from_numpy(subsets), [ref_lam])[0].numpy()
    curve = []
    for lam in agreement["grid"]:
        pred = dense_scores(model, (x, y), (xv, yv), lam, "kfac").numpy() @ subsets.T
        curve.append(np.nanmean([spearmanr(pred[j], ref[j])[0] for j in range(len(xv))]))
    # (at the smallest lambda, 1e-2 x the smallest eigenvalue, float32 against the dense float64
    # solve moves a few ranks: 2e-4 here)
    assert agreement["agreement"] == pytest.approx(curve, abs=1e-3)
    assert agreement["agreement"][1:] == pytest.approx(curve[1:], abs=1e-6)
    pick = agreement["grid"][int(np.argmax(np.round(curve, 9)))]
    assert agreement["agree_lambda"] == pytest.approx(pick)
    assert agreement["lowered"] == (pick < max(lams))
    used = pick if agreement["lowered"] else lams
    assert record["lambda"] == pytest.approx(used, rel=1e-6)
    preds = dense_scores(model, (x, y), (xe, ye), used, "kfac").numpy() @ masks.T
    want = np.mean([spearmanr(preds[j], outputs[:, 0, j])[0] for j in range(4)])
    assert record["lds"] == pytest.approx(want, abs=1e-9)


def test_self_influence_with_one_damping_per_layer_equals_the_dense_solve():
    """Mislabel detection's self-influence g_i^T (F + Lambda)^-1 g_i with one damping per layer
    (and a plain lambda beside it in the same call) against the dense Kronecker Fisher."""
    model = mlp().eval()
    gen = torch.Generator().manual_seed(15)
    x, y = torch.randn(20, 6, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    att = make_attributor("kfac").fit(AttributionContext(task, ArrayDataset(x, y),
                                                         [model.state_dict()]))
    path = att.lambda_path(ArrayDataset(x[:2], y[:2]))
    lams = [3e-1, 2e-4, 5e-2]

    def dense(per_layer: list[float]) -> torch.Tensor:
        total = torch.zeros(20, dtype=torch.float64)
        for (a, d), lam in zip(layer_pairs(model, x, y, ce), per_layer, strict=True):
            la, qa = torch.linalg.eigh(a.T @ a / 20)
            ls, qs = torch.linalg.eigh(d.T @ d / 20)
            g = torch.einsum("no,ni->noi", d, a).reshape(20, -1)
            q = torch.kron(qs, qa)
            fisher = q @ torch.diag(torch.outer(ls, la).reshape(-1)) @ q.T
            solve = torch.linalg.solve(fisher + lam * torch.eye(len(fisher), dtype=a.dtype), g.T)
            total += (g * solve.T).sum(1)
        return total

    got = path.self_influence([lams, 1e-2])
    torch.testing.assert_close(got[0], dense(lams), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got[1], dense([1e-2] * 3), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_the_per_layer_rule_picks_exactly_what_score_reads_as_per_layer(strategy):
    """A dead input feature gives each layer null-space eigenvalues (1e-36 to 1e-18 here):
    the selection's "per_layer" and score(lam="per_layer") read the same raw spectrum, so
    the dampings are equal to the last bit (the selection used to zero the null space)."""
    from tdatune.select.damping_choice import choose_damping

    model = mlp().eval()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    x[:, 2] = 0
    task = Task(make_model=mlp, loss_fn=ce, output=margin_out)
    ctx = AttributionContext(task, ArrayDataset(x, y), [model.state_dict()], chunk_size=7)
    att = make_attributor(strategy).fit(ctx)
    val = ArrayDataset(x[:5], y[:5])
    assert bool(att.lambda_path(val).null_mask().any())
    assert choose_damping(att, val, rule="per_layer").lam == att.module_heuristic_dampings()
