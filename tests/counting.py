"""Loss and output functions that count the calls made with gradients enabled: a memory
guard must refuse before any of them."""

from __future__ import annotations

import torch
from torch import nn

CALLS = {"grad": 0}


def counting_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example; counts the calls made with gradients enabled."""
    CALLS["grad"] += int(torch.is_grad_enabled())
    return nn.functional.cross_entropy(out, y, reduction="none")


def counting_margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class logit; counts the calls made with gradients enabled."""
    CALLS["grad"] += int(torch.is_grad_enabled())
    return out.gather(1, y[:, None])[:, 0]
