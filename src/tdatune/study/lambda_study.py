"""The lambda study of one setting: train, build ground truth, score a lambda-path over a grid
spanning the spectrum, select lambda by the surrogate (on validation) and by the quantile
baselines, and report LDS for each (on test). ``tdatune demo`` runs it on digits-lr."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdatune import __version__
from tdatune.attributors.registry import ATTRIBUTORS, make_attributor
from tdatune.evaluate.calibrate import MAX_CALIBRATION_MODELS, calibrate_candidates, calibrate_lambda
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.evaluate.lds import lds_at, lds_path
from tdatune.select.blockwise import is_block_rule
from tdatune.select.damping_choice import choose_damping
from tdatune.select.default import QUANTILE, parse_rule
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import default_lambda_grid, mean_indicator
from tdatune.study.diagnosis import candidate_dampings
from tdatune.study.plots import plot_lambda_curve
from tdatune.study.prepare import prepare_setting
from tdatune.study.spec import is_eigen
from tdatune.utils.atomic import atomic_write_json, atomic_write_text
from tdatune.utils.checks import check_open_unit
from tdatune.utils.fingerprint import fingerprint_config


@dataclass
class LambdaStudyConfig:
    """What the lambda study runs."""

    setting: str = "digits-lr"
    attributor: str = "iffim"
    attributor_params: dict[str, Any] = field(default_factory=dict)
    n_subsets: int = 50
    alpha: float = 0.5
    seeds_per_subset: int = 1
    threshold: float = 0.5
    rule: str | None = None  # the retraining-free rule (None: the attributor's default)
    quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)
    grid_points: int = 41
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    show_progress: bool = True
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    sizes: tuple[int, int, int] | None = None
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)
    calibrate: int | None = None  # K retrained models choose lambda (the first K subsets)

    def __post_init__(self) -> None:
        check_open_unit("threshold", self.threshold)
        if self.rule is not None and not is_block_rule(self.rule):
            parse_rule(self.rule)
        if self.calibrate is not None and not (
                3 <= self.calibrate <= min(MAX_CALIBRATION_MODELS, self.n_subsets)):
            raise ValueError(
                f"--calibrate K needs 3 <= K <= {MAX_CALIBRATION_MODELS} and K <= the number of "
                f"retrained subsets ({self.n_subsets}); got {self.calibrate}")
        check_open_unit("subset fraction alpha", self.alpha)
        for q in self.quantiles:
            check_open_unit("quantile q", q)
        if self.grid_points < 2:
            raise ValueError(f"grid_points must be >= 2, got {self.grid_points}")
        if self.attributor not in ATTRIBUTORS or not is_eigen(ATTRIBUTORS[self.attributor]):
            eigen = [n for n, c in ATTRIBUTORS.items() if is_eigen(c)]
            raise ValueError(f"the lambda study needs an eigen-based attributor (one lambda-path); "
                             f"choose one of: {', '.join(eigen)}; got {self.attributor!r}")
        ATTRIBUTORS[self.attributor](**self.attributor_params)  # every value, before any work
        GroundTruthConfig(n_subsets=self.n_subsets, alpha=self.alpha,
                          seeds_per_subset=self.seeds_per_subset)

    def result_name(self) -> str:
        """The attributor's own subdirectory of the run directory (``iffim``, or
        ``iffim-<hash>`` with fit-stage values), so that studies of several attributors share
        one run directory, its checkpoints and its ground truth."""
        if not self.attributor_params:
            return self.attributor
        return f"{self.attributor}-{fingerprint_config(self.attributor_params)[:8]}"


def run_lambda_study(config: LambdaStudyConfig, out: str | Path) -> dict[str, Any]:
    """Run the study, write ``summary.json``, ``lambda_curve.png`` and ``lambda_curve.csv``
    into ``out/<attributor>`` (see ``LambdaStudyConfig.result_name``), and return the summary.
    Training checkpoints and ground truth are stored under ``out`` and reused by a rerun and by
    the studies of other attributors in the same directory."""
    start = time.time()
    run_dir = Path(out)
    out = run_dir / config.result_name()
    out.mkdir(parents=True, exist_ok=True)
    say = print if config.show_progress else (lambda *a, **k: None)
    gt_config = GroundTruthConfig(n_subsets=config.n_subsets, alpha=config.alpha,
                                  seeds_per_subset=config.seeds_per_subset,
                                  subset_seed=config.seed, train_seed=config.seed)
    prepared = prepare_setting(config.setting, run_dir, gt_config, seed=config.seed,
                               data_dir=config.data_dir, device=config.device,
                               show_progress=config.show_progress, say=say,
                               backend=config.backend, backend_options=config.backend_options,
                               sizes=config.sizes, recipe_overrides=config.recipe_overrides,
                               task_options=config.task_options,
                               load_options=config.load_options)
    splits, gt, context = prepared.splits, prepared.groundtruth, prepared.context
    setting, recipe, device = prepared.setting, prepared.recipe, context.device
    test_accuracy: float | None = prepared.test_accuracy()
    if test_accuracy != test_accuracy:  # NaN: not a classifier (e.g. a regression task)
        test_accuracy = None
    say(f"{config.attributor}: gradients, eigendecomposition, lambda-path")
    attributor = make_attributor(config.attributor, **config.attributor_params).fit(context)
    test_path = attributor.lambda_path(splits.test)
    sigma, c_val = attributor.surrogate_spectrum(splits.val)
    grid = default_lambda_grid(sigma, num=config.grid_points, below=1e-2, above=1e2)

    say("selecting lambda on validation, scoring LDS on test")
    xi_mean, _ = mean_indicator(sigma, c_val, grid)
    choice = choose_damping(attributor, splits.val, rule=config.rule, threshold=config.threshold)
    selection = choice.selection  # a per-block rule: the whole spectrum's 0.9 quantile beside it
    lam_q = [quantile_lambda(sigma, q) for q in config.quantiles]
    other_rule = "xi" if selection.rule != "xi" else "quantile"
    other_lam = (selection.xi_lambda if selection.rule != "xi"
                 else quantile_lambda(sigma, QUANTILE))
    # one pass over the lambda-path: the grid, the selected lambda, the other rule, the baselines
    extra = torch.tensor([selection.lam, other_lam, *lam_q], dtype=grid.dtype)
    results = lds_path(test_path, gt.masks, gt.mean_outputs, torch.cat([grid, extra]))
    curve, lds_sel = results[: len(grid)], results[len(grid)]
    if choice.per_block:  # one damping per layer: scored on its own
        lds_sel = lds_at(test_path, gt.masks, gt.mean_outputs, choice.lam)
    other = {"rule": other_rule, "threshold": config.threshold, "lambda": other_lam,
             "lds": results[len(grid) + 1].mean}
    baselines = {str(q): [lam, res.mean] for q, lam, res in
                 zip(config.quantiles, lam_q, results[len(grid) + 2 :], strict=True)}
    best = int(np.nanargmax([c.mean for c in curve]))
    trust = selection.reliability
    calibrated = (_calibrate(config.calibrate, test_path, gt, grid, curve)
                  if config.calibrate else None)
    candidates = (_calibrate_candidates(config.calibrate, test_path,
                                        attributor.lambda_path(splits.val), gt, choice)
                  if config.calibrate else None)

    summary = {
        "setting": setting.name,
        "data_source": splits.source,
        "attributor": config.attributor,
        "attributor_params": attributor.params,
        "lambda_selected": choice.lam,
        "lds_selected": lds_sel.mean,
        "lds_selected_sem": lds_sel.sem,
        "damping": choice.to_dict(),
        "selection": {**selection.to_dict(), "rule": choice.rule},
        "other_rule": other,
        "reliability": trust.to_dict() if trust else None,
        "calibrated": calibrated,
        "calibrated_candidates": candidates,
        "lambda_best": float(grid[best]),
        "lds_best": curve[best].mean,
        "lds_smallest_lambda": curve[0].mean,
        "lds_curve": [[float(lam), c.mean, float(x)] for lam, c, x in zip(grid, curve, xi_mean,
                                                                          strict=True)],
        "baselines": baselines,
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        "n_subsets": config.n_subsets,
        "alpha": config.alpha,
        "seeds_per_subset": config.seeds_per_subset,
        "n_eigenvalues": int(sigma.numel()),
        "eigen_form": getattr(getattr(attributor, "eigen", None), "form", None),
        "test_accuracy": test_accuracy,
        "recipe": recipe.to_dict(),
        "seed": config.seed,
        "request": {"data_dir": config.data_dir, "sizes": config.sizes,
                    "recipe_overrides": config.recipe_overrides,
                    "task_options": config.task_options, "load_options": config.load_options},
        "versions": {"tdatune": __version__, "torch": torch.__version__, "numpy": np.__version__},
        "device": str(device),
        "seconds": time.time() - start,
    }
    atomic_write_json(out / "summary.json", summary)
    csv = "lambda,lds,lds_sem,xi_mean\n" + "".join(
        f"{float(lam):.6e},{c.mean:.6f},{c.sem:.6f},{float(x):.6f}\n"
        for lam, c, x in zip(grid, curve, xi_mean, strict=True))
    atomic_write_text(out / "lambda_curve.csv", csv)
    plot_lambda_curve(
        out / "lambda_curve.png", grid.tolist(), [c.mean for c in curve], [c.sem for c in curve],
        xi_mean.tolist(), selected=choice.lam, lds_selected=lds_sel.mean,
        best=float(grid[best]), baselines={q: tuple(v) for q, v in baselines.items()},
        threshold=config.threshold,
        title=f"{setting.name} / {config.attributor}: LDS and surrogate xi vs lambda",
        note=trust.line() if trust else None,
        calibrated=None if calibrated is None else (calibrated["lambda"], calibrated["lds"]),
        other=(selection_label(other), other["lambda"], other["lds"]),
    )
    return summary


def _calibrate(k: int, test_path: Any, gt: Any, grid: torch.Tensor, curve: list[Any]
               ) -> dict[str, Any]:
    """Lambda chosen by the first ``k`` retrained subsets (the smoothed LDS curve over the whole
    grid: limiting it to where mean xi lies in 0.3-0.8 did worse out of sample, docs/study.md);
    its LDS on all subsets and on the subsets it did not see."""
    outputs = np.asarray(gt.mean_outputs)
    lam, _ = calibrate_lambda(test_path, gt.masks[:k], outputs[:k], grid)
    i = int(torch.argmin((grid - lam).abs()))
    out: dict[str, Any] = {"k": k, "lambda": lam, "lds": curve[i].mean}
    if gt.masks.shape[0] - k >= 3:
        rest = lds_path(test_path, gt.masks[k:], outputs[k:], grid)
        values = [r.mean for r in rest]
        out |= {"lds_unseen": values[i], "lds_best_unseen": float(np.nanmax(values))}
    return out


def _calibrate_candidates(k: int, test_path: Any, val_path: Any, gt: Any, choice: Any
                          ) -> dict[str, Any]:
    """A handful of candidate dampings (the default, xi's, two quantiles, per layer, almost
    none) chosen among by the first ``k`` retrained subsets, by paired differences; the chosen
    one's LDS on all subsets and on the ones it did not see."""
    outputs = np.asarray(gt.mean_outputs)
    cands = candidate_dampings(val_path, choice.lam, choice.selection)
    picked = calibrate_candidates(test_path, gt.masks[:k], outputs[:k], cands, "default")
    lam = cands[picked.chosen]

    def score(cols: slice) -> float:
        return lds_at(test_path, gt.masks[cols], outputs[cols], lam, invalid="mask").mean

    out: dict[str, Any] = {"k": k, "rule": picked.chosen, "lambda": lam, "sure": picked.sure,
                           "line": picked.line(), "candidates": cands, "lds": score(slice(None))}
    if gt.masks.shape[0] - k >= 3:
        out["lds_unseen"] = score(slice(k, None))
    return out


