"""Sensitivity sweeps: sub-experiments x attributors x benchmark settings (spec: study/spec.py,
guide: docs/sweeps.md).

Each *cell* is one fit: (setting, ground-truth alpha, method label, fit-stage values); it scores
every score-stage value its sub-experiments ask for (a lambda sweep on an eigen-based method is
one lambda-path pass). A cell file records the *definition* of the cell (setting with sizes,
recipe, model and data options, seed, ground-truth configuration, attributor, fit values, the
full score requests, thresholds) and its fingerprint, so a rerun serves a stored cell only if it
answers exactly the same question; a changed cell is recomputed, saying what changed. A failed
cell is stored as failed (with its error), shown in the report, retried on the next run, and
makes ``tdatune sweep`` exit non-zero.

Training happens once per setting and ground truth once per (setting, alpha), each in a
directory named by the fingerprint of what defines it. Cells are independent: they run in this
process, a local process pool or on a Ray cluster, with the same results.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tdatune.attributors.registry import make_attributor
from tdatune.data.base import Splits
from tdatune.data.noise import flip_labels
from tdatune.evaluate.groundtruth import GroundTruth, GroundTruthConfig, manifest_for
from tdatune.evaluate.lds import lds, lds_path
from tdatune.models.task import Task
from tdatune.select.quantile import quantile_lambda
from tdatune.select.surrogate import default_lambda_grid, mean_indicator, select_lambdas
from tdatune.settings.registry import Setting
from tdatune.study.beyond import REMOVAL_FORMAT, RETRAIN_DIR, mislabel_record, removal_record
from tdatune.study.diagnosis import default_selection, diagnose
from tdatune.study.prepare import (
    TrainedSetting,
    build_setting,
    setting_groundtruth,
    setting_identity,
    train_built,
)
from tdatune.study.spec import (
    SPECTRUM,
    MethodSpec,
    SettingSpec,
    SweepSpec,
    load_spec,
    plain,
    point_fingerprint,
    spec_from_dict,
    sub_experiment_points,
)
from tdatune.utils.atomic import atomic_write_json, read_json
from tdatune.utils.environment import numeric_environment
from tdatune.utils.fingerprint import differences, fingerprint_config
from tdatune.utils.progress import progress

__all__ = ["BASELINE_QUANTILES", "CELL_FORMAT", "Cell", "CellStore", "expand_cells", "load_spec",
           "run_cell", "run_sweep", "spec_from_dict"]

BASELINE_QUANTILES = (0.1, 0.5, 0.9)  # spectrum-quantile baselines recorded per eigen cell
XI_POINTS = 60                        # points of the stored mean-xi curve
CELL_FORMAT = 3                       # bump when what a cell file means changes
# 3: ``inputs`` (the resolved trained setting and ground truth) in the definition; the
# surrogate at the spec's threshold is picked when a cell is read, not stored
_SPEC_LEVEL_IGNORED = ("format", "inputs")  # what a format-2 cell's definition lacks


def surrogate_of(record: dict[str, Any], threshold: float) -> dict[str, Any] | None:
    """The selection at ``threshold`` among a cell's ``selections`` (None when absent)."""
    return next((s for s in record.get("selections", [])
                 if math.isclose(s["threshold"], threshold, rel_tol=1e-12)), None)


