"""Two models that are not built-in settings, end to end: from your own model to a lambda
selected without retraining, and an LDS check against real retraining.

(a) ``regression``: an MLP on scikit-learn's diabetes data, MSE loss, the prediction as the
    explained output, trained by *your own* training loop (a plain function).
(b) ``transformer``: a small transformer classifier fed dict batches
    (``input_ids``, ``attention_mask``, ``labels``) from a DataLoader, built locally (no
    downloads), trained by tdatune's recipe.

Run from the repository root::

    python examples/your_model.py                 # both, small sizes (~20 s each on 2 cores)
    tdatune lambda --task examples.your_model:regression_setting --out runs/diabetes --subsets 20
    tdatune groundtruth --task examples.your_model:transformer_setting --out runs/tiny-tf

Everything the process / Ray backends ship to workers is module-level here (functions and
classes), so it pickles. See docs/your_model.md for the walk-through.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tdatune.data import ArrayDataset
from tdatune.evaluate import GroundTruthConfig, build_ground_truth, lds
from tdatune.models.outputs import margin
from tdatune.models.task import Task, make_task
from tdatune.models.training import TrainFunction, TrainRecipe
from tdatune.settings import Setting, user_setting
from tdatune.study.attribute import attribute

# ======================================================================== (a) regression


def diabetes(n_train: int = 200, n_val: int = 60, n_test: int = 60, seed: int = 0
             ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """scikit-learn's diabetes data (442 patients, 10 features), standardised, split in three."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cuts = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    return tuple((x[perm[a:b]], y[perm[a:b]]) for a, b in pairwise(cuts))


def regression_net() -> nn.Module:
    """The model factory: a 10-32-1 tanh MLP."""
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))


WEIGHT_DECAY = 1e-3


def train_regression(data: ArrayDataset, seed: int, epochs: int = 30) -> list[dict]:
    """*Your* training loop: Adam on minibatches, L2 in the objective. Returns a state dict per
    10 epochs (the checkpoints; the last is the trained model)."""
    torch.manual_seed(seed)
    model = regression_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    states = []
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(model(x)[:, 0], y)
            loss = loss + 0.5 * WEIGHT_DECAY * sum((p * p).sum() for p in model.parameters())
            loss.backward()
            opt.step()
        if (epoch + 1) % 10 == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def regression_task() -> Task:
    """MSE per example, the prediction as the explained output."""
    return make_task(regression_net, loss="mse", output="prediction", name="diabetes-mlp")


def regression_setting() -> Setting:
    """``--task examples.your_model:regression_setting``: task, data and training function."""
    train, val, test = diabetes()
    return user_setting("diabetes-mlp", regression_task(), train, val, test,
                        TrainFunction(train_regression, weight_decay=WEIGHT_DECAY),
                        description="scikit-learn diabetes + 10-32-1 MLP (your own loop)")


# ======================================================================== (b) transformer


class ToySentences(Dataset):
    """Token sequences of random length over a vocabulary of ``vocab`` (0 = padding); the label
    says whether token 1 occurs more often than token 2. Made locally from a seed."""

    def __init__(self, n: int, seed: int, vocab: int = 12, max_len: int = 10) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.zeros(n, max_len, dtype=torch.long)
        self.mask = torch.zeros(n, max_len, dtype=torch.long)
        self.labels = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            length = int(torch.randint(4, max_len + 1, (1,), generator=gen))
            tokens = torch.randint(1, vocab, (length,), generator=gen)
            self.ids[i, :length] = tokens
            self.mask[i, :length] = 1
            self.labels[i] = int((tokens == 1).sum() > (tokens == 2).sum())

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class TinyTransformer(nn.Module):
    """Embedding + one pre-norm self-attention block + MLP, masked mean pooling, 2 classes."""

    def __init__(self, vocab: int = 12, d: int = 16, max_len: int = 10) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.1)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, 2]."""
        h = self.tok(input_ids) + self.pos[: input_ids.shape[1]]
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        att = att.masked_fill(attention_mask[:, None, :] == 0, float("-inf")).softmax(-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(self.norm2(h))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def call_transformer(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How to call the model on a dict batch (the labels stay out of the forward pass)."""
    return model(batch["input_ids"], batch["attention_mask"])


