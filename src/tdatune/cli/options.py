"""Options shared by the commands that build a setting (train, groundtruth, lambda, demo): the
same names, forms and help everywhere, and every value checked before any work starts."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdatune.evaluate.runners import RUNNERS
from tdatune.models.training import TrainRecipe
from tdatune.settings.registry import Setting, get_setting
from tdatune.study.spec import check_options


def add_setting_options(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """The setting (a built-in name or ``--task package.module:function``) and how it is built:
    data directory, seed, sizes, epochs, model and data options."""
    if positional:
        p.add_argument("setting", nargs="?", default=None,
                       help="setting name (see `tdatune settings`) or package.module:function")
        p.add_argument("--task", default=None, metavar="PACKAGE.MODULE:FUNCTION",
                       help="your own task: a function returning a tdatune Setting (see "
                            "docs/your_model.md); importable from the current directory")
    p.add_argument("--data-dir", default=None, type=Path,
                   help="directory with the real data files (see `tdatune settings -v`)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and subsets")
    p.add_argument("--sizes", default=None, metavar="TRAIN,VAL,TEST",
                   help="train/validation/test sizes, e.g. 1000,200,200 (default: the setting's)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model option, e.g. width=16 (repeatable; "
                        "`tdatune settings -v` lists them)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data option, e.g. block_len=32 (repeatable)")


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """--device, --backend, --address, --workers, --quiet: where and how models are (re)trained."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", choices=list(RUNNERS),
                   help="how subset models are retrained (auto: batched when the model allows)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address for --backend ray (default: a local Ray instance)")
    p.add_argument("--workers", type=int, default=None, help="processes for --backend process")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """Runner options from the parsed --address / --workers."""
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.backend == "ray" and args.address:
        return {"address": args.address}
    if args.backend == "process" and args.workers:
        return {"num_workers": args.workers}
    return {}


@dataclass
class SettingRequest:
    """What the command line asked of a setting, checked."""

    name: str
    setting: Setting
    sizes: tuple[int, int, int] | None = None
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    load_options: dict[str, Any] = field(default_factory=dict)


def setting_request(args: argparse.Namespace, *, need_val: bool = False,
                    need_test: bool = False) -> SettingRequest:
    """The setting named on the command line with its checked overrides (before any work)."""
    name = resolve_setting_argument(args)
    setting = get_setting(name)
    sizes = parse_sizes(args.sizes, need_val=need_val, need_test=need_test)
    task_options = parse_options(args.model_opt, "--model-opt")
    load_options = parse_options(args.data_opt, "--data-opt")
    check_options(f"--model-opt of {setting.name}", task_options, setting.make_task,
                  setting.task_options)
    check_options(f"--data-opt of {setting.name}", load_options, setting.load, setting.load_options)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        if not isinstance(setting.recipe, TrainRecipe):
            raise ValueError(f"{setting.name} trains with your own function; --epochs applies "
                             "only to a TrainRecipe (set the epochs in your function)")
        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        overrides["epochs"] = args.epochs
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    return SettingRequest(name, setting, sizes, overrides, task_options, load_options)


def resolve_setting_argument(args: argparse.Namespace) -> str:
    """The setting name or task reference given on the command line (exactly one)."""
    task, setting = getattr(args, "task", None), getattr(args, "setting", None)
    if task and setting and task != setting:
        raise ValueError(f"give a setting name or --task, not both (got {setting!r} and "
                         f"--task {task!r})")
    ref = task or setting
    if not ref:
        raise ValueError("name a setting (see `tdatune settings`) or give --task "
                         "package.module:function")
    if task and ":" not in task:
        raise ValueError(f"--task {task!r} must look like package.module:function")
    return ref


def parse_options(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE strings to a dict; values are read as JSON when they parse (numbers, true)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE (e.g. width=16)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_sizes(text: str | None, *, need_val: bool = False, need_test: bool = False
                ) -> tuple[int, int, int] | None:
    """'1000,200,200' to (1000, 200, 200); train >= 2, and validation / test >= 1 where the
    command uses them."""
    if text is None:
        return None
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"--sizes {text!r} must be three integers TRAIN,VAL,TEST, e.g. 1000,200,200")
    if sizes[0] < 2:
        raise ValueError(f"--sizes {text!r}: the training split needs at least 2 examples")
    if need_val and sizes[1] < 1:
        raise ValueError(f"--sizes {text!r}: the validation split must hold at least 1 example "
                         "(lambda is selected on it)")
    if need_test and sizes[2] < 1:
        raise ValueError(f"--sizes {text!r}: the test split must hold at least 1 example "
                         "(it is explained and scored)")
    return sizes  # type: ignore[return-value]