@dataclass(frozen=True)
class Cell:
    """One fit and everything scored from it."""

    setting: str                                        # setting label
    method: str                                         # method label
    alpha: float
    fit: tuple[tuple[str, Any], ...]
    score: tuple[tuple[tuple[str, Any], ...], ...] = ()  # non-eigen: score-value sets
    lambdas: tuple[float, ...] = ()                      # eigen: explicit lambdas
    spectrum: bool = False                               # eigen: also the spectrum grid

    @property
    def cell_id(self) -> str:
        """A stable file name for the cell (its fit values and alpha, hashed)."""
        return f"{self.setting}__{self.method}__a{self.alpha:g}__{point_fingerprint(self.fit)}"

    def definition(self, spec: SweepSpec) -> dict[str, Any]:
        """Everything that defines this cell's numbers (fingerprinted into the cell file)."""
        method = spec.method(self.method)
        subset = {"explain": method.explain} if method.explain else {}
        removal = spec.removal_on(self.setting)
        if removal is not None:
            subset["removal"] = {**asdict(removal), "format": REMOVAL_FORMAT}
        return {
            **subset,
            "format": CELL_FORMAT,
            "setting": spec.setting(self.setting).definition(spec.seed, spec.data_dir),
            "groundtruth": asdict(groundtruth_config(spec, self.alpha)),
            "attributor": method.name, "fit": plain(self.fit),
            "score": [plain(s) for s in self.score], "lambdas": list(self.lambdas),
            "spectrum_grid": spec.grid_points if self.spectrum else None,
            "thresholds": spec.thresholds if method.eigen else None,
            "quantiles": list(BASELINE_QUANTILES) if method.eigen else None,
        }


def groundtruth_config(spec: SweepSpec, alpha: float) -> GroundTruthConfig:
    """The sweep's ground-truth configuration at subset fraction ``alpha``."""
    return replace(spec.groundtruth, alpha=alpha)


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the sweep: sub-experiment points grouped by (setting, alpha, method, fit)."""
    cells: dict[tuple[Any, ...], dict[str, Any]] = {}
    for setting in spec.settings:
        for method in spec.methods:
            if not method.runs_on(setting.label):
                continue
            for point in sub_experiment_points(method):
                alpha = spec.groundtruth.alpha if point.alpha is None else point.alpha
                key = (setting.label, method.label, alpha, point.fit)
                entry = cells.setdefault(key, {"score": [], "lambdas": set(), "spectrum": False})
                if method.eigen:
                    lam = dict(point.score)["lam"]
                    if lam == SPECTRUM:
                        entry["spectrum"] = True
                    else:
                        entry["lambdas"].add(float(lam))
                elif point.score not in entry["score"]:
                    entry["score"].append(point.score)
    return [Cell(s, m, a, fit, score=tuple(e["score"]), lambdas=tuple(sorted(e["lambdas"])),
                 spectrum=e["spectrum"]) for (s, m, a, fit), e in cells.items()]


# -- one cell ----------------------------------------------------------------------------------

def run_cell(trained: TrainedSetting, gt: GroundTruth, method: MethodSpec, cell: Cell,
             spec: SweepSpec) -> dict[str, Any]:
    """Fit one attributor and score everything the cell asks for; return the cell's record."""
    test, val = trained.splits.test, trained.splits.val
    if method.explain:
        if method.explain > len(test):
            raise ValueError(f"{method.label}: explain = {method.explain}, but {cell.setting} "
                             f"has only {len(test)} test examples")
        test = test.subset(torch.arange(method.explain))
        gt = replace(gt, outputs=gt.outputs[:, :, : method.explain])
    t0 = time.time()
    att = make_attributor(method.name, **plain(cell.fit)).fit(trained.context)
    fit_seconds = time.time() - t0
    t1 = time.time()
    extra = (_score_eigen(att, test, val, gt, cell, spec) if method.eigen
             else _score_grid(att, test, gt, cell, trained.context.show_progress))
    flipped = trained.splits.info.get("flipped")
    if flipped:
        extra["mislabel"] = mislabel_record(
            att, att.lambda_path(test) if method.eigen else None, list(flipped), extra,
            spec.threshold)
    removal = spec.removal_on(cell.setting)
    if removal is not None:
        extra["removal"] = removal_record(trained, att, removal, extra, spec.threshold,
                                          gt.directory.parent / RETRAIN_DIR, spec.seed,
                                          method.eigen)
    return {"status": "ok", "fit_seconds": fit_seconds, "score_seconds": time.time() - t1,
            "n_explained": len(test), "environment": numeric_environment(trained.context.device),
            "data_source": trained.splits.source, "model_quality": trained.quality(), **extra}


