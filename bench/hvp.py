"""Hessian-vector products (what IF CG and LiSSA pay per iteration) against per-example
gradients, same model, same hardware, same run; and the memory one (vector, example) pair holds.

* hvp            -- tdatune's ``TrainingObjective.hvp``: reverse-over-reverse, vmapped over the
                    vectors, chunked to ``memory_bytes``;
* loop           -- the same double backward, one vector at a time;
* fwd-over-rev   -- ``jvp`` of ``grad``, vmapped over the vectors;
* gradient       -- one batched gradient of the summed loss (the work of a training step).

Times are per (vector, example) pair, or per example for the gradient; the ratios are against
``hvp``. Memory: ``pair_bytes`` (what autograd saves for one example, measured with
saved-tensor hooks, which ``hvp`` sizes its chunks by) against the growth of the process's peak
resident memory over one ``hvp`` call of ``--memory-vectors`` vectors, divided by its pairs (run
first; a growth of 0 means the call stayed below the peak of data loading: raise the vectors).

    python bench/hvp.py                                   # the CPU-sized deep settings
    python bench/hvp.py --settings text-gpt2 --vectors 8 --threads 2
"""

from __future__ import annotations

import argparse
import resource

import torch
from torch.func import grad, jvp, vmap

from common import add_machine_flags, rate, setup_machine
from tdatune.curvature.hessian import TrainingObjective, cast_problem
from tdatune.models.training import init_model
from tdatune.settings.registry import get_setting

# the model and data options of examples/study_deep_cpu.toml
CPU_SIZED = {
    "cifar2-resnet9": ({"width": 8}, {}),
    "text-gpt2": ({"d_model": 32, "n_layer": 2, "n_head": 2},
                  {"block_len": 32, "vocab_size": 512, "max_chars": 400000}),
    "music-transformer": ({"d_model": 32, "n_layer": 2, "n_head": 2},
                          {"block_len": 32, "max_pieces": 80}),
}


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    """Parse flags and print one block per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(CPU_SIZED))
    parser.add_argument("--vectors", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--memory-vectors", type=int, default=16,
                        help="vectors of the first (memory) call; it must outgrow the memory "
                             "the process used before (data loading) to be measured")
    parser.add_argument("--precision", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    dtype = getattr(torch, args.precision)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.precision}, "
          f"{args.vectors} vectors x {args.examples} examples")
    for name in args.settings:
        measure(name, args, device, dtype)


def measure(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Time the four ways on one setting (an untrained model: the cost does not depend on the
    weights) and print them with the memory per pair."""
    model_opts, data_opts = CPU_SIZED.get(name, ({}, {}))
    splits, task = get_setting(name).build(
        sizes=(args.examples, 2, 2), task_options=model_opts, load_options=data_opts)
    model = init_model(task, 0, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    model, params, train = cast_problem(model, params, splits.train.to(device), dtype)
    obj = TrainingObjective(task, model, params, train, 1e-3)
    vecs = torch.randn(args.vectors, obj.p, dtype=dtype, device=device,
                       generator=torch.Generator(device).manual_seed(0))
    before = peak_rss()
    obj.hvp(torch.randn(args.memory_vectors, obj.p, dtype=dtype, device=device))
    grown = (peak_rss() - before) / (args.memory_vectors * args.examples)
    pairs = args.vectors * args.examples
    g = grad(obj._summed_loss())
    (x, y), = obj._batches(None, args.examples)
    theta = obj.theta

    def loop() -> torch.Tensor:
        return torch.stack([grad(lambda t, v=v: (g(t, x, y) * v).sum())(theta) for v in vecs])

    def fwd_over_rev() -> torch.Tensor:
        return vmap(lambda v: jvp(lambda t: g(t, x, y), (theta,), (v,))[1])(vecs)

    # seconds per pair (per example for the gradient): the inverse of common.rate
    times = {"hvp": 1 / rate(lambda: obj.hvp(vecs), pairs, args.repeats, device),
             "loop": 1 / rate(loop, pairs, args.repeats, device),
             "fwd-over-rev": 1 / rate(fwd_over_rev, pairs, args.repeats, device),
             "gradient": 1 / rate(lambda: g(theta, x, y), args.examples, args.repeats, device)}
    print(f"\n{name}: p = {obj.p}")
    for key, sec in times.items():
        unit = "example" if key == "gradient" else "pair"
        print(f"  {key:<13}{sec * 1e3:8.3f} ms per {unit}   {sec / times['hvp']:5.2f}x hvp")
    measured = (f"{grown / 1e6:.2f} MB ({grown / obj.pair_bytes():.2f}x)" if grown > 0 else
                "not measured (below this process's earlier peak: run the setting alone or "
                "raise --memory-vectors)")
    print(f"  memory per pair: pair_bytes {obj.pair_bytes() / 1e6:.2f} MB, peak-RSS growth "
          f"{measured}")


if __name__ == "__main__":
    main()
