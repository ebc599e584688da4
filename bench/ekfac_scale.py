"""EK-FAC on a GPT of >= 10 million parameters and 10,000 training blocks, on one CPU machine.

The question is memory: EK-FAC's factors are small (in^2 + out^2 per layer), but its
eigenvalue correction and its scores touch every example's gradient in the Kronecker
eigenbasis (p numbers each). tdatune never holds n x p numbers: the correction pass and the
training eigen-coordinates stream chunk by chunk, and a score weighs the explained examples
straight from their gradients (no eigen-coordinates held), so peak memory is the model, one
chunk's rotated gradients and one copy of the explained examples' weighted gradients (m x p,
in groups of what ``--query-memory`` allows, or rank-r factors with ``--query-rank``).

Baseline measured in the same run: training steps (Adam, the setting's recipe) over the first
``--baseline-blocks`` blocks, one pass, which is also all the training the model gets (the
question is memory, not attribution quality); its time is scaled to a full epoch over the
training blocks. The stages are reported as multiples of that epoch, with the peak resident
memory of the process:

    python bench/ekfac_scale.py --threads 2                  # 11M parameters, 10,000 blocks
    python bench/ekfac_scale.py --n-train 500 --d-model 128  # a quick check of the script
    python bench/ekfac_scale.py --n-train 300 --baseline-blocks 50 --compare-path  # memory
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from common import (
    add_gpt_flags,
    add_machine_flags,
    build_gpt,
    conditions,
    peak_rss_gib,
    setup_machine,
)
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.models.training import train_model
from tdatune.settings.registry import get_setting


def main() -> None:
    """Build, train one epoch (the baseline), fit EK-FAC, score; print one line per stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_flags(parser, n_train=10_000, n_explained=100, d_model=384, n_layer=6, n_head=6)
    parser.add_argument("--chunk", type=int, default=32, help="examples per streamed chunk")
    parser.add_argument("--baseline-blocks", type=int, default=1000,
                        help="blocks of the timed training pass (scaled to an epoch)")
    parser.add_argument("--query-rank", type=int, default=None,
                        help="keep each explained example's weighted layer gradients at rank r")
    parser.add_argument("--query-memory", type=float, default=None,
                        help="GiB the explained side's weighted gradients may hold at once")
    parser.add_argument("--compare-path", action="store_true",
                        help="then score through a lambda-path (holds the explained "
                             "coordinates) and print the Pearson correlation of the two")
    add_machine_flags(parser)
    args = parser.parse_args()
    if args.query_memory is not None:
        args.query_memory = int(args.query_memory * 2**30)
    device = setup_machine(args)
    print(conditions(device))
    splits, task = build_gpt(args, args.n_explained)
    model = task.make_model()
    p = sum(v.numel() for v in model.parameters())
    print(f"  GPT: {p / 1e6:.2f}M parameters, {len(splits.train)} training blocks of "
          f"{args.block_len} tokens, {len(splits.test)} explained; peak {peak_rss_gib():.2f} GiB")

    recipe = replace(get_setting("text-gpt2").recipe, epochs=1)
    part = splits.train.subset(torch.arange(min(args.baseline_blocks, len(splits.train))))
    t0 = time.perf_counter()
    trained = train_model(task, part, recipe, 0, show_progress=False)
    epoch_s = (time.perf_counter() - t0) * len(splits.train) / len(part)
    print(f"  baseline: training steps over {len(part)} blocks, scaled to an epoch of "
          f"{len(splits.train)}: {epoch_s:.1f} s; peak {peak_rss_gib():.2f} GiB")

    ctx = AttributionContext(task, splits.train, trained.checkpoints[-1:],
                             chunk_size=args.chunk, device=device)
    t0 = time.perf_counter()
    att = make_attributor("ekfac").fit(ctx)
    fit_s = time.perf_counter() - t0
    print(f"  ekfac fit (covariances, eigenbases, eigenvalue correction) {fit_s:.1f} s "
          f"= {fit_s / epoch_s:.2f} x epoch; peak {peak_rss_gib():.2f} GiB")
    lam = 0.1 * float(att.fit_.sigma.mean())
    t0 = time.perf_counter()
    scores = att.score(splits.test, lam=lam, query_rank=args.query_rank,
                       query_memory=args.query_memory)
    score_s = time.perf_counter() - t0
    print(f"  scores [{scores.shape[0]} x {scores.shape[1]}] at lambda {lam:.3g}, explained side "
          f"weighted from its gradients in groups (query_rank {args.query_rank}), training side "
          f"streamed: {score_s:.1f} s = {score_s / epoch_s:.2f} x epoch; finite "
          f"{bool(torch.isfinite(scores).all())}; peak {peak_rss_gib():.2f} GiB")
    if not args.compare_path:
        return
    t0 = time.perf_counter()
    path = att.lambda_path(splits.test)
    coords_s = time.perf_counter() - t0
    print(f"  (then) explained coordinates of a lambda-path [{len(splits.test)} x "
          f"{path.sigma.numel()}] {coords_s:.1f} s; peak {peak_rss_gib():.2f} GiB")
    t0 = time.perf_counter()
    held = path.scores(lam).float()
    score_s = time.perf_counter() - t0
    r = float(torch.corrcoef(torch.stack([scores.reshape(-1), held.reshape(-1)]))[0, 1])
    print(f"  (then) scores through the path {score_s:.1f} s; Pearson with the grouped scores "
          f"{r:.6f}; peak {peak_rss_gib():.2f} GiB")

if __name__ == "__main__":
    main()
