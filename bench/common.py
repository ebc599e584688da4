"""Helpers shared by the benchmark scripts: common flags and timing."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tdatune.utils.device import resolve_device


def add_machine_flags(parser: argparse.ArgumentParser) -> None:
    """--threads and --device."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def setup_machine(args: argparse.Namespace) -> torch.device:
    """Quiet progress bars, set torch threads, resolve the device."""
    os.environ.setdefault("TDATUNE_NO_PROGRESS", "1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall times are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(work: Callable[[], None], items: int, repeats: int, device: torch.device) -> float:
    """Items per second of ``work`` (one warm-up call, then ``repeats`` timed calls)."""
    work()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    sync(device)
    return repeats * items / (time.perf_counter() - start)


def gemm_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matrix product on ``device``: the practical compute ceiling
    the roofline bounds are taken against, measured in the same run as the benchmark."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return rate(lambda: a @ b, 2 * size**3, repeats, device)


def count_flops(work: Callable[[], object]) -> int:
    """Matrix-product FLOPs (mm, bmm, addmm, convolutions) ``work`` performs, counted by
    torch's FlopCounterMode on an untimed call."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return int(counter.get_total_flops())


def add_sweep_flags(parser: argparse.ArgumentParser) -> None:
    """--spec, --out, --settings and --seed: trained settings of a sweep directory."""
    parser.add_argument("--spec", required=True, help="the sweep's TOML file")
    parser.add_argument("--out", required=True, help="the sweep directory (trained, with GT)")
    parser.add_argument("--settings", nargs="+", required=True, help="setting labels")
    parser.add_argument("--seed", type=int, default=None,
                        help="the sweep's seed (default: the spec's)")


def ranked_settings(doc: str, ranks: list[int]) -> tuple[argparse.Namespace, Iterator[Any]]:
    """Parse the sweep, ``--ranks`` and machine flags of a script documented by ``doc``,
    print the run's conditions, and return the arguments with an iterator of ``(label,
    trained setting, ground truth)`` over ``--settings`` (resumed from the sweep's files)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_sweep_flags(parser)
    parser.add_argument("--ranks", nargs="+", type=int, default=ranks)
    add_machine_flags(parser)
    args = parser.parse_args()
    device = setup_machine(args)
    spec, work = sweep_workspace(args, device)
    print(conditions(device))

    def settings() -> Iterator[Any]:
        for label in args.settings:
            yield (label, work.trained(label),  # type: ignore[attr-defined]
                   work.groundtruth(label, spec.groundtruth.alpha))  # type: ignore[attr-defined]

    return args, settings()


def sweep_workspace(args: argparse.Namespace, device: torch.device) -> tuple[object, object]:
    """(spec, Workspace) of a sweep directory: its trained settings and ground truths are
    resumed from the files (nothing is retrained when the sweep has run)."""
    from dataclasses import replace
    from pathlib import Path

    from tdatune.study.spec import load_spec
    from tdatune.study.sweep import Workspace

    spec = load_spec(args.spec)
    if args.seed is not None:
        spec = replace(spec, seed=args.seed)
    return spec, Workspace(spec, Path(args.out), str(device), False, lambda *a, **k: None)


def row_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Pearson correlation of a's and b's rows."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of all entries of a and b."""
    return float(torch.corrcoef(torch.stack([a.reshape(-1).double(), b.reshape(-1).double()]))[0, 1])


def conditions(device: torch.device | str) -> str:
    """One line of the run's conditions: torch, threads, CPUs, processor, load, device."""
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus "
            f"{os.cpu_count()}, {platform.processor() or platform.machine()}, load "
            f"{os.getloadavg()[0]:.1f}, device {device}")


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def add_gpt_flags(parser: argparse.ArgumentParser, *, n_train: int, n_explained: int,
                  d_model: int, n_layer: int, n_head: int) -> None:
    """--n-train, --n-explained, --d-model, --n-layer, --n-head and --block-len: a GPT of the
    text-gpt2 setting (vocabulary 1024) and its sizes."""
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-explained", type=int, default=n_explained)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--n-layer", type=int, default=n_layer)
    parser.add_argument("--n-head", type=int, default=n_head)
    parser.add_argument("--block-len", type=int, default=64, help="tokens per block")


def build_gpt(args: argparse.Namespace, n_val: int) -> tuple[Any, Any]:
    """(splits, task) of the text-gpt2 setting at the sizes of :func:`add_gpt_flags`."""
    from tdatune.settings.registry import get_setting

    return get_setting("text-gpt2").build(
        seed=0, sizes=(args.n_train, n_val, args.n_explained),
        task_options={"d_model": args.d_model, "n_layer": args.n_layer, "n_head": args.n_head},
        load_options={"block_len": args.block_len, "vocab_size": 1024})
