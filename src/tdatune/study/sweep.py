"""Sensitivity sweeps: hyperparameter grids x attributors x benchmark settings.

A sweep is described by a TOML file (see docs/sweeps.md)::

    name = "lambda-and-projection"
    settings = ["digits-lr", "mnist-lr"]
    seed = 0
    [groundtruth]
    n_subsets = 50
    alpha = 0.5
    [sizes]                       # optional per-setting train/val/test sizes
    mnist-lr = [2000, 300, 300]
    [[methods]]
    name = "iffim"
    fit = { proj_dim = [64, 256] }        # fit-stage grid (cartesian product)
    score = { lam = "spectrum" }          # score-stage grid; "spectrum": log grid over the spectrum

Each (setting, method, fit-stage values) is one *cell*: fit once, then score every
score-stage value (a lambda sweep on an eigen-based method is one lambda-path). Each finished
cell is written atomically to ``cells/<id>.json``; a rerun skips finished cells, so a killed
sweep resumes. Training and ground truth are done once per setting and shared by all cells.
Cells are independent and can run in a local process pool (``backend="process"``) or on a
Ray cluster (``backend="ray"``); each is saved as soon as it finishes.
"""

from __future__ import annotations

import itertools
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdatune.attributors.registry import ATTRIBUTORS, make_attributor
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.evaluate.lds import lds, lds_path
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import default_lambda_grid, select_lambda
from tdatune.study.prepare import Prepared, prepare_setting
from tdatune.utils.atomic import atomic_write_json, read_json
from tdatune.utils.checks import check_open_unit
from tdatune.utils.fingerprint import fingerprint_config
from tdatune.utils.progress import progress

SPECTRUM = "spectrum"
BASELINE_QUANTILES = (0.1, 0.5, 0.9)  # spectrum-quantile baselines recorded per eigen cell


@dataclass
class MethodSpec:
    """One attributor and the grids of its fit-stage and score-stage hyperparameters."""

    name: str
    fit: dict[str, list[Any]] = field(default_factory=dict)
    score: dict[str, Any] = field(default_factory=dict)

    def fit_grid(self) -> list[dict[str, Any]]:
        """Cartesian product of the fit-stage values."""
        return _product(self.fit)


@dataclass
class SweepSpec:
    """A whole sweep."""

    name: str
    settings: list[str]
    methods: list[MethodSpec]
    groundtruth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    sizes: dict[str, list[int]] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    threshold: float = 0.5
    grid_points: int = 25
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("a sweep needs at least one setting (settings = [...])")
        if not self.methods:
            raise ValueError("a sweep needs at least one [[methods]] table")
        check_open_unit("threshold", self.threshold)
        for m in self.methods:
            if m.name not in ATTRIBUTORS:
                raise ValueError(f"unknown attributor {m.name!r} in sweep; choose one of: "
                                 f"{', '.join(ATTRIBUTORS)}")
            cls = ATTRIBUTORS[m.name]
            spec = cls.spec()
            for key, stage in [(k, "fit") for k in m.fit] + [(k, "score") for k in m.score]:
                if key not in spec:
                    raise ValueError(f"{m.name}: unknown hyperparameter {key!r}; valid: "
                                     f"{', '.join(spec)}")
                if spec[key].stage != stage:
                    raise ValueError(f"{m.name}: {key} is a {spec[key].stage}-stage hyperparameter; "
                                     f"put it under `{spec[key].stage}`")
            for values in m.fit_grid():
                cls(**values)  # validates every fit-stage value before any work starts

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (recorded in the sweep directory)."""
        return asdict(self)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return spec_from_dict(raw)


def spec_from_dict(raw: dict[str, Any]) -> SweepSpec:
    """Build a SweepSpec from parsed TOML/JSON."""
    raw = dict(raw)
    known = {"name", "settings", "methods", "groundtruth", "sizes", "recipes", "seed", "threshold",
             "grid_points", "data_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown sweep keys {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    methods = [MethodSpec(name=m["name"], fit={k: _as_list(v) for k, v in m.get("fit", {}).items()},
                          score=dict(m.get("score", {}))) for m in raw.pop("methods", [])]
    gt = GroundTruthConfig(**raw.pop("groundtruth", {}))
    return SweepSpec(methods=methods, groundtruth=gt, name=raw.pop("name", "sweep"), **raw)


@dataclass(frozen=True)
class Cell:
    """One fit: a setting, a method and its fit-stage values."""

    setting: str
    method: str
    fit: tuple[tuple[str, Any], ...]

    @property
    def cell_id(self) -> str:
        """A stable file name for the cell."""
        return f"{self.setting}__{self.method}__{fingerprint_config(list(self.fit))[:10]}"


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Every (setting, method, fit-stage combination) of the sweep."""
    return [Cell(s, m.name, tuple(sorted(values.items())))
            for s in spec.settings for m in spec.methods for values in m.fit_grid()]


