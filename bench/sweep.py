"""Lambda sweeps side by side: tdatune's lambda-paths against dattri 0.3.0 (one attributor per
lambda), same trained model, data, ground truth and lambda grid, all in this run.

For each setting, L lambdas (default 20), LDS at every lambda:

* tdatune IF explicit -- ``if_explicit``: the Hessian and its eigendecomposition once
  (fit), then every lambda from the lambda-path (``lds_path``); only where p <= 12,000;
* tdatune IF CG       -- ``curvature.hessian.krylov_cg_path``: one Lanczos run of
  ``--cg-iters`` + 1 HVP steps per explained example replays CG's ``--cg-iters``-th iterate at
  every lambda (x0 = v, dattri's starting point), LDS from subset sums of the training
  gradients;
* dattri IF explicit  -- ``IFAttributorExplicit(regularization=wd + lambda)``, ``cache``,
  ``attribute`` and ``dattri.metric.lds``, a new attributor per lambda, as dattri's users
  sweep a hyperparameter (its Hessian is recomputed by ``attribute`` each time);
* dattri IF CG        -- the same with ``IFAttributorCG(max_iter=10)``.

dattri's loss is the mean training loss without the L2 term and its ``regularization`` is
weight_decay + lambda, so both libraries damp the same matrix (the training objective's
Hessian + lambda I); its target is minus the margin, so its scores have tdatune's sign.
``--dattri-lambdas K`` times dattri on K of the L lambdas (evenly spread; its per-lambda work
does not depend on lambda: a fixed number of CG iterations, one Hessian and one solve) and
scales the sum by L / K; the LDS curves are compared at those K lambdas.

    python bench/sweep.py --threads 2                                  # all three settings
    python bench/sweep.py --settings mnist-lr --precision float64 float32   # eigh precision
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from common import add_machine_flags, setup_machine
from tdatune.attributors import AttributionContext, make_attributor
from tdatune.curvature.hessian import (
    EXACT_HESSIAN_MAX_PARAMS,
    TrainingObjective,
    cast_problem,
    krylov_cg_path,
)
from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import GroundTruthConfig, build_ground_truth, sample_subsets
from tdatune.evaluate.lds import lds_path, spearman_rows, summarize
from tdatune.features.gradients import iter_per_example_grads, num_params, per_example_grads
from tdatune.models.training import train_model
from tdatune.settings.registry import get_setting

# explained (test) examples per setting: dattri's CG costs m x (iters + 1) full-data HVPs per
# lambda, so the MLP (p = 109,386) is explained on fewer examples.
EXPLAINED = {"digits-lr": 200, "mnist-lr": 200, "mnist-mlp": 50}


@dataclass
class Sweep:
    """One method's sweep: wall seconds by phase and LDS at each lambda it ran."""

    name: str
    phases: dict[str, float] = field(default_factory=dict)
    lds: dict[float, float] = field(default_factory=dict)
    scale: float = 1.0  # L / K when only K lambdas were timed

    @property
    def seconds(self) -> float:
        """Wall time of the whole L-lambda sweep (scaled when K < L lambdas were run)."""
        return sum(self.phases.values()) * self.scale


def lambda_grid(count: int) -> list[float]:
    """``count`` log-spaced lambdas from 1e-5 to 10 (mean-loss convention; weight decay of
    these settings is 1e-3)."""
    return [float(x) for x in np.logspace(-5, 1, count)]


def tdatune_explicit(ctx: AttributionContext, explained: ArrayDataset, masks: torch.Tensor,
                     outputs: np.ndarray, lambdas: list[float], precision: str) -> Sweep:
    """if_explicit: fit once, LDS at every lambda from the lambda-path."""
    sweep = Sweep(f"tdatune IF explicit ({precision})")
    start = time.perf_counter()
    att = make_attributor("if_explicit", precision=precision).fit(ctx)
    sweep.phases["fit"] = time.perf_counter() - start
    start = time.perf_counter()
    curve = lds_path(att.lambda_path(explained), masks, outputs, lambdas)
    sweep.phases["lambda-path + LDS"] = time.perf_counter() - start
    sweep.lds = {lam: r.mean for lam, r in zip(lambdas, curve, strict=True)}
    return sweep


