"""Numbers an audit found unchecked, each against a computation made here independently of
the code under test (by hand, a dense solve, numpy, a brute-force count)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import tdatune.attributors.if_arnoldi as if_arnoldi_module
import tdatune.evaluate.calibrate as calibrate_module
import tdatune.study.lambda_study as lambda_study_module
import tdatune.study.sweep as sweep_module
from attr_problems import dense_hessian, problem
from tdatune.attributors import make_attributor
from tdatune.attributors.lambda_path import LambdaPath
from tdatune.curvature.arnoldi import top_eigenpairs
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.calibrate import calibration_draws
from tdatune.evaluate.removal import random_removals
from tdatune.features.factored import KroneckerProjector
from tdatune.features.layerwise import layer_factors, linear_layers
from tdatune.select.reliability import crossing_slope, reliability
from tdatune.study.beyond import _picks
from tdatune.study.spec import MethodSpec, grid_values
from tdatune.study.sweep import Cell, expand_cells, spec_from_dict


def _removed(keep: torch.Tensor) -> list[frozenset[int]]:
    """The removed indices of each keep-mask row, read off with a Python loop."""
    return [frozenset(i for i, k in enumerate(row.tolist()) if not k) for row in keep]


# 1 -------------------------------------------------------------------------------------------

def test_random_removal_baselines_are_distinct_sized_uniform_and_seeded():
    """Every baseline removes exactly ``remove`` distinct training examples and keeps the rest;
    the baselines of one call differ from each other; over many draws every index and every
    3-subset of 10 is removed about equally often (a brute-force count); one seed gives the same
    sets, other seeds other sets."""
    n, remove, count = 80, 6, 5
    keep = random_removals(n, remove, count, seed=3)
    assert keep.shape == (count, n) and keep.dtype == torch.bool
    sets = _removed(keep)
    for s in sets:
        assert len(s) == remove and all(0 <= i < n for i in s)
    assert len(set(sets)) == count  # C(80, 6) ~ 3e8: five draws never coincide
    # brute-force frequencies: 10 examples, 3 removed, 3000 draws
    many = _removed(random_removals(10, 3, 3000, seed=0))
    per_index = np.zeros(10)
    per_subset: dict[frozenset[int], int] = {}
    for s in many:
        assert len(s) == 3
        for i in s:
            per_index[i] += 1
        per_subset[s] = per_subset.get(s, 0) + 1
    # each index: binomial(3000, 0.3): mean 900, sd 25; each subset: mean 25 (of C(10, 3) = 120)
    assert np.abs(per_index - 900).max() < 150, per_index
    assert set(per_subset) == {frozenset(c) for c in itertools.combinations(range(10), 3)}
    assert max(per_subset.values()) < 70
    # seeded per call: the same seed the same sets, ten seeds ten different families
    assert torch.equal(random_removals(n, remove, count, seed=3), keep)
    families = {tuple(sorted(map(tuple, map(sorted, _removed(random_removals(n, remove, count, s))))))
                for s in range(10)}
    assert len(families) == 10


# 2 -------------------------------------------------------------------------------------------

def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, axis=-1), axis=-1).astype(np.float64)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def _curve(preds: np.ndarray, outputs: np.ndarray, cols: list[int]) -> np.ndarray:
    """Mean over explained examples of Spearman over the subsets ``cols``, per lambda."""
    return np.array([np.mean([_spearman(preds[lam, j, cols], outputs[cols, j])
                              for j in range(preds.shape[1])]) for lam in range(preds.shape[0])])


def _smooth(curve: np.ndarray) -> np.ndarray:
    out = []
    for i in range(len(curve)):
        window = curve[max(i - 1, 0): i + 2]
        out.append(sum(window) / len(window))
    return np.array(out)


def test_calibration_judges_on_subsets_it_never_saw(monkeypatch):
    """Each draw of :func:`calibration_draws` chooses on k subsets and judges on the other M - k:
    no judging mask equals a choosing mask, together they are all M, and the returned gaps are
    those recomputed here (numpy Spearman) on exactly those subsets. The study's calibration
    (``lambda_study._calibrate``) likewise judges on masks it did not choose with."""
    gen = torch.Generator().manual_seed(4)
    n, m, big_m, k = 12, 3, 14, 5
    rows: list[tuple[bool, ...]] = []
    while len(rows) < big_m:  # distinct random half-subsets
        row = tuple(bool(b) for b in (torch.rand(n, generator=gen) < 0.5).tolist())
        if row not in rows and 2 <= sum(row) <= n - 2:
            rows.append(row)
    masks = torch.tensor(rows)
    sigma = torch.tensor([9.0, 2.0, 0.4, 0.05], dtype=torch.float64)
    c = torch.randn(m, 4, generator=gen, dtype=torch.float64)
    a = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    lambdas = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    # subset predictions by hand: sum over S of -c diag(1/(sigma+lam)) a_i
    preds = np.stack([(-(c / (sigma + lam)) @ a.T).numpy() @ masks.double().numpy().T
                      for lam in lambdas])  # [L, m, M]
    outputs = (masks.double() @ a[:, :1]).numpy() @ np.ones((1, m)) \
        + np.random.default_rng(1).normal(size=(big_m, m))
    calls: list[np.ndarray] = []
    original = calibrate_module._lds_curve

    def spy(p: np.ndarray, o: np.ndarray, cols: np.ndarray) -> np.ndarray:
        calls.append(np.array(cols))
        return original(p, o, cols)

    monkeypatch.setattr(calibrate_module, "_lds_curve", spy)
    draws = 6
    gaps = calibration_draws(preds, outputs, k, draws=draws, seed=2)
    assert len(calls) == 2 * draws
    seen_sets = set()
    for d in range(draws):
        seen, rest = calls[2 * d], calls[2 * d + 1]
        assert len(seen) == k and len(rest) == big_m - k
        seen_masks = {tuple(r) for r in masks[seen].tolist()}
        rest_masks = {tuple(r) for r in masks[rest].tolist()}
        assert len(seen_masks) == k and len(rest_masks) == big_m - k
        assert not seen_masks & rest_masks, f"draw {d} judges on a mask it chose with"
        assert seen_masks | rest_masks == set(rows)
        seen_sets.add(frozenset(seen_masks))
        # the gaps, recomputed on exactly these subsets
        seen_curve, rest_curve = _curve(preds, outputs, list(seen)), _curve(preds, outputs, list(rest))
        want_raw = rest_curve.max() - rest_curve[int(np.argmax(seen_curve))]
        want_smooth = rest_curve.max() - rest_curve[int(np.argmax(_smooth(seen_curve)))]
        assert gaps["argmax"][d] == pytest.approx(want_raw, abs=1e-12)
        assert gaps["smoothed"][d] == pytest.approx(want_smooth, abs=1e-12)
    assert len(seen_sets) > 1  # the draws are not one subset drawn again

    # the study's calibration: first k masks choose, the others judge
    used: dict[str, list[torch.Tensor]] = {"choose": [], "judge": []}
    orig_calibrate, orig_lds = lambda_study_module.calibrate_lambda, lambda_study_module.lds_path

    def spy_calibrate(path: Any, chosen: torch.Tensor, *args: Any, **kw: Any) -> Any:
        used["choose"].append(chosen.clone())
        return orig_calibrate(path, chosen, *args, **kw)

    def spy_lds(path: Any, judged: torch.Tensor, *args: Any, **kw: Any) -> Any:
        used["judge"].append(judged.clone())
        return orig_lds(path, judged, *args, **kw)

    monkeypatch.setattr(lambda_study_module, "calibrate_lambda", spy_calibrate)
    monkeypatch.setattr(lambda_study_module, "lds_path", spy_lds)
    path = LambdaPath(sigma, c, a)
    gt = SimpleNamespace(masks=masks, mean_outputs=outputs)
    grid = torch.tensor(lambdas, dtype=torch.float64)
    curve = [SimpleNamespace(mean=0.0) for _ in lambdas]
    out = lambda_study_module._calibrate(4, path, gt, grid, curve)
    assert "lds_unseen" in out
    (chosen,), (judged,) = used["choose"], used["judge"]
    chosen_rows = {tuple(r) for r in chosen.tolist()}
    judged_rows = {tuple(r) for r in judged.tolist()}
    assert len(chosen_rows) == 4 and len(judged_rows) == big_m - 4
    assert not chosen_rows & judged_rows and chosen_rows | judged_rows == set(rows)


# 3 -------------------------------------------------------------------------------------------

def test_removal_lambda_picks_along_the_grid_by_hand():
    """``count`` grid lambdas nearest to evenly spaced index positions j (L - 1) / (count - 1)
    (worked here with exact fractions, no ties): grids where floor, ceil, round and an
    off-by-one in L all give different indices."""
    def nearest(length: int, count: int) -> list[int]:
        count = min(count, length)
        if count == 1:
            return [0]
        out = []
        for j in range(count):
            x = Fraction(j * (length - 1), count - 1)
            assert x.denominator != 2  # no ties in these cases
            out.append(math.floor(x + Fraction(1, 2)))
        return sorted(set(out))

    cases = {(9, 4): [0, 3, 5, 8],       # 0, 2.67, 5.33, 8: floor 2, 5; ceil 3, 6
             (6, 4): [0, 2, 3, 5],       # 0, 1.67, 3.33, 5
             (11, 4): [0, 3, 7, 10],     # 0, 3.33, 6.67, 10
             (13, 5): [0, 3, 6, 9, 12],  # exact
             (3, 5): [0, 1, 2],          # more picks than grid points: every one
             (7, 1): [0]}
    for (length, count), want in cases.items():
        assert nearest(length, count) == want, (length, count)
        grid = list(np.logspace(-4, 2, length))
        assert _picks(grid, count) == [grid[i] for i in want], (length, count)
    assert _picks([], 3) == []


# 4 -------------------------------------------------------------------------------------------

def test_crossing_slope_when_xi_starts_above_the_threshold():
    """Mean xi at or above the threshold at the first grid point: the slope of the first
    interval, in xi per decade, on a grid with unequal decade steps and unequal rises."""
    lam = np.array([1e-4, 1e-2, 1e-1, 1.0])           # log10: -4, -2, -1, 0
    xi = np.array([0.55, 0.61, 0.90, 0.93])
    # first interval: (0.61 - 0.55) / (-2 - -4) = 0.03 (second 0.29, last 0.03 / 1 = 0.03 is
    # told apart by the 0.62 curve below)
    assert crossing_slope(lam, xi, 0.5) == pytest.approx(0.03, abs=1e-12)
    xi2 = np.array([0.55, 0.62, 0.90, 0.93])
    assert crossing_slope(lam, xi2, 0.5) == pytest.approx(0.035, abs=1e-12)
    # exactly at the threshold counts as reached
    assert crossing_slope(lam, np.array([0.5, 0.7, 0.8, 0.9]), 0.5) == pytest.approx(0.1, abs=1e-12)
    # through reliability(): the mean of two rows is xi2
    rows = np.array([[0.45, 0.52, 0.80, 0.93], [0.65, 0.72, 1.00, 0.93]])
    got = reliability(lam, rows, 0.5, selected=1e-4, reference=1e-2)
    assert got.slope == pytest.approx(0.035, abs=1e-12)
    assert got.distance == pytest.approx(2.0)
    # contrast: crossing inside the grid between -1 and 0 decades: (0.7 - 0.3) / 1
    assert crossing_slope(lam, np.array([0.1, 0.3, 0.45, 0.7]), 0.5) == pytest.approx(0.25)
    assert crossing_slope(lam, np.array([0.1, 0.3, 0.7, 0.9]), 0.5) == pytest.approx(0.4)


# 5 -------------------------------------------------------------------------------------------

class Counted:
    """A matrix-vector product that counts its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(v)