def run_cell(prepared: Prepared, method: MethodSpec, fit_values: dict[str, Any],
             threshold: float = 0.5, grid_points: int = 25) -> dict[str, Any]:
    """Fit one attributor and score its whole score-stage grid; return the cell's rows."""
    gt = prepared.groundtruth
    test, val = prepared.splits.test, prepared.splits.val
    t0 = time.time()
    att = make_attributor(method.name, **fit_values).fit(prepared.context)
    fit_seconds = time.time() - t0
    score_spec = dict(method.score)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    lam_spec = score_spec.pop("lam", None)
    eigen = hasattr(att, "lambda_path") and "lam" in att.spec()
    t1 = time.time()
    if eigen:
        test_path = att.lambda_path(test)
        if lam_spec is None or lam_spec == SPECTRUM:
            lambdas = default_lambda_grid(test_path.sigma, num=grid_points, below=1e-2, above=1e2)
        else:
            lambdas = torch.as_tensor(_as_list(lam_spec), dtype=torch.float64)
        if score_spec:
            raise ValueError(f"{method.name}: with a lambda-path only `lam` is swept at score "
                             f"stage; remove {', '.join(score_spec)} from its score grid")
        sel = None
        lam_q: list[float] = []
        try:
            sigma_val, c_val = att.surrogate_spectrum(val)
        except ValueError as err:  # e.g. an indefinite Hessian: xi is defined for PSD matrices
            extra["surrogate_error"] = str(err)
        else:
            sel = select_lambda(sigma_val, c_val, threshold=threshold)
            lam_q = [quantile_lambda(sigma_val, q) for q in BASELINE_QUANTILES]
        # one pass over the lambda-path: the grid, then the selected lambda and the baselines
        extra_lams = torch.tensor(([sel.lam] if sel else []) + lam_q, dtype=torch.float64)
        results = lds_path(test_path, gt.masks, gt.mean_outputs, torch.cat([lambdas, extra_lams]))
        rows = [{"lam": lam, "lds": res.mean, "sem": res.sem}
                for lam, res in zip(lambdas.tolist(), results[: len(lambdas)], strict=True)]
        if sel is not None:
            sel_lds, *q_lds = results[len(lambdas):]
            extra["surrogate"] = {**sel.to_dict(), "lds": sel_lds.mean, "sem": sel_lds.sem}
            extra["quantile_baselines"] = {str(q): [lam, res.mean] for q, lam, res in
                                           zip(BASELINE_QUANTILES, lam_q, q_lds, strict=True)}
        extra["spectrum"] = {"k": int(test_path.sigma.numel()), "max": float(test_path.sigma.max()),
                             "min": float(test_path.sigma.min())}
    else:
        grid = {k: _as_list(v) for k, v in score_spec.items()}
        if lam_spec is not None:
            if lam_spec == SPECTRUM:
                raise ValueError(f"{method.name} has no eigen spectrum; give `lam` as a list")
            grid["lam"] = _as_list(lam_spec)
        for values, scores in progress(att.score_grid(test, _product(grid) or [{}]),
                                       enabled=prepared.context.show_progress, desc=method.name):
            res = lds(scores, gt.masks, gt.mean_outputs)
            rows.append({**values, "lds": res.mean, "sem": res.sem})
    return {"setting": prepared.setting.name, "method": method.name, "fit": fit_values,
            "rows": rows, "fit_seconds": fit_seconds, "score_seconds": time.time() - t1,
            "data_source": prepared.splits.source, **extra}


def run_cell_or_error(prepared: Prepared, method: MethodSpec, fit_values: dict[str, Any],
                      threshold: float = 0.5, grid_points: int = 25) -> dict[str, Any]:
    """``run_cell``, but a value that is invalid for this setting (a ValueError, e.g. a
    projection dim above this model's parameter count) becomes a recorded error cell instead
    of stopping the sweep. Delete the cell file to retry it."""
    try:
        return run_cell(prepared, method, fit_values, threshold, grid_points)
    except ValueError as err:
        return {"setting": prepared.setting.name, "method": method.name, "fit": fit_values,
                "rows": [], "error": str(err), "data_source": prepared.splits.source}


