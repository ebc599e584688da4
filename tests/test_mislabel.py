"""Mislabel detection: label flips with a known answer, AUC and top-fraction recall against
hand-worked rankings, and self-influence against dense and loop computations."""

from __future__ import annotations

import pytest
import torch

from attr_problems import loop_grads, problem, rel_err
from tdatune.attributors import make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.data.noise import flip_labels
from tdatune.evaluate.mislabel import detection, found_in_top, roc_auc


def test_auc_and_top_recall_hand_worked():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.4, 0.4])
    flagged = torch.tensor([0, 3])
    # pairs (flagged, clean): 0.9 beats all 3; 0.4 beats 0.1, loses to 0.8, ties 0.4 -> 4.5 / 6
    assert roc_auc(scores, flagged) == pytest.approx(0.75)
    assert roc_auc(-scores, flagged) == pytest.approx(0.25)
    assert found_in_top(scores, flagged, 0.4) == pytest.approx(0.5)  # top 2: #0, #2
    assert found_in_top(scores, flagged, 0.2) == pytest.approx(0.5)  # top 1: #0
    assert found_in_top(torch.zeros(5), flagged, 0.4) == pytest.approx(0.5)  # ties: #0, #1
    assert roc_auc(torch.zeros(5), flagged) == pytest.approx(0.5)
    assert detection(scores, flagged, 0.4) == {"auc": pytest.approx(0.75),
                                               "found_top": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="both flagged and unflagged"):
        roc_auc(scores, torch.arange(5))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(torch.tensor([1.0, float("nan"), 0.0]), torch.tensor([0]))


def test_auc_equals_brute_force_pair_count():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=gen).double()  # many ties
    flagged = torch.randperm(40, generator=gen)[:9]
    pos = torch.zeros(40, dtype=torch.bool)
    pos[flagged] = True
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a in scores[pos] for b in scores[~pos])
    assert roc_auc(scores, flagged) == pytest.approx(wins / (9 * 31))


def test_flip_labels_flips_exactly_the_reported_ones():
    y = torch.arange(200) % 4
    data = ArrayDataset(torch.randn(200, 3), y)
    noisy, flipped = flip_labels(data, 0.1, 4, seed=3)
    assert flipped.numel() == 20 and flipped.tolist() == sorted(set(flipped.tolist()))
    changed = (noisy.targets != y).nonzero().flatten()
    assert changed.tolist() == flipped.tolist()
    assert int(noisy.targets.max()) < 4 and torch.equal(noisy.inputs, data.inputs)
    again, flipped2 = flip_labels(data, 0.1, 4, seed=3)
    assert torch.equal(again.targets, noisy.targets) and torch.equal(flipped, flipped2)
    assert not torch.equal(flip_labels(data, 0.1, 4, seed=4)[1], flipped)
    hf = ArrayDataset({"input_ids": torch.zeros(200, 3, dtype=torch.long), "labels": y})
    hf_noisy, hf_flipped = flip_labels(hf, 0.1, 4, seed=3)  # the labels inside the batch
    assert torch.equal(hf_flipped, flipped) and torch.equal(hf_noisy.inputs["labels"],
                                                           noisy.targets)
    assert hf_noisy.whole_batch and torch.equal(hf_noisy.inputs["input_ids"], hf.inputs["input_ids"])
    with pytest.raises(ValueError, match="integer targets"):
        flip_labels(ArrayDataset(torch.randn(5, 2), torch.randn(5)), 0.2, 2)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        flip_labels(data, 1.5, 4)


def test_path_self_influence_equals_dense_solve():
    prob = problem("mlp")
    path = make_attributor("iffim").fit(prob.context).lambda_path(prob.explained)
    g = loop_grads(prob, prob.train, "loss")
    fisher = g.T @ g / len(g)
    lams = [1e-3, 1e-1]
    got = path.self_influence(lams)
    for row, lam in zip(got, lams, strict=True):
        ref = (g * torch.linalg.solve(fisher + lam * torch.eye(g.shape[1], dtype=g.dtype),
                                      g.T).T).sum(1)
        assert rel_err(row, ref) < 1e-6


def test_tracin_self_influence_equals_loop():
    prob = problem("mlp", learning_rates=True)
    att = make_attributor("tracin").fit(prob.context)
    ref = sum(prob.context.learning_rates[e] * loop_grads(prob, prob.train, "loss", e).square()
              .sum(1) for e in range(6))
    assert rel_err(att.self_influence(), ref) < 1e-4
