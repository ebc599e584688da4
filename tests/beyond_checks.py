"""Independent references for the beyond-LDS tests: ROC AUC by counting pairs, and a model
retrained by hand on a kept subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tdatune.models.training import load_model, train_model
from tdatune.study.sweep import run_sweep, spec_from_dict


def quiet(*_a):
    """A silent ``say``."""


def brute_auc(scores: torch.Tensor, flagged: torch.Tensor) -> float:
    """The probability that a flagged example outscores an unflagged one (ties count half),
    by counting every pair."""
    pos = torch.zeros(len(scores), dtype=torch.bool)
    pos[flagged] = True
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0
               for a in scores[pos].tolist() for b in scores[~pos].tolist())
    return wins / (int(pos.sum()) * int((~pos).sum()))


def retrained_output(trained, keep: torch.Tensor, j: int, seed: int = 0) -> float:
    """The explained output at test example ``j`` of a model trained by hand (``seed``) on the
    training examples ``keep`` of a sweep's trained setting."""
    train, test = trained.splits.train, trained.splits.test
    state = train_model(trained.task, train.subset(keep), trained.recipe, seed).state
    model, params = load_model(trained.task, state, "cpu")
    x = test.subset([j])
    return float(trained.task.evaluate(model, params, x.inputs, x.targets)[0])


def quiet_sweep(raw: dict[str, Any], out: Path) -> tuple[Any, Any]:
    """Run a sweep spec given as a dict into ``out`` without a word; (spec, outcome), every
    cell finished."""
    spec = spec_from_dict(raw)
    outcome = run_sweep(spec, out, show_progress=False, say=quiet)
    assert not outcome.failed, outcome.failed
    return spec, outcome
