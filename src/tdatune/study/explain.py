"""Seeing what a score matrix says: for chosen explained examples, the training examples
that raise their output most (proponents) and lower it most (opponents), on a page a person
checks (``explain_page``).

``explain_scores`` takes any scores (yours included); ``explain_run`` rebuilds a run
directory from its stored checkpoints: a lambda study's (``tdatune demo`` / ``tdatune
lambda``: the attributor it studied, at the lambda it selected) or a sweep's (a setting and a
method entry at its study defaults, at the default rule's lambda); or at a given lambda.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors.damping import Damping, check_damping
from tdatune.attributors.registry import make_attributor
from tdatune.data.base import ArrayDataset, Splits
from tdatune.data.views import Decoder, view_example
from tdatune.select.damping_choice import choose_damping
from tdatune.study.explain_page import Card, Explanation, write_page
from tdatune.study.prepare import TrainedSetting, train_setting
from tdatune.utils.atomic import read_json
from tdatune.utils.checks import check_shape

DEFAULT_EXAMPLES = (0, 1, 2, 3)
DEFAULT_TOP = 8


def top_influences(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [m, k'] of each row's ``k`` largest scores (proponents, largest first) and
    ``k`` smallest (opponents, most negative first), k' = min(k, n)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [explained, training], got shape {tuple(scores.shape)}")
    if k < 1:
        raise ValueError(f"the number of examples shown (top k) must be >= 1, got {k}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("the scores hold NaN or infinite values; nothing can be ranked")
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices,
            scores.topk(k, dim=1, largest=False).indices)


def explain_scores(
    scores: torch.Tensor, train: ArrayDataset, explained: ArrayDataset, out: str | Path, *,
    k: int = DEFAULT_TOP, explained_names: Sequence[str] | None = None,
    splits: Splits | None = None, decode: Decoder | None = None,
    title: str = "Most influential training examples", meta: Sequence[str] = (),
) -> Path:
    """Write the explain page (``out/index.html``, ``out/explained_<k>.png``) for ``scores``
    [len(explained), len(train)] and return the page's path. ``splits`` tells how examples
    look (image, text, piano roll); ``decode`` turns token ids into text for your tokenizer."""
    check_shape("scores", scores, [len(explained), len(train)])
    names = (list(explained_names) if explained_names is not None
             else [f"explained example {i}" for i in range(len(explained))])
    if len(names) != len(explained):
        raise ValueError(f"{len(names)} names for {len(explained)} explained examples")
    pro, opp = top_influences(scores.double(), k)
    out_list = []
    def card(row: int, j: int) -> Card:
        return Card(view_example(train, j, splits, decode=decode), f"train #{j}",
                    float(scores[row, j]))

    for row in range(len(explained)):
        out_list.append(Explanation(
            Card(view_example(explained, row, splits, decode=decode), names[row]),
            [card(row, int(j)) for j in pro[row]], [card(row, int(j)) for j in opp[row]]))
    return write_page(out_list, Path(out), title, list(meta))


def _damping_text(lam: Any) -> str:
    if isinstance(lam, int | float):
        return f"{lam:.4g}"
    if isinstance(lam, str):
        return lam
    values = lam.items() if isinstance(lam, dict) else enumerate(lam)
    return "per layer " + ", ".join(f"{k}: {float(v):.3g}" for k, v in values)


def _study_summary(run_dir: Path, attributor: str | None) -> tuple[str, dict[str, Any]]:
    """The lambda study's result directory name and summary in ``run_dir``."""
    found = sorted(p.parent.name for p in run_dir.glob("*/summary.json"))
    if not found:
        raise FileNotFoundError(
            f"{run_dir} holds no lambda study (no <attributor>/summary.json); run "
            f"`tdatune demo --out {run_dir}` or `tdatune lambda ... --out {run_dir}` first")
    if attributor is None:
        if len(found) > 1:
            raise ValueError(f"{run_dir} holds studies of {', '.join(found)}; choose one "
                             "with --attributor")
        attributor = found[0]
    if attributor not in found:
        raise ValueError(f"{run_dir} has no study {attributor!r}; it has: {', '.join(found)}")
    return attributor, read_json(run_dir / attributor / "summary.json")


