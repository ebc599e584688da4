"""``tdatune settings`` and ``tdatune train``: list the benchmark settings, train one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tdatune.models.training import init_model, train_model, trainable
from tdatune.settings.registry import all_settings, get_setting
from tdatune.utils.atomic import atomic_write_json
from tdatune.utils.device import resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``settings`` and ``train``."""
    p = sub.add_parser("settings", help="list the benchmark settings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=list_settings)

    t = sub.add_parser("train", help="train a setting's model, saving a checkpoint per epoch")
    t.add_argument("setting", help="setting name (see `tdatune settings`)")
    t.add_argument("--out", type=Path, default=None, help="run directory (default runs/train-SETTING)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", type=Path, default=None, help="directory with the real data files")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--tiny", action="store_true", help="tiny sizes and 2 epochs (smoke test)")
    t.set_defaults(func=train_setting)


def list_settings(args: argparse.Namespace) -> int:
    """Print every setting with its data source and sizes."""
    rows = [{"name": s.name, "data": s.data_source, "train/val/test": "/".join(map(str, s.sizes)),
             "description": s.description} for s in all_settings()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'setting':<{width}}  {'data':<9}  {'train/val/test':<15}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['data']:<9}  {r['train/val/test']:<15}  {r['description']}")
    return 0


def train_setting(args: argparse.Namespace) -> int:
    """Train the named setting; print accuracy and loss per epoch; record the recipe."""
    from dataclasses import replace

    setting = get_setting(args.setting)
    device = resolve_device(args.device)
    splits, task = setting.build(seed=args.seed, data_dir=args.data_dir, tiny=args.tiny)
    recipe = setting.tiny_recipe() if args.tiny else setting.recipe
    if args.epochs is not None:
        recipe = replace(recipe, epochs=args.epochs)
    out = args.out or Path("runs") / f"train-{setting.name}"
    print(f"{setting.name}: {splits.source}; sizes {splits.sizes()}; device {device}")
    model = init_model(task, args.seed, device)
    test = splits.test.to(device)

    def on_epoch(epoch: int, state: dict) -> dict[str, float]:
        model.load_state_dict(state)
        params = trainable(model, state)
        acc = task.accuracy(model, params, test.inputs, test.targets)
        loss = float(task.evaluate(model, params, test.inputs, test.targets, fn="loss").mean())
        print(f"epoch {epoch:3d}  test accuracy {acc:.4f}  test loss {loss:.4f}")
        return {"test_accuracy": acc, "test_loss": loss}

    start = time.time()
    result = train_model(task, splits.train, recipe, args.seed, device=device,
                         checkpoint_dir=out / "checkpoints", show_progress=True, on_epoch=on_epoch)
    atomic_write_json(out / "run.json", {
        "setting": setting.name, "source": splits.source, "sizes": splits.sizes(),
        "recipe": recipe.to_dict(), "seed": args.seed, "device": str(device),
        "history": result.history, "seconds": time.time() - start,
    })
    print(f"saved {len(result.checkpoints)} checkpoints to {out / 'checkpoints'}")
    return 0
