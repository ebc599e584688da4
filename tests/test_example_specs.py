"""Every ``examples/*.toml`` sweep spec loads and validates without data or training, names
only known settings and attributors, and expands to the cells that an independent count from
its raw TOML gives (and that docs/study.md states, where it states a count)."""

from __future__ import annotations

import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tdatune.attributors.registry import ATTRIBUTORS
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.settings.registry import SETTINGS, Setting, get_setting
from tdatune.study.spec import load_spec, spec_from_dict
from tdatune.study.sweep import expand_cells

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def documented_counts() -> dict[str, int]:
    """Cell counts docs/study.md's table of studies states, by example file name."""
    text = (ROOT / "docs" / "study.md").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"`examples/([\w.-]+\.toml)`[^\n]*?(\d+) cells", text)}


def grid(value: Any) -> list[Any]:
    """A TOML grid as docs/sweeps.md defines it: a list, a value, or {logspace = [lo, hi, num]};
    the text "none" is None."""
    if isinstance(value, dict):
        lo, hi, num = value["logspace"]
        return [float(x) for x in 10.0 ** np.linspace(lo, hi, int(num))]
    items = value if isinstance(value, list) else [value]
    return [None if isinstance(v, str) and v.lower() == "none" else v for v in items]


def frozen(value: Any) -> Any:
    """A hashable form of a hyperparameter value (lists, e.g. checkpoint sets, as tuples)."""
    return tuple(frozen(v) for v in value) if isinstance(value, list | tuple) else value


def own_cells(raw: dict[str, Any]) -> set[tuple[Any, ...]]:
    """Cells counted from the raw TOML by the rule of docs/sweeps.md: one per (setting, alpha,
    method entry, fit-stage values), every value not varied at its study default; an option
    added later (``named_at_default=False``) is named only away from its default."""
    labels = [s if isinstance(s, str) else s.get("label") or s["name"] for s in raw["settings"]]
    alpha0 = raw.get("groundtruth", {}).get("alpha", GroundTruthConfig().alpha)
    cells = set()
    for entry in raw["methods"]:
        spec = ATTRIBUTORS[entry["name"]].spec()
        base = {name: h.default for name, h in spec.items()}
        base.update({k: grid(v)[0] if not isinstance(v, list) else v
                     for k, v in entry.get("defaults", {}).items()})
        vary = list(entry.get("vary", []))
        if "fit" in entry or "score" in entry:
            vary.append({**entry.get("fit", {}), **entry.get("score", {})})
        for experiment in vary or [{}]:
            for combo in itertools.product(*(grid(v) for v in experiment.values())):
                values, alpha = dict(base), float(alpha0)
                for key, value in zip(experiment, combo, strict=True):
                    if key == "alpha":
                        alpha = float(value)
                    elif key == "epoch" and "checkpoint" in spec:
                        values["checkpoint"] = value
                    elif key == "epoch":
                        values["checkpoints"] = value if isinstance(value, list) else [value]
                    else:
                        values[key] = value
                fit = frozenset((k, frozen(v)) for k, v in values.items()
                                if spec[k].stage == "fit"
                                and (spec[k].named_at_default or v != spec[k].default))
                for label in entry.get("settings", labels):
                    cells.add((label, entry.get("label", entry["name"]), alpha, fit))
    return cells


@pytest.fixture
def no_data_no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading data (hence training) fails the test: validation must need neither."""
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("validating a spec loaded data or trained a model")

    monkeypatch.setattr(Setting, "build", refuse)


def test_there_are_example_specs_and_documented_counts() -> None:
    """The glob finds the examples, and docs/study.md states counts for some of them."""
    assert len(EXAMPLES) >= 5
    assert set(documented_counts()) <= {p.name for p in EXAMPLES}
    assert len(documented_counts()) >= 4


@pytest.mark.usefixtures("no_data_no_training")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_spec_validates_and_expands_to_its_cells(path: Path) -> None:
    """The spec loads, names known settings and attributors, and has the cells counted here."""
    raw = tomllib.loads(path.read_text())
    spec = load_spec(path)
    for entry in raw["settings"]:
        if isinstance(entry, dict) and "task" in entry:  # a user task: module:function, labelled
            assert re.fullmatch(r"[\w.]+:\w+", entry["task"]) and entry.get("label")
            continue
        name = entry if isinstance(entry, str) else entry["name"]
        assert name in SETTINGS and get_setting(name).name == name
    assert all(m["name"] in ATTRIBUTORS for m in raw["methods"])
    assert [m.name for m in spec.methods] == [m["name"] for m in raw["methods"]]
    assert len(spec.settings) == len(raw["settings"])

    cells = expand_cells(spec)
    want = own_cells(raw)
    assert len(cells) == len(want) > 0
    got = {(c.setting, c.method, c.alpha, frozenset((k, frozen(v)) for k, v in c.fit)) for c in cells}
    assert got == want
    assert len({c.cell_id for c in cells}) == len(cells)  # one file per cell
    documented = documented_counts().get(path.name)
    if documented is not None:
        assert len(cells) == documented, f"docs/study.md says {documented} cells"
    # what a sweep records (sweep.json) reads back to the same cells
    again = expand_cells(spec_from_dict(spec.to_dict()))
    assert [c.cell_id for c in again] == [c.cell_id for c in cells]
