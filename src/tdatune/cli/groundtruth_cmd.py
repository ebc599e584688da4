"""``tdatune groundtruth``: train a setting and build (or resume) its LDS ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tdatune.cli.options import (
    add_backend_options,
    add_setting_options,
    backend_options,
    setting_request,
)
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.study.prepare import prepare_setting


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``groundtruth``."""
    g = sub.add_parser("groundtruth", help="retrain on random subsets and store LDS ground truth")
    add_setting_options(g)
    g.add_argument("--out", type=Path, required=True,
                   help="run directory: checkpoints/ and groundtruth/ go here (resumed on rerun)")
    g.add_argument("--subsets", type=int, default=50, help="subsets M (default 50)")
    g.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    g.add_argument("--seeds", type=int, default=1, help="retraining seeds per subset (averaged)")
    add_backend_options(g)
    g.set_defaults(func=run)


def _accuracy_note(accuracy: float) -> str:
    return "" if accuracy != accuracy else f"; test accuracy of the full model {accuracy:.3f}"


def run(args: argparse.Namespace) -> int:
    """Build the ground truth and print where it is."""
    start = time.time()
    request = setting_request(args, need_test=True)
    config = GroundTruthConfig(n_subsets=args.subsets, alpha=args.alpha,
                               seeds_per_subset=args.seeds, subset_seed=args.seed,
                               train_seed=args.seed)
    options = backend_options(args)
    prepared = prepare_setting(
        request.name, args.out, config, seed=args.seed, data_dir=args.data_dir,
        sizes=request.sizes, device=args.device, show_progress=not args.quiet,
        backend=args.backend, backend_options=options,
        say=(lambda *a: None) if args.quiet else print,
        recipe_overrides=request.recipe_overrides, task_options=request.task_options,
        load_options=request.load_options,
    )
    gt = prepared.groundtruth
    print(f"ground truth for {request.name}: {gt.outputs.shape[0]} subsets x "
          f"{gt.outputs.shape[1]} seed(s) x {gt.outputs.shape[2]} test examples in {gt.directory} "
          f"({time.time() - start:.1f} s)" + _accuracy_note(prepared.test_accuracy()))
    return 0
