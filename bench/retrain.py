"""Retraining throughput for LDS ground truth: batched vs one model at a time vs dattri.

Models per second for M subset models (alpha = 0.5) of a setting, all measured in this run on
this hardware:

* batched     -- tdatune.models.batched: the M models trained together (stacked parameters);
* sequential  -- tdatune's one-at-a-time loop (train_model per subset), on the first K models;
* dattri      -- dattri 0.3.0's ``retrain_lds`` loop driving the same training function on K
                 subsets (skipped when dattri is not importable).

The sequential and dattri loops are timed on K <= M models (``--sequential-models``) to keep
the run short; their per-model cost does not depend on M. The batched models' outputs are
checked against the sequential ones for the K shared subsets.

    python bench/retrain.py                          # mnist-lr and mnist-mlp, M = 50
    python bench/retrain.py --epochs 5 --threads 1   # shorter MLP recipe, one thread
    python bench/retrain.py --settings mnist-mlp --chunk-sizes 5 10 25 50   # batched only
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from common import add_machine_flags, count_flops, gemm_peak, setup_machine
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, retrain_outputs, sample_subsets
from tdatune.models.batched import models_per_chunk, retrain_outputs_batched
from tdatune.models.training import train_model
from tdatune.settings.registry import get_setting


def _dattri_rate(task, recipe, train, k: int, device) -> float | None:
    """Models per second of dattri's retrain_lds loop over k subsets, or None without dattri."""
    try:
        from dattri.model_util.retrain import retrain_lds
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    def train_func(dataloader, seed=None, **_):
        xs, ys = zip(*dataloader, strict=True)
        data = ArrayDataset(torch.cat(xs), torch.cat(ys))
        model = task.make_model()
        model.load_state_dict(train_model(task, data, recipe, seed or 0, device=device).state)
        return model

    loader = DataLoader(TensorDataset(train.inputs, train.targets), batch_size=recipe.batch_size)
    path = tempfile.mkdtemp(prefix="dattri-bench-")
    try:
        start = time.perf_counter()
        # dattri's per-subset progress bars would flood the table (they ignore TQDM_DISABLE).
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            retrain_lds(train_func, loader, path, num_subsets=k, subset_ratio=0.5, seed=0)
        return k / (time.perf_counter() - start)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bench_setting(name: str, models: int, k: int, epochs: int | None, device: torch.device,
                  use_dattri: bool) -> dict[str, float | None]:
    """Time the three loops for one setting and print a line per loop."""
    setting = get_setting(name)
    splits, task = setting.build()
    recipe = setting.recipe if epochs is None else replace(setting.recipe, epochs=epochs)
    train, explained = splits.train, splits.test
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=models, alpha=0.5))
    seeds = list(range(models))
    fit = min(models, models_per_chunk(task, recipe, train, device=device,
                                       subset_size=int(masks[0].sum())))
    chunk = math.ceil(models / math.ceil(models / fit))  # equal chunks: 50 at 12 -> 5 x 10
    # Warm-up on a tiny problem, not timed: first calls of torch.func and torch.optim import
    # modules lazily (about 2 s), which would otherwise be charged to whichever loop runs first.
    tiny = replace(recipe, epochs=1, lbfgs_iters=2)
    retrain_outputs_batched(task, tiny, train, explained, masks[:2], seeds[:2], device=device)
    retrain_outputs(task, tiny, train, explained, masks[0], seeds[0], device)

    start = time.perf_counter()
    batched = np.concatenate([
        retrain_outputs_batched(task, recipe, train, explained, masks[i : i + chunk],
                                seeds[i : i + chunk], device=device)
        for i in range(0, models, chunk)])
    batched_rate = models / (time.perf_counter() - start)

    start = time.perf_counter()
    sequential = np.stack([retrain_outputs(task, recipe, train, explained, masks[m], seeds[m],
                                           device) for m in range(k)])
    sequential_rate = k / (time.perf_counter() - start)
    dattri_rate = _dattri_rate(task, recipe, train, k, device) if use_dattri else None

    # Roofline: one model's matrix-product FLOPs (the sequential loop's arithmetic, which no
    # batching removes) against the machine's GEMM rate measured now.
    flops = count_flops(lambda: retrain_outputs(task, recipe, train, explained, masks[0],
                                                seeds[0], device))
    peak = gemm_peak(device)
    achieved = flops * sequential_rate
    gap = float(np.abs(batched[:k] - sequential).max())
    print(f"\n{name}: n_train={len(train)}, M={models} (chunks of {chunk}), recipe "
          f"{recipe.optimizer} x {recipe.epochs} epochs"
          + (f" x {recipe.lbfgs_iters} iters" if recipe.optimizer == "lbfgs" else "")
          + f", device {device}, torch threads {torch.get_num_threads()}")
    print(f"  batched     {batched_rate:8.3f} models/s")
    print(f"  sequential  {sequential_rate:8.3f} models/s  (K={k})   batched / sequential = "
          f"{batched_rate / sequential_rate:6.2f}x")
    if dattri_rate is not None:
        print(f"  dattri 0.3  {dattri_rate:8.3f} models/s  (K={k})   batched / dattri     = "
              f"{batched_rate / dattri_rate:6.2f}x")
    elif use_dattri:
        print("  dattri      not importable (pip install --no-deps dattri==0.3.0 pyyaml)")
    print(f"  max |output(batched) - output(sequential)| over {k} models: {gap:.2e}")
    print(f"  roofline    {flops / 1e9:.2f} GFLOP of matrix products per model; sequential runs "
          f"them at {achieved / 1e9:.1f} GFLOP/s, a {peak / 1e9:.0f} GFLOP/s GEMM here -> no "
          f"batching can beat sequential by more than {peak / achieved:.1f}x on this hardware")
    print(f"  batched runs that arithmetic at {flops * batched_rate / 1e9:.1f} GFLOP/s: "
          f"{flops * batched_rate / peak:.2f} of the roofline")
    return {"batched": batched_rate, "sequential": sequential_rate, "dattri": dattri_rate,
            "ceiling": peak / achieved, "of_roofline": flops * batched_rate / peak}