def selection_label(selection: dict[str, Any]) -> str:
    """How the table names the selection's rule."""
    rule = selection.get("rule", "xi")
    name, _, constant = rule.partition(":")
    if name == "top":
        return f"{constant or '0.01'} x top eigenvalue"
    if name == "quantile":
        return f"quantile q={constant or '0.9'}"
    if name == "per_layer":
        return f"per layer {constant or '0.1'} x mean"
    if name == "xi":
        return f"surrogate xi >= {selection['threshold']}"
    return rule


def _lambda_text(lam: float | list[float]) -> str:
    if isinstance(lam, list):
        return f"{len(lam)} layers"
    return f"{lam:.3e}"


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable table of the study's result."""
    lines = [
        f"{summary['setting']} ({summary['data_source']}), {summary['attributor']}, "
        f"n_train={summary['n_train']}, {summary['n_subsets']} retrained subsets"
        + ("" if summary["test_accuracy"] is None
           else f", test accuracy {summary['test_accuracy']:.3f}"),
        "",
        f"{'method':<26} {'lambda':>11} {'LDS (test)':>11}",
        f"{'default: ' + selection_label(summary['selection']):<26} "
        f"{_lambda_text(summary['lambda_selected']):>11} {summary['lds_selected']:>11.4f}",
        *([f"{selection_label(summary['other_rule']):<26} "
           f"{summary['other_rule']['lambda']:>11.3e} {summary['other_rule']['lds']:>11.4f}"]
          if summary.get("other_rule") else []),
        f"{'grid best (oracle)':<26} {summary['lambda_best']:>11.3e} {summary['lds_best']:>11.4f}",
        f"{'smallest grid lambda':<26} {summary['lds_curve'][0][0]:>11.3e} "
        f"{summary['lds_smallest_lambda']:>11.4f}",
    ]
    for q, (lam, value) in summary["baselines"].items():
        lines.append(f"{'spectrum quantile q=' + q:<26} {lam:>11.3e} {value:>11.4f}")
    picked = summary.get("calibrated_candidates")
    if picked:
        lines.append(f"{'few-retrain: ' + picked['rule']:<26} {_lambda_text(picked['lambda']):>11} "
                     f"{picked['lds']:>11.4f}")
    cal = summary.get("calibrated")
    if cal:
        lines.append(f"{'calibrated, ' + str(cal['k']) + ' retrained':<26} {cal['lambda']:>11.3e} "
                     f"{cal['lds']:>11.4f}")
    sel = summary["selection"]
    lines += ["", f"selection: {sel['status']}, {sel['n_used']} validation examples used, "
              f"{sel['n_dropped']} dropped (xi undefined); {summary['seconds']:.1f} s"]
    trust = summary.get("reliability")
    if trust:
        lines.append("reliability: " + trust["line"])
        lines += [f"  - {reason}" for reason in trust["reasons"]]
        if trust["unsure"]:
            lines.append("  check the LDS along lambda with a few retrained models "
                         "(--calibrate K) before trusting this lambda")
    if picked:
        lines.append(f"few-retrain choice on the first {picked['k']} subsets among "
                     f"{', '.join(picked['candidates'])}: {picked['line']}"
                     + (f"; LDS on the other {summary['n_subsets'] - picked['k']}: "
                        f"{picked['lds_unseen']:.4f}" if "lds_unseen" in picked else ""))
    if cal and "lds_unseen" in cal:
        lines.append(f"calibrated on the first {cal['k']} subsets; on the other "
                     f"{summary['n_subsets'] - cal['k']}: LDS {cal['lds_unseen']:.4f} "
                     f"(their grid best {cal['lds_best_unseen']:.4f})")
    return "\n".join(lines)