def batch_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example cross-entropy against the batch's labels."""
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def batch_margin(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The explained output: the correct-class margin log(p_y / (1 - p_y))."""
    return margin(logits, batch["labels"])


def transformer_task() -> Task:
    """The dict-batch task."""
    return make_task(TinyTransformer, batch_loss, batch_margin, forward=call_transformer,
                     name="toy-transformer")


TRANSFORMER_RECIPE = TrainRecipe(optimizer="adam", epochs=15, lr=5e-3, batch_size=16,
                                 weight_decay=1e-3)


def transformer_loaders(n_train: int = 96, n_val: int = 32, n_test: int = 24
                        ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """DataLoaders of dict batches, as you would have them for training."""
    return (DataLoader(ToySentences(n_train, 0), batch_size=16, shuffle=True),
            DataLoader(ToySentences(n_val, 1), batch_size=16),
            DataLoader(ToySentences(n_test, 2), batch_size=16))


def transformer_setting() -> Setting:
    """``--task examples.your_model:transformer_setting``."""
    train, val, test = transformer_loaders()
    return user_setting("toy-transformer", transformer_task(), train, val, test,
                        TRANSFORMER_RECIPE, description="toy sentences + tiny transformer",
                        num_classes=2)


# ======================================================================== end to end


@dataclass
class Outcome:
    """What one end-to-end run found."""

    name: str
    lam: float
    status: str
    n_dropped: int
    lds: float
    lds_sem: float
    scores_shape: tuple[int, ...]


def end_to_end(setting: Setting, *, checkpoints: Any = None, n_subsets: int = 16,
               attributor: str = "iffim", out: str = "runs/your_model",
               plot: bool = False) -> Outcome:
    """Fit, select lambda on validation (no retraining), score test; then retrain on
    ``n_subsets`` random halves (your training function or the recipe) for an LDS check."""
    splits, task = setting.build()
    recipe = setting.recipe
    result = attribute(task, splits.train, splits.test, val=splits.val,
                       checkpoints=checkpoints, training=None if checkpoints else recipe,
                       weight_decay=recipe.weight_decay, attributor=attributor,
                       plot=f"{out}/{setting.name}/xi_curve.png" if plot else None)
    gt = build_ground_truth(task, recipe, splits.train, splits.test,
                            GroundTruthConfig(n_subsets=n_subsets),
                            f"{out}/{setting.name}/groundtruth", show_progress=False)
    score = lds(result.scores, gt.masks, gt.mean_outputs)
    sel = result.selection
    return Outcome(setting.name, result.lam, sel.status if sel else "given",
                   sel.n_dropped if sel else 0, float(score.mean), float(score.sem),
                   tuple(result.scores.shape))


def run_regression(out: str = "runs/your_model", n_subsets: int = 16) -> Outcome:
    """(a): checkpoints from your own loop, ground truth from the same loop."""
    setting = regression_setting()
    splits, _ = setting.build()
    states = train_regression(splits.train, seed=0)  # your loop, your checkpoints
    return end_to_end(setting, checkpoints=states, n_subsets=n_subsets, out=out)


def run_transformer(out: str = "runs/your_model", n_subsets: int = 12) -> Outcome:
    """(b): dict batches from DataLoaders, trained by tdatune's recipe."""
    return end_to_end(transformer_setting(), n_subsets=n_subsets, out=out)


def main(argv: list[str] | None = None) -> int:
    """Run both examples and print what each found."""
    out = (argv or sys.argv[1:] or ["runs/your_model"])[0]
    for outcome in (run_regression(out), run_transformer(out)):
        print(f"{outcome.name}: lambda {outcome.lam:.3g} ({outcome.status}, "
              f"{outcome.n_dropped} dropped), test LDS {outcome.lds:.3f} +- {outcome.lds_sem:.3f}, "
              f"scores {outcome.scores_shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