def tdatune_cg(ctx: AttributionContext, explained: ArrayDataset, masks: torch.Tensor,
               outputs: np.ndarray, lambdas: list[float], iters: int) -> Sweep:
    """CG's iterate at every lambda from one Lanczos run (float32, as dattri runs)."""
    sweep = Sweep(f"tdatune IF CG ({iters} it.)")
    start = time.perf_counter()
    model, params = ctx.model_at(-1)
    model, params, train = cast_problem(model, params, ctx.train, torch.float32)
    _, _, expl = cast_problem(model, params, explained, torch.float32)
    v = per_example_grads(ctx.task, model, params, expl, target="output")
    probes = torch.zeros(masks.shape[0], num_params(params))
    mask_f = masks.to(torch.float32)
    for s, g in iter_per_example_grads(ctx.task, model, params, train, target="loss",
                                       chunk_size=512):
        probes += mask_f[:, s : s + g.shape[0]] @ g  # subset sums of training gradients
    sweep.phases["gradients"] = time.perf_counter() - start
    start = time.perf_counter()
    # the whole training set per HVP and every explained example in one vmap: dattri's
    # batching (one train loader batch, one test loader batch), so both use the same memory
    objective = TrainingObjective(ctx.task, model, params, train, ctx.weight_decay,
                                  chunk_size=len(train))
    path = krylov_cg_path(objective.hvp, v, probes, iters=iters, x0="rhs", batch=len(v))
    sweep.phases["Lanczos"] = time.perf_counter() - start
    start = time.perf_counter()
    preds = -path.probe_products(lambdas).double().numpy()  # [L, m, M]
    rho = spearman_rows(preds, outputs.T[None])
    sweep.lds = {lam: summarize(r).mean for lam, r in zip(lambdas, rho, strict=True)}
    sweep.phases["LDS"] = time.perf_counter() - start
    return sweep


def dattri_sweep(kind: str, ctx: AttributionContext, explained: ArrayDataset,
                 masks: torch.Tensor, outputs: np.ndarray, lambdas: list[float], timed: list[int],
                 iters: int) -> Sweep | None:
    """dattri 0.3.0, a new attributor per lambda, its own LDS; None without dattri."""
    try:
        from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit
        from dattri.metric import lds as dattri_lds
        from dattri.task import AttributionTask
    except ImportError:
        return None
    from torch.utils.data import DataLoader, TensorDataset

    task = ctx.task
    trained, params = ctx.model_at(-1)
    model = copy.deepcopy(trained).float().eval()
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    state.update({k: v.detach().clone().float() for k, v in params.items()})

    def loss_func(p, data):
        x, y = data
        return task.loss_fn(functional_call(model, p, (x,)), y).mean()

    def target_func(p, data):  # minus the explained output: dattri's scores get tdatune's sign
        x, y = data
        return -task.output_fn(functional_call(model, p, (x,)), y).mean()

    train_loader = DataLoader(TensorDataset(ctx.train.inputs.float(), ctx.train.targets),
                              batch_size=len(ctx.train))
    test_loader = DataLoader(TensorDataset(explained.inputs.float(), explained.targets),
                             batch_size=len(explained))
    indices = torch.stack([m.nonzero().squeeze(1) for m in masks])
    gt = (torch.as_tensor(outputs, dtype=torch.float32), indices)
    sweep = Sweep(f"dattri IF {kind}" + (f" ({iters} it.)" if kind == "CG" else ""),
                  scale=len(lambdas) / len(timed))
    total = 0.0
    for li in timed:
        lam = lambdas[li]
        start = time.perf_counter()
        dtask = AttributionTask(loss_func=loss_func, model=model, checkpoints=state,
                                target_func=target_func)
        reg = ctx.weight_decay + lam
        att = (IFAttributorExplicit(dtask, regularization=reg) if kind == "explicit"
               else IFAttributorCG(dtask, max_iter=iters, regularization=reg))
        # dattri's bars ignore TQDM_DISABLE; keep the table readable
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            att.cache(train_loader)
            scores = att.attribute(train_loader, test_loader)
        corr, _ = dattri_lds(scores.detach(), gt)
        total += time.perf_counter() - start
        sweep.lds[lam] = float(np.nanmean(corr.numpy()))
    sweep.phases[f"{len(timed)} lambdas"] = total
    return sweep


