"""Per-example gradient throughput against plain training-step throughput, same model, same
hardware, same run.

* per-example  -- tdatune.features.gradients.iter_per_example_grads (vmap over grad) over the
                  training set, optionally projected (``--proj-dim``);
* train step   -- forward + backward + SGD step on minibatches of ``--batch-size`` (the
                  setting's recipe batch size by default), the work one epoch of training does.

Both report examples per second; the ratio says how many training epochs one pass of
per-example gradients costs.

    python bench/gradients.py                              # mnist-lr and mnist-mlp
    python bench/gradients.py --proj-dim 512 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from common import add_machine_flags, rate, setup_machine
from tdatune.features.gradients import iter_per_example_grads, num_params
from tdatune.features.projection import Projector
from tdatune.models.training import init_model, objective
from tdatune.settings.registry import get_setting


def train_step_rate(task, train, batch_size: int, device: torch.device, repeats: int) -> float:
    """Examples per second of SGD training steps (forward, backward, update)."""
    model = init_model(task, 0, device)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9)
    x, y = train.inputs.to(device), train.targets.to(device)

    def epoch() -> None:
        for start in range(0, x.shape[0], batch_size):
            opt.zero_grad()
            objective(task, model, params, x[start : start + batch_size],
                      y[start : start + batch_size], 1e-3).backward()
            opt.step()

    return rate(epoch, x.shape[0], repeats, device)


def per_example_rate(task, train, chunk: int, proj_dim: int | None, device: torch.device,
                     repeats: int) -> float:
    """Examples per second of per-example loss gradients (projected when ``proj_dim``)."""
    model = init_model(task, 0, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    projector = (Projector(num_params(params), proj_dim, seed=0, device=device)
                 if proj_dim else None)

    def one_pass() -> None:
        for _ in iter_per_example_grads(task, model, params, train, chunk_size=chunk,
                                        projector=projector):
            pass

    return rate(one_pass, len(train), repeats, device)


def main() -> None:
    """Parse flags and print one table row per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["mnist-lr", "mnist-mlp"])
    parser.add_argument("--chunk", type=int, default=256, help="per-example gradient chunk")
    parser.add_argument("--batch-size", type=int, default=None, help="training minibatch")
    parser.add_argument("--proj-dim", type=int, default=None, help="project gradients to d")
    parser.add_argument("--repeats", type=int, default=2)
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    print(f"device {device}, torch threads {torch.get_num_threads()}, chunk {args.chunk}, "
          f"projection {args.proj_dim or 'none'}")
    print(f"{'setting':<12}{'p':>9}{'per-example ex/s':>19}{'train-step ex/s':>18}{'ratio':>8}")
    for name in args.settings:
        setting = get_setting(name)
        splits, task = setting.build()
        batch = args.batch_size or setting.recipe.batch_size
        p = sum(q.numel() for q in task.make_model().parameters())
        grads = per_example_rate(task, splits.train, args.chunk, args.proj_dim, device,
                                 args.repeats)
        steps = train_step_rate(task, splits.train, batch, device, args.repeats)
        print(f"{name:<12}{p:>9}{grads:>19.0f}{steps:>18.0f}{grads / steps:>8.2f}")


if __name__ == "__main__":
    main()
