"""Per-example gradient throughput against plain training-step throughput, same model, same
hardware, same run.

Rows (examples per second over the training set, and the ratio to the training step):

* train step      -- forward + backward + optimizer step on minibatches of ``--batch-size``
                     (the setting's recipe batch size by default): the baseline;
* vmap rows       -- the path before layer hooks: torch.func vmap over grad, rows formed;
* hooked rows     -- layer hooks, per-example rows [b, p] formed (tdatune.features.gradients);
* inner products  -- layer hooks, each training example's inner products with ``--explained``
                     explained examples' gradients, from the factors or formed rows by the
                     FLOP rule (tdatune.features.factored.inner_products): TracIn's and the
                     kernel's work, no [n, p] matrix written;
* kronecker d     -- layer hooks, Kronecker-projected features at total width <= d;
* gaussian d      -- hooked rows then a dense Gaussian projection to d.

    python bench/gradients.py                                   # mnist-mlp and text-gpt2
    python bench/gradients.py --settings mnist-mlp --threads 2 --proj-dim 512
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from common import add_machine_flags, rate, setup_machine
from tdatune.data.base import ArrayDataset
from tdatune.data.batches import batch_len
from tdatune.features.factored import KroneckerProjector, inner_products
from tdatune.features.gradients import GradientSource, iter_per_example_grads, num_params
from tdatune.features.projection import Projector
from tdatune.models.training import init_model, objective
from tdatune.settings.registry import get_setting


def train_step_rate(task, train: ArrayDataset, batch_size: int, device: torch.device,
                    repeats: int) -> float:
    """Examples per second of training steps (forward, backward, update)."""
    model = init_model(task, 0, device)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9)

    def epoch() -> None:
        for _, x, y in train.batches(batch_size, device):
            opt.zero_grad()
            objective(task, model, params, x, y, 1e-3).backward()
            opt.step()

    return rate(epoch, len(train), repeats, device)


def gradient_rates(task, train: ArrayDataset, explained: ArrayDataset, chunk: int,
                   proj_dim: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Examples per second of each per-example row kind (see the module docstring)."""
    model = init_model(task, 0, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = len(train)
    out: dict[str, float] = {}

    def passes(projector=None):
        def run() -> None:
            for _ in iter_per_example_grads(task, model, params, train, chunk_size=chunk,
                                            projector=projector):
                pass
        return run

    source = GradientSource(task, model, params, probe=train)
    out["hooked rows"] = rate(passes(), n, repeats, device)

    width = num_params(params)
    legacy = GradientSource(task, model, params)
    legacy.mode = "vmap"  # the path before layer hooks

    def vmap_rows() -> None:
        for _, x, y in train.batches(chunk, device):
            legacy.write(x, y, torch.empty(batch_len(x), width, device=device))

    out["vmap rows (before)"] = rate(vmap_rows, n, 1, device)
    layers = [c for c in source.plan.layers if c.factored]
    _, ex, ey = next(explained.batches(len(explained), device))
    query = source.captured(ex, ey, len(explained))

    def products() -> None:
        for _, x, y in train.batches(chunk, device):
            inner_products(layers, query, source.captured(x, y, batch_len(x)))

    out[f"inner products, {len(explained)} explained"] = rate(products, n, repeats, device)
    kron = KroneckerProjector(model, params, proj_dim, seed=0)
    out[f"kronecker d={kron.d}"] = rate(passes(kron), n, repeats, device)
    gauss = Projector(width, proj_dim, seed=0, device=device)
    out[f"gaussian d={proj_dim}"] = rate(passes(gauss), n, repeats, device)
    return out


def main() -> None:
    """Parse flags and print one table per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["mnist-mlp", "text-gpt2"])
    parser.add_argument("--chunk", type=int, default=256, help="per-example gradient chunk")
    parser.add_argument("--batch-size", type=int, default=None, help="training minibatch")
    parser.add_argument("--proj-dim", type=int, default=512, help="projection dim d")
    parser.add_argument("--explained", type=int, default=100,
                        help="explained examples for the inner-product row")
    parser.add_argument("--n", type=int, default=None, help="training examples (default all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streaming", type=int, default=0,
                        help="then run bench/streaming.py on this many synthetic examples "
                             "(kronecker projection at --proj-dim; killed and resumed) and "
                             "print its peak memory (0: skip)")
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}, chunk {args.chunk}")
    for name in args.settings:
        setting = get_setting(name)
        splits, task = setting.build()
        train = splits.train if args.n is None else splits.train.slice(0, args.n)
        explained = splits.test.slice(0, args.explained)
        batch = args.batch_size or setting.recipe.batch_size
        p = sum(q.numel() for q in task.make_model().parameters())
        steps = train_step_rate(task, train, batch, device, args.repeats)
        rates = gradient_rates(task, train, explained, args.chunk, args.proj_dim, device,
                               args.repeats)
        print(f"\n{name}: p = {p}, n = {len(train)}, training batch {batch}")
        print(f"{'rows':<34}{'examples/s':>12}{'x training':>12}")
        print(f"{'train step (baseline)':<34}{steps:>12.0f}{1.0:>12.2f}")
        for row, value in rates.items():
            print(f"{row:<34}{value:>12.0f}{value / steps:>12.2f}")
    if args.streaming:
        streaming(args.streaming, args.proj_dim, torch.get_num_threads())


def streaming(n: int, proj_dim: int, threads: int) -> None:
    """bench/streaming.py in a subprocess; its lines on memory, resumption and the result."""
    print(f"\nstreaming: {n:,} examples of the MLP 784-128-64-10 into a store, kronecker "
          f"d <= {proj_dim} (bench/streaming.py)")
    cmd = [sys.executable, str(Path(__file__).with_name("streaming.py")), "--n", str(n),
           "--proj-dim", str(proj_dim), "--proj-kind", "kronecker", "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    keep = ("run ", "killed", "chunks computed", "peak resident", "result", "estimate")
    for line in done.stdout.splitlines():
        if any(k in line for k in keep):
            print("  " + line.strip())
    if done.returncode:
        print(f"  bench/streaming.py failed ({done.returncode}): {done.stderr[-500:]}")


if __name__ == "__main__":
    main()
