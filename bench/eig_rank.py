"""IFFIM's top-k route (``eig_rank=k``) against its exact eigensystem, on trained settings of
a sweep directory and their stored ground truth (nothing is retrained: run the sweep first).

For each setting, unprojected IFFIM exact and at each k: LDS at the exact route's default
damping (the 0.9 quantile of its spectrum: equal damping) and at the route's own default
(the 0.9 quantile read at its place in the whole spectrum of min(n, p) eigenvalues:
exact when the top k reach it, else the k-th eigenvalue), the Pearson correlation of its scores
with the exact ones at equal damping, and the fit time:

    PYTHONPATH=. python bench/eig_rank.py --spec examples/selection_seeds.toml \\
        --out runs/seeds/s0 --settings mnist-mlp cifar2-resnet9 text-gpt2 --ranks 50 200
"""

from __future__ import annotations

import time

from common import pearson, ranked_settings, row_pearson
from tdatune.attributors import make_attributor
from tdatune.evaluate.lds import lds
from tdatune.select.quantile import quantile_lambda


def main() -> None:
    """One table row per setting and rank."""
    args, settings = ranked_settings(__doc__, [50, 200])
    print("| setting | n x p | k | LDS at equal damping | LDS at its own q0.9 | Pearson (all) | "
          "Pearson (per row) | fit s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, trained, gt in settings:
        test, outputs = trained.splits.test, gt.mean_outputs
        n = len(trained.splits.train)
        p = sum(v.numel() for v in trained.context.model_at(-1)[1].values())
        exact = None
        for k in [None, *args.ranks]:
            t0 = time.perf_counter()
            att = make_attributor("iffim", eig_rank=k).fit(trained.context)
            fit_s = time.perf_counter() - t0
            own = quantile_lambda(att.eigen.sigma, 0.9, rank=min(n, p))
            if exact is None:
                equal = own
            scores = att.score(test, lam=equal)
            at_equal = lds(scores, gt.masks, outputs, invalid="mask").mean
            at_own = lds(att.score(test, lam=own), gt.masks, outputs, invalid="mask").mean
            if exact is None:
                exact = scores
            print(f"| {label} | {n:,} x {p:,} | {'exact' if k is None else k} | "
                  f"{at_equal:.4f} | {at_own:.4f} | {pearson(scores, exact):.4f} | "
                  f"{row_pearson(scores, exact):.4f} | {fit_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
