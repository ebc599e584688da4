"""``tdatune settings`` and ``tdatune train``: list the benchmark settings, train one."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tdatune.cli.options import add_setting_options, setting_request
from tdatune.models.training import init_model, train_model, trainable
from tdatune.settings.registry import Setting, all_settings
from tdatune.utils.atomic import atomic_write_json
from tdatune.utils.device import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``settings`` and ``train``."""
    p = sub.add_parser("settings", help="list the benchmark settings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verbose", "-v", action="store_true", help="also print notes and recipes")
    p.set_defaults(func=list_settings)

    t = sub.add_parser("train", help="train a setting's model, saving a checkpoint per epoch")
    add_setting_options(t)
    t.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-SETTING)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--tiny", action="store_true", help="tiny sizes, model and 2 epochs (smoke test)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=train_setting)


def setting_row(s: Setting) -> dict[str, Any]:
    """What `tdatune settings` shows about one setting."""
    return {"name": s.name, "data": s.data_source, "train/val/test": "/".join(map(str, s.sizes)),
            "description": s.description, "real data": s.real_data, "notes": s.notes,
            "recipe": s.recipe.to_dict(), "model options": s.task_options,
            "data options": s.load_options}


def list_settings(args: argparse.Namespace) -> int:
    """Print every setting with its data source and sizes."""
    rows = [setting_row(s) for s in all_settings()]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'setting':<{width}}  {'data':<9}  {'train/val/test':<15}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['data']:<9}  {r['train/val/test']:<15}  {r['description']}")
        if args.verbose:
            for key in ("real data", "notes", "recipe", "model options", "data options"):
                if r[key]:
                    print(f"{'':<{width}}    {key}: {r[key]}")
    if not args.verbose:
        print("\n'stand-in' settings use offline substitutes unless --data-dir points at the real "
              "files; `tdatune settings -v` says which files and how.")
    return 0


def versions() -> dict[str, str]:
    """Versions that determine a run's numbers."""
    from tdatune import __version__

    return {"tdatune": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform()}


def train_setting(args: argparse.Namespace) -> int:
    """Train the named setting; print accuracy and loss per epoch; record recipe and results."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    request = setting_request(args, need_val=True, need_test=True)  # both are evaluated
    setting = request.setting
    device = resolve_device(args.device)
    task_opts, load_opts = request.task_options, request.load_options
    splits, task = setting.build(seed=args.seed, data_dir=args.data_dir, tiny=args.tiny,
                                 sizes=request.sizes, task_options=task_opts,
                                 load_options=load_opts)
    recipe = setting.tiny_recipe() if args.tiny else setting.recipe
    if request.recipe_overrides:
        recipe = replace(recipe, **request.recipe_overrides)
    out = args.out or Path("runs") / f"train-{setting.name}"
    out.mkdir(parents=True, exist_ok=True)
    load_used, task_used = setting.resolved_options(tiny=args.tiny, task_options=task_opts,
                                                    load_options=load_opts)
    model = init_model(task, args.seed, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{setting.name}: {splits.source}")
    print(f"sizes {splits.sizes()}; {n_params} parameters; device {device}")
    if "tokenizer" in splits.info:
        atomic_write_json(out / "tokenizer.json", splits.info["tokenizer"])
    baselines = {k: float(v) for k, v in splits.info.items() if k.startswith("unigram_loss")}
    if baselines:
        print("unigram baseline loss: " + ", ".join(f"{k[13:]} {v:.4f}" for k, v in baselines.items()))
    val, test = splits.val.to(device), splits.test.to(device)
    batch = 64 if setting.sequence else 1024

    def on_epoch(epoch: int, state: dict) -> dict[str, float]:
        model.load_state_dict(state)
        params = {k: v.to(device) for k, v in trainable(model, state).items()}
        record: dict[str, float] = {}
        for label, data in (("val", val), ("test", test)):
            if len(data) == 0:
                continue
            accuracy = task.accuracy(model, params, data.inputs, data.targets, batch_size=batch)
            if accuracy == accuracy:  # NaN: not a classification task (e.g. regression)
                record[f"{label}_accuracy"] = accuracy
            record[f"{label}_loss"] = float(task.evaluate(model, params, data.inputs, data.targets,
                                                          fn="loss", batch_size=batch).mean())
        line = f"epoch {epoch:3d}  " + "  ".join(
            f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items())
        if baselines:
            line += f"  (unigram val {baselines.get('unigram_loss_val', float('nan')):.4f})"
        tqdm.write(line)
        return record

    start = time.time()
    result = train_model(task, splits.train, recipe, args.seed, device=device,
                         checkpoint_dir=out / "checkpoints", show_progress=not args.quiet,
                         on_epoch=on_epoch)
    final = result.history[-1] if result.history else {}
    atomic_write_json(out / "run.json", {
        "setting": setting.name, "source": splits.source, "data_dir": str(args.data_dir),
        "sizes": splits.sizes(), "recipe": recipe.to_dict(), "seed": args.seed,
        "device": str(device), "tiny": args.tiny, "model_options": task_used,
        "data_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in load_used.items()},
        "task": {"name": task.name, "output": task.output_name, "extra": task.extra,
                 "parameters": n_params},
        "test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
        "val_loss": final.get("val_loss"), **baselines,
        "history": result.history, "seconds": time.time() - start, "versions": versions(),
    })
    summary = (f"final test accuracy {final['test_accuracy']:.4f}" if "test_accuracy" in final
               else f"final test loss {final.get('test_loss', float('nan')):.4f}")
    if baselines:
        summary += (f", val loss {final.get('val_loss', float('nan')):.4f} vs unigram "
                    f"{baselines.get('unigram_loss_val', float('nan')):.4f}")
    print(summary)
    print(f"saved {len(result.checkpoints)} checkpoints and run.json to {out}")
    return 0