def bench_setting(name: str, args: argparse.Namespace, device: torch.device) -> None:
    """Train (or reuse), build ground truth (or reuse), then time every sweep."""
    setting = get_setting(name)
    splits, task = setting.build(seed=0)
    recipe = setting.recipe
    m = args.explained or EXPLAINED.get(name, 100)
    explained = splits.test.subset(torch.arange(min(m, len(splits.test))))
    work = Path(args.work) / name
    trained = train_model(task, splits.train, recipe, 0, checkpoint_dir=work / "checkpoints",
                          device=device)
    gt = build_ground_truth(task, recipe, splits.train, explained,
                            GroundTruthConfig(n_subsets=args.subsets), work / "groundtruth",
                            device=device, show_progress=False, backend="batched")
    ctx = AttributionContext(task, splits.train, trained.checkpoints,
                             weight_decay=recipe.weight_decay, device=device)
    masks, outputs = gt.masks, gt.mean_outputs
    _, params = ctx.model_at(-1)
    p = num_params(params)
    lambdas = lambda_grid(args.lambdas)
    k = max(1, min(args.dattri_lambdas, len(lambdas)))
    timed = sorted({round(i * (len(lambdas) - 1) / max(k - 1, 1)) for i in range(k)})
    print(f"\n{name}: n_train={len(splits.train)}, explained={len(explained)}, p={p:,}, "
          f"M={args.subsets} subsets, {len(lambdas)} lambdas {lambdas[0]:.0e}..{lambdas[-1]:.0e}, "
          f"device {device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # warm-up, untimed: first torch.func / dattri calls import lazily (seconds)
    small = ArrayDataset(splits.train.inputs[:64], splits.train.targets[:64])
    warm = AttributionContext(task, small, trained.checkpoints, weight_decay=recipe.weight_decay)
    warm_masks = sample_subsets(64, GroundTruthConfig(n_subsets=4))
    two = explained.subset(torch.arange(2))
    tdatune_cg(warm, two, warm_masks, outputs[:4, :2], lambdas[:2], 1)
    dattri_sweep("CG", warm, two, warm_masks, outputs[:4, :2], lambdas[:2], [0], 1)

    def done(sweep: Sweep | None) -> Sweep | None:
        if sweep is not None:  # progress line; the table follows at the end
            print(f"  ... {sweep.name}: {sum(sweep.phases.values()):.1f} s", flush=True)
        return sweep

    rows: list[tuple[Sweep, Sweep | None]] = []
    if "explicit" in args.methods and p <= EXACT_HESSIAN_MAX_PARAMS:
        ours = [done(tdatune_explicit(ctx, explained, masks, outputs, lambdas, prec))
                for prec in args.precision]
        theirs = done(dattri_sweep("explicit", ctx, explained, masks, outputs, lambdas, timed,
                              args.cg_iters)) if not args.no_dattri else None
        rows += [(ours[0], theirs)] + [(o, None) for o in ours[1:]]
    elif "explicit" in args.methods:
        print(f"  IF explicit: skipped (p = {p:,} > {EXACT_HESSIAN_MAX_PARAMS:,}: a dense "
              "Hessian is refused by both libraries' memory)")
    if "cg" in args.methods:
        ours_cg = done(tdatune_cg(ctx, explained, masks, outputs, lambdas, args.cg_iters))
        theirs_cg = done(dattri_sweep("CG", ctx, explained, masks, outputs, lambdas, timed,
                                      args.cg_iters)) if not args.no_dattri else None
        rows.append((ours_cg, theirs_cg))

    for ours, theirs in rows:
        detail = ", ".join(f"{k} {v:.2f} s" for k, v in ours.phases.items())
        print(f"  {ours.name:<30} {ours.seconds:8.2f} s   ({detail})")
        if theirs is None:
            continue
        scaled = f" x {theirs.scale:.2f} (timed {len(timed)} of {len(lambdas)})" \
            if theirs.scale != 1 else ""
        per = theirs.seconds / len(lambdas)
        gap = max(abs(theirs.lds[lam] - ours.lds[lam]) for lam in theirs.lds)
        print(f"  {theirs.name:<30} {theirs.seconds:8.2f} s   ({per:.2f} s per lambda{scaled})"
              f"   tdatune / dattri speed-up = {theirs.seconds / ours.seconds:6.2f}x"
              f"   max |LDS gap| {gap:.1e}")
        if theirs.seconds / ours.seconds < 10:
            fixed = max(ours.phases.values())
            phase = max(ours.phases, key=ours.phases.get)
            print(f"    below 10x: tdatune's '{phase}' ({fixed:.1f} s, done once) alone is "
                  f"{fixed / per:.1f} dattri lambdas; with L = {len(lambdas)} the ratio cannot "
                  f"exceed {theirs.seconds / fixed:.1f}x unless that step gets faster")
    print("  LDS by lambda:")
    names = [s.name for pair in rows for s in pair if s is not None]
    print("    lambda     " + "  ".join(f"{n[:22]:>22}" for n in names))
    for lam in lambdas:
        cells = []
        for pair in rows:
            for s in pair:
                if s is not None:
                    cells.append(f"{s.lds[lam]:22.4f}" if lam in s.lds else f"{'':>22}")
        print(f"    {lam:9.2e}  " + "  ".join(cells))


def main() -> None:
    """Parse flags and run each setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["digits-lr", "mnist-lr", "mnist-mlp"])
    parser.add_argument("--lambdas", type=int, default=20, help="L: lambdas in the sweep")
    parser.add_argument("--dattri-lambdas", type=int, default=20,
                        help="K <= L lambdas dattri runs (time scaled by L / K)")
    parser.add_argument("--explained", type=int, default=None,
                        help="explained test examples (default per setting: " +
                        ", ".join(f"{k} {v}" for k, v in EXPLAINED.items()) + ")")
    parser.add_argument("--subsets", type=int, default=50, help="ground-truth subsets M")
    parser.add_argument("--cg-iters", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["explicit", "cg"],
                        choices=["explicit", "cg"])
    parser.add_argument("--precision", nargs="+", default=["float64"],
                        choices=["float32", "float64"],
                        help="if_explicit eigendecomposition dtype(s); the first is compared "
                             "with dattri")
    parser.add_argument("--work", default="runs/bench_sweep",
                        help="checkpoints and ground truth, reused by a rerun")
    parser.add_argument("--no-dattri", action="store_true")
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    try:
        import dattri  # noqa: F401
    except ImportError:
        if not args.no_dattri:
            print("dattri not importable: pip install --no-deps dattri==0.3.0 (tdatune only)")
    for name in args.settings:
        bench_setting(name, args, device)


if __name__ == "__main__":
    main()