def test_lanczos_against_dense_eigh_and_its_documented_step_count(monkeypatch):
    """Top eigenpairs of an explicit symmetric matrix with a non-uniform spectrum against
    torch.linalg.eigh; min(p, 2k + 20) matrix-vector products by default, ``iters`` when
    given (at most p); IF Arnoldi spends exactly that many HVPs."""
    gen = torch.Generator().manual_seed(7)
    p = 40
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([37.0, 11.0, 4.2, 1.9]),
                          torch.rand(p - 4, generator=gen, dtype=torch.float64) * 1.3 - 0.6])
    a = q @ torch.diag(spectrum) @ q.T
    a = (a + a.T) / 2
    values, vectors = torch.linalg.eigh(a)
    order = torch.argsort(values, descending=True)
    for k, iters, steps in [(3, None, 26), (4, 30, 30), (4, 100, p), (2, 6, 6)]:
        mv = Counted(lambda v: a @ v)
        got, u = top_eigenpairs(mv, p, k, iters=iters, seed=1)
        assert mv.calls == steps, (k, iters)
        if steps >= 26:
            torch.testing.assert_close(got, values[order[:k]], rtol=1e-9, atol=0)
            cos = (u.T @ vectors[:, order[:k]]).diagonal().abs()
            torch.testing.assert_close(cos, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-7)
    small = torch.diag(torch.tensor([5.0, 3.0, 2.5, 1.0, 0.2, -0.5], dtype=torch.float64))
    mv = Counted(lambda v: small @ v)
    got, _ = top_eigenpairs(mv, 6, 2)
    assert mv.calls == 6  # min(p, 2k + 20) = p
    torch.testing.assert_close(got, torch.tensor([5.0, 3.0], dtype=torch.float64))

    counters: list[Counted] = []
    original = if_arnoldi_module.top_eigenpairs

    def spy(matvec: Any, *args: Any, **kw: Any) -> Any:
        counters.append(Counted(matvec))
        return original(counters[-1], *args, **kw)

    monkeypatch.setattr(if_arnoldi_module, "top_eigenpairs", spy)
    prob = problem("lr", n_train=40)
    h = dense_hessian(prob)
    top = torch.linalg.eigvalsh(h).flip(0)
    att = make_attributor("if_arnoldi", rank=3).fit(prob.context)
    assert [cnt.calls for cnt in counters] == [2 * 3 + 20]
    assert float(att.sigma[0]) == pytest.approx(float(top[0]), rel=1e-6)
    make_attributor("if_arnoldi", rank=3, iters=9).fit(prob.context)
    assert counters[-1].calls == 9


