"""IFFIM, TRAK and LoGra against dense solves of their formulas; ensemble lambda-paths;
retraining-free lambda selection through ``surrogate_spectrum``."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from attr_problems import loop_grads, model64, problem, rel_err
from tdatune.attributors import EnsembleLambdaPath, LambdaPath, make_attributor
from tdatune.features.layerwise import layer_factors, layerwise_grads, linear_layers
from tdatune.select import select_lambda

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_fisher_if(v: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """-V (G^T G / n + lam I)^-1 G^T."""
    f = g.T @ g / g.shape[0]
    return -v @ torch.linalg.solve(f + lam * torch.eye(f.shape[0], dtype=f.dtype), g.T)


def test_iffim_identity_projection_equals_none():
    prob = problem("mlp")
    plain = make_attributor("iffim").fit(prob.context)
    ident = make_attributor("iffim", proj_kind="identity").fit(prob.context)
    for lam in (1e-4, 1e-1):
        a, b = plain.score(prob.explained, lam=lam), ident.score(prob.explained, lam=lam)
        assert rel_err(b, a) < 1e-4


def trak_dense(prob, attr, checkpoint: int, lam: float) -> torch.Tensor:
    """phi' (Phi^T Phi + n lam I)^-1 Phi^T Q with loop gradients and the member's own P."""
    member = attr.members[(0, prob.context.checkpoint_index(checkpoint))]
    proj = member.projector.matrix().double()
    phi = loop_grads(prob, prob.train, "margin", checkpoint) @ proj
    phi_x = loop_grads(prob, prob.explained, "output", checkpoint) @ proj
    m, params = model64(prob, checkpoint)
    probs = torch.softmax(functional_call(m, params, (prob.train.inputs.double(),)), dim=1)
    q = 1 - probs.gather(1, prob.train.targets[:, None]).squeeze(1)
    n, d = phi.shape
    kernel = phi.T @ phi + n * lam * torch.eye(d, dtype=phi.dtype)
    return phi_x @ torch.linalg.solve(kernel, phi.T * q)


def test_trak_one_checkpoint_equals_dense_formula():
    prob = problem("mlp")
    attr = make_attributor("trak", proj_dim=24).fit(prob.context)
    for lam in (0.0, 1e-3):
        assert rel_err(attr.score(prob.explained, lam=lam), trak_dense(prob, attr, -1, lam)) < 1e-3


def test_trak_ensemble_is_mean_of_members_and_grows_by_one():
    prob = problem("mlp")
    attr = make_attributor("trak", proj_dim=24, checkpoints=[-1]).fit(prob.context)
    attr.add_checkpoint(2)
    assert sorted(attr.members) == [(0, 2), (0, 5)]
    lam = 1e-3
    ref = 0.5 * (trak_dense(prob, attr, -1, lam) + trak_dense(prob, attr, 2, lam))
    assert rel_err(attr.score(prob.explained, lam=lam), ref) < 1e-3
    both = make_attributor("trak", proj_dim=24, checkpoints=[2, -1]).fit(prob.context)
    assert torch.allclose(both.score(prob.explained, lam=lam), attr.score(prob.explained, lam=lam))
    path = attr.lambda_path(prob.explained)
    assert isinstance(path, EnsembleLambdaPath) and path.sigma.numel() == 48


def test_trak_ensemble_over_independently_trained_models():
    from dataclasses import replace

    from tdatune.models.training import TrainRecipe, train_model

    prob = problem("mlp")
    recipe = TrainRecipe(optimizer="sgd", epochs=6, lr=0.1, batch_size=16, momentum=0.9,
                         weight_decay=1e-3)  # as in attr_problems, another seed
    other = train_model(prob.task, prob.train, recipe, seed=1)
    ctx2 = replace(prob.context, checkpoints=other.checkpoints, _models={})
    attr = make_attributor("trak", proj_dim=24).fit(prob.context)
    attr.add_model(ctx2)
    single2 = make_attributor("trak", proj_dim=24).fit(ctx2)
    single1 = make_attributor("trak", proj_dim=24).fit(prob.context)
    lam = 1e-3
    ref = 0.5 * (single1.score(prob.explained, lam=lam) + single2.score(prob.explained, lam=lam))
    assert rel_err(attr.score(prob.explained, lam=lam), ref) < 1e-5
    assert sorted(attr.members) == [(0, 5), (1, 5)]
    with pytest.raises(ValueError, match="same training set"):
        attr.add_model(problem("mlp", n_train=50).context)


def test_trak_default_projection_capped_on_small_models():
    prob = problem("lr")  # p = 650 > 512: projected; a tiny model keeps full gradients
    attr = make_attributor("trak").fit(prob.context)
    assert next(iter(attr.members.values())).projector.d == 512
    small = torch.nn.Linear(29, 10)  # p = 300
    params = dict(small.named_parameters())
    assert attr._projector(small, params) is None  # default 512 on p = 300: no projection
    explicit = make_attributor("trak", proj_dim=512).fit(prob.context)
    with pytest.raises(ValueError, match="proj_dim=512 exceeds the number of parameters p=300"):
        explicit._projector(small, params)


def test_ensemble_path_sums_members_and_allows_zero_lambda():
    gen = torch.Generator().manual_seed(0)
    members = [LambdaPath(torch.rand(k, dtype=torch.float64, generator=gen) + 0.1,
                          torch.randn(3, k, dtype=torch.float64, generator=gen),
                          torch.randn(7, k, dtype=torch.float64, generator=gen), sign=s)
               for k, s in ((4, -1.0), (5, 1.0))]
    ens = EnsembleLambdaPath(members, [0.3, 2.0])
    masks = torch.rand(6, 7, generator=gen) > 0.5
    for lam in (0.0, 0.2):
        ref = 0.3 * members[0].scores(lam) + 2.0 * members[1].scores(lam)
        assert torch.allclose(ens.scores(lam), ref)
        assert torch.allclose(ens.subset_predictions(masks, [lam])[0], ref @ masks.double().T)
    with pytest.raises(ValueError, match="singular"):
        LambdaPath(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.ones(1, 2),
                   torch.ones(3, 2)).scores(0.5)
    with pytest.raises(ValueError, match=">= 0"):
        ens.scores(-1.0)


def test_logra_identity_equals_iffim_on_same_layers():
    prob = problem("mlp")
    lam = 1e-2
    # all linear layers: LoGra with identity factors is IFFIM on the full gradient
    full = make_attributor("logra", proj_dim=None).fit(prob.context)
    iffim = make_attributor("iffim").fit(prob.context)
    assert rel_err(full.score(prob.explained, lam=lam), iffim.score(prob.explained, lam=lam)) < 1e-3
    # one layer: IFFIM restricted to that layer's weight and bias gradients (dense solve)
    names = ["net.2.weight", "net.2.bias"]
    g = loop_grads(prob, prob.train, "loss", names=names)
    v = loop_grads(prob, prob.explained, "output", names=names)
    one = make_attributor("logra", proj_dim=None, layers=["net.2"]).fit(prob.context)
    assert rel_err(one.score(prob.explained, lam=lam), dense_fisher_if(v, g, lam)) < 1e-3
    # block-diagonal: the sum of per-layer IFFIMs
    blocks = make_attributor("logra", proj_dim=None, blocks="layer").fit(prob.context)
    ref = sum(dense_fisher_if(loop_grads(prob, prob.explained, "output", names=[f"{m}.weight", f"{m}.bias"]),
                              loop_grads(prob, prob.train, "loss", names=[f"{m}.weight", f"{m}.bias"]), lam)
              for m in ("net.0", "net.2"))
    assert rel_err(blocks.score(prob.explained, lam=lam), ref) < 1e-3


def test_logra_projected_features_are_kronecker_products():
    prob = problem("mlp")
    model, _ = prob.context.model_at(-1)
    layers = linear_layers(model)
    factors = layer_factors(layers, 4, seed=1)
    feats = layerwise_grads(prob.task, model, prob.train, factors, layers, chunk_size=16)
    assert feats.shape == (len(prob.train), 4 * 4 + 4 * 4)
    offset = 0
    for (name, layer), f in zip(layers, factors, strict=True):
        g = loop_grads(prob, prob.train, "loss", names=[f"{name}.weight", f"{name}.bias"])
        w = g[:, : layer.weight.numel()].reshape(-1, layer.out_features, layer.in_features)
        b = g[:, layer.weight.numel() :].reshape(-1, layer.out_features, 1)
        full = torch.cat([w, b], dim=2)  # [n, out, in + 1]
        p_out = f.p_out.double() if f.p_out is not None else torch.eye(f.d_out, dtype=torch.float64)
        ref = (p_out.T @ full @ f.p_in.double()).reshape(len(prob.train), -1)
        got = feats[:, offset : offset + f.width].double()
        assert rel_err(got, ref) < 1e-4, name
        offset += f.width


def logra_dense_features(prob, data, fn: str, attr) -> torch.Tensor:
    """LoGra's projected features by the dense formula: per layer, P_out^T [dW | db] P_in of
    loop-autograd gradients (``fn``: 'loss' for training, 'output' for explained examples)."""
    blocks = []
    for (name, layer), f in zip(attr.layers, attr.factors, strict=True):
        g = loop_grads(prob, data, fn, attr.params["checkpoint"],
                       names=[f"{name}.weight", f"{name}.bias"])
        w = g[:, : layer.weight.numel()].reshape(-1, layer.out_features, layer.in_features)
        b = g[:, layer.weight.numel() :].reshape(-1, layer.out_features, 1)
        full = torch.cat([w, b], dim=2)
        p_out = (f.p_out.double() if f.p_out is not None
                 else torch.eye(f.d_out, dtype=torch.float64))
        p_in = f.p_in.double() if f.p_in is not None else torch.eye(f.d_in, dtype=torch.float64)
        blocks.append((p_out.T @ full @ p_in).reshape(len(data), -1))
    return torch.cat(blocks, dim=1)


@pytest.mark.parametrize("blocks", ["joint", "layer"])
def test_projected_logra_scores_and_output_features_equal_dense(blocks):
    prob = problem("mlp")
    attr = make_attributor("logra", proj_dim=4, blocks=blocks).fit(prob.context)
    phi = logra_dense_features(prob, prob.train, "loss", attr)
    phi_x = logra_dense_features(prob, prob.explained, "output", attr)
    assert rel_err(attr.explained_grads(prob.explained).double(), phi_x) < 1e-4
    widths = [f.width for f in attr.factors]
    cuts = [slice(sum(widths[:i]), sum(widths[: i + 1])) for i in range(len(widths))]
    for lam in (1e-3, 1e-1):
        if blocks == "joint":
            ref = dense_fisher_if(phi_x, phi, lam)
        else:  # block-diagonal Fisher: the sum of per-layer solves
            ref = sum(dense_fisher_if(phi_x[:, c], phi[:, c], lam) for c in cuts)
        assert rel_err(attr.score(prob.explained, lam=lam).double(), ref) < 1e-3


def independent_spectrum(name: str, attr, prob):
    """(sigma, explained coordinates, signed training coordinates) rebuilt from the fitted
    eigensystems and loop-autograd (or dense projected) explained gradients, not through
    ``lambda_path``: scores = (c / (sigma + lam)) @ train.T."""
    if name == "iffim":
        v = loop_grads(prob, prob.explained, "output")
        if attr.eigen.grads is None:  # kernel form from the hooks' factors: V G^T by the loop
            g = loop_grads(prob, prob.train, "loss")
            return (attr.eigen.sigma, attr.eigen.coords_from_products(v @ g.T),
                    -attr.eigen.train_coords)
        return attr.eigen.sigma, attr.eigen.coords(v), -attr.eigen.train_coords
    if name == "logra":
        v = logra_dense_features(prob, prob.explained, "output", attr)
        parts = [(e.sigma, e.coords(v[:, s]), -e.train_coords)
                 for e, s in zip(attr.eigens, attr.slices, strict=True)]
    else:  # TRAK: the mean over members of phi_x' U / (sigma + lam) (Q-weighted train) / n
        keys = sorted(attr.members)
        parts = []
        for key in keys:
            member = attr.members[key]
            v = loop_grads(prob, prob.explained, "output", member.checkpoint)
            v = v @ member.projector.matrix().double()
            train = member.eigen.train_coords * (member.q[:, None] / member.eigen.n) / len(keys)
            parts.append((member.eigen.sigma, member.eigen.coords(v), train))
    sigma, coords, train = zip(*parts, strict=True)
    f64 = torch.float64
    return (torch.cat([t.to(f64) for t in sigma]), torch.cat([t.to(f64) for t in coords], 1),
            torch.cat([t.to(f64) for t in train], 1))


@pytest.mark.parametrize("name,params", [
    ("iffim", {}), ("trak", {"proj_dim": 24}), ("trak", {"proj_dim": 24, "checkpoints": [2, -1]}),
    ("logra", {"proj_dim": 4}), ("logra", {"proj_dim": 4, "blocks": "layer"})])
def test_surrogate_spectrum_is_the_spectrum_scores_use(name, params):
    prob = problem("mlp")
    attr = make_attributor(name, **params).fit(prob.context)
    sigma, coords = attr.surrogate_spectrum(prob.explained)
    sigma_ref, coords_ref, train_ref = independent_spectrum(name, attr, prob)
    torch.testing.assert_close(sigma.double(), sigma_ref, rtol=1e-10, atol=0)
    assert rel_err(coords.double(), coords_ref) < 1e-4
    for lam in (1e-3, 1e-1):
        # scores rebuilt from the spectrum handed to the surrogate equal score()
        rebuilt = (coords.double() / (sigma.double() + lam)) @ train_ref.T
        assert rel_err(attr.score(prob.explained, lam=lam).double(), rebuilt) < 1e-4
    selected = select_lambda(sigma, coords)
    reference = select_lambda(sigma_ref, coords_ref)
    assert selected.status == reference.status == "crossed"
    assert selected.lam == pytest.approx(reference.lam, rel=1e-3)
    assert torch.isfinite(attr.score(prob.explained, lam=selected.lam)).all()


def test_surrogate_spectrum_refused_for_non_eigen_methods():
    prob = problem("lr")
    with pytest.raises(NotImplementedError, match="not eigen-based"):
        make_attributor("tracin").fit(prob.context).surrogate_spectrum(prob.explained)


class TinySeq(torch.nn.Module):
    """Embedding + two linear layers over token positions: [B, T] -> [B, T, V]."""

    def __init__(self, vocab: int = 7, width: int = 5) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(tokens))))


def test_layerwise_features_sum_over_sequence_positions():
    from tdatune.data.base import ArrayDataset
    from tdatune.models.task import Task

    torch.manual_seed(0)
    model = TinySeq()
    task = Task(make_model=TinySeq, name="tiny-seq")
    gen = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randint(0, 7, (6, 4), generator=gen),
                        torch.randint(0, 7, (6, 4), generator=gen))
    layers = linear_layers(model)
    assert [n for n, _ in layers] == ["hidden", "head"]
    feats = layerwise_grads(task, model, data, layer_factors(layers, None), layers, chunk_size=4)
    for i in range(len(data)):
        model.zero_grad()
        task.loss_fn(model(data.inputs[i : i + 1]), data.targets[i : i + 1])[0].backward()
        hidden = torch.cat([model.hidden.weight.grad, model.hidden.bias.grad[:, None]], dim=1)
        ref = torch.cat([hidden.reshape(-1), model.head.weight.grad.reshape(-1)])
        assert torch.allclose(feats[i], ref, atol=1e-6)


def test_layerwise_adds_up_a_layer_run_twice():
    """A layer called twice in one pass: its identity-factor features are the sum of both
    calls' contributions, the single-example autograd gradient of its [W | b]."""
    from tdatune.data.base import ArrayDataset
    from tdatune.models.task import Task

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    task = Task(make_model=Twice, name="twice")
    data = ArrayDataset(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    layers = linear_layers(model)
    feats = layerwise_grads(task, model, data, layer_factors(layers, None), layers)
    for i in range(len(data)):
        model.zero_grad()
        task.loss_fn(model(data.inputs[i : i + 1]), data.targets[i : i + 1])[0].backward()
        ref = torch.cat([model.lin.weight.grad, model.lin.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(feats[i], ref.reshape(-1), rtol=1e-4, atol=1e-6)


def test_blockwise_predictions_use_each_blocks_own_damping():
    """Two Fisher blocks with different dampings against dense solves of each block."""
    from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath

    g = torch.Generator().manual_seed(7)
    n, m, M = 20, 3, 6
    blocks, paths = [], []
    for p, scale in ((4, 1.0), (3, 1e-3)):
        G = torch.randn(n, p, generator=g, dtype=torch.float64) * scale
        V = torch.randn(m, p, generator=g, dtype=torch.float64) * scale
        F = G.T @ G / n
        sigma, U = torch.linalg.eigh(F)
        blocks.append((G, V, F))
        paths.append(LambdaPath(sigma, V @ U, G @ U))
    path = EnsembleLambdaPath(paths, [1.0, 1.0])
    masks = torch.rand(M, n, generator=g) < 0.5
    lams = (1e-1, 1e-7)
    want = sum(-(V @ torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=torch.float64),
                                        G.T)) @ masks.double().T
               for (G, V, F), lam in zip(blocks, lams, strict=True))
    got = path.blockwise_predictions(masks, lams)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="2 blocks"):
        path.blockwise_predictions(masks, [1.0])


def test_a_block_of_tiny_curvature_takes_a_tiny_damping():
    """Each block's damping is checked against that block's eigenvalues: a block whose
    eigenvalues are 1e-20 of the other's may take lambda = 1e-22 (not singular for it)."""
    from tdatune.attributors.lambda_path import EnsembleLambdaPath, LambdaPath

    big = LambdaPath(torch.tensor([1.0, 2.0], dtype=torch.float64),
                     torch.ones(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    tiny = LambdaPath(torch.tensor([1e-20], dtype=torch.float64),
                      torch.ones(1, 1, dtype=torch.float64),
                      torch.tensor([[1.0], [0.0]], dtype=torch.float64))
    path = EnsembleLambdaPath([big, tiny], [1.0, 1.0])
    masks = torch.tensor([[True, False]])
    got = path.blockwise_predictions(masks, [0.5, 1e-22])
    want = -(1.0 / 1.5 + 1.0 / (1e-20 + 1e-22))
    torch.testing.assert_close(got, torch.tensor([[want]], dtype=torch.float64))
    with pytest.raises(ValueError, match=">= 0"):
        path.blockwise_predictions(masks, [0.5, -1e-20])
