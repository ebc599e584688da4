"""Algorithm 1 (``select_lambda``) on a compressed spectrum against the exact sums per lambda,
same spectrum, same run.

* baseline    -- ``_select_lambda_exact``: the exact xi recomputed from (sigma, c) at every
                 lambda, O(m k) per grid point and per bisection step (the former path);
* exact-once  -- the exact sums, with the weights prepared once (``CompressedSpectrum`` with
                 ``exact=True``): still O(m k) per lambda, without the per-call checks;
* compressed  -- ``select_lambda``: binned moments built once in O(m k), then O(m x bins) per
                 lambda (``tdatune.select.compressed``).

The spectrum is synthetic: eigenvalues log-uniform over ``--decades`` decades, Gaussian
explained coordinates. One timed call per path (the baseline is slow), default 200-point grid,
threshold 0.5. The ratios are against the baseline; the differences are the selected lambda's
|d log lambda| and the largest difference of the mean-xi curve on the grid.

    python bench/select_lambda.py                        # k = 109,000 x m = 300, and 20,000 x 100
    python bench/select_lambda.py --sizes 109000 300 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable

import torch

from common import add_machine_flags, setup_machine
from tdatune.select.compressed import CompressedSpectrum
from tdatune.select.surrogate import (
    Selection,
    _bracket_and_bisect,
    _select_lambda_exact,
    default_lambda_grid,
    select_lambda,
)


def exact_once(sigma: torch.Tensor, c: torch.Tensor, threshold: float) -> Selection:
    """Algorithm 1 on the exact sums with the weights prepared once."""
    spectrum = CompressedSpectrum(sigma, c, exact=True)
    return _bracket_and_bisect(spectrum.mean_xi, default_lambda_grid(sigma), threshold, 60,
                               int(spectrum.defined.sum()), int((~spectrum.defined).sum()))


def timed(work: Callable[[], Selection]) -> tuple[Selection, float]:
    """The result of one call and its wall time in seconds."""
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def measure(k: int, m: int, decades: float, threshold: float) -> None:
    """Time the three paths on one synthetic spectrum and print them against the baseline."""
    gen = torch.Generator().manual_seed(0)
    sigma = 10.0 ** (-decades * torch.rand(k, generator=gen, dtype=torch.float64))
    c = torch.randn(m, k, generator=gen, dtype=torch.float64)
    start = time.perf_counter()
    spectrum = CompressedSpectrum(sigma, c)
    build = time.perf_counter() - start
    print(f"\nk = {k:,} eigenvalues over {decades:g} decades, m = {m} validation examples: "
          f"{spectrum.bins:,} bins x {spectrum.order} moments, "
          f"error bound on xi {spectrum.error_bound:.1e} (building them alone: {build:.2f} s)")
    runs = {"baseline": timed(lambda: _select_lambda_exact(sigma, c, threshold)),
            "exact-once": timed(lambda: exact_once(sigma, c, threshold)),
            "compressed": timed(lambda: select_lambda(sigma, c, threshold))}
    base, base_time = runs["baseline"]
    for name, (sel, sec) in runs.items():
        d_lam = abs(math.log(sel.lam / base.lam))
        d_curve = float((sel.xi_mean - base.xi_mean).abs().max())
        print(f"  {name:<11}{sec:9.3f} s   {base_time / sec:7.1f}x baseline   lambda {sel.lam:.10e} "
              f"({sel.status}), |d log lambda| {d_lam:.1e}, max |d xi_mean| {d_curve:.1e}")


def main() -> None:
    """Parse flags, print the conditions, then one block per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[109_000, 300, 20_000, 100],
                        help="pairs k m")
    parser.add_argument("--decades", type=float, default=15.0)
    parser.add_argument("--threshold", type=float, default=0.5)
    add_machine_flags(parser)
    args = parser.parse_args()
    if len(args.sizes) % 2:
        parser.error("--sizes takes pairs: k m [k m ...]")
    setup_machine(args)
    print(f"{platform.machine()} {platform.processor() or platform.platform()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, float64, CPU; one call per path on a possibly shared machine")
    for k, m in zip(args.sizes[::2], args.sizes[1::2], strict=True):
        measure(k, m, args.decades, args.threshold)


if __name__ == "__main__":
    main()
