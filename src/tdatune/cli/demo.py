"""``tdatune demo`` and ``tdatune lambda``: the lambda study (train, ground truth, lambda-path,
surrogate selection, baselines) on the embedded digits data or any setting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdatune.study.lambda_study import LambdaStudyConfig, format_summary, run_lambda_study


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory (reused on rerun)")
    p.add_argument("--subsets", type=int, default=50, help="retrained subsets M (default 50)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    p.add_argument("--seeds", type=int, default=1, help="retraining seeds per subset (averaged)")
    p.add_argument("--threshold", type=float, default=0.5, help="surrogate threshold (default 0.5)")
    p.add_argument("--grid-points", type=int, default=41, help="lambda grid size for the curve")
    p.add_argument("--seed", type=int, default=0)
    add_backend_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """A built-in setting name, or ``--task package.module:function`` (your own task)."""
    p.add_argument("setting", nargs="?", default=None,
                   help="setting name (see `tdatune settings`) or package.module:function")
    p.add_argument("--task", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                   help="your own task: a function returning a tdatune Setting (see "
                        "docs/your_model.md); importable from the current directory")


def resolve_setting_argument(args: argparse.Namespace) -> str:
    """The setting name or task reference given on the command line (exactly one)."""
    task, setting = getattr(args, "task", None), getattr(args, "setting", None)
    if task and setting and task != setting:
        raise ValueError(f"give a setting name or --task, not both (got {setting!r} and "
                         f"--task {task!r})")
    ref = task or setting
    if not ref:
        raise ValueError("name a setting (see `tdatune settings`) or give --task "
                         "package.module:function")
    if task and ":" not in task:
        raise ValueError(f"--task {task!r} must look like package.module:function")
    return ref


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --backend, --address, --workers: where training and retraining run."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto",
                   choices=["auto", "sequential", "batched", "process", "ray"],
                   help="how subset models are retrained (auto: batched when the model allows)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --backend ray (default: a local Ray instance)")
    p.add_argument("--workers", type=int, default=None, help="processes for --backend process")


def backend_options(args: argparse.Namespace) -> dict:
    """Runner options from the parsed --address / --workers."""
    if args.backend == "ray" and args.address:
        return {"address": args.address}
    if args.backend == "process" and args.workers:
        return {"num_workers": args.workers}
    return {}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and ``lambda``."""
    d = sub.add_parser("demo", help="lambda study on digits + logistic regression (embedded data)")
    _common(d)
    d.set_defaults(func=run, setting="digits-lr", attributor="iffim", params="{}", data_dir=None)

    s = sub.add_parser("lambda", help="lambda study of any setting and eigen-based attributor")
    add_setting_arguments(s)
    s.add_argument("--attributor", default="iffim", help="eigen-based attributor (default iffim)")
    s.add_argument("--params", default="{}",
                   help='fit-stage hyperparameters as JSON, e.g. \'{"proj_dim": 256}\'')
    s.add_argument("--data-dir", default=None, help="directory with the real data files")
    _common(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the lambda study and print its table."""
    config = LambdaStudyConfig(
        setting=resolve_setting_argument(args), attributor=args.attributor,
        attributor_params=json.loads(args.params),
        n_subsets=args.subsets, alpha=args.alpha, seeds_per_subset=args.seeds,
        threshold=args.threshold, grid_points=args.grid_points, seed=args.seed,
        data_dir=args.data_dir, device=args.device, show_progress=not args.quiet,
        backend=args.backend, backend_options=backend_options(args),
    )
    summary = run_lambda_study(config, args.out)
    print()
    print(format_summary(summary))
    print(f"\nwrote {args.out / 'summary.json'}, {args.out / 'lambda_curve.png'}")
    return 0
