"""The "agree" rule and its variants judged on stored curves of ``bench/plateau_curves.py``.

Reads the JSON files written by ``plateau_curves.py --reference iffim`` (one per sweep
directory) and prints, per group of files, the gap to the grid's best LDS, mean / worst, of:
the per-layer default as the cells recorded it, no damping (the smallest grid lambda), the
lambda of highest agreement with the reference always, and the three variants of the rule
"take it when it is below the per-layer damping": below the smallest, the geometric mean or
the largest per-layer damping (the shipped rule). The choice among the variants was made on
the first group (seed 0 of the seven study settings); the other groups judge it.

    python bench/agreement_table.py docs/study/agreement/seeds_s0.json -- \\
        docs/study/agreement/seeds_s1.json docs/study/agreement/seeds_s2.json -- \\
        docs/study/agreement/families_s*.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _rows(files: list[str]) -> list[dict]:
    rows = []
    for name in files:
        for key, c in json.loads(Path(name).read_text()).items():
            best, pick = max(c["lds"]), c["ref_pick"]
            lams = c["default_lambda"] if isinstance(c["default_lambda"], list) else \
                [c["default_lambda"]]
            rows.append({"file": Path(name).stem, "cell": key, "default": c["gap_at_default"],
                         "none": c["gap_at_min"], "agree": best - c["lds"][pick],
                         "pick": c["lams"][pick], "per_layer": lams})
    return rows


def _below(edge: Callable[[list[float]], float]) -> Callable[[dict], float]:
    return lambda r: r["agree"] if r["pick"] < edge(r["per_layer"]) else r["default"]


RULES: dict[str, Callable[[dict], float]] = {
    "per layer (recorded default)": lambda r: r["default"],
    "no damping (smallest grid lambda)": lambda r: r["none"],
    "highest agreement, always": lambda r: r["agree"],
    "agree below the smallest per-layer": _below(min),
    "agree below the geometric mean": _below(lambda v: float(np.exp(np.mean(np.log(v))))),
    "agree below the largest (shipped)": _below(max),
}


def main() -> None:
    """One table per group of files (groups separated by ``--``)."""
    groups, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    groups.append(current)
    for files in (g for g in groups if g):
        rows = _rows(files)
        print(f"\n{', '.join(Path(f).stem for f in files)}: {len(rows)} cells")
        print("| rule | mean | worst |\n|---|---|---|")
        for name, rule in RULES.items():
            gaps = np.array([rule(r) for r in rows])
            print(f"| {name} | {gaps.mean():.3f} | {gaps.max():.3f} |")


if __name__ == "__main__":
    main()
