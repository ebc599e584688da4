"""tdatune's EK-FAC against Kronfluence's at millions of parameters: fit + score time, the peak
resident memory of each library in its own process, and score agreement at equal damping.

The parent builds a GPT (the ``text-gpt2`` setting: ``--d-model``, ``--n-layer``; vocabulary
1024, blocks of 64 tokens) on ``--n-train`` training blocks, trains it for ``--baseline-blocks``
blocks (the question is cost and agreement, not attribution quality) and saves the state.
Then each library runs in a fresh subprocess on that state: EK-FAC on the same ``nn.Linear``
layers (Kronfluence tracks those), the empirical Fisher, scores of ``--n-explained`` test
blocks at ``--damping`` (one value for every layer, the mean-loss scale both use). Each child
prints its fit and score seconds and its peak resident memory and writes its scores. The
parent prints one row per library and the Pearson correlation of the two score matrices. No
ground truth is built: retraining at this size is not affordable on a CPU.

Needs kronfluence 1.0.1 beside the pinned CPU torch (see ``bench/kronfluence.py``):

    pip install --no-deps kronfluence==1.0.1 einconv einops opt-einsum
    PYTHONPATH=. python bench/kronfluence_scale.py --n-train 5000 --d-model 256 --n-layer 4 \\
        --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import (
    add_gpt_flags,
    add_machine_flags,
    build_gpt,
    conditions,
    peak_rss_gib,
    pearson,
    setup_machine,
)
from tdatune.settings.registry import get_setting

HERE = Path(__file__).resolve().parent


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The setting's splits and task at the requested sizes (the same in every process)."""
    return build_gpt(args, 10)


def linear_layers(model: nn.Module) -> list[str]:
    """The modules both libraries factor: nn.Linear."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def run_tdatune(args: argparse.Namespace, task: Any, splits: Any, state: dict) -> dict[str, Any]:
    """Fit and score with tdatune's EK-FAC."""
    from tdatune.attributors import AttributionContext, make_attributor

    ctx = AttributionContext(task, splits.train, [state], chunk_size=args.batch)
    layers = linear_layers(ctx.model_at(-1)[0])
    t0 = time.perf_counter()
    att = make_attributor("ekfac", layers=layers).fit(ctx)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = att.score(splits.test, lam=args.damping)
    return {"fit s": fit_s, "score s": time.perf_counter() - t0, "scores": scores}


def run_kronfluence(args: argparse.Namespace, task: Any, splits: Any, state: dict
                    ) -> dict[str, Any]:
    """Fit and score with Kronfluence's EK-FAC (its wrappers from ``bench/kronfluence.py``)."""
    import importlib.util

    # bench/kronfluence.py first: it takes this folder off the import path, so that the
    # package, not that script, is what ``import kronfluence`` finds below.
    spec = importlib.util.spec_from_file_location("kf_bench", HERE / "kronfluence.py")
    assert spec is not None and spec.loader is not None
    kf_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kf_bench)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    model = task.make_model()
    model.load_state_dict(state)
    model.eval()
    ktask = kf_bench.kronfluence_task(task, "empirical")
    model = prepare_model(model, ktask)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer(analysis_name="scale", model=model, task=ktask, output_dir=tmp,
                            disable_tqdm=True, cpu=True, disable_model_save=True)
        t0 = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="f", dataset=kf_bench.Pairs(splits.train),
            per_device_batch_size=args.batch,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            scores_name="s", factors_name="f", query_dataset=kf_bench.Pairs(splits.test),
            train_dataset=kf_bench.Pairs(splits.train),
            per_device_query_batch_size=len(splits.test), per_device_train_batch_size=args.batch,
            score_args=ScoreArguments(damping_factor=args.damping), overwrite_output_dir=True)
        score_s = time.perf_counter() - t0
        scores = -analyzer.load_pairwise_scores("s")["all_modules"].float()
    return {"fit s": fit_s, "score s": score_s, "scores": scores}


def child(args: argparse.Namespace) -> None:
    """One library in this process: load the state, fit, score, write the row and scores."""
    setup_machine(args)
    splits, task = build(args)
    state = torch.load(args.state, weights_only=True)
    run = run_tdatune if args.child == "tdatune" else run_kronfluence
    row = run(args, task, splits, state)
    torch.save(row.pop("scores"), args.out / f"{args.child}.pt")
    row["peak GiB"] = peak_rss_gib()
    (args.out / f"{args.child}.json").write_text(json.dumps(row))


def main() -> None:
    """Build and train once, run each library in its own process, compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_flags(parser, n_train=5000, n_explained=50, d_model=256, n_layer=4, n_head=4)
    parser.add_argument("--baseline-blocks", type=int, default=500,
                        help="training blocks of the one training pass")
    parser.add_argument("--batch", type=int, default=32, help="examples per chunk / batch")
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--child", choices=("tdatune", "kronfluence"), help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    add_machine_flags(parser)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    device = setup_machine(args)
    print(conditions(device))
    splits, task = build(args)
    from tdatune.models.training import train_model

    recipe = replace(get_setting("text-gpt2").recipe, epochs=1)
    part = splits.train.subset(torch.arange(min(args.baseline_blocks, len(splits.train))))
    state = train_model(task, part, recipe, 0, show_progress=False).checkpoints[-1]
    p = sum(v.numel() for v in state.values())
    print(f"  GPT: {p / 1e6:.2f}M parameters, {len(splits.train):,} training blocks of 64 tokens, "
          f"{len(splits.test)} explained, damping {args.damping:g}, batch {args.batch}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        torch.save(state, out / "state.pt")
        for lib in ("tdatune", "kronfluence"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", lib,
                   "--state", str(out / "state.pt"), "--out", str(out)]
            for flag in ("n_train", "n_explained", "d_model", "n_layer", "n_head", "block_len",
                         "batch", "damping", "threads"):
                value = getattr(args, flag)
                if value is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(value)]
            subprocess.run(cmd, check=True, env={**os.environ, "TDATUNE_NO_PROGRESS": "1"})
            rows[lib] = json.loads((out / f"{lib}.json").read_text())
            print(f"  {lib}: fit {rows[lib]['fit s']:.1f} s, score {rows[lib]['score s']:.1f} s, "
                  f"peak {rows[lib]['peak GiB']:.2f} GiB", flush=True)
        ours, theirs = torch.load(out / "tdatune.pt"), torch.load(out / "kronfluence.pt")
    t, k = rows["tdatune"], rows["kronfluence"]
    print(f"  time (fit + score) tdatune / kronfluence: "
          f"{(t['fit s'] + t['score s']) / (k['fit s'] + k['score s']):.2f}; peak memory "
          f"{t['peak GiB'] / k['peak GiB']:.2f}; Pearson at equal damping {pearson(ours, theirs):.6f}")


if __name__ == "__main__":
    main()
