"""Bad hyperparameters are refused with messages that name the valid choices."""

from __future__ import annotations

import pytest

from attr_problems import problem
from tdatune.attributors import ATTRIBUTORS, make_attributor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_registry_has_every_method():
    assert set(ATTRIBUTORS) == {"if_explicit", "if_cg", "if_lissa", "iffim", "trak", "tracin",
                                "logra", "kfac", "ekfac", "if_arnoldi"}
    with pytest.raises(ValueError, match="choose one of: if_explicit, if_cg"):
        make_attributor("influence")


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_unknown_hyperparameter_lists_valid_ones(name):
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) damping; valid: "):
        make_attributor(name, damping=0.1)


def test_fit_stage_value_refused_at_score_time():
    prob = problem("lr")
    attr = make_attributor("if_explicit").fit(prob.context)
    with pytest.raises(ValueError, match="checkpoint is a fit-stage hyperparameter"):
        attr.score(prob.explained, checkpoint=0)


@pytest.mark.parametrize("name,values,match", [
    ("if_cg", {"max_iter": -1}, "invalid max_iter=-1: must be an integer >= 1"),
    ("if_cg", {"max_iter": 2.5}, "invalid max_iter=2.5"),
    ("if_cg", {"early_stop": "yes"}, "invalid early_stop='yes': must be True or False"),
    ("if_lissa", {"scale": 0}, "invalid scale=0: must be a finite number > 0"),
    ("if_lissa", {"depth": 0}, "invalid depth=0"),
    ("if_explicit", {"lam": -1e-3}, "invalid lam=-0.001"),
    ("trak", {"lam": -1.0}, "invalid lam=-1.0: must be a finite number >= 0"),
    ("tracin", {"normalize": 1}, "invalid normalize=1"),
])
def test_invalid_score_values_refused(name, values, match):
    prob = problem("lr")
    attr = make_attributor(name, **({"proj_dim": 16} if name == "trak" else {})).fit(prob.context)
    with pytest.raises(ValueError, match=match):
        attr.score(prob.explained, **values)


@pytest.mark.parametrize("name,values,match", [
    ("iffim", {"proj_dim": 10_000}, "projection dim must be between 1 and the number of "
                                    "parameters p=650"),
    ("trak", {"proj_dim": 10_000}, "proj_dim=10000 exceeds the number of parameters p=650"),
    ("tracin", {"proj_dim": 651}, "proj_dim=651 exceeds the number of parameters p=650"),
    ("logra", {"proj_dim": 500}, "proj_dim=500 exceeds every layer side"),
    ("logra", {"layers": ["fc9"]}, "unknown linear layer.*fc9.*layers are: linear"),
    ("trak", {"checkpoints": [7]}, "checkpoint 7 out of range: 3 epochs saved"),
    ("if_cg", {"precision": "float16"}, "invalid precision='float16': must be one of "
                                         "'float64', 'float32'"),
])
def test_invalid_fit_values_refused(name, values, match):
    prob = problem("lr")
    with pytest.raises(ValueError, match=match):
        make_attributor(name, **values).fit(prob.context)


def test_lissa_bad_scale_refused_with_estimate():
    prob = problem("lr")
    attr = make_attributor("if_lissa").fit(prob.context)
    with pytest.raises(ValueError, match=r"scale=0.01 is too small.*use e.g. scale="):
        attr.score(prob.explained, scale=0.01)


def test_score_before_fit_refused():
    prob = problem("lr")
    with pytest.raises(RuntimeError, match="call fit"):
        make_attributor("tracin").score(prob.explained)
