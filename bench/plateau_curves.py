"""Does K-FAC / EK-FAC need damping? A retraining-free curve beside the stored LDS curve.

For each setting of a sweep directory (trained, with its eigen cells), the attributor is fitted
on the trained model and its validation path predicts the subset sums of 50 random
half-subsets of the training data (no ground truth). Per grid lambda of the stored cell, it
prints the mean Spearman correlation of those predictions with the ones at the smallest grid
lambda ("vs min": where it stays near 1, the predictions no longer change as lambda -> 0) and
with the next grid lambda's, beside the cell's stored LDS at each lambda and the LDS lost at
the smallest lambda and at the default damping. This is a candidate detector of the
no-damping plateau (`docs/study.md`); it is a probe, not a rule. Writes the curves as JSON.

With ``--reference iffim`` (any method label of the sweep with a default selection), the
reference attributor is fitted too and predicts the same subset sums at its own default
damping; "vs ref" is the mean Spearman correlation of each grid lambda's predictions with
those, and the lambda that agrees best is reported with its stored LDS: a selection rule
without constants (agree most with an attributor whose default is trusted), judged here
against the stored curves.

    PYTHONPATH=. python bench/plateau_curves.py --spec examples/selection_seeds.toml \\
        --out runs/seeds/s0 --settings digits-mlp text-gpt2 --method kfac --json curves.json
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from common import add_machine_flags, add_sweep_flags, conditions, setup_machine, sweep_workspace
from tdatune.attributors import make_attributor
from tdatune.evaluate.lds import spearman_rows
from tdatune.select.agreement import agreement_curve

SUBSETS = 50


def _cell(out: str, label: str, method: str) -> dict:
    files = sorted(glob.glob(f"{out}/cells/{label}__{method}__*.json"))
    if not files:
        raise SystemExit(f"no {method} cell of {label} in {out}/cells")
    return json.loads(Path(files[0]).read_text())


def _curve(label: str, method: str, cell: dict, path, masks: torch.Tensor,
           projected, reference: np.ndarray | None) -> dict:
    """The stability (and reference agreement) curve of one cell, printed and returned."""
    rows = [r for r in cell["rows"] if r.get("spectrum")]
    lams, ldss = [r["lam"] for r in rows], [r["lds"] for r in rows]
    preds = path.subset_predictions(masks, lams, projected=projected).numpy()
    vs_min = [float(np.nanmean(spearman_rows(p, preds[0]))) for p in preds]
    vs_next = [float(np.nanmean(spearman_rows(preds[k], preds[k + 1])))
               for k in range(len(preds) - 1)]
    top, best = float(path.sigma.max()), max(ldss)
    curve = {"lams": lams, "default_lambda": cell["default_selection"]["lambda"],
             "default_lds": cell["default_selection"]["lds"],
             "lam_over_top": [x / top for x in lams], "lds": ldss, "vs_min": vs_min,
             "vs_next": vs_next, "gap_at_min": best - ldss[0],
             "gap_at_default": best - cell["default_selection"]["lds"]}
    lines = [("lambda / top", [x / top for x in lams]), ("LDS", ldss), ("vs min", vs_min),
             ("vs next", vs_next)]
    if reference is not None:
        vs_ref = [float(x) for x in agreement_curve(preds, reference)]
        pick = int(np.nanargmax(vs_ref))  # the first maximum, as lowered_damping takes it
        curve.update(vs_ref=vs_ref, ref_pick=pick, gap_at_ref=best - ldss[pick])
        lines.append(("vs ref", vs_ref))
    print(f"{label} {method}: LDS lost at the smallest lambda {curve['gap_at_min']:.3f}, at the "
          f"default {curve['gap_at_default']:.3f}"
          + (f", at the reference's pick {curve['gap_at_ref']:.3f}" if reference is not None
             else ""))
    for name, values in lines:
        fmt = "{:.0e}" if name == "lambda / top" else "{:.3f}"
        print(f"  {name:>12}: " + " ".join(fmt.format(v) for v in values[::3]), flush=True)
    return curve


def main() -> None:
    """One block of lines per setting; the curves to ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_flags(parser)
    parser.add_argument("--method", nargs="+", default=["kfac"],
                        help="the cells' method labels (kfac, ekfac)")
    parser.add_argument("--reference", default=None,
                        help="a method label whose default damping's predictions are the "
                             "reference (e.g. iffim)")
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    _, work = sweep_workspace(args, device)
    print(conditions(device))
    curves = {}
    gen = torch.Generator().manual_seed(0)
    for label in args.settings:
        trained = work.trained(label)  # type: ignore[attr-defined]
        masks = None
        reference = None
        for method in ([args.reference] if args.reference else []) + list(args.method):
            cell = _cell(args.out, label, method)
            att = make_attributor(cell["attributor"], **dict(cell["fit"])).fit(trained.context)
            path = att.lambda_path(trained.splits.val)
            if masks is None:
                masks = torch.rand(SUBSETS, path.n_train, generator=gen) < 0.5
            projected = path.project_masks(masks)
            if method == args.reference and reference is None:
                lam = cell["default_selection"]["lambda"]
                reference = path.subset_predictions(masks, [lam], projected=projected).numpy()[0]
                continue
            curves[f"{label}/{method}"] = _curve(label, method, cell, path, masks, projected,
                                                 reference)
    if args.json is not None:
        args.json.write_text(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
