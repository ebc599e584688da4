"""The "agree" rule's pieces against hand-worked cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from tdatune.select.agreement import agreement_curve, lowered_damping


def test_agreement_curve_is_the_mean_spearman_of_each_lambda_against_the_reference():
    rng = np.random.default_rng(4)
    reference = rng.standard_normal((5, 12))
    preds = np.stack([reference + s * rng.standard_normal((5, 12)) for s in (0.1, 1.0, 5.0)])
    preds[2, 3] = 1.0  # a constant row: Spearman undefined, left out of the mean
    want = [np.nanmean([spearmanr(p[j], reference[j])[0] if np.ptp(p[j]) > 0 else np.nan
                        for j in range(5)]) for p in preds]
    assert agreement_curve(preds, reference) == pytest.approx(want, abs=1e-12)
    assert want[0] > want[1] > want[2]


GRID = [1e-8, 1e-6, 1e-4, 1e-2]


@pytest.mark.parametrize("curve,per_layer,pick,lowered", [
    # The first maximum (1e-6) is below the largest per-layer damping (3e-4) though above the
    # smallest (5e-7): lowered (a rule reading the smallest would not lower).
    ([0.2, 0.6, 0.5, 0.1], [5e-7, 3e-4], 1e-6, True),
    # Agreement peaks at 1e-2, above every per-layer damping: keep them.
    ([0.1, 0.2, 0.3, 0.4], [5e-7, 3e-4], 1e-2, False),
    # A tie: the smaller lambda is the pick; 1e-6 is not below a largest damping of 1e-6.
    ([0.1, 0.5, 0.2, 0.5], [1e-6, 2e-7], 1e-6, False),
    # NaN entries are skipped; the pick 1e-8 is below 2e-8.
    ([0.3, np.nan, 0.1, 0.2], [2e-8], 1e-8, True),
])
def test_lowered_damping_by_hand(curve, per_layer, pick, lowered):
    got_pick, got_lowered = lowered_damping(GRID, np.array(curve), per_layer)
    assert got_pick == pick and got_lowered is lowered


def test_no_agreement_at_all_keeps_the_per_layer_damping():
    pick, lowered = lowered_damping(GRID, np.full(4, np.nan), [1e-3])
    assert np.isnan(pick) and lowered is False


def test_the_damping_used_is_the_pick_only_when_lowered():
    from tdatune.select.agreement import Agreement

    def made(lowered: bool) -> Agreement:
        return Agreement(grid=GRID, agreement=[0.1, 0.9, 0.2, 0.0], reference_lambda=1e-3,
                         agree_lambda=1e-6, per_layer=[2e-5, 4e-4], lowered=lowered)

    assert made(True).lam == 1e-6
    assert made(False).lam == [2e-5, 4e-4]
    assert made(True).to_dict()["lowered"] is True


def test_attribute_checks_the_memory_of_the_reference_that_agree_fits():
    """K-FAC's own estimate fits 60 MiB here, IFFIM's (a 3000 x 3000 kernel) does not. Asked
    for by name, "agree" is refused before any work, naming its reference; as the default, the
    per-layer damping is used instead, with a warning."""
    import warnings
    from functools import partial

    import torch

    from tdatune.features.budget import DoesNotFit
    from tdatune.models.small import MLP
    from tdatune.models.task import Task
    from tdatune.study.attribute import attribute, attribute_estimate

    task = Task(make_model=partial(MLP, 64, (16,), 10), name="m")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 64, generator=gen), torch.randint(0, 10, (3000,), generator=gen)
    train, val, test = (x, y), (x[:40], y[:40]), (x[:5], y[:5])
    budget = 60 << 20
    sizes = {a: attribute_estimate(task, train, val, attributor=a).memory_bytes
             for a in ("kfac", "iffim")}
    assert sizes["kfac"] < budget < sizes["iffim"]
    state = task.make_model().state_dict()
    with pytest.raises(DoesNotFit, match="iffim reference"):
        attribute(task, train, test, val=val, checkpoints=[state], attributor="kfac",
                  memory_budget=budget, rule="agree")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = attribute(task, train, test, val=val, checkpoints=[state], attributor="kfac",
                         memory_budget=budget)
    assert done.damping.rule == "per_layer"
    assert any("using rule 'per_layer' instead" in str(w.message) for w in caught)
    assert not any(isinstance(w.message, DoesNotFit) for w in caught)
