"""Beyond LDS in a sweep: mislabel detection on flipped labels, removal and leave-one-out by
retraining, checked against dense self-influence, brute-force pair counts and retraining by
hand; the spec's checks; the report's table and figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attr_problems import Problem, loop_grads
from beyond_checks import brute_auc, quiet, quiet_sweep, retrained_output
from tdatune.data.digits import load_digits_splits
from tdatune.evaluate.removal import (
    RemovalConfig,
    loo_masks,
    random_removals,
    removal_effects,
    top_removals,
)
from tdatune.models.training import load_model, train_model
from tdatune.study.report import write_report
from tdatune.study.sweep import Workspace, spec_from_dict

SPEC = {
    "name": "beyond", "grid_points": 5,
    "settings": [{"name": "digits-lr", "label": "noisy", "sizes": [80, 20, 20],
                  "label_noise": 0.1}],
    "groundtruth": {"n_subsets": 4},
    "removal": {"examples": 2, "remove": 6, "lambdas": 2, "random": 2, "loo": True},
    "methods": [{"name": "iffim"}, {"name": "tracin"}],
}


def test_removal_sets_and_effects_by_hand():
    scores = torch.tensor([[0.5, 3.0, -1.0, 2.0], [1.0, 0.0, 0.2, -4.0]])
    assert top_removals(scores, 2).tolist() == [[True, False, True, False],
                                                [False, True, False, True]]
    rand = random_removals(10, 3, 4, seed=1)
    assert rand.shape == (4, 10) and (rand.sum(1) == 7).all()
    assert torch.equal(rand, random_removals(10, 3, 4, seed=1))
    assert loo_masks(3).tolist() == [[False, True, True], [True, False, True],
                                     [True, True, False], [True, True, True]]
    # 2 dampings x 2 explained, 2 random sets, the full model; row = model, column = example
    out = np.array([[1.0, 9.0], [9.0, 2.0],    # damping 0: sets of example 0, example 1
                    [0.0, 9.0], [9.0, 1.0],    # damping 1
                    [3.0, 4.0], [5.0, 6.0],    # random
                    [4.5, 5.5]])               # all data
    got = removal_effects(out, 2, 2)
    # random mean (4, 5); effect = mean_j(rand_j - removed_j); drop = mean_j(full_j - removed_j)
    assert got["effect"] == pytest.approx([(3 + 3) / 2, (4 + 4) / 2])
    assert got["drop"] == pytest.approx([(3.5 + 3.5) / 2, (4.5 + 4.5) / 2])
    assert got["random_drop"] == pytest.approx(0.5)
    assert got["effect_sem"] == pytest.approx([0.0, 0.0])  # both examples moved alike
    # one damping, example effects 3 and 2: mean 2.5, standard error sd / sqrt(2) = 0.5
    got = removal_effects(np.array([[1.0, 9.0], [9.0, 3.0], [3.0, 4.0], [5.0, 6.0],
                                    [0.0, 0.0]]), 2, 2)
    assert got["effect"] == pytest.approx([2.5]) and got["effect_sem"] == pytest.approx([0.5])
    with pytest.raises(ValueError, match="random must be >= 2"):
        RemovalConfig(random=1)
    with pytest.raises(ValueError, match="cannot remove 4 of 4"):
        top_removals(scores, 4)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("beyond") / "out"
    spec, outcome = quiet_sweep(SPEC, out)
    return spec, out, {c["method"]: c for c in outcome}


def test_mislabel_and_removal_cells_equal_independent_computations(swept):
    spec, out, cells = swept
    trained = Workspace(spec, out, "cpu", False, quiet).trained("noisy")
    clean = load_digits_splits(n_train=80, n_val=20, n_test=20, seed=0).train.targets
    flipped = (trained.splits.train.targets != clean).nonzero().flatten()
    assert flipped.numel() == 8  # 10 % of 80, each moved to another class

    # self-influence by a dense solve on loop gradients; AUC by counting pairs
    prob = Problem(trained.task, trained.splits.train, trained.splits.test, trained.context, 0.0)
    g = loop_grads(prob, prob.train, "loss")
    fisher = g.T @ g / len(g)
    mis = cells["iffim"]["mislabel"]
    assert mis["n_flipped"] == 8
    for row in mis["rows"][::2]:
        inv = torch.linalg.solve(fisher + row["lam"] * torch.eye(g.shape[1], dtype=g.dtype), g.T)
        self_inf = (g * inv.T).sum(1)
        assert row["auc"] == pytest.approx(brute_auc(self_inf, flipped), abs=1e-9)
        top = torch.sort(-self_inf, stable=True).indices[:8]
        assert row["found_top"] == pytest.approx(np.isin(top, flipped).sum() / 8)

    # TracIn: sum over checkpoints of lr x squared loss-gradient norms
    lrs = trained.context.learning_rates or [1.0] * len(trained.context.checkpoints)
    ref = sum(lrs[e] * loop_grads(prob, prob.train, "loss", e).square().sum(1)
              for e in range(max(0, len(lrs) - 10), len(lrs)))
    assert cells["tracin"]["mislabel"]["rows"][0]["auc"] == pytest.approx(
        brute_auc(ref, flipped), abs=1e-9)

    # removal: retrain by hand without each explained example's top 6 by the dense scores
    v = loop_grads(prob, trained.splits.test.subset([0, 1]), "output")
    full = [retrained_output(trained, torch.ones(80, dtype=torch.bool), j) for j in (0, 1)]
    row = next(r for r in cells["iffim"]["removal"]["rows"] if r["rule"] == "grid")
    scores = -v @ torch.linalg.solve(fisher + row["lam"] * torch.eye(g.shape[1], dtype=g.dtype),
                                     g.T)
    keep = torch.ones(2, 80, dtype=torch.bool)
    keep.scatter_(1, scores.topk(6, dim=1).indices, False)
    drop = np.mean([full[j] - retrained_output(trained, keep[j], j) for j in (0, 1)])
    assert row["drop"] == pytest.approx(drop, rel=0.02, abs=1e-3)

    # leave-one-out: Pearson of the scores with f_full - f_{-i}, every i retrained by hand
    loo = cells["iffim"]["removal"]["loo"]
    assert [r["lam"] for r in loo] == [r["lam"] for r in mis["rows"]]
    delta = np.array([[full[j] - retrained_output(trained, torch.arange(80) != i, j)
                       for i in range(80)] for j in (0, 1)])
    mid = loo[len(loo) // 2]
    scores = -v @ torch.linalg.solve(fisher + mid["lam"] * torch.eye(g.shape[1], dtype=g.dtype),
                                     g.T)
    pearson = np.mean([np.corrcoef(scores[j].numpy(), delta[j])[0, 1] for j in (0, 1)])
    assert mid["pearson"] == pytest.approx(pearson, abs=0.02)


def test_explain_a_sweep_ranks_by_dense_influence(swept, tmp_path, capsys):
    import re

    from tdatune.cli import main
    from test_explain import page_cards

    spec, out, _ = swept
    page = tmp_path / "page"
    assert main(["explain", str(out), "--out", str(page), "--quiet"]) == 2
    assert "choose one with --attributor: iffim, tracin" in capsys.readouterr().err
    assert main(["explain", str(out), "--attributor", "iffim", "--out", str(page),
                 "--examples", "0", "3", "--top", "4", "--quiet"]) == 0
    html = (page / "index.html").read_text()
    lam = float(re.search(r"lambda ([0-9.e+-]+) \(selected without retraining\)", html).group(1))
    trained = Workspace(spec, out, "cpu", False, quiet).trained("noisy")
    prob = Problem(trained.task, trained.splits.train, trained.splits.test.subset([0, 3]),
                   trained.context, 0.0)
    g = loop_grads(prob, prob.train, "loss")
    v = loop_grads(prob, prob.explained, "output")
    dense = -v @ torch.linalg.solve(g.T @ g / len(g) + lam * torch.eye(g.shape[1],
                                                                       dtype=g.dtype), g.T)
    for row, cards in enumerate(page_cards(html)):
        order = torch.argsort(dense[row], descending=True)
        assert [j for r, j in cards if r == "proponent"] == order[:4].tolist()


def test_spec_checks_label_noise_and_removal():
    def bad(change, match):
        raw = {**SPEC, **change}
        with pytest.raises(ValueError, match=match):
            spec_from_dict(raw)

    bad({"settings": [{"name": "digits-lr", "label_noise": 1.5}]}, "label_noise of digits-lr")
    bad({"removal": {"examples": 0}}, r"\[removal\]: removal examples must be")
    bad({"removal": {"exampels": 2}}, "exampels")
    bad({"removal": {"settings": ["nope"]}}, "nope")
    bad({"removal": {"loo": ["other"]}}, "loo names other")
    spec = spec_from_dict({**SPEC, "removal": {"settings": ["noisy"]}})
    assert spec.removal_on("noisy") == RemovalConfig()
    assert spec.removal_on("other") is None
    spec = spec_from_dict({**SPEC, "removal": {"loo": ["noisy"]}})
    assert spec.removal_on("noisy") == RemovalConfig(loo=True)


def test_a_changed_removal_or_label_noise_changes_the_cells_definition(monkeypatch):
    import tdatune.study.sweep as sweep_module
    from tdatune.study.sweep import expand_cells

    base = spec_from_dict(SPEC)
    cell = expand_cells(base)[0]
    before = cell.definition(base)
    monkeypatch.setattr(sweep_module, "REMOVAL_FORMAT", sweep_module.REMOVAL_FORMAT + 1)
    assert cell.definition(base) != before  # removal measured another way: recomputed
    monkeypatch.undo()
    changed = spec_from_dict({**SPEC, "removal": {**SPEC["removal"], "remove": 7}})
    assert cell.definition(changed) != cell.definition(base)
    noisier = spec_from_dict({**SPEC, "settings": [{**SPEC["settings"][0], "label_noise": 0.2}]})
    assert cell.definition(noisier) != cell.definition(base)
    clean = spec_from_dict({**SPEC, "settings": [{**SPEC["settings"][0], "label_noise": None}]})
    assert "label_noise" not in cell.definition(clean)["setting"]  # old cells stay current


def test_report_has_the_beyond_table_and_figure(swept):
    _, out, _ = swept
    report = write_report(out).read_text()
    assert "## Beyond LDS" in report
    assert "| noisy | iffim | mislabel AUC |" in report
    assert "| noisy | iffim | removal effect |" in report
    assert "| noisy | iffim | LOO Pearson |" in report
    assert (out / "figures" / "beyond_iffim.png").stat().st_size > 1000
    assert (out / "beyond.csv").exists()


def test_retrain_sets_of_two_sizes_on_the_batched_backend(tmp_path):
    """Removal sets and the full set differ in size: each size is its own batched run, and the
    full set's row and the second removal set's equal models trained by hand with seed 0:
    every set is trained with the same seeds, whatever its place among the others."""
    from dataclasses import replace

    from tdatune.evaluate.removal import retrain_sets
    from tdatune.evaluate.runners import resolve_backend
    from tdatune.settings.registry import get_setting

    setting = get_setting("digits-mlp")
    splits, task = setting.build(sizes=(60, 10, 10))
    recipe = replace(setting.recipe, epochs=2)
    assert resolve_backend("auto", task, recipe, splits.train) == "batched"
    masks = torch.ones(4, 60, dtype=torch.bool)
    masks[0, :5] = False
    masks[1, 5:10] = False
    masks[3, :5] = False  # the same set as row 0: trained once
    explained = splits.test.subset([0, 1])
    out = retrain_sets(task, recipe, splits.train, explained, masks, 1, 0, tmp_path)
    assert out.shape == (4, 2) and np.array_equal(out[0], out[3])
    assert not np.allclose(out[0], out[1])
    for row, keep in ((2, masks[2]), (1, masks[1])):
        state = train_model(task, splits.train.subset(keep), recipe, 0).state
        model, params = load_model(task, state, "cpu")
        ref = task.evaluate(model, params, explained.inputs, explained.targets).double().numpy()
        np.testing.assert_allclose(out[row], ref, rtol=1e-4, atol=1e-5)


def test_retrain_sets_with_more_seeds_in_the_same_directory(tmp_path):
    """Asking the same removal sets again with two retraining seeds (a changed ``[removal]``)
    in the directory of the one-seed run retrains, and each row is the mean of the models
    trained by hand with the ground truth's seeds (0 and 10,000 for the first set)."""
    from dataclasses import replace

    from tdatune.evaluate.removal import retrain_sets
    from tdatune.settings.registry import get_setting

    setting = get_setting("digits-mlp")
    splits, task = setting.build(sizes=(40, 10, 10))
    recipe = replace(setting.recipe, epochs=2)
    masks = torch.ones(2, 40, dtype=torch.bool)
    masks[0, :5] = False
    explained = splits.test.subset([0, 1])
    one = retrain_sets(task, recipe, splits.train, explained, masks, 1, 0, tmp_path)
    two = retrain_sets(task, recipe, splits.train, explained, masks, 2, 0, tmp_path)

    def by_hand(seed):
        state = train_model(task, splits.train, recipe, seed).state
        model, params = load_model(task, state, "cpu")
        return task.evaluate(model, params, explained.inputs, explained.targets).double().numpy()

    np.testing.assert_allclose(one[1], by_hand(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two[1], (by_hand(0) + by_hand(10_000)) / 2, rtol=1e-4, atol=1e-5)
    assert not np.allclose(one[1], two[1])
    from tdatune.evaluate.groundtruth import PairedSeeds, load_ground_truth

    stored = [load_ground_truth(d).config for d in sorted(tmp_path.iterdir())]
    assert {type(c) for c in stored} == {PairedSeeds}
    assert sorted(c.seeds_per_subset for c in stored) == [1, 1, 2, 2]
