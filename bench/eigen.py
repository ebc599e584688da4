"""Kernel-form eigensystem: explained-example coordinates by streaming G (what tdatune does)
against materialising the p x k eigenvector matrix U = G^T W / sqrt(n sigma) (the baseline),
same gradients, same run.

    python bench/eigen.py --setting mnist-mlp --sizes 2000 300 300 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_machine_flags, setup_machine
from tdatune.curvature.eigen import fisher_eigensystem
from tdatune.features.gradients import per_example_grads
from tdatune.models.training import load_model, train_model
from tdatune.settings.registry import get_setting


def main() -> None:
    """Time both ways of mapping explained gradients into the kernel eigenbasis."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="mnist-mlp")
    parser.add_argument("--sizes", type=int, nargs=3, default=[2000, 300, 300])
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (any model will do)")
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    setting = get_setting(args.setting)
    splits, task = setting.build(sizes=tuple(args.sizes))
    from dataclasses import replace

    result = train_model(task, splits.train, replace(setting.recipe, epochs=args.epochs), 0,
                         device=device)
    model, params = load_model(task, result.state, device)
    g = per_example_grads(task, model, params, splits.train)
    v = per_example_grads(task, model, params, splits.test, target="output")
    print(f"{args.setting}: n={g.shape[0]}, p={g.shape[1]}, m={v.shape[0]}, "
          f"torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    eig = fisher_eigensystem(g, form="kernel")
    decomposition = time.perf_counter() - start
    start = time.perf_counter()
    streamed = eig.coords(v)
    t_stream = time.perf_counter() - start

    start = time.perf_counter()
    basis = (g.double().T @ eig.kernel_vectors) / torch.sqrt(eig.n * eig.sigma)
    baseline = v.double() @ basis
    t_basis = time.perf_counter() - start
    err = float((baseline - streamed).abs().max() / baseline.abs().max())
    print(f"  eigendecomposition (shared)  {decomposition:8.2f} s")
    print(f"  baseline: build U, then V U  {t_basis:8.2f} s   U holds {basis.numel() * 8 / 2**30:.2f} GiB")
    print(f"  streamed: (V G^T) W          {t_stream:8.2f} s   no p x k matrix")
    print(f"  speed-up {t_basis / t_stream:.1f}x, max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
