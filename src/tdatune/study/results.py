"""A sweep directory read back against its spec: which cells are current, and every
sub-experiment as a table of (varied values, LDS, standard error, source file).

Only cells whose stored fingerprint matches the definition the spec gives them today are
used; failed, stale (changed since) and missing cells are listed, never plotted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdatune.study.spec import (
    ALPHA,
    EPOCH,
    SPECTRUM,
    MethodSpec,
    SweepSpec,
    experiment_points,
    plain,
    spec_from_dict,
)
from tdatune.study.sweep import Cell, CellStore, expand_cells, recorded_inputs
from tdatune.utils.atomic import read_json


@dataclass
class SubExperiment:
    """One sub-experiment of one method on one setting, as records."""

    setting: str
    method: str
    attributor: str
    index: int
    keys: list[str]                                   # varied keys as the spec names them
    records: list[dict[str, Any]] = field(default_factory=list)
    missing: int = 0                                  # points whose cell is not (yet) usable

    @property
    def title(self) -> str:
        """e.g. ``trak: proj_dim x lam``."""
        return f"{self.method}: {' x '.join(self.keys) or 'defaults'}"


@dataclass
class SweepResults:
    """The usable cells of a sweep directory and their sub-experiment tables."""

    out: Path
    spec: SweepSpec
    cells: list[dict[str, Any]]                       # current, status ok
    failed: list[dict[str, Any]]
    stale: list[str]                                  # cell ids whose definition changed since
    missing: list[str]                                # cell ids never run
    orphans: list[str]                                # files in cells/ that no current cell owns
    experiments: list[SubExperiment]
    damaged: list[str] = field(default_factory=list)  # cell files that could not be read: why
    legacy: list[str] = field(default_factory=list)   # cell ids of format 2 (inputs unrecorded)

    def cell(self, cell_id: str) -> dict[str, Any] | None:
        """A usable cell by id."""
        return self._by_id.get(cell_id)

    def __post_init__(self) -> None:
        self._by_id = {c["cell_id"]: c for c in self.cells}


def load_results(out: str | Path) -> SweepResults:
    """Read ``out/sweep.json`` and every cell file, keeping only cells that answer today's spec."""
    out = Path(out)
    spec_path = out / "sweep.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{out} holds no sweep.json; run `tdatune sweep SPEC --out {out}` "
                                "first")
    spec = spec_from_dict(read_json(spec_path))
    store = CellStore(out, spec, inputs=recorded_inputs(out, spec))
    cells, failed, stale, missing, damaged, legacy = [], [], [], [], [], []
    owned = set()
    for cell in expand_cells(spec):
        owned.add(f"{cell.cell_id}.json")
        state, detail = store.state(cell)
        if state in ("done", "legacy"):
            cells.append(store.load(cell))
            if state == "legacy":
                legacy.append(cell.cell_id)
        elif state == "failed":
            failed.append(store.load(cell))
        elif state == "changed":
            stale.append(cell.cell_id)
        elif state == "unreadable":
            stale.append(cell.cell_id)
            damaged.append(f"{store.path(cell)}: {detail}")
        else:
            missing.append(cell.cell_id)
    orphans = sorted(p.name for p in store.dir.glob("*.json") if p.name not in owned) \
        if store.dir.exists() else []
    if not cells and not failed:
        if damaged:
            raise FileNotFoundError(
                f"{out}/cells holds no readable finished cell of this sweep; damaged (rerun "
                f"`tdatune sweep` on this directory to recompute them): {'; '.join(damaged)}")
        raise FileNotFoundError(f"{out}/cells holds no finished cell of this sweep; run the sweep "
                                "first")
    results = SweepResults(out, spec, cells, failed, stale, missing, orphans, [], damaged, legacy)
    results.experiments = [sub for s in spec.settings for m in spec.methods if m.runs_on(s.label)
                           for sub in _experiments(results, s.label, m)]
    return results


def _experiments(results: SweepResults, setting: str, method: MethodSpec) -> list[SubExperiment]:
    subs = []
    for index, experiment in enumerate(method.vary):
        sub = SubExperiment(setting, method.label, method.name, index, list(experiment))
        for varied, point in experiment_points(method, index):
            alpha = results.spec.groundtruth.alpha if point.alpha is None else point.alpha
            cell_id = Cell(setting, method.label, alpha, point.fit).cell_id
            cell = results.cell(cell_id)
            if cell is None:
                sub.missing += 1
                continue
            for row in _rows_for(cell, point.score, method.eigen):
                values = {k: (row["lam"] if k == "lam" else _axis_value(v)) for k, v in varied.items()}
                sub.records.append({**values, "lds": row["lds"], "sem": row["sem"],
                                    "file": cell["file"], "cell_id": cell_id,
                                    "row_lam": row.get("lam")})
        subs.append(sub)
    return subs


def _rows_for(cell: dict[str, Any], score: tuple[tuple[str, Any], ...], eigen: bool
              ) -> list[dict[str, Any]]:
    """The cell rows that answer one point's score-stage values."""
    want = plain(score)
    if eigen:
        lam = want["lam"]
        if lam == SPECTRUM:
            return [r for r in cell["rows"] if r.get("spectrum")]
        return [r for r in cell["rows"] if not r.get("spectrum")
                and math.isclose(r["lam"], float(lam), rel_tol=1e-12)][:1]
    return [r for r in cell["rows"] if all(r.get(k) == v for k, v in want.items())][:1]


def _axis_value(value: Any) -> Any:
    """A varied value as it is plotted and written (lists, e.g. checkpoint sets, as text)."""
    if isinstance(value, list | tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return value


def default_value(method: MethodSpec, key: str) -> Any:
    """The study default of a varied key (None where it has none, e.g. alpha's is the sweep's)."""
    if key in (ALPHA,):
        return None
    if key == EPOCH:
        return -1
    return method.base_values().get(key)


def is_default(spec: SweepSpec, setting: str, method: MethodSpec, key: str, value: Any) -> bool:
    """Whether ``value`` of a varied key is the study default on ``setting``: the sweep's alpha,
    the last checkpoint for ``epoch`` (-1 or its index), else the method's base value (None, e.g.
    no projection, included)."""
    if key == ALPHA:
        return value is not None and math.isclose(float(value), spec.groundtruth.alpha)
    if key == EPOCH:
        epochs = getattr(spec.setting(setting).resolved_recipe(), "epochs", None)
        return value == -1 or (epochs is not None and value == epochs - 1)
    return _axis_value(method.base_values().get(key)) == value