# 6 -------------------------------------------------------------------------------------------

def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    a, b = x.flatten().double().numpy(), y.flatten().double().numpy()
    return float(np.corrcoef(a, b)[0, 1])


def _independent(mats: list[torch.Tensor]) -> None:
    """Pairwise different and uncorrelated (entries and columns)."""
    for x, y in itertools.combinations(mats, 2):
        assert x.shape == y.shape
        assert not torch.equal(x, y)
        assert abs(_corr(x, y)) < 0.25  # 512 entries: sd of a null correlation ~0.044
        xc = (x - x.mean(0)) / x.std(0)
        yc = (y - y.mean(0)) / y.std(0)
        cross = (xc.T @ yc / (x.shape[0] - 1)).abs()  # 64 rows: null sd ~0.125
        assert float(cross.max()) < 0.65


def test_kronecker_sides_come_from_independent_streams():
    """Square layers (in = out = 64): the input- and output-side matrices of each layer, and of
    the two layers, are different and uncorrelated; the same seed rebuilds them all, another
    seed gives other ones. For the KroneckerProjector and for LoGra's layer factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(63, 64), nn.Tanh(), nn.Linear(64, 64, bias=False))
    params = dict(model.named_parameters())
    proj = KroneckerProjector(model, params, 128, seed=5)
    mats = [m for s in proj.sides for m in (s.p_in, s.p_out)]
    assert all(m is not None and m.shape == (64, 8) for m in mats)
    _independent(mats)
    again = KroneckerProjector(model, params, 128, seed=5)
    for x, y in zip(mats, [m for s in again.sides for m in (s.p_in, s.p_out)], strict=True):
        assert torch.equal(x, y)
    other = KroneckerProjector(model, params, 128, seed=6)
    for x, y in zip(mats, [m for s in other.sides for m in (s.p_in, s.p_out)], strict=True):
        assert abs(_corr(x, y)) < 0.25

    layers = linear_layers(model)
    factors = layer_factors(layers, 8, seed=5)
    lmats = [m for f in factors for m in (f.p_in, f.p_out)]
    assert all(m is not None and m.shape == (64, 8) for m in lmats)
    _independent(lmats)
    for x, y in zip(lmats, [m for f in layer_factors(layers, 8, seed=5) for m in (f.p_in, f.p_out)],
                    strict=True):
        assert torch.equal(x, y)
    for x, y in zip(lmats, [m for f in layer_factors(layers, 8, seed=6) for m in (f.p_in, f.p_out)],
                    strict=True):
        assert abs(_corr(x, y)) < 0.25


# 7 -------------------------------------------------------------------------------------------

def test_logspace_grid_runs_from_lo_to_hi_in_num_log_steps():
    """{logspace = [lo, hi, num]}: 10^lo first, 10^hi last, num points a constant ratio apart
    (by hand and against numpy.logspace), also as the lambdas a sweep's cells score."""
    for lo, hi, num in [(-2.5, 0.5, 7), (-4, 1, 6), (-3, -1, 2)]:
        got = grid_values({"logspace": [lo, hi, num]})
        assert len(got) == num
        by_hand = [10 ** (lo + j * (hi - lo) / (num - 1)) for j in range(num)]
        np.testing.assert_allclose(got, by_hand, rtol=1e-12)
        np.testing.assert_allclose(got, np.logspace(lo, hi, num), rtol=1e-12)
        assert got[0] == pytest.approx(10.0 ** lo, rel=1e-12)
        assert got[-1] == pytest.approx(10.0 ** hi, rel=1e-12)
        ratios = np.array(got[1:]) / np.array(got[:-1])
        np.testing.assert_allclose(ratios, 10 ** ((hi - lo) / (num - 1)), rtol=1e-12)
    spec = spec_from_dict({"settings": ["digits-lr"], "methods": [
        {"name": "iffim", "vary": [{"lam": {"logspace": [-2.5, 0.5, 7]}}]}]})
    (cell,) = expand_cells(spec)
    np.testing.assert_allclose(cell.lambdas, [10 ** (-2.5 + j / 2) for j in range(7)], rtol=1e-12)