def run_sweep(spec: SweepSpec, out: str | Path, *, backend: str = "local",
              address: str | None = None, device: str = "auto", show_progress: bool = True,
              say: Callable[..., None] = print) -> list[dict[str, Any]]:
    """Run (or resume) the sweep into ``out``; return every cell's result."""
    out = Path(out)
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out / "sweep.json"
    if spec_path.exists() and read_json(spec_path)["groundtruth"] != asdict(spec.groundtruth):
        raise ValueError(f"{out} holds a sweep with another ground-truth configuration; "
                         "use a new directory")
    atomic_write_json(spec_path, spec.to_dict())
    cells = expand_cells(spec)
    pending = [c for c in cells if not (cells_dir / f"{c.cell_id}.json").exists()]
    say(f"sweep {spec.name}: {len(cells)} cells, {len(cells) - len(pending)} already done")
    methods = {m.name: m for m in spec.methods}
    gt_backend, gt_options = ("ray", {"address": address}) if backend == "ray" else ("auto", {})
    for name in dict.fromkeys(c.setting for c in pending):  # train + ground truth once, here
        _prepare(spec, out, name, device, show_progress, say, gt_backend, gt_options)
    if backend in ("ray", "process"):
        from tdatune.evaluate.runners import map_local, map_ray

        payloads = [(spec.to_dict(), str(out), c, device) for c in pending]

        def save(index: int, result: dict[str, Any]) -> None:
            atomic_write_json(cells_dir / f"{pending[index].cell_id}.json", result)

        if backend == "ray":
            map_ray(_run_cell_payload, payloads, address=address, show_progress=show_progress,
                    desc="sweep cells", on_result=save)
        else:
            map_local(_run_cell_payload, payloads, show_progress=show_progress,
                      desc="sweep cells", on_result=save)
    elif backend == "local":
        cache: dict[str, Prepared] = {}
        for cell in progress(pending, enabled=show_progress, desc="sweep cells", unit="cell"):
            if cell.setting not in cache:
                cache[cell.setting] = _prepare(spec, out, cell.setting, device, False, lambda *a: None)
            result = run_cell_or_error(cache[cell.setting], methods[cell.method], dict(cell.fit),
                                       spec.threshold, spec.grid_points)
            atomic_write_json(cells_dir / f"{cell.cell_id}.json", result)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of: local, process, ray")
    return [read_json(cells_dir / f"{c.cell_id}.json") for c in cells]


def _prepare(spec: SweepSpec, out: Path, name: str, device: str, show_progress: bool,
             say: Callable[..., None], backend: str = "auto",
             backend_options: dict[str, Any] | None = None) -> Prepared:
    sizes = spec.sizes.get(name)
    return prepare_setting(name, out / "settings" / name, spec.groundtruth, seed=spec.seed,
                           data_dir=spec.data_dir, sizes=tuple(sizes) if sizes else None,
                           device=device, show_progress=show_progress,
                           recipe_overrides=spec.recipes.get(name), say=say, backend=backend,
                           backend_options=backend_options)


def _run_cell_payload(payload: tuple[dict[str, Any], str, Cell, str]) -> dict[str, Any]:
    """Run one cell in another process (Ray worker): reload the prepared setting from disk."""
    raw, out, cell, device = payload
    spec = spec_from_dict(raw)
    prepared = _prepare(spec, Path(out), cell.setting, device, False, lambda *a: None)
    method = next(m for m in spec.methods if m.name == cell.method)
    return run_cell_or_error(prepared, method, dict(cell.fit), spec.threshold, spec.grid_points)


def _as_list(value: Any) -> list[Any]:
    """A grid from TOML: a list, a scalar, or {logspace = [lo, hi, num]}; "none" means None."""
    if isinstance(value, dict) and "logspace" in value:
        lo, hi, num = value["logspace"]
        return np.logspace(float(lo), float(hi), int(num)).tolist()
    items = list(value) if isinstance(value, list | tuple) else [value]
    return [None if isinstance(v, str) and v.lower() == "none" else v for v in items]


def _product(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]
