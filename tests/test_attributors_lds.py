"""Integration: every attributor on digits + logistic regression against stored ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from tdatune.attributors import AttributionContext, make_attributor
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
from tdatune.evaluate.lds import lds, lds_path
from tdatune.models.training import train_model
from tdatune.settings.registry import get_setting

SETTINGS = {  # defaults, except a shorter LiSSA recursion to keep the test fast
    "if_explicit": {}, "if_cg": {}, "if_lissa": {"depth": 200}, "iffim": {}, "trak": {},
    "tracin": {}, "logra": {},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_lr(one_torch_thread, tmp_path_factory):
    setting = get_setting("digits-lr")
    splits, task = setting.build(sizes=(300, 0, 40))
    recipe = setting.recipe
    trained = train_model(task, splits.train, recipe, seed=0)
    gt = build_ground_truth(task, recipe, splits.train, splits.test,
                            GroundTruthConfig(n_subsets=20), tmp_path_factory.mktemp("gt"),
                            show_progress=False)
    ctx = AttributionContext(task, splits.train, trained.checkpoints,
                             weight_decay=recipe.weight_decay)
    yield splits, ctx, gt


def test_every_method_gives_finite_lds_and_if_family_beats_tracin(digits_lr):
    splits, ctx, gt = digits_lr
    results = {}
    for name, score_values in SETTINGS.items():
        attr = make_attributor(name).fit(ctx)
        scores = attr.score(splits.test, **score_values)
        assert scores.shape == (len(splits.test), len(splits.train))
        assert torch.isfinite(scores).all(), name
        results[name] = lds(scores, gt.masks, gt.mean_outputs).mean
        if hasattr(attr, "lambda_path") and name != "if_explicit":
            lam = attr.params.get("lam", 1e-3) or 1e-3
            via_path = lds_path(attr.lambda_path(splits.test), gt.masks, gt.mean_outputs,
                                [lam])[0].mean
            assert math.isclose(via_path, lds(attr.score(splits.test, lam=lam), gt.masks,
                                              gt.mean_outputs).mean, abs_tol=1e-3), name
    assert all(math.isfinite(v) for v in results.values()), results
    for name in ("if_explicit", "if_cg", "iffim"):
        assert results[name] > results["tracin"] + 0.1, results
