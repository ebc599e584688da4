"""How well a ranking finds known-bad training examples (flipped labels): ROC AUC and the
fraction found among the top-ranked, for one score vector or a path of them."""

from __future__ import annotations

import torch
from scipy.stats import rankdata

TOP_FRACTION = 0.1


def _positives(n: int, flagged: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    idx = torch.as_tensor(flagged, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"flagged indices must lie in 0..{n - 1}")
    mask[idx] = True
    if not 0 < int(mask.sum()) < n:
        raise ValueError("a ranking's AUC needs both flagged and unflagged examples")
    return mask


def roc_auc(scores: torch.Tensor, flagged: torch.Tensor) -> float:
    """P(score of a flagged example > score of an unflagged one), ties counting one half (the
    Mann-Whitney statistic): 1 is a perfect ranking, 0.5 chance."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("the ranking scores hold NaN or infinite values")
    pos = _positives(s.numel(), flagged)
    ranks = torch.from_numpy(rankdata(s.numpy()))  # tied scores share their mean rank
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def found_in_top(scores: torch.Tensor, flagged: torch.Tensor,
                 fraction: float = TOP_FRACTION) -> float:
    """Fraction of the flagged examples among the ``fraction`` highest-scored (ties broken by
    index, lower first)."""
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    pos = _positives(s.numel(), flagged)
    k = max(1, round(fraction * s.numel()))
    top = torch.sort(-s, stable=True).indices[:k]
    return float(pos[top].sum()) / float(pos.sum())


def detection(scores: torch.Tensor, flagged: torch.Tensor,
              fraction: float = TOP_FRACTION) -> dict[str, float]:
    """``{"auc", "found_top"}`` of one ranking (higher score: more suspect)."""
    return {"auc": roc_auc(scores, flagged), "found_top": found_in_top(scores, flagged, fraction)}
