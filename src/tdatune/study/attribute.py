"""The common job in one call: your task, your training data, a validation set and the examples
to explain -> fit an attributor, pick lambda without retraining (the surrogate indicator,
Algorithm 1, on the validation set), and return the scores with the selection's diagnostics."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors.base import AttributionContext, Attributor
from tdatune.attributors.damping import PER_LAYER, Damping, block_lambdas
from tdatune.attributors.registry import make_attributor
from tdatune.data.base import ArrayDataset, as_split
from tdatune.features.budget import (
    AttributionEstimate,
    DoesNotFit,
    PathEstimate,
    check_attribution,
)
from tdatune.models.checkpoints import as_checkpoints
from tdatune.models.task import Params, Task, check_task
from tdatune.models.training import TrainFunction, TrainRecipe, train_model
from tdatune.select.agreement import AGREE, REFERENCE
from tdatune.select.damping_choice import DampingChoice, choose_damping
from tdatune.select.default import default_rule
from tdatune.select.surrogate import Selection, default_lambda_grid


@dataclass
class AttributionResult:
    """Scores at the selected lambda and how it was selected.

    ``scores[j, i]``: how much training example i raises the output of explained example j
    (positive: including it raises the output). ``lam`` is the damping used (one value per
    block, in the path's ``block_names()`` order, for a per-block damping); ``damping`` what
    the selection chose and by which rule. ``selection`` holds Algorithm 1's lambda, its
    ``status`` ("crossed"; "below-grid": xi already above the threshold at the smallest lambda;
    "above-grid": never reached), ``n_used`` / ``n_dropped`` validation examples (dropped: zero
    output gradient, xi undefined), and the curve ``grid`` / ``xi_mean``.
    """

    scores: torch.Tensor
    lam: float | list[float]
    selection: Selection | None
    attributor: Attributor
    context: AttributionContext
    plot: Path | None = None
    damping: DampingChoice | None = None

    @property
    def xi_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda grid, mean xi over validation) of the selection."""
        if self.selection is None:
            raise ValueError("lambda was given, not selected: there is no xi curve")
        return self.selection.grid, self.selection.xi_mean

    def summary(self) -> dict[str, Any]:
        """JSON-friendly diagnostics."""
        return {"attributor": self.attributor.name, "lambda": self.lam,
                "damping": None if self.damping is None else self.damping.to_dict(),
                "selection": None if self.selection is None else self.selection.to_dict(),
                "scores_shape": list(self.scores.shape), "plot": str(self.plot) if self.plot else None}


def attribute(
    task: Task, train: Any, explained: Any, *, val: Any = None, checkpoints: Any = None,
    training: TrainRecipe | TrainFunction | None = None, attributor: str = "iffim",
    params: dict[str, Any] | None = None, lam: Damping | None = None, threshold: float = 0.5,
    rule: str | None = None,
    weight_decay: float | None = None, learning_rates: list[float] | None = None,
    seed: int = 0, device: str | torch.device | None = None, plot: str | Path | None = None,
    show_progress: bool = False, memory_budget: int | None = None, check_fit: bool = True,
) -> AttributionResult:
    """Fit ``attributor`` on ``train``, select lambda on ``val`` without retraining, and score
    ``explained``.

    Data may be tensors ``(x, y)``, dicts, Datasets or DataLoaders (see
    :func:`tdatune.data.as_dataset`). Give ``checkpoints`` from your own loop (a module, a
    state dict, a path, or a list of them, last = trained model) or ``training`` (a
    :class:`TrainRecipe` or your :class:`TrainFunction`) to train here. ``weight_decay`` is
    the L2 coefficient of your training objective (default: the training recipe's, else 0).
    ``lam`` skips the selection (TracIn has no lambda): a number, or for K-FAC, EK-FAC and LoGra
    per layer one per layer (a list, ``{layer: value}``, ``"per_layer"``;
    :mod:`tdatune.attributors.damping`). ``val`` is needed only for the selection; ``rule``
    chooses it, by default the attributor's own (:func:`tdatune.select.default.default_rule`:
    per layer 0.1 x each layer's mean eigenvalue for K-FAC and EK-FAC, the spectrum's 0.9
    quantile for IFFIM and TRAK, ...); or ``"xi"`` (Algorithm 1 at ``threshold``),
    ``"top[:c]"``, ``"quantile[:q]"``, ``"per_layer[:fraction]"``, ``"blockwise:<rule>"``
    (:mod:`tdatune.select.blockwise`). ``result.damping`` says what was chosen, with xi beside
    it. ``plot`` writes a PNG of mean xi against lambda.
    The attributor must be eigen-based for the selection: iffim, if_explicit, trak, logra,
    kfac, ekfac or if_arnoldi.
    TracIn weighs each checkpoint by its ``learning_rates`` (from ``training`` when given);
    without them every checkpoint weighs 1, with a warning.

    Before any work (training included) the memory of the whole call is estimated
    (:func:`attribute_estimate`, every attributor's own path): above the memory available, or
    ``memory_budget`` bytes when lower, it is refused
    (:class:`~tdatune.features.budget.DoesNotFit`); above half of that, or with an
    eigendecomposition too large to be quick, it warns once
    (:class:`~tdatune.features.budget.BudgetWarning`). Both name the fix that fits the
    attributor: a projection (``params={"proj_dim": ...}``), K-FAC (``attributor="kfac"`` or
    ``"ekfac"``), fewer explained examples per call, fewer checkpoints, or (for if_explicit's
    p x p Hessian) iffim with a projection, kfac or if_cg. ``check_fit=False`` skips the check.
    """
    train_d = as_split(train, "training data")
    val_d = None if val is None else as_split(val, "validation set")
    explained_d = as_split(explained, "explained examples")
    for what, data in (("training data", train_d), ("validation set", val_d),
                       ("explained examples", explained_d)):
        if data is not None:
            check_task(task, data, what=what)
    att = make_attributor(attributor, **(params or {}))
    damped = "lam" in att.spec()
    if lam is None and damped:
        if not hasattr(att, "lambda_path"):
            raise ValueError(f"{attributor} is not eigen-based, so lambda cannot be selected "
                             "without retraining; use iffim, if_explicit, trak, logra, kfac, "
                             "ekfac or if_arnoldi, or pass lam=")
        if val_d is None:
            raise ValueError(f"{attributor} selects lambda on a validation set: give val= "
                             "(examples not in the training data), or lam= to skip the selection")
    if check_fit:
        selects = lam is None and damped and val_d is not None
        estimate = _estimate(att, task, train_d, explained_d, len(val_d) if selects else 0,
                             _checkpoint_count(checkpoints, training))
        if estimate is not None:
            check_attribution(estimate, budget=memory_budget,
                              what=f"attribute() with {attributor}", stacklevel=2)
        if selects and (rule or default_rule(att.name, att.params)) == AGREE:
            rule = _agree_or_per_layer(task, train_d, val_d, attributor, rule, memory_budget,
                                       _checkpoint_count(checkpoints, training))
    if checkpoints is not None:
        states: list[Params] = as_checkpoints(task, checkpoints)
    elif training is not None:
        states = train_model(task, train_d, training, seed, device=device or "cpu").checkpoints
    else:
        raise ValueError("give checkpoints= (the trained model's state dict(s) from your loop) "
                         "or training= (a TrainRecipe or TrainFunction to train here)")
    if weight_decay is None:
        weight_decay = training.weight_decay if training is not None else 0.0
    if learning_rates is None and training is not None:
        learning_rates = training.epoch_learning_rates(len(train_d))
    context = AttributionContext(task, train_d, states, weight_decay=weight_decay,
                                 learning_rates=learning_rates, device=device,
                                 show_progress=show_progress)
    if learning_rates is None and hasattr(att, "learning_rate"):
        warnings.warn(
            f"{attributor} weighs each checkpoint's gradient products by the learning rate in "
            f"force at it, but none were given, so all {len(states)} checkpoint(s) weigh 1; pass "
            "learning_rates= (one per checkpoint) or training= to weigh them as TracIn does",
            UserWarning, stacklevel=2)
    att.fit(context)
    selection, choice = None, None
    if lam is None and damped and val_d is not None:  # (val_d is given: checked above)
        sigma, _ = att.surrogate_spectrum(val_d)
        grid = default_lambda_grid(sigma, num=81, below=1e-2, above=1e2)
        choice = choose_damping(att, val_d, rule=rule, threshold=threshold, grid=grid)
        selection, lam = choice.selection, choice.lam
        trust = selection.reliability
        if trust is not None and trust.unsure:
            warnings.warn(
                f"the selected damping ({choice.describe()}) may be far from the best: "
                + "; ".join(trust.reasons()) + ". Check it with a few retrained models "
                "(tdatune.evaluate.calibrate.calibrate_lambda; docs/your_model.md, 'Choosing "
                "lambda with a few retrained models') before relying on it",
                UserWarning, stacklevel=2)
    scores = att.score(explained_d, **({"lam": lam} if damped else {}))
    figure = None
    if plot is not None and selection is not None:
        figure = plot_xi_curve(selection, plot, title=f"{task.name} / {attributor}", damping=choice)
    if damped and not isinstance(lam, int | float):  # one per block: as the path resolved it
        lam = _block_values(att, explained_d, lam)
    return AttributionResult(scores=scores, lam=float(lam) if isinstance(lam, int | float) else
                             (lam if damped else float("nan")),
                             selection=selection, attributor=att,
                             context=context, plot=figure, damping=choice)


def _agree_or_per_layer(task: Task, train: ArrayDataset, val: ArrayDataset, attributor: str,
                        rule: str | None, budget: int | None, checkpoints: int | None
                        ) -> str | None:
    """Rule "agree" fits IFFIM on the same training data (its path on ``val``): check that it
    fits. Asked for by name, a reference that does not fit is refused; as the default, the
    per-layer damping is used instead, with a warning."""
    reference = _estimate(make_attributor(REFERENCE), task, train, val, 0, checkpoints)
    if reference is None:
        return rule
    what = (f"the {REFERENCE} reference of {attributor}'s damping rule '{AGREE}' "
            "(rule='per_layer' skips it)")
    try:
        check_attribution(reference, budget=budget, what=what, stacklevel=3)
    except DoesNotFit as err:
        if rule is not None:
            raise
        warnings.warn(f"{attributor}'s default damping rule '{AGREE}' needs {REFERENCE} as a "
                      f"reference, which does not fit ({err}); using rule 'per_layer' instead",
                      UserWarning, stacklevel=3)
        return PER_LAYER
    return rule


def _block_values(att: Attributor, explained: ArrayDataset, lam: Damping) -> list[float]:
    path = att.lambda_path(explained)  # type: ignore[attr-defined]
    values = block_lambdas(lam, path.sigma, path.block_sizes(), path.block_names())
    return [values] * len(path.block_sizes()) if isinstance(values, float) else values


def attribute_estimate(task: Task, train: Any, explained: Any, *, val: Any = None,
                       attributor: str = "iffim", params: dict[str, Any] | None = None,
                       checkpoints: int | None = None
                       ) -> AttributionEstimate | PathEstimate | None:
    """The memory :func:`attribute` would need for these data (``val``: lambda selected on
    it; ``checkpoints``: how many states will be given, None: unknown), from the model's
    architecture alone, no gradient computed: what its check compares with the memory
    available (``.memory_bytes``, ``.describe()``, ``.phases``). None for an attributor
    without an estimate."""
    att = make_attributor(attributor, **(params or {}))
    validation = 0 if val is None else len(as_split(val, "validation set"))
    return _estimate(att, task, as_split(train, "training data"),
                     as_split(explained, "explained examples"), validation, checkpoints)


def _estimate(att: Attributor, task: Task, train: ArrayDataset, explained: ArrayDataset,
              validation: int, checkpoints: int | None = None
              ) -> AttributionEstimate | PathEstimate | None:
    with torch.random.fork_rng(devices=[]):
        model = task.make_model()
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return att.memory_estimate(task, model, params, train, explained=len(explained),
                               validation=validation, checkpoints=checkpoints)


def _checkpoint_count(checkpoints: Any, training: Any) -> int | None:
    """How many states the context will hold, read off the arguments without loading them:
    one module, state dict or path; a list's length; a recipe's epochs; else None."""
    if checkpoints is not None:
        if isinstance(checkpoints, torch.nn.Module | str | Path | Mapping):
            return 1
        return len(checkpoints) if isinstance(checkpoints, Sized) else None
    return getattr(training, "epochs", None) if isinstance(training, TrainRecipe) else None


def plot_xi_curve(selection: Selection, path: str | Path, *, title: str = "",
                  damping: DampingChoice | None = None) -> Path:
    """A PNG of mean xi (validation) against lambda, the threshold and the selected lambda (for
    a per-block ``damping``, the band its block values span)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tdatune.utils.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.semilogx(selection.grid.numpy(), selection.xi_mean.numpy(), color="C0", label="mean xi")
    ax.axhline(selection.threshold, color="grey", ls=":", label=f"threshold {selection.threshold}")
    if damping is not None and isinstance(damping.lam, list):
        ax.axvspan(min(damping.lam), max(damping.lam), color="C3", alpha=0.15,
                   label=f"{damping.rule}: {len(damping.lam)} block dampings")
    else:
        ax.axvline(selection.lam, color="C3", ls="--",
                   label=f"selected lambda {selection.lam:.3g} ({selection.rule}, {selection.status})")
    if selection.xi_lambda is not None:
        ax.axvline(selection.xi_lambda, color="C1", ls=":",
                   label=f"xi >= {selection.threshold:g}: {selection.xi_lambda:.3g}")
    ax.set_xlabel("lambda")
    ax.set_ylabel("mean surrogate xi (validation)")
    ax.set_ylim(0, 1.02)
    note = "" if selection.reliability is None else "\n" + selection.reliability.line()
    ax.set_title((title or "surrogate indicator") + note, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = ["AttributionResult", "attribute", "attribute_estimate", "plot_xi_curve"]
