"""The numeric environment a result was computed in: torch version, thread counts, BLAS and the
CPU kernel torch dispatches to. Recorded beside every trained setting, ground truth and sweep
cell (not part of their identity: the same computation on another thread count is the same
question, but a chaotic model's numbers move with it; see docs/study.md)."""

from __future__ import annotations

import platform
import re
from typing import Any

import numpy as np
import torch


def _build_setting(config: str, key: str) -> str:
    match = re.search(rf"{key}=([^,\s]+)", config)
    return match.group(1) if match else "unknown"


def numeric_environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """A JSON-ready record of what can change floating-point results between two runs."""
    config = torch.__config__.show()
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "blas": _build_setting(config, "BLAS_INFO"),
        "lapack": _build_setting(config, "LAPACK_INFO"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    dev = torch.device(device) if device is not None else torch.device("cpu")
    env["device"] = str(dev)
    if dev.type == "cuda" and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
    return env


__all__ = ["numeric_environment"]
