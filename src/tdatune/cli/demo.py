"""``tdatune demo`` and ``tdatune lambda``: the lambda study (train, ground truth, lambda-path,
surrogate selection, baselines) on the embedded digits data or any setting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdatune.attributors.registry import ATTRIBUTORS
from tdatune.cli.options import (
    add_backend_options,
    add_setting_options,
    backend_options,
    setting_request,
)
from tdatune.study.lambda_study import LambdaStudyConfig, format_summary, run_lambda_study
from tdatune.study.spec import is_eigen

EIGEN_ATTRIBUTORS = [name for name, cls in ATTRIBUTORS.items() if is_eigen(cls)]


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True,
                   help="run directory: checkpoints and ground truth are shared by every "
                        "attributor studied in it; results go to OUT/<attributor>/")
    p.add_argument("--subsets", type=int, default=50, help="retrained subsets M (default 50)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    p.add_argument("--seeds", type=int, default=1, help="retraining seeds per subset (averaged)")
    p.add_argument("--threshold", type=float, default=0.5, help="surrogate threshold (default 0.5)")
    p.add_argument("--rule", default=None,
                   help="how lambda is selected without retraining: xi (Algorithm 1 at the "
                        "threshold), top[:c] (c x the top eigenvalue, default 0.01), "
                        "quantile[:q] (the q quantile of the spectrum, default 0.9), and for "
                        "K-FAC, EK-FAC and LoGra per layer one damping per layer: per_layer[:f] "
                        "(f x each layer's mean eigenvalue, default 0.1) or blockwise:<rule>; "
                        "default: the attributor's own (per_layer for kfac and ekfac, "
                        "top:0.001 for if_arnoldi, quantile for the others)")
    p.add_argument("--grid-points", type=int, default=41, help="lambda grid size for the curve")
    p.add_argument("--calibrate", type=int, default=None, metavar="K",
                   help="also choose lambda with K <= 10 retrained models (the first K subsets "
                        "of the ground truth, reused when on disk): the grid lambda with the "
                        "highest LDS on them")
    add_backend_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and ``lambda``."""
    d = sub.add_parser("demo", help="lambda study on digits + logistic regression (embedded data)")
    _study_options(d)
    d.add_argument("--seed", type=int, default=0, help="seed of the split, init and subsets")
    d.set_defaults(func=run, setting="digits-lr", task=None, attributor="iffim", params="{}",
                   data_dir=None, sizes=None, epochs=None, model_opt=[], data_opt=[])

    s = sub.add_parser("lambda", help="lambda study of any setting and eigen-based attributor")
    add_setting_options(s)
    s.add_argument("--attributor", default="iffim", choices=EIGEN_ATTRIBUTORS,
                   help="eigen-based attributor (default iffim)")
    s.add_argument("--params", default="{}",
                   help='fit-stage hyperparameters as JSON, e.g. \'{"proj_dim": 256}\'')
    _study_options(s)
    s.set_defaults(func=run)


def parse_params(text: str) -> dict:
    """The --params JSON object, with an error that names --params."""
    try:
        params = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--params {text!r} is not valid JSON ({err.msg} at column "
                         f"{err.colno}); quote the names, e.g. '{{\"proj_dim\": 64}}'") from None
    if not isinstance(params, dict):
        raise ValueError(f"--params must be a JSON object such as '{{\"proj_dim\": 64}}', got {text!r}")
    return params


def run(args: argparse.Namespace) -> int:
    """Check every argument, then run the lambda study and print its table."""
    request = setting_request(args, need_val=True, need_test=True)
    config = LambdaStudyConfig(
        setting=request.name, attributor=args.attributor,
        attributor_params=parse_params(args.params),
        n_subsets=args.subsets, alpha=args.alpha, seeds_per_subset=args.seeds,
        threshold=args.threshold, rule=args.rule, grid_points=args.grid_points, seed=args.seed,
        data_dir=args.data_dir, device=args.device, show_progress=not args.quiet,
        backend=args.backend, backend_options=backend_options(args), sizes=request.sizes,
        recipe_overrides=request.recipe_overrides, task_options=request.task_options,
        load_options=request.load_options, calibrate=args.calibrate,
    )
    summary = run_lambda_study(config, args.out)
    result = args.out / config.result_name()
    print()
    print(format_summary(summary))
    print(f"\nwrote {result / 'summary.json'}, {result / 'lambda_curve.png'}")
    return 0
