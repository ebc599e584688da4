"""EK-FAC with low-rank explained gradients (``query_rank=r``) against exact scores, on
trained settings of a sweep directory and their stored ground truth.

For each setting: EK-FAC fitted once; scores at the attributor's default damping (one per
layer, 0.1 x each layer's mean eigenvalue) exact and at each rank; per rank its LDS, the
Pearson correlation of its scores with the exact ones (all m x n entries, and the mean over
explained examples of each row's correlation), the numbers one explained example holds
(against the exact p) and the scoring time. The sweep directory supplies the trained model
and the ground truth (nothing is retrained; run the sweep first):

    PYTHONPATH=. python bench/query_rank.py --spec examples/selection_seeds.toml --out runs/seeds/s0 \\
        --settings text-gpt2 cifar2-resnet9 --ranks 1 4 16 64
"""

from __future__ import annotations

import time

from common import pearson, ranked_settings, row_pearson
from tdatune.attributors import make_attributor
from tdatune.attributors.kfac import query_numbers
from tdatune.evaluate.lds import lds


def main() -> None:
    """One table row per setting and rank."""
    args, settings = ranked_settings(__doc__, [1, 4, 16, 64])
    print("| setting | rank | LDS | Pearson (all) | Pearson (per row) | numbers / example | "
          "of p | score s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, trained, gt in settings:
        att = make_attributor("ekfac").fit(trained.context)
        test = trained.splits.test
        outputs = gt.mean_outputs
        fit = att.fit_
        shapes = [tuple(b.sigma.shape) for b in fit.blocks]
        p = int(fit.sigma.numel())
        t0 = time.perf_counter()
        exact = att.score(test, lam="per_layer")
        exact_s = time.perf_counter() - t0
        base = lds(exact, gt.masks, outputs, invalid="mask").mean
        print(f"| {label} | exact | {base:.4f} | 1 | 1 | {p:,} | 1 | {exact_s:.1f} |", flush=True)
        for r in args.ranks:
            t0 = time.perf_counter()
            got = att.score(test, lam="per_layer", query_rank=r)
            took = time.perf_counter() - t0
            value = lds(got, gt.masks, outputs, invalid="mask").mean
            numbers = query_numbers(fit.block_sizes, shapes, r)  # type: ignore[arg-type]
            print(f"| {label} | {r} | {value:.4f} | {pearson(got, exact):.4f} | "
                  f"{row_pearson(got, exact):.4f} | {numbers:,} | {numbers / p:.3f} | "
                  f"{took:.1f} |", flush=True)


if __name__ == "__main__":
    main()
