"""``tdatune explain``: the most influential training examples of a lambda-study run, on an
HTML page with one PNG per explained example."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tdatune.study.explain import DEFAULT_EXAMPLES, DEFAULT_TOP, explain_run


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``explain``."""
    e = sub.add_parser(
        "explain", help="show the top proponents and opponents of test examples (HTML + PNG)")
    e.add_argument("run", type=Path,
                   help="run directory of `tdatune demo`, `tdatune lambda` or `tdatune sweep` "
                        "(its stored checkpoints are reused; nothing is retrained)")
    e.add_argument("--out", type=Path, required=True,
                   help="folder for index.html and explained_<k>.png")
    e.add_argument("--examples", type=int, nargs="+", default=list(DEFAULT_EXAMPLES),
                   help="test-split indices to explain (default: 0 1 2 3)")
    e.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"proponents and opponents shown per example (default {DEFAULT_TOP})")
    e.add_argument("--lam", type=parse_damping, default=None,
                   help="damping to score at: a number, or for K-FAC, EK-FAC and LoGra per layer "
                        "one per layer as JSON ('[1e-3, 1e-2]', '{\"fc1\": 1e-3, \"*\": 1e-2}') or "
                        "per_layer[:fraction] (default: the damping the study selected)")
    e.add_argument("--attributor", default=None,
                   help="which study of the run directory, or which method entry of a sweep "
                        "(needed when it holds several)")
    e.add_argument("--setting", default=None,
                   help="a sweep's setting label (needed when the sweep has several)")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--quiet", action="store_true", help="no progress messages")
    e.set_defaults(func=run)


def parse_damping(text: str) -> Any:
    """``--lam``: a number, a JSON list or object (one damping per layer), or a rule name."""
    try:
        return float(text)
    except ValueError:
        pass
    if text.lstrip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--lam {text!r} is not valid JSON ({err.msg})") from None
    return text


def run(args: argparse.Namespace) -> int:
    """Write the page and say where it is."""
    page = explain_run(args.run, args.out, attributor=args.attributor, examples=args.examples,
                       k=args.top, lam=args.lam, device=args.device,
                       show_progress=not args.quiet, setting=args.setting)
    print(f"wrote {page} and {len(args.examples)} PNG figure(s) in {page.parent}")
    return 0
