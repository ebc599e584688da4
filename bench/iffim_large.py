"""Unprojected IFFIM on many training examples of a Hugging Face ViT: the route, said before
work, and the peak resident memory.

The model is ``examples/vit_classifier.py`` (hidden 32, two layers, 7x7 patches; its p is
printed) trained on ``--n-train`` Fashion-MNIST images. At n = 20,000 the exact path would
eigendecompose the p x p Fisher (min(n, p) above ``iffim.EXACT_EIGH_LIMIT``); by default
IFFIM keeps its top ``TOP_RANK`` eigenpairs by randomised subspace iteration instead. Printed:
the estimate ``attribute()`` checks before any work (both routes), then the fit and the
scores of ``--n-explained`` test images with their times and the process's peak resident
memory. ``--eig-rank N`` (N >= the size) forces the exact route for comparison.

    PYTHONPATH=. python bench/iffim_large.py --n-train 20000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_machine_flags, conditions, peak_rss_gib, setup_machine
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.models.training import train_model
from tdatune.study.attribute import attribute_estimate


def main() -> None:
    """Train, estimate both routes, fit and score; one line per stage."""
    from examples.vit_classifier import vit_setting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-explained", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eig-rank", type=int, default=None,
                        help="IFFIM's eig_rank (default: its own choice)")
    parser.add_argument("--chunk", type=int, default=256)
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    print(conditions(device))
    setting = vit_setting(epochs=args.epochs)
    splits, task = setting.build(seed=0, sizes=(args.n_train, 10, args.n_explained))
    p = sum(v.numel() for v in task.make_model().parameters())
    print(f"  ViT: {p:,} parameters, {len(splits.train):,} training images; "
          f"peak {peak_rss_gib():.2f} GiB")
    for rank, what in ((None, "default route"), (10**9, "exact route")):
        est = attribute_estimate(task, splits.train, splits.test, attributor="iffim",
                                 params={"eig_rank": rank})
        print(f"  estimate, {what}: {est.describe()}")
    t0 = time.perf_counter()
    trained = train_model(task, splits.train, setting.recipe, 0)
    print(f"  training ({args.epochs} epoch(s)) {time.perf_counter() - t0:.1f} s; "
          f"peak {peak_rss_gib():.2f} GiB")
    ctx = AttributionContext(task, splits.train, trained.checkpoints[-1:],
                             chunk_size=args.chunk, device=device)
    params = {} if args.eig_rank is None else {"eig_rank": args.eig_rank}
    t0 = time.perf_counter()
    att = make_attributor("iffim", **params).fit(ctx)
    print(f"  iffim fit ({att.eigen.form} form, {att.eigen.sigma.numel():,} eigenpairs, "
          f"truncated {att.eigen.truncated}) {time.perf_counter() - t0:.1f} s; "
          f"peak {peak_rss_gib():.2f} GiB")
    t0 = time.perf_counter()
    lam = float(torch.quantile(att.eigen.sigma, 0.9))
    scores = att.score(splits.test, lam=lam)
    print(f"  scores [{scores.shape[0]} x {scores.shape[1]}] at lambda {lam:.3g} "
          f"{time.perf_counter() - t0:.1f} s, finite {bool(torch.isfinite(scores).all())}; "
          f"peak {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