def _score_eigen(att: Any, test: Any, val: Any, gt: GroundTruth, cell: Cell,
                 spec: SweepSpec) -> dict[str, Any]:
    """Every requested lambda (and the spectrum grid) in one lambda-path pass, plus the
    surrogate selections at every threshold, the quantile baselines and the mean-xi curve."""
    extra: dict[str, Any] = {}
    test_path = att.lambda_path(test)
    grid = (default_lambda_grid(test_path.sigma, num=spec.grid_points, below=1e-2, above=1e2)
            if cell.spectrum else torch.empty(0, dtype=torch.float64))
    explicit = torch.tensor(cell.lambdas, dtype=torch.float64)
    selections: list[Any] = []
    lam_q: list[float] = []
    try:
        sigma_val, c_val = att.surrogate_spectrum(val)
    except ValueError as err:  # e.g. an indefinite Hessian: xi is defined for PSD matrices
        extra["surrogate_error"] = str(err)
    else:
        selections = select_lambdas(sigma_val, c_val, list(spec.thresholds))
        lam_q = [quantile_lambda(sigma_val, q) for q in BASELINE_QUANTILES]
        xi_grid = default_lambda_grid(sigma_val, num=XI_POINTS)
        xi_mean, dropped = mean_indicator(sigma_val, c_val, xi_grid)
        extra["xi_curve"] = {"lambdas": xi_grid.tolist(), "xi_mean": xi_mean.tolist(),
                             "n_dropped": dropped, "top_eigenvalue": float(sigma_val.max())}
        try:
            extra["default_selection"] = default_selection(att, test_path, val, gt,
                                                           spec.threshold)
        except (ValueError, RuntimeError) as err:
            extra["default_selection_error"] = f"{type(err).__name__}: {err}"
        default = extra.get("default_selection", {}).get("lambda")
        try:
            extra |= diagnose(test_path, att.lambda_path(val), gt, grid, selections, xi_grid,
                              xi_mean, spec.threshold,
                              blockwise=att.name in ("logra", "kfac", "ekfac"), default=default)
        except (ValueError, RuntimeError) as err:  # the LDS grid stands without the diagnosis
            extra["diagnosis_error"] = f"{type(err).__name__}: {err}"
    extras = torch.tensor([s.lam for s in selections] + lam_q, dtype=torch.float64)
    results = lds_path(test_path, gt.masks, gt.mean_outputs, torch.cat([grid, explicit, extras]))
    rows = [{"lam": lam, "lds": r.mean, "sem": r.sem, "spectrum": True}
            for lam, r in zip(grid.tolist(), results[: len(grid)], strict=True)]
    rows += [{"lam": lam, "lds": r.mean, "sem": r.sem, "spectrum": False}
             for lam, r in zip(explicit.tolist(), results[len(grid): len(grid) + len(explicit)],
                               strict=True)]
    tail = results[len(grid) + len(explicit):]
    if selections:
        extra["selections"] = [{**s.to_dict(), "lds": r.mean, "sem": r.sem}
                               for s, r in zip(selections, tail, strict=False)]
        extra["quantile_baselines"] = {str(q): [lam, r.mean] for q, lam, r in
                                       zip(BASELINE_QUANTILES, lam_q, tail[len(selections):],
                                           strict=True)}
    extra["spectrum"] = {"k": int(test_path.sigma.numel()), "max": float(test_path.sigma.max()),
                         "min": float(test_path.sigma.min())}
    return {"rows": rows, **extra}


