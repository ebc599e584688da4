"""tdatune's EK-FAC against Kronfluence's on the same trained model and ground truth.

For each setting: train (stored under ``--work``, reused), build the LDS ground truth (stored,
reused), then fit EK-FAC with both libraries on the same layers (Kronfluence tracks nn.Linear
and nn.Conv2d) and the same Fisher kind (empirical by default), and report:

* factor-fit and scoring wall times of each (same process, same threads; tdatune's scoring
  time includes its one pass for the training eigen-coordinates, after which every further
  damping costs a matrix product);
* score agreement at equal damping: Pearson of tdatune's scores with Kronfluence's
  (tdatune's sign convention: score = -grad f^T (F + lambda)^-1 grad l);
* LDS at Kronfluence's default damping (1e-8), at its heuristic (0.1 x each module's mean
  eigenvalue), at tdatune's selected damping (the default rule on the validation split) and
  at the best of a 25-point grid.

Needs kronfluence 1.0.1 beside the pinned CPU torch, without its dependencies' torch pins
(its wheel also installs a top-level ``examples`` package; this repository's ``examples`` is a
regular package, so it still wins from the repository root):

    pip install --no-deps kronfluence==1.0.1 einconv einops opt-einsum
    python bench/kronfluence.py --settings digits-mlp mnist-mlp --threads 2
    python bench/kronfluence.py --settings cifar2-resnet9 text-gpt2 --sizes 1000,100,100 \
        --epochs 6 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import add_machine_flags, conditions, setup_machine
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth
from tdatune.evaluate.lds import lds, lds_path
from tdatune.models.task import Task
from tdatune.models.training import train_model
from tdatune.select.default import choose_lambda
from tdatune.settings.registry import get_setting

# This file is named like the package it measures: take its folder off the import path (after
# ``common`` is imported), so ``import kronfluence`` finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _HERE]
sys.modules.pop("kronfluence", None)

KRONFLUENCE_DEFAULT_DAMPING = 1e-8  # kronfluence 1.0.1 ScoreArguments.damping_factor


def kronfluence_task(task: Task, fisher: str) -> Any:
    """A kronfluence Task that computes tdatune's loss and output."""
    from kronfluence.task import Task as KTask

    from tdatune.curvature.kfac import fisher_task

    sampled = fisher_task(task, "true") if fisher == "true" else None

    class Wrapped(KTask):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False
                               ) -> torch.Tensor:
            x, y = batch
            outputs = task.call(model, dict(model.named_parameters()), x)
            loss = (sampled.loss_fn if sample and sampled is not None else task.loss_fn)
            return loss(outputs, y).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return task.output_fn(task.call(model, dict(model.named_parameters()), x), y).sum()

    return Wrapped()


