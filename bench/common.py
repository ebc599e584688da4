"""Helpers shared by the benchmark scripts: common flags and timing."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

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