# 8 -------------------------------------------------------------------------------------------

@dataclass
class _GroundTruth:
    outputs: np.ndarray


class _Reached(Exception):
    pass


def test_explain_larger_than_the_test_split_is_refused_equal_is_accepted(monkeypatch):
    """At spec load, with explicit sizes and with a setting's default sizes (digits-lr: 200
    test examples), and again when a cell runs on the split it really has."""
    base = {"methods": [{"name": "if_cg", "explain": 6}],
            "settings": [{"name": "digits-lr", "sizes": [10, 5, 5]}]}
    with pytest.raises(ValueError, match=r"explain = 6, but digits-lr has only 5 test examples"):
        spec_from_dict(base)
    spec = spec_from_dict({**base, "methods": [{"name": "if_cg", "explain": 5}]})
    assert spec.methods[0].explain == 5
    with pytest.raises(ValueError, match=r"explain = 201, but digits-lr has only 200 test examples"):
        spec_from_dict({"settings": ["digits-lr"], "methods": [{"name": "if_cg", "explain": 201}]})
    spec_from_dict({"settings": ["digits-lr"], "methods": [{"name": "if_cg", "explain": 200}]})
    spec_from_dict({"settings": ["digits-lr"], "sizes": {"digits-lr": [10, 5, 7]},
                    "methods": [{"name": "if_cg", "explain": 7}]})
    with pytest.raises(ValueError, match=r"explain = 8, but digits-lr has only 7"):
        spec_from_dict({"settings": ["digits-lr"], "sizes": {"digits-lr": [10, 5, 7]},
                        "methods": [{"name": "if_cg", "explain": 8}]})

    # when a cell runs: the split it was given
    def reached(*args: Any, **kw: Any) -> Any:
        raise _Reached

    monkeypatch.setattr(sweep_module, "make_attributor", reached)
    test = ArrayDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    trained = SimpleNamespace(splits=SimpleNamespace(test=test, val=test))
    gt = _GroundTruth(np.zeros((2, 1, 4)))
    cell = Cell("tiny", "if_cg", 0.5, ())
    with pytest.raises(ValueError, match=r"explain = 5, but tiny has only 4 test examples"):
        sweep_module.run_cell(trained, gt, MethodSpec("if_cg", explain=5), cell, spec)
    with pytest.raises(_Reached):
        sweep_module.run_cell(trained, gt, MethodSpec("if_cg", explain=4), cell, spec)