class Pairs(torch.utils.data.Dataset):
    """An ArrayDataset's examples as (x, y) pairs for a DataLoader."""

    def __init__(self, data: ArrayDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.data.inputs[i], self.data.targets[i]


def kronfluence_scores(task: Task, model: nn.Module, train: ArrayDataset,
                       explained: ArrayDataset, dampings: list[float | None], fisher: str,
                       batch: int) -> tuple[dict[float | None, torch.Tensor], float, float]:
    """Kronfluence EK-FAC scores [m, n] per damping (None: its heuristic), fit and score s."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    ktask = kronfluence_task(task, fisher)
    model = prepare_model(model, ktask)
    out: dict[float | None, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="bench", model=model, task=ktask, output_dir=tmp,
                            disable_tqdm=True, cpu=True, disable_model_save=True)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="f", dataset=Pairs(train), per_device_batch_size=batch,
            factor_args=FactorArguments(strategy="ekfac",
                                        use_empirical_fisher=fisher == "empirical"),
            overwrite_output_dir=True)
        fit_s = time.perf_counter() - t0
        score_s = 0.0
        for k, damping in enumerate(dampings):
            t0 = time.perf_counter()
            analyzer.compute_pairwise_scores(
                scores_name=f"s{k}", factors_name="f", query_dataset=Pairs(explained),
                train_dataset=Pairs(train), per_device_query_batch_size=len(explained),
                per_device_train_batch_size=batch,
                score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
            score_s += time.perf_counter() - t0
            out[damping] = -analyzer.load_pairwise_scores(f"s{k}")["all_modules"].double()
    return out, fit_s, score_s / len(dampings)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score matrices, flattened."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def run_setting(name: str, work: Path, n_subsets: int, sizes: tuple[int, int, int] | None,
                fisher: str, batch: int, epochs: int | None = None) -> dict[str, Any]:
    """One setting's row (see the module docstring)."""
    setting = get_setting(name)
    splits, task = setting.build(seed=0, sizes=sizes)
    recipe = setting.recipe if epochs is None else replace(setting.recipe, epochs=epochs)
    trained = train_model(task, splits.train, recipe, 0, checkpoint_dir=work / name / "ckpt")
    gt = build_ground_truth(task, recipe, splits.train, splits.test,
                            GroundTruthConfig(n_subsets=n_subsets, subset_seed=0, train_seed=0),
                            work / name / "groundtruth", show_progress=False)
    ctx = AttributionContext(task, splits.train, trained.checkpoints[-1:], chunk_size=batch)
    model = ctx.model_at(-1)[0]
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    t0 = time.perf_counter()
    att = make_attributor("ekfac", fisher=fisher, layers=layers).fit(ctx)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = att.lambda_path(splits.test)  # explained coordinates (training ones: held if small)
    coords_s = time.perf_counter() - t0
    sigma, c_val = att.lambda_path(splits.val).spectrum()
    selected = choose_lambda(sigma, c_val).lam
    t0 = time.perf_counter()
    ours_at = {d: path.scores(d) for d in (KRONFLUENCE_DEFAULT_DAMPING, selected)}
    score_s = coords_s + (time.perf_counter() - t0) / 2
    top = float(sigma.max().log10())
    grid = torch.logspace(top - 8, top + 1, 25, dtype=torch.float64)
    best = max(r.mean for r in lds_path(path, gt.masks, gt.mean_outputs, grid))
    kf, kf_fit, kf_score = kronfluence_scores(  # on a copy: kronfluence wraps the modules
        task, copy.deepcopy(model), splits.train, splits.test,
        [KRONFLUENCE_DEFAULT_DAMPING, None, selected], fisher, batch)

    def score_lds(s: torch.Tensor) -> float:
        return lds(s.float(), gt.masks, gt.mean_outputs).mean

    return {
        "setting": name, "n": len(splits.train), "m": len(splits.test),
        "tdatune fit s": fit_s, "tdatune score s": score_s,
        "kronfluence fit s": kf_fit, "kronfluence score s": kf_score,
        "pearson at 1e-8": pearson(ours_at[KRONFLUENCE_DEFAULT_DAMPING],
                                   kf[KRONFLUENCE_DEFAULT_DAMPING]),
        "pearson at selected": pearson(ours_at[selected], kf[selected]),
        "LDS kronfluence default": score_lds(kf[KRONFLUENCE_DEFAULT_DAMPING]),
        "LDS kronfluence heuristic": score_lds(kf[None]),
        "LDS tdatune selected": score_lds(ours_at[selected]), "selected lambda": selected,
        "LDS grid best": best,
    }


def main() -> None:
    """Parse flags, run the settings, print one row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-mlp"])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-kronfluence"))
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--sizes", default=None, help="train,val,test sizes")
    parser.add_argument("--fisher", choices=("empirical", "true"), default="empirical")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else None
    print(f"{conditions(device)}, fisher {args.fisher}")
    for name in args.settings:
        row = run_setting(name, args.work, args.subsets, sizes, args.fisher, args.batch,
                          args.epochs)
        for key, value in row.items():
            print(f"  {key:<28} {value:.4g}" if isinstance(value, float) else
                  f"  {key:<28} {value}")


if __name__ == "__main__":
    main()