def _sweep_run(run_dir: Path, setting: str | None, method: str | None, device: str,
               show_progress: bool) -> tuple[TrainedSetting, Any, str, str, dict[str, Any]]:
    """A sweep directory's trained setting and method entry (study defaults)."""
    from tdatune.study.sweep import Workspace, spec_from_dict

    spec = spec_from_dict(read_json(run_dir / "sweep.json"))
    labels = [x.label for x in spec.settings]
    methods = [m.label for m in spec.methods]
    for what, value, choices in (("--setting", setting, labels), ("--attributor", method,
                                                                  methods)):
        if value is None and len(choices) > 1:
            raise ValueError(f"{run_dir} is a sweep of several; choose one with {what}: "
                             f"{', '.join(choices)}")
        if value is not None and value not in choices:
            raise ValueError(f"{run_dir} has no {what[2:]} {value!r}; it has: "
                             f"{', '.join(choices)}")
    label, entry = setting or labels[0], spec.method(method or methods[0])
    say = print if show_progress else (lambda *a, **kw: None)
    trained = Workspace(spec, run_dir, device, show_progress, say).trained(label)
    fit = {k: v for k, v in entry.base_values().items() if entry.stage(k) == "fit"}
    return trained, make_attributor(entry.name, **fit), label, entry.label, fit


def explain_run(
    run_dir: str | Path, out: str | Path, *, attributor: str | None = None,
    examples: Sequence[int] = DEFAULT_EXAMPLES, k: int = DEFAULT_TOP,
    lam: Damping | None = None, device: str = "auto", show_progress: bool = False,
    setting: str | None = None,
) -> Path:
    """The explain page of a run directory: a lambda study's (``tdatune demo`` / ``lambda``:
    its attributor at its selected lambda) or a sweep's (``setting`` and method ``attributor``
    at the study defaults, lambda by the default rule on the validation split), or ``lam``."""
    run_dir = Path(run_dir)
    if (run_dir / "sweep.json").exists():
        trained, att, label, method, _ = _sweep_run(run_dir, setting, attributor, device,
                                                    show_progress)
        return _explain_trained(trained, att, out, examples, k, lam, label, method)
    name, summary = _study_summary(run_dir, attributor)
    request = summary.get("request") or {}
    sizes = (summary["n_train"], summary["n_val"], summary["n_test"])
    trained = train_setting(
        summary["setting"], run_dir, seed=summary.get("seed", 0),
        data_dir=request.get("data_dir"), sizes=sizes, device=device,
        show_progress=show_progress, recipe_overrides=request.get("recipe_overrides"),
        task_options=request.get("task_options"), load_options=request.get("load_options"),
        say=print if show_progress else (lambda *a, **kw: None))
    att = make_attributor(summary["attributor"], **summary.get("attributor_params", {}))
    return _explain_trained(trained, att, out, examples, k,
                            summary["lambda_selected"] if lam is None else lam,
                            summary["setting"], name, selected=lam is None)


def _explain_trained(trained: TrainedSetting, att: Any, out: str | Path,
                     examples: Sequence[int], k: int, lam: Damping | None, setting: str,
                     name: str, selected: bool = False) -> Path:
    """Fit ``att`` on a trained setting, score the test examples ``examples`` at ``lam`` (one
    damping, or one per layer; None: the attributor's default rule on the validation split;
    ignored by a method without a damping), and write the page."""
    test = trained.splits.test
    bad = [i for i in examples if not 0 <= int(i) < len(test)]
    if bad or not examples:
        raise ValueError(f"explained examples must be test indices 0..{len(test) - 1}; got "
                         f"{list(examples) if not bad else bad}")
    if lam is not None:
        lam = check_damping(lam)
    explained = test.subset([int(i) for i in examples])
    att.fit(trained.context)
    damped = "lam" in type(att).spec()
    how = "selected without retraining" if selected or lam is None else "given"
    if damped and lam is None:
        lam = choose_damping(att, trained.splits.val).lam
    scores = att.score(explained, lam=lam) if damped else att.score(explained)
    model, params = trained.context.model_at(-1)
    x = explained.to(trained.context.device)
    outputs = trained.task.evaluate(model, params, x.inputs, x.targets)
    names = [f"test #{int(i)} (output {float(o):+.3g})" for i, o in zip(examples, outputs,
                                                                      strict=True)]
    damping = f"lambda {_damping_text(lam)} ({how}); " if damped else ""
    meta = [f"setting {setting} ({trained.splits.source}); attributor {att.name}; {damping}"
            f"{len(trained.splits.train)} training examples",
            "Score > 0: including the training example raises the explained output "
            "(a proponent); score < 0: it lowers it (an opponent)."]
    return explain_scores(scores, trained.splits.train, explained, out, k=k,
                          explained_names=names, splits=trained.splits,
                          title=f"{setting} / {name}: most influential training examples",
                          meta=meta)
