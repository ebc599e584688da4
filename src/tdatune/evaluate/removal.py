"""Removal: does taking out the training examples a score ranks as proponents change the
explained output more than taking out as many random ones? And leave-one-out: do the scores
predict what removing each single example does? Both by real retraining, on the ground
truth's machinery (one file per retrained model, resumable, any backend).

Conventions. A *removal set* of explained example j at one damping is its ``remove``
highest-scored training examples; the model is retrained on the rest. The explained output
of model S at example j is f_S(z_j), averaged over the retraining seeds (the same seeds for
every set).

- ``effect`` = mean_j [ mean_r f_{-rand_r}(z_j) - f_{-top_j}(z_j) ]: how much more removing
  the proponents lowers the output than removing random examples (> 0: the ranking works).
  ``effect_sem``: its standard error over the explained examples.
- ``drop`` = mean_j [ f_full(z_j) - f_{-top_j}(z_j) ], against a model retrained on all data.
- LOO: Delta_ij = f_full(z_j) - f_{-i}(z_j), the effect of example i on z_j, against the
  scores s_ji (a positive score says including i raises f(z_j)): Pearson and Spearman per
  explained example, averaged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdatune.data.base import ArrayDataset
from tdatune.evaluate.groundtruth import PairedSeeds, build_ground_truth
from tdatune.models.task import Task
from tdatune.models.training import TrainFunction, TrainRecipe
from tdatune.utils.correlation import pearson_rows, spearman_rows


@dataclass(frozen=True)
class RemovalConfig:
    """What a removal experiment retrains: the first ``examples`` explained examples, their
    top ``remove`` proponents at each damping, ``random`` random removal sets of the same
    size, ``seeds`` retraining seeds per set; ``loo``: also leave-one-out on every training
    example (n + 1 models: only for small settings)."""

    examples: int = 5
    remove: int = 10
    lambdas: int = 5
    random: int = 5
    seeds: int = 1
    loo: bool = False

    def __post_init__(self) -> None:
        for name in ("examples", "remove", "lambdas", "random", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"removal {name} must be an integer >= 1, got {value!r}")
        if self.random < 2:
            raise ValueError(f"removal random must be >= 2 (the random baseline is a mean), "
                             f"got {self.random}")
        if not isinstance(self.loo, bool):
            raise ValueError(f"removal loo must be true or false, got {self.loo!r}")


def top_removals(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Keep-masks [m, n]: each explained example's training set without its ``remove``
    highest-scored examples."""
    m, n = scores.shape
    if not 1 <= remove < n:
        raise ValueError(f"cannot remove {remove} of {n} training examples; use 1..{n - 1}")
    keep = torch.ones(m, n, dtype=torch.bool)
    keep.scatter_(1, scores.topk(remove, dim=1).indices, False)
    return keep


def random_removals(n: int, remove: int, count: int, seed: int) -> torch.Tensor:
    """``count`` keep-masks [count, n], each without ``remove`` random examples (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.ones(count, n, dtype=torch.bool)
    for r in range(count):
        keep[r, torch.randperm(n, generator=gen)[:remove]] = False
    return keep


def retrain_sets(task: Task, recipe: TrainRecipe | TrainFunction, train: ArrayDataset,
                 explained: ArrayDataset, masks: torch.Tensor, seeds: int, seed: int,
                 directory: Path, *, device: str | torch.device = "cpu",
                 backend: str = "auto", show_progress: bool = False) -> np.ndarray:
    """Outputs [len(masks), len(explained)] (mean over ``seeds``) of models retrained on each
    keep-mask, every mask with the same training seeds (``seed + 10,000 r`` for r < ``seeds``:
    a set's outputs do not depend on the sets beside it, and a removal and its random
    baseline share their initialisations). Identical masks are trained once; masks of one
    size are one ground-truth run
    (batched training steps subsets of one size together), stored in
    ``directory/<fingerprint of its masks, seeds and seed>`` and resumed on rerun; another
    number of seeds is another directory, so a changed experiment never meets a stored one."""
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
    out = np.empty((len(unique), len(explained)))
    sizes = unique.sum(dim=1)
    for size in sizes.unique().tolist():
        rows = (sizes == size).nonzero().flatten()
        group = unique[rows]
        if len(group) == 1:  # the ground truth's machinery wants two models at least
            group = torch.cat([group, group])
        key = group.numpy().tobytes() + f"seeds={seeds},seed={seed},paired".encode()
        digest = hashlib.sha256(key).hexdigest()[:12]
        config = PairedSeeds(n_subsets=len(group), alpha=0.5, seeds_per_subset=seeds,
                             subset_seed=seed, train_seed=seed)
        gt = build_ground_truth(task, recipe, train, explained, config, directory / digest,
                                device=device, show_progress=show_progress, backend=backend,
                                masks=group)
        out[rows.numpy()] = gt.mean_outputs[: len(rows)]
    return out[inverse.numpy()]


def removal_effects(outputs: np.ndarray, n_examples: int, n_random: int) -> dict[str, Any]:
    """``effect`` and ``drop`` per damping from the outputs [L * E + R + 1, E] of the models
    retrained on (damping-major) top removals, then the random removals, then all data."""
    e = n_examples
    top = outputs[: -n_random - 1].reshape(-1, e, e)  # [L, j's removal set, explained k]
    removed = np.stack([np.diagonal(t) for t in top])  # [L, E]: f_{-top_j}(z_j)
    rand = outputs[-n_random - 1 : -1].mean(axis=0)  # [E]
    full = outputs[-1]
    each = rand[None, :] - removed  # [L, E]
    sem = each.std(axis=1, ddof=1) / np.sqrt(e) if e > 1 else np.full(len(each), np.nan)
    return {"effect": each.mean(axis=1).tolist(), "effect_sem": sem.tolist(),
            "drop": (full[None, :] - removed).mean(axis=1).tolist(),
            "random_drop": float((full - rand).mean())}


def loo_correlations(scores: torch.Tensor, delta: np.ndarray) -> dict[str, float]:
    """Mean over explained examples of Pearson and Spearman between scores [E, n] and the
    leave-one-out effects delta [E, n]."""
    s = scores.double().numpy()
    return {"pearson": float(np.nanmean(pearson_rows(s, delta))),
            "spearman": float(np.nanmean(spearman_rows(s, delta)))}


def loo_masks(n: int) -> torch.Tensor:
    """n leave-one-out keep-masks, then the full training set: [n + 1, n]."""
    return torch.cat([~torch.eye(n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)])
