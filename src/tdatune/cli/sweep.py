"""``tdatune sweep``, ``tdatune report`` and ``tdatune rules``: sensitivity sweeps over
hyperparameter grids, their reports, and selection rules compared across sweeps."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from tdatune.study.report import write_report
from tdatune.study.rules import write_rules
from tdatune.study.sweep import load_spec, run_sweep


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``sweep``, ``report`` and ``rules``."""
    s = sub.add_parser("sweep", help="run (or resume) a hyperparameter sweep from a TOML file")
    s.add_argument("spec", type=Path, help="sweep TOML file (see docs/sweeps.md)")
    s.add_argument("--out", type=Path, required=True, help="sweep directory (resumed on rerun)")
    s.add_argument("--backend", default="local", choices=["local", "process", "ray"],
                   help="where cells run: this process, a local process pool, or Ray tasks")
    s.add_argument("--address", default=None,
                   help="Ray cluster address (e.g. ray://head:10001); default: a local Ray instance")
    s.add_argument("--retrain-backend", default="auto",
                   choices=["auto", "sequential", "batched", "process", "ray"],
                   help="how ground-truth subset models are retrained (auto: batched where it "
                        "reproduces one-at-a-time training, on Ray with --backend ray)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    s.add_argument("--seed", type=int, default=None,
                   help="training seed of every setting, instead of the spec's `seed` (run one "
                        "sweep directory per seed to judge rules over independently trained "
                        "models)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=sweep)

    r = sub.add_parser("report", help="(re)write tables, figures and report.md of a sweep directory")
    r.add_argument("out", type=Path, help="sweep directory")
    r.set_defaults(func=report)
    c = sub.add_parser("rules", help="compare selection thresholds and quantiles across sweeps "
                       "(gap to the grid best, side of the best lambda, a calibrated threshold "
                       "left one setting out)")
    c.add_argument("dirs", type=Path, nargs="+", help="sweep directories")
    c.add_argument("--out", type=Path, required=True, help="folder for rules.md, rules.csv and "
                   "rules_by_attributor.csv")
    c.add_argument("--default", type=float, default=0.5,
                   help="the threshold a calibrated one is compared with (default 0.5)")
    c.set_defaults(func=rules)


def sweep(args: argparse.Namespace) -> int:
    """Run the sweep, then write its report; exit 1 when any cell failed (one line each)."""
    spec = load_spec(args.spec)
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    say = (lambda *a: None) if args.quiet else print
    outcome = run_sweep(spec, args.out, backend=args.backend, address=args.address,
                        device=args.device, show_progress=not args.quiet, say=say,
                        retrain_backend=args.retrain_backend)
    path = write_report(args.out)
    print(f"wrote {path}")
    if outcome.failed:
        print(f"{len(outcome.failed)} of {len(outcome)} cells failed (rerun the same command to "
              "retry them; details in report.md and the cell files):", file=sys.stderr)
        for cell in outcome.failed:
            print(f"  FAILED {cell['file']}: {cell['error'].splitlines()[0][:200]}", file=sys.stderr)
        return 1
    return 0


def report(args: argparse.Namespace) -> int:
    """Rewrite the report of a finished (or partly finished) sweep."""
    print(f"wrote {write_report(args.out)}")
    return 0


def rules(args: argparse.Namespace) -> int:
    """Compare selection rules over the cells of several sweep directories."""
    print(f"wrote {write_rules(args.dirs, args.out, default=args.default)}")
    return 0