def _score_grid(att: Any, test: Any, gt: GroundTruth, cell: Cell, show: bool) -> dict[str, Any]:
    """Score-stage values one by one (reusing the fit); a value that fails (e.g. a LiSSA scale
    that diverges at some lambda) becomes an error row, not a failed cell."""
    grid = [plain(s) for s in cell.score] or [{}]
    rows: list[dict[str, Any]] = []
    done: set[int] = set()
    try:
        for i, (values, scores) in enumerate(progress(att.score_grid(test, grid), enabled=show,
                                                      desc=att.name, total=len(grid))):
            res = lds(scores, gt.masks, gt.mean_outputs)
            rows.append({**values, "lds": res.mean, "sem": res.sem})
            done.add(i)
    except (ValueError, FloatingPointError, ArithmeticError):
        for i, values in enumerate(grid):  # redo the rest one value at a time
            if i in done:
                continue
            try:
                res = lds(att.score(test, **values), gt.masks, gt.mean_outputs)
            except (ValueError, FloatingPointError, ArithmeticError) as err:
                rows.append({**values, "lds": float("nan"), "sem": float("nan"), "error": str(err)})
            else:
                rows.append({**values, "lds": res.mean, "sem": res.sem})
    return {"rows": rows}  # in grid order: score_grid yields in order, the redo keeps it


# -- the cell store ----------------------------------------------------------------------------

Inputs = Callable[[Cell], "dict[str, Any] | None"]


