"""``tdatune groundtruth``: train a setting and build (or resume) its LDS ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tdatune.cli.demo import (
    add_backend_arguments,
    add_setting_arguments,
    backend_options,
    resolve_setting_argument,
)
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.study.prepare import prepare_setting


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``groundtruth``."""
    g = sub.add_parser("groundtruth", help="retrain on random subsets and store LDS ground truth")
    add_setting_arguments(g)
    g.add_argument("--out", type=Path, required=True,
                   help="run directory: checkpoints/ and groundtruth/ go here (resumed on rerun)")
    g.add_argument("--subsets", type=int, default=50, help="subsets M (default 50)")
    g.add_argument("--alpha", type=float, default=0.5, help="subset fraction (default 0.5)")
    g.add_argument("--seeds", type=int, default=1, help="retraining seeds per subset (averaged)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--data-dir", default=None, help="directory with the real data files")
    g.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), default=None)
    add_backend_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=run)


def _accuracy_note(accuracy: float) -> str:
    return "" if accuracy != accuracy else f"; test accuracy of the full model {accuracy:.3f}"


def run(args: argparse.Namespace) -> int:
    """Build the ground truth and print where it is."""
    start = time.time()
    args.setting = resolve_setting_argument(args)
    config = GroundTruthConfig(n_subsets=args.subsets, alpha=args.alpha,
                               seeds_per_subset=args.seeds, subset_seed=args.seed,
                               train_seed=args.seed)
    prepared = prepare_setting(
        args.setting, args.out, config, seed=args.seed, data_dir=args.data_dir,
        sizes=tuple(args.sizes) if args.sizes else None, device=args.device,
        show_progress=not args.quiet, backend=args.backend, backend_options=backend_options(args),
        say=(lambda *a: None) if args.quiet else print,
    )
    gt = prepared.groundtruth
    print(f"ground truth for {args.setting}: {gt.outputs.shape[0]} subsets x {gt.outputs.shape[1]} "
          f"seed(s) x {gt.outputs.shape[2]} test examples in {gt.directory} "
          f"({time.time() - start:.1f} s)" + _accuracy_note(prepared.test_accuracy()))
    return 0
