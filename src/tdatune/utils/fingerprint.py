"""Stable content fingerprints of arrays and configurations, used to refuse stale stored results."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch


def fingerprint_tensors(*tensors: torch.Tensor | np.ndarray) -> str:
    """SHA-256 (hex, 16 chars) of the shapes, dtypes and bytes of the given arrays."""
    digest = hashlib.sha256()
    for t in tensors:
        arr = t.detach().cpu().contiguous().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        arr = np.ascontiguousarray(arr)
        digest.update(f"{arr.shape}|{arr.dtype}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def fingerprint_config(config: Any) -> str:
    """SHA-256 (hex, 16 chars) of a JSON-serialisable configuration, key order ignored."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries that differ between two JSON-like values (``task.loss_fn``),
    so a refusal names the field that changed rather than a whole section."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out.append(path)
            else:
                out.extend(differences(old[key], new[key], path))
        return out
    same = json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)
    return [] if same else [prefix or "(value)"]