def chunk_sizes(name: str, models: int, sizes: list[int], repeats: int,
                device: torch.device) -> None:
    """The batched path alone, on the same M models cut into chunks of each size."""
    setting = get_setting(name)
    splits, task = setting.build()
    train, explained, recipe = splits.train, splits.test, setting.recipe
    masks = sample_subsets(len(train), GroundTruthConfig(n_subsets=models, alpha=0.5))
    print(f"\n{name}: M={models}, batched models/s by chunk size ({repeats} runs each, "
          f"interleaved), torch threads {torch.get_num_threads()}")
    rates: dict[int, list[float]] = {c: [] for c in sizes}
    for _ in range(repeats):
        for size in sizes:
            start = time.perf_counter()
            for i in range(0, models, size):
                retrain_outputs_batched(task, recipe, train, explained, masks[i : i + size],
                                        list(range(i, min(i + size, models))), device=device)
            rates[size].append(models / (time.perf_counter() - start))
    for size in sizes:
        print(f"  chunks of {size:3d}: " + ", ".join(f"{r:.2f}" for r in rates[size]))


def main() -> None:
    """Parse flags and run the benchmark for each setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["mnist-lr", "mnist-mlp"])
    parser.add_argument("--models", type=int, default=50, help="M subset models (batched)")
    parser.add_argument("--sequential-models", type=int, default=10,
                        help="K models timed in the one-at-a-time and dattri loops")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the recipe's epochs (L-BFGS: calls of lbfgs_iters)")
    add_machine_flags(parser)
    parser.add_argument("--no-dattri", action="store_true", help="skip the dattri loop")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None,
                        help="time only the batched path, with chunks of each size")
    parser.add_argument("--repeats", type=int, default=2, help="runs per chunk size")
    args = parser.parse_args()
    device = setup_machine(args)
    if args.chunk_sizes:
        for name in args.settings:
            chunk_sizes(name, args.models, args.chunk_sizes, args.repeats, device)
        return
    k = min(args.sequential_models, args.models)
    for name in args.settings:
        bench_setting(name, args.models, k, args.epochs, device, not args.no_dattri)


if __name__ == "__main__":
    main()
