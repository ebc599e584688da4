"""Every attributor at its default hyperparameters on digits-lr and mnist-mlp: LDS (mean +- sem
over explained test examples, against retrained ground truth) and wall time of fit + score.

    python bench/attributor_table.py                       # both settings, writes docs/attributors.md
    python bench/attributor_table.py --settings digits-lr  # one setting

Training checkpoints and ground truth are stored under ``--work`` and reused by a rerun.
Wall times are single runs in this process, so they are
indicative; the ratio column compares each method with IFFIM measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors import ATTRIBUTORS, AttributionContext, Attributor, make_attributor
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig, build_ground_truth
from tdatune.evaluate.lds import lds, lds_path
from tdatune.features.gradients import num_params
from tdatune.models.training import TrainRecipe, train_model
from tdatune.select import select_lambda
from tdatune.settings.registry import get_setting
from tdatune.utils.atomic import atomic_write_json, atomic_write_text, read_json
from tdatune.utils.progress import progress

# (train, val, test) sizes used here; mnist-mlp is reduced from the setting's 4000/500/500
# because if_cg (full-data HVPs) and if_lissa (1000 minibatch HVP steps) scale with the
# number of explained examples and run on CPU here.
SIZES = {"digits-lr": None, "mnist-mlp": (2000, 100, 100)}


def epoch_learning_rates(recipe: TrainRecipe, n: int) -> list[float] | None:
    """Mean learning rate of each epoch (TracIn's eta_t); None (weights 1) for L-BFGS."""
    if recipe.optimizer == "lbfgs":
        return None
    steps = max(1, math.ceil(n / recipe.batch_size))
    total = recipe.epochs * steps
    return [sum(recipe.lr_at(e * steps + i, total) for i in range(steps)) / steps
            for e in range(recipe.epochs)]


def run_setting(name: str, work: Path, n_subsets: int, seed: int) -> dict[str, Any]:
    """Train, build ground truth and score every attributor for one setting."""
    setting = get_setting(name)
    splits, task = setting.build(seed=seed, sizes=SIZES.get(name))
    recipe = setting.recipe
    print(f"== {name}: {len(splits.train)} train / {len(splits.test)} explained (test), "
          f"{n_subsets} subsets", flush=True)
    t0 = time.perf_counter()
    trained = train_model(task, splits.train, recipe, seed, checkpoint_dir=work / name / "ckpt")
    gt = build_ground_truth(task, recipe, splits.train, splits.test,
                            GroundTruthConfig(n_subsets=n_subsets, subset_seed=seed,
                                              train_seed=seed),
                            work / name / "groundtruth", show_progress=True)
    print(f"   training + ground truth: {time.perf_counter() - t0:.1f} s", flush=True)
    ctx = AttributionContext(task, splits.train, trained.checkpoints,
                             weight_decay=recipe.weight_decay,
                             learning_rates=epoch_learning_rates(recipe, len(splits.train)))
    model, params = ctx.model_at(-1)
    accuracy = task.accuracy(model, params, splits.test.inputs, splits.test.targets)
    rows = []
    cache = work / name / "results"
    for method in progress(list(ATTRIBUTORS), desc=name):
        path = cache / f"{method}.json"
        if path.exists():  # a finished method of an interrupted run
            rows.append(read_json(path))
            continue
        start = time.perf_counter()
        try:
            attr = make_attributor(method).fit(ctx)
            scores = attr.score(splits.test)
        except ValueError as err:  # e.g. if_explicit on a model too large for a dense Hessian
            row = {"method": method, "error": str(err).split(";")[0]}
            print(f"   {method:<12} n/a: {err}", flush=True)
        else:
            seconds = time.perf_counter() - start
            result = lds(scores, gt.masks, gt.mean_outputs)
            row = {"method": method, "lds": result.mean, "sem": result.sem, "seconds": seconds,
                   "defaults": {h.name: h.default for h in attr.hyperparameters},
                   **surrogate_row(attr, splits.val, splits.test, gt)}
            print(f"   {method:<12} LDS {result.mean:.4f} +- {result.sem:.4f}   {seconds:7.1f} s"
                  f"   surrogate lam {row.get('lam_selected')} LDS {row.get('lds_selected')}",
                  flush=True)
        atomic_write_json(path, row)
        rows.append(row)
    return {"setting": name, "n_train": len(splits.train), "n_explained": len(splits.test),
            "p": num_params(params), "accuracy": accuracy, "recipe": recipe, "rows": rows,
            "n_subsets": n_subsets, "source": splits.source}


def surrogate_row(attr: Attributor, val: ArrayDataset, test: ArrayDataset,
                  gt: GroundTruth) -> dict[str, Any]:
    """For eigen-based methods: the surrogate-selected lambda (Algorithm 1 on the validation
    examples) and the test LDS there; empty for the others."""
    try:
        sigma, coords = attr.surrogate_spectrum(val)
    except (NotImplementedError, ValueError):
        return {}
    selection = select_lambda(sigma, coords)
    result = lds_path(attr.lambda_path(test), gt.masks, gt.mean_outputs, [selection.lam])[0]
    return {"lam_selected": selection.lam, "lds_selected": result.mean,
            "sem_selected": result.sem}


def format_defaults(defaults: dict[str, Any]) -> str:
    """Compact 'name=value' list of a method's defaults."""
    return ", ".join(f"{k}={v}" for k, v in defaults.items())


def markdown(results: list[dict[str, Any]], command: str) -> str:
    """The table as markdown, one section per setting."""
    lines = ["# Attributors at their default hyperparameters", "",
             f"Produced by `{command}` "
             f"(torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
             f"{platform.machine()}, CPU only). LDS is the mean Spearman correlation over "
             "explained test examples (± standard error) between predicted subset sums and "
             "the outputs (correct-class margin) of models retrained on random half-size "
             "subsets; time is the wall time of `fit` + `score` for all explained examples, "
             "single run, on a shared machine (indicative only).", "",
             "*surrogate lam: LDS* — for eigen-based methods, the lambda chosen without "
             "retraining by Algorithm 1 (threshold 0.5 on the validation examples, "
             "`attributor.surrogate_spectrum` + `tdatune.select.select_lambda`) and the test "
             "LDS there (not included in the time). Lambdas follow docs/lambda_convention.md "
             "(damping of the mean-loss curvature; TRAK's native lambda is n times larger).",
             "",
             "mnist-mlp runs at reduced sizes (2000 train / 100 val / 100 test instead of the "
             "setting's defaults): retraining 50 models is quick, but if_cg (full-data HVPs per "
             "iteration) and if_lissa (1000 minibatch-HVP steps) cost time proportional to the "
             "number of explained examples on CPU. if_explicit is n/a there: a dense Hessian of "
             "109,386 parameters is refused (limit 12,000).", ""]
    for res in results:
        iffim = next((r for r in res["rows"] if r["method"] == "iffim" and "seconds" in r), None)
        lines += [f"## {res['setting']}", "",
                  f"{res['source']}; {res['n_train']} training examples, {res['n_explained']} "
                  f"explained (test) examples, p = {res['p']:,} parameters, test accuracy "
                  f"{res['accuracy']:.3f}; ground truth: {res['n_subsets']} subsets x 1 seed, "
                  f"alpha = 0.5; recipe: {res['recipe'].optimizer}, {res['recipe'].epochs} "
                  f"epochs, weight decay {res['recipe'].weight_decay}.", "",
                  "| method | LDS (mean ± sem) | fit + score (s) | time / IFFIM | surrogate lam: "
                  "LDS | defaults |",
                  "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | n/a | n/a | n/a | n/a | {r['error']} |")
                continue
            ratio = f"{r['seconds'] / iffim['seconds']:.2g}x" if iffim else "-"
            sel = (f"{r['lam_selected']:.2e}: {r['lds_selected']:.3f} ± {r['sem_selected']:.3f}"
                   if "lam_selected" in r else "-")
            lines.append(f"| {r['method']} | {r['lds']:.3f} ± {r['sem']:.3f} | "
                         f"{r['seconds']:.2f} | {ratio} | {sel} | {format_defaults(r['defaults'])} |")
        lines.append("")
    return "\n".join(lines + NOTES)


NOTES = [
    "## Notes on the methods", "",
    "- Sign: a positive score means including the training example raises the explained "
    "output f (margin). IF-family scores are -v^T (C + lam I)^-1 g_i; TracIn is "
    "-sum_t eta_t grad f . grad l (the first-order effect of an SGD step on z_i); TRAK is "
    "positive by construction.",
    "- if_explicit keeps the Hessian's eigenvalues with their signs (an MLP's Hessian may be "
    "indefinite) and refuses a lambda with sigma_k + lambda ~ 0. Its surrogate column "
    "applies Algorithm 1 to H's spectrum (positive definite for the convex digits-lr model); "
    "the surrogate's derivation is for the Fisher.",
    "- if_cg runs in float64 on full-data HVPs; with early_stop an example stops at "
    "||r|| <= 1e-10 ||v||; a direction of non-positive curvature freezes that example.",
    "- if_lissa refuses scale <= (top eigenvalue + lam) / 2 (top eigenvalue by 20 power "
    "steps) and stops with LiSSADivergence naming scale if the iterates blow up.",
    "- trak averages the members' scores over checkpoints (the reference implementation "
    "averages kernel part and Q separately); lam = 0 is the pseudo-inverse. Its default "
    "lam = 0 is far from its best lambda here; compare the surrogate column.",
    "- logra uses one Fisher over all layers' Kronecker-projected gradients (blocks='joint'); "
    "blocks='layer' is LoGra's block-diagonal curvature. Factors of size k=16 per side "
    "(a side of at most 16 stays unprojected).",
    "- tracin sums over the last 10 saved epochs with each epoch's mean learning rate as "
    "eta_t (weights 1 for L-BFGS).",
    '- kfac / ekfac: the Kronecker-factored empirical Fisher of every hooked layer (Linear, Conv2d, '
    "Embedding; other parameters a diagonal block), K-FAC's eigenvalues l_S l_A or EK-FAC's corrected "
    'second moments in the Kronecker eigenbasis; one fit scores every damping (xi and Algorithm 1 on that'
    " basis); `fisher='true'` samples labels from the model. Scores equal kronfluence 1.0.1's EK-FAC at "
    'equal damping (Pearson 1.0000, bench/kronfluence.py).',
    '- if_arnoldi: the k = 50 largest Hessian eigenpairs by Lanczos (full reorthogonalisation) on HVPs, '
    'positive ones kept; the inverse is taken on that subspace only.',
    "",
]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-lr", "mnist-mlp"])
    parser.add_argument("--n-subsets", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_attributors"))
    parser.add_argument("--out", type=Path, default=Path("docs/attributors.md"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python bench/attributor_table.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    results = [run_setting(name, args.work, args.n_subsets, args.seed) for name in args.settings]
    text = markdown(results, command.strip())
    print(text)
    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