class CellStore:
    """The ``cells/`` directory: one JSON file per cell, written atomically, read back only when
    its fingerprint matches the cell's current definition.

    ``inputs(cell)`` gives what the cell is computed from as resolved objects (the trained
    setting's identity and the ground truth's manifest fingerprint; see
    :meth:`Workspace.inputs`); it is part of the definition. Without it (or where it returns
    None: a sweep directory copied without its ``settings/``) the inputs a cell recorded are
    taken as they are."""

    def __init__(self, out: Path, spec: SweepSpec, inputs: Inputs | None = None) -> None:
        self.dir = out / "cells"
        self.spec = spec
        self.inputs = inputs

    def path(self, cell: Cell) -> Path:
        """The cell's file."""
        return self.dir / f"{cell.cell_id}.json"

    def header(self, cell: Cell, stored_inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """What every record of ``cell`` starts with (identity, definition, fingerprint)."""
        method = self.spec.method(cell.method)
        setting = self.spec.setting(cell.setting)
        definition = cell.definition(self.spec)
        inputs = self.inputs(cell) if self.inputs is not None else None
        definition["inputs"] = inputs if inputs is not None else stored_inputs
        return {"cell_id": cell.cell_id, "fingerprint": fingerprint_config(definition),
                "definition": definition, "setting": cell.setting, "setting_name": setting.name,
                "method": cell.method, "attributor": method.name, "alpha": cell.alpha,
                "fit": plain(cell.fit)}

    def state(self, cell: Cell) -> tuple[str, str]:
        """(``done`` | ``legacy`` | ``failed`` | ``changed`` | ``missing`` | ``unreadable``,
        detail). ``legacy``: a cell of format 2, which recorded no inputs, whose every recorded
        field matches: the report reads it (and says so), a sweep recomputes it."""
        path = self.path(cell)
        if not path.exists():
            return "missing", ""
        try:
            stored = read_json(path)
        except (ValueError, OSError) as err:
            return "unreadable", str(err)
        old = stored.get("definition", {})
        want = self.header(cell, old.get("inputs"))
        new = want["definition"]
        if stored.get("fingerprint") != want["fingerprint"]:
            diffs = differences(old, new)
            if old.get("format") == 2 and all(d.split(".")[0] in _SPEC_LEVEL_IGNORED
                                               for d in diffs):
                return ("legacy", "") if stored.get("status") == "ok" else (
                    "failed", str(stored.get("error", "")))
            return "changed", ", ".join(diffs) or "format"
        if stored.get("status") != "ok":
            return "failed", str(stored.get("error", ""))
        return "done", ""

    def save(self, cell: Cell, result: dict[str, Any]) -> None:
        """Write the cell's record atomically."""
        atomic_write_json(self.path(cell), {**self.header(cell), **result})

    def load(self, cell: Cell) -> dict[str, Any]:
        """The stored record of ``cell`` (with its file name), its ``surrogate`` the selection at
        the spec's threshold."""
        record = {**read_json(self.path(cell)), "file": f"cells/{cell.cell_id}.json"}
        record.pop("surrogate", None)  # a format-2 cell stored the one of the threshold it ran at
        chosen = surrogate_of(record, self.spec.threshold)
        if chosen is not None:
            record["surrogate"] = chosen
        return record


def failure_record(err: BaseException) -> dict[str, Any]:
    """What a failed cell stores: the error and the end of its traceback."""
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {"status": "failed", "rows": [], "error": f"{type(err).__name__}: {err}",
            "traceback": tb[-4000:]}


# -- the whole sweep ---------------------------------------------------------------------------

@dataclass
class SweepOutcome:
    """Every cell's record, in spec order, and the failed ones."""

    cells: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The cells whose status is not ``ok``."""
        return [c for c in self.cells if c.get("status") != "ok"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.cells)

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.cells[i]


class Workspace:
    """Trained settings and ground truths of a sweep directory, built once each, cached.

    A setting is first *resolved* (data loaded, task made; cheap) so that its identity, read
    off the resolved objects (:func:`~tdatune.study.prepare.setting_identity`), and its ground
    truths' manifests are known before anything is trained; every cell records them as its
    ``inputs``, so a changed model, loss, output, forward, training function or data makes the
    cells that depend on it recompute."""

    def __init__(self, spec: SweepSpec, out: Path, device: str, show_progress: bool,
                 say: Callable[..., None], gt_backend: str = "auto",
                 gt_options: dict[str, Any] | None = None) -> None:
        self.spec, self.out, self.device = spec, out, device
        self.show, self.say = show_progress, say
        self.gt_backend, self.gt_options = gt_backend, gt_options
        self._built: dict[str, tuple[Setting, Splits, Task]] = {}
        self._identity: dict[str, dict[str, Any]] = {}
        self._inputs: dict[tuple[str, float], dict[str, Any]] = {}
        self._trained: dict[str, TrainedSetting] = {}
        self._gts: dict[tuple[str, float], GroundTruth] = {}

    def setting_dir(self, setting: SettingSpec) -> Path:
        """``settings/<label>-<fingerprint of its definition>``."""
        return setting_dir(self.out, self.spec, setting)

    def built(self, label: str) -> tuple[Setting, Splits, Task]:
        """The setting with its data loaded and task made (nothing trained)."""
        if label not in self._built:
            s = self.spec.setting(label)
            setting, splits, task = build_setting(
                s.name, seed=self.spec.seed, data_dir=s.resolved_data_dir(self.spec.data_dir),
                sizes=tuple(s.sizes) if s.sizes else None, task_options=s.model,
                load_options=s.data)
            if s.label_noise is not None:  # the model is trained on the flipped labels
                train, flipped = flip_labels(splits.train, s.label_noise, splits.num_classes,
                                             seed=self.spec.seed)
                splits = replace(splits, train=train,
                                 info={**splits.info, "flipped": flipped.tolist()})
            self._built[label] = (setting, splits, task)
        return self._built[label]

    def identity(self, label: str) -> dict[str, Any]:
        """The resolved identity of a setting, also written to its ``identity.json``."""
        if label not in self._identity:
            _, splits, task = self.built(label)
            s = self.spec.setting(label)
            identity = setting_identity(splits, task, s.resolved_recipe(), self.spec.seed)
            path = self.setting_dir(s) / IDENTITY_FILE
            if not path.exists() or read_json(path) != identity:
                atomic_write_json(path, identity)
            self._identity[label] = identity
        return self._identity[label]

    def groundtruth_dir(self, label: str, alpha: float) -> Path:
        """``<setting dir>/groundtruth-a<alpha>-<fingerprint of its configuration>``."""
        return groundtruth_dir(self.out, self.spec, label, alpha)

    def inputs(self, cell: Cell) -> dict[str, Any]:
        """What the cell is computed from: the setting's identity and the ground truth's
        manifest (fingerprints), and the model's class and size for a reader."""
        key = (cell.setting, cell.alpha)
        if key not in self._inputs:
            identity = self.identity(cell.setting)
            _, splits, task = self.built(cell.setting)
            manifest = manifest_for(task, self.spec.setting(cell.setting).resolved_recipe(),
                                    splits.train, splits.test,
                                    groundtruth_config(self.spec, cell.alpha))
            self._inputs[key] = cell_inputs(identity, fingerprint_config(manifest))
        return self._inputs[key]

    def trained(self, label: str) -> TrainedSetting:
        """The trained setting (trained or resumed on first use)."""
        if label not in self._trained:
            s = self.spec.setting(label)
            setting, splits, task = self.built(label)
            self.identity(label)
            self._trained[label] = train_built(
                setting, splits, task, self.setting_dir(s), seed=self.spec.seed,
                device=self.device, show_progress=self.show, recipe_overrides=s.recipe,
                say=self.say)
        return self._trained[label]

    def groundtruth(self, label: str, alpha: float) -> GroundTruth:
        """The ground truth of a setting at ``alpha`` (built or resumed on first use)."""
        if (label, alpha) not in self._gts:
            self._gts[(label, alpha)] = setting_groundtruth(
                self.trained(label), groundtruth_config(self.spec, alpha),
                self.groundtruth_dir(label, alpha), show_progress=self.show, say=self.say,
                backend=self.gt_backend, backend_options=self.gt_options)
        return self._gts[(label, alpha)]

    def run(self, cell: Cell) -> dict[str, Any]:
        """Run one cell; any exception becomes a failed record."""
        try:
            trained = self.trained(cell.setting)
            gt = self.groundtruth(cell.setting, cell.alpha)
            return run_cell(trained, gt, self.spec.method(cell.method), cell, self.spec)
        except Exception as err:
            return failure_record(err)


IDENTITY_FILE = "identity.json"


def setting_dir(out: Path, spec: SweepSpec, setting: SettingSpec) -> Path:
    """``settings/<label>-<fingerprint of its definition>`` of a sweep directory."""
    fp = fingerprint_config(setting.definition(spec.seed, spec.data_dir))[:8]
    return out / "settings" / f"{setting.label}-{fp}"


def groundtruth_dir(out: Path, spec: SweepSpec, label: str, alpha: float) -> Path:
    """Where a setting's ground truth at ``alpha`` lives in a sweep directory."""
    fp = fingerprint_config(asdict(groundtruth_config(spec, alpha)))[:8]
    return setting_dir(out, spec, spec.setting(label)) / f"groundtruth-a{alpha:g}-{fp}"


def cell_inputs(identity: dict[str, Any], groundtruth: str) -> dict[str, Any]:
    """A cell's ``inputs`` from its setting's identity and its ground truth's fingerprint."""
    arch = identity["task"]["architecture"]
    return {"setting": fingerprint_config(identity), "groundtruth": groundtruth,
            "model": f"{arch['class']}, {arch['n_parameters']} parameters"}


def recorded_inputs(out: Path, spec: SweepSpec) -> Inputs:
    """``inputs`` of each cell as the sweep directory last resolved them (the setting's
    ``identity.json`` and the ground truth's manifest), without loading any data; None where
    they are not on disk (then a cell's own record is taken as it is)."""
    def inputs(cell: Cell) -> dict[str, Any] | None:
        ident = setting_dir(out, spec, spec.setting(cell.setting)) / IDENTITY_FILE
        manifest = groundtruth_dir(out, spec, cell.setting, cell.alpha) / "manifest.json"
        if not (ident.exists() and manifest.exists()):
            return None
        try:
            return cell_inputs(read_json(ident), read_json(manifest)["fingerprint"])
        except (ValueError, OSError, KeyError):
            return None
    return inputs


def run_sweep(spec: SweepSpec, out: str | Path, *, backend: str = "local",
              address: str | None = None, device: str = "auto", show_progress: bool = True,
              say: Callable[..., None] = print, retrain_backend: str = "auto") -> SweepOutcome:
    """Run (or resume) the sweep into ``out``; return every cell's record (failed ones too).

    ``backend`` runs the cells (local, process, ray); ``retrain_backend`` retrains the ground
    truths' subset models (auto, sequential, batched, process, ray; auto follows a Ray
    ``backend`` onto the cluster)."""
    if backend not in ("local", "process", "ray"):
        raise ValueError(f"unknown backend {backend!r}; choose one of: local, process, ray")
    from tdatune.evaluate.runners import RUNNERS

    if retrain_backend not in RUNNERS:
        raise ValueError(f"unknown retrain backend {retrain_backend!r}; choose one of: "
                         f"{', '.join(RUNNERS)}")
    out = Path(out)
    gt_backend = "ray" if backend == "ray" and retrain_backend == "auto" else retrain_backend
    gt_options = {"address": address} if gt_backend == "ray" else {}
    work = Workspace(spec, out, device, show_progress, say, gt_backend, gt_options)
    store = CellStore(out, spec, inputs=work.inputs)
    store.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", spec.to_dict())
    cells = expand_cells(spec)
    pending = []
    counts: dict[str, int] = {}
    for cell in cells:
        state, detail = store.state(cell)
        if state == "legacy":
            say(f"  {cell.cell_id}: computed by cell format 2, which did not record the trained "
                "model nor the ground truth it came from; recomputing")
            state = "changed"
        counts[state] = counts.get(state, 0) + 1
        if state == "done":
            continue
        pending.append(cell)
        if state == "changed":
            say(f"  {cell.cell_id}: definition changed ({detail}); recomputing")
        elif state == "failed":
            say(f"  {cell.cell_id}: failed last time ({detail[:120]}); retrying")
        elif state == "unreadable":
            say(f"  {cell.cell_id}: stored file unreadable ({detail[:120]}); recomputing")
    say(f"sweep {spec.name}: {len(cells)} cells, {counts.get('done', 0)} already done, "
        f"{len(pending)} to run")
    if backend == "local":
        # setting by setting: its training and ground truths, then its cells, so that the
        # results of the first settings are stored before the later ones are even trained
        for label in dict.fromkeys(c.setting for c in pending):
            mine = [c for c in pending if c.setting == label]
            for alpha in dict.fromkeys(c.alpha for c in mine):
                work.groundtruth(label, alpha)
            for cell in progress(mine, enabled=show_progress, desc=f"{label} cells", unit="cell"):
                store.save(cell, work.run(cell))
    else:
        for label, alpha in dict.fromkeys((c.setting, c.alpha) for c in pending):
            work.groundtruth(label, alpha)  # once each, here, before cells go to workers
        from tdatune.evaluate.runners import map_local, map_ray

        payloads = [(spec.to_dict(), str(out), cell, device) for cell in pending]

        def save(index: int, result: dict[str, Any]) -> None:
            store.save(pending[index], result)

        mapper = map_ray if backend == "ray" else map_local
        options = {"address": address} if backend == "ray" else {}
        mapper(_run_cell_payload, payloads, show_progress=show_progress, desc="sweep cells",
               on_result=save, **options)
    return SweepOutcome([store.load(c) for c in cells])


def _run_cell_payload(payload: tuple[dict[str, Any], str, Cell, str]) -> dict[str, Any]:
    """Run one cell in another process (pool or Ray worker): reload the setting from disk."""
    raw, out, cell, device = payload
    spec = spec_from_dict(raw)
    return Workspace(spec, Path(out), device, False, lambda *a: None).run(cell)
