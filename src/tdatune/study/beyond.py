"""The metrics beyond LDS that a sweep cell records beside it: mislabel detection by
self-influence (on a setting with flipped labels) and removal / leave-one-out by retraining
(``[removal]`` in the spec), along the same lambdas as the LDS and at the lambdas each
retraining-free rule selects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdatune.attributors.damping import Damping
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.mislabel import detection
from tdatune.evaluate.removal import (
    RemovalConfig,
    loo_correlations,
    loo_masks,
    random_removals,
    removal_effects,
    retrain_sets,
    top_removals,
)
from tdatune.study.prepare import TrainedSetting

RETRAIN_DIR = "retrain"  # beside a setting's ground truths: removal and LOO models
REMOVAL_RULES = ("q0.9", "lds-best", "default")  # retrained besides xi's lambda (costly)
REMOVAL_FORMAT = 4  # in a removal cell's definition; bump when what removal measures changes
# 2: every set retrained with the same seeds (paired); removal also at each listed lambda
# 3: each removal row records its standard error over the explained examples
# 4: also at the product's default damping (one per layer for K-FAC / EK-FAC)


def rule_lambdas(record: dict[str, Any], threshold: float) -> dict[str, Damping]:
    """The dampings an eigen cell's record singles out: xi's at the spec's threshold, the
    spectrum quantiles', the product's default (``default``: one lambda, or a list with one per
    layer) and the LDS grid best (``lds-best``, an oracle needing retraining)."""
    out = {f"xi@{s['threshold']:g}": float(s["lambda"]) for s in record.get("selections", [])
           if abs(s["threshold"] - threshold) < 1e-12 and s.get("lambda") is not None}
    out |= {f"q{q}": float(v[0]) for q, v in record.get("quantile_baselines", {}).items()}
    default = record.get("default_selection", {}).get("lambda")
    if default is not None:
        out["default"] = default
    finite = [r for r in record.get("rows", []) if "lam" in r and np.isfinite(r["lds"])]
    if finite:
        out["lds-best"] = float(max(finite, key=lambda r: r["lds"])["lam"])
    return out


def grid_lambdas(record: dict[str, Any]) -> list[float]:
    """The LDS grid of an eigen cell's record (spectrum and listed lambdas), ascending."""
    return sorted(float(r["lam"]) for r in record.get("rows", []) if "lam" in r)


def mislabel_record(att: Any, path: Any, flipped: list[int], record: dict[str, Any],
                    threshold: float) -> dict[str, Any]:
    """AUC and recall among the top 10 % of self-influence, along the cell's lambdas and at
    each rule's lambda (a path), or once (TracIn's self-influence)."""
    flagged = torch.tensor(flipped)
    out: dict[str, Any] = {"n_flipped": len(flipped)}
    if path is None:
        if not hasattr(att, "self_influence"):
            return {**out, "error": f"{att.name} has no self-influence"}
        return {**out, "rows": [detection(att.self_influence(), flagged)]}
    lams = grid_lambdas(record)
    rules = rule_lambdas(record, threshold)
    values = path.self_influence(lams + list(rules.values()))
    rows = [{"lam": lam, **detection(v, flagged)} for lam, v in zip(lams, values, strict=False)]
    out["rows"] = rows
    out["rules"] = {name: {**lambda_fields(lam), **detection(v, flagged)} for (name, lam), v in
                    zip(rules.items(), values[len(lams):], strict=True)}
    return out


def lambda_fields(lam: Damping) -> dict[str, Any]:
    """How a row records its damping: ``lam`` (NaN for one per layer, so log axes skip it) and,
    for one per layer, ``block_lambdas``."""
    if isinstance(lam, list | tuple):
        return {"lam": float("nan"), "block_lambdas": [float(x) for x in lam]}
    return {"lam": float(lam)}


def _picks(lams: list[float], count: int) -> list[float]:
    """``count`` lambdas spread evenly (in index, so in log lambda on a log grid)."""
    if not lams:
        return []
    idx = np.unique(np.linspace(0, len(lams) - 1, min(count, len(lams))).round().astype(int))
    return [lams[i] for i in idx]


def removal_record(trained: TrainedSetting, att: Any, config: RemovalConfig,
                   record: dict[str, Any], threshold: float, directory: Path, seed: int,
                   eigen: bool) -> dict[str, Any]:
    """Retrain without each explained example's top proponents at ``config.lambdas`` lambdas
    spread along the spectrum grid, at every lambda the cell lists (a one-factor
    sub-experiment's damping) and at each rule's; without random sets and on all data; with
    ``config.loo``, leave-one-out too."""
    test = trained.splits.test
    e = min(config.examples, len(test))
    explained = test.subset(torch.arange(e))
    train = trained.splits.train
    if eigen:
        path = att.lambda_path(explained)
        rows = [r for r in record.get("rows", []) if "lam" in r]
        spectrum = sorted(float(r["lam"]) for r in rows if r.get("spectrum"))
        listed = sorted(float(r["lam"]) for r in rows if not r.get("spectrum"))
        picks = _picks(spectrum, config.lambdas)  # along the grid, and every listed lambda
        grid = picks + [lam for lam in listed if lam not in picks]
        rules = {k: v for k, v in rule_lambdas(record, threshold).items()
                 if k.startswith("xi@") or k in REMOVAL_RULES}
        lams = grid + list(rules.values())
        names = ["grid"] * (len(lams) - len(rules)) + list(rules)
        scores = [path.scores(lam) for lam in lams]
    else:
        path, lams, names = None, [float("nan")], ["default"]
        scores = [att.score(explained)]
    masks = torch.cat([top_removals(s.double(), config.remove) for s in scores]
                      + [random_removals(len(train), config.remove, config.random, seed),
                         torch.ones(1, len(train), dtype=torch.bool)])
    out = _retrain(trained, explained, masks, config, directory, seed)
    effects = removal_effects(out, e, config.random)
    rows = [{**lambda_fields(lam), "rule": name, "effect": eff, "effect_sem": sem, "drop": drop}
            for lam, name, eff, sem, drop in zip(lams, names, effects["effect"],
                                                 effects["effect_sem"], effects["drop"],
                                                 strict=True)]
    result: dict[str, Any] = {"n_explained": e, "remove": config.remove, "rows": rows,
                              "random_drop": effects["random_drop"]}
    if config.loo:
        loo = _retrain(trained, explained, loo_masks(len(train)), config, directory, seed)
        delta = loo[-1][:, None] - loo[:-1].T  # [E, n]: f_full(z_j) - f_{-i}(z_j)
        if path is None:  # no damping: the scores of the removal above
            result["loo"] = [{"lam": float("nan"),
                              **loo_correlations(scores[0].double(), delta)}]
        else:
            result["loo"] = [{"lam": lam, **loo_correlations(path.scores(lam).double(), delta)}
                             for lam in grid_lambdas(record)]
    return result


def _retrain(trained: TrainedSetting, explained: ArrayDataset, masks: torch.Tensor,
             config: RemovalConfig, directory: Path, seed: int) -> np.ndarray:
    return retrain_sets(trained.task, trained.recipe, trained.splits.train, explained, masks,
                        config.seeds, seed, directory, device=trained.context.device,
                        show_progress=trained.context.show_progress)
