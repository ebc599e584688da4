"""The sweep spec: settings, ground truth and methods with their sub-experiments, validated
whole before any training starts.

A study follows a one-factor design: every hyperparameter sits at the study default
(Appendix A.1 of the sensitivity paper, which are each attributor's own defaults) except the
one or two that a *sub-experiment* varies. A method's ``vary`` lists its sub-experiments::

    [[methods]]
    name = "trak"
    vary = [{ lam = "spectrum" }, { epoch = [2, 5, 9] },
            { proj_dim = [128, 512], lam = { logspace = [-4, 1, 6] } }]

``epoch`` (the checkpoint an attributor reads) and ``alpha`` (the ground truth's subset
fraction) are dimensions like any other. The older ``fit`` / ``score`` grids are one
sub-experiment over the cartesian product of all their keys.
"""

from __future__ import annotations

import inspect
import itertools
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tdatune.attributors.base import Attributor
from tdatune.attributors.registry import ATTRIBUTORS
from tdatune.evaluate.groundtruth import GroundTruthConfig
from tdatune.evaluate.removal import RemovalConfig
from tdatune.models.training import TrainRecipe
from tdatune.settings.registry import Setting, get_setting
from tdatune.utils.checks import check_open_unit
from tdatune.utils.fingerprint import fingerprint_config

SPECTRUM = "spectrum"  # lam = "spectrum": a log grid spanning the eigenvalues (eigen methods)
EPOCH = "epoch"        # the checkpoint an attributor reads (checkpoint / checkpoints)
ALPHA = "alpha"        # the ground truth's subset fraction
TOP_KEYS = ("name", "settings", "methods", "groundtruth", "sizes", "recipes", "seed", "threshold",
            "thresholds", "grid_points", "data_dir", "removal")
SETTING_KEYS = ("name", "task", "label", "sizes", "recipe", "model", "data", "data_dir",
                "label_noise")
REMOVAL_KEYS = (*(f.name for f in fields(RemovalConfig)), "settings")
METHOD_KEYS = ("name", "label", "defaults", "vary", "fit", "score", "explain", "settings")


def is_eigen(cls: type[Attributor]) -> bool:
    """Whether an attributor scores every lambda from one eigensystem (a lambda-path)."""
    return hasattr(cls, "lambda_path") and "lam" in cls.spec()


@dataclass
class SettingSpec:
    """One benchmark setting (built-in name or ``package.module:function``) at chosen sizes,
    recipe, model and data options; ``label`` names it in the sweep. ``data_dir``, when
    given, replaces the sweep's top-level ``data_dir`` for this setting."""

    name: str
    label: str = ""
    sizes: list[int] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    label_noise: float | None = None  # fraction of training labels flipped (mislabel study)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def resolved_data_dir(self, data_dir: str | None) -> str | None:
        """This setting's data directory: its own, else the sweep's ``data_dir``."""
        return self.data_dir if self.data_dir is not None else data_dir

    def setting(self) -> Setting:
        """The registered setting this entry builds on."""
        return get_setting(self.name)

    def resolved_recipe(self) -> TrainRecipe:
        """The setting's recipe with this entry's overrides."""
        return replace(self.setting().recipe, **self.recipe)

    def definition(self, seed: int, data_dir: str | None) -> dict[str, Any]:
        """Everything that defines the trained model and its data (fingerprinted);
        ``data_dir`` is the sweep's, replaced by this setting's own when it has one."""
        setting = self.setting()
        load, task = setting.resolved_options(task_options=self.model, load_options=self.data)
        noise = {} if self.label_noise is None else {"label_noise": self.label_noise}
        return {"name": self.name, "sizes": list(self.sizes or setting.sizes),
                "recipe": self.resolved_recipe().to_dict(), "model": task, "data": load,
                "seed": seed, "data_dir": self.resolved_data_dir(data_dir), **noise}


@dataclass
class MethodSpec:
    """One attributor entry: its label, study defaults and sub-experiments."""

    name: str
    label: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    vary: list[dict[str, list[Any]]] = field(default_factory=list)
    explain: int | None = None  # explain only the first N test examples (None: all of them)
    settings: list[str] | None = None  # setting labels this entry runs on (None: every one)

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def runs_on(self, setting: str) -> bool:
        """Whether this entry has cells on the setting labelled ``setting``."""
        return self.settings is None or setting in self.settings

    @property
    def cls(self) -> type[Attributor]:
        """The attributor class."""
        return ATTRIBUTORS[self.name]

    @property
    def eigen(self) -> bool:
        """Whether lambda is scored along one lambda-path."""
        return is_eigen(self.cls)

    def base_values(self) -> dict[str, Any]:
        """Every hyperparameter at the study default (the class default unless overridden)."""
        return {**{h.name: h.default for h in self.cls.hyperparameters}, **self.defaults}

    def translate(self, key: str, value: Any) -> tuple[str, Any]:
        """``epoch`` to this attributor's checkpoint hyperparameter; other keys unchanged."""
        if key != EPOCH:
            return key, value
        spec = self.cls.spec()
        if "checkpoint" in spec:
            return "checkpoint", value
        return "checkpoints", value if isinstance(value, list) else [value]

    def stage(self, key: str) -> str:
        """``fit``, ``score`` or ``groundtruth`` (alpha)."""
        if key == ALPHA:
            return "groundtruth"
        return self.cls.spec()[self.translate(key, 0)[0]].stage


@dataclass
class SweepSpec:
    """A whole sweep (see docs/sweeps.md)."""

    name: str
    settings: list[SettingSpec]
    methods: list[MethodSpec]
    groundtruth: GroundTruthConfig = field(default_factory=GroundTruthConfig)
    seed: int = 0
    threshold: float = 0.5
    thresholds: list[float] = field(default_factory=list)
    grid_points: int = 25
    data_dir: str | None = None
    removal: dict[str, Any] | None = None  # RemovalConfig fields and the settings it runs on

    def __post_init__(self) -> None:
        self.thresholds = sorted({*map(float, self.thresholds), float(self.threshold)})

    def removal_on(self, label: str) -> RemovalConfig | None:
        """The removal experiment of the setting labelled ``label`` (None: not run there)."""
        if self.removal is None:
            return None
        only = self.removal.get("settings")
        if only is not None and label not in only:
            return None
        values = {k: v for k, v in self.removal.items() if k != "settings"}
        if isinstance(values.get("loo"), list):  # leave-one-out on the settings listed
            values["loo"] = label in values["loo"]
        return RemovalConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (recorded in the sweep directory; ``spec_from_dict`` reads it back)."""
        raw = asdict(self)
        raw["settings"] = [asdict(s) for s in self.settings]
        raw["methods"] = [asdict(m) for m in self.methods]
        return raw

    def setting(self, label: str) -> SettingSpec:
        """The setting entry called ``label``."""
        return next(s for s in self.settings if s.label == label)

    def method(self, label: str) -> MethodSpec:
        """The method entry called ``label``."""
        return next(m for m in self.methods if m.label == label)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from err
    return spec_from_dict(raw)


def spec_from_dict(raw: dict[str, Any]) -> SweepSpec:
    """Build a SweepSpec from parsed TOML/JSON and validate every key and value in it."""
    raw = dict(raw)
    _check_keys("sweep", raw, TOP_KEYS)
    top_sizes = _table(raw.pop("sizes", {}), "[sizes]")
    top_recipes = _table(raw.pop("recipes", {}), "[recipes]")
    settings = [_setting_entry(e, top_sizes, top_recipes) for e in _list(raw.pop("settings", []),
                                                                            "settings")]
    if not settings:
        raise ValueError("a sweep needs at least one setting: settings = [\"digits-lr\"] or "
                         "[[settings]] tables")
    _unique("setting", [s.label for s in settings])
    for key in sorted(set(top_sizes) | set(top_recipes)):
        if key not in {s.label for s in settings}:
            raise ValueError(f"[sizes]/[recipes] name {key!r}, which is not a setting of this sweep "
                             f"({', '.join(s.label for s in settings)})")
    gt_raw = _table(raw.pop("groundtruth", {}), "[groundtruth]")
    _check_keys("[groundtruth]", gt_raw, [f.name for f in fields(GroundTruthConfig)])
    try:
        groundtruth = GroundTruthConfig(**gt_raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"[groundtruth]: {err}") from err
    methods = [_method_entry(e) for e in _list(raw.pop("methods", []), "methods")]
    if not methods:
        raise ValueError("a sweep needs at least one [[methods]] table")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ValueError(f"two [[methods]] entries are both called {dup!r}; give each a distinct "
                         f"`label` (e.g. label = \"{dup}-b\") so their cells stay apart")
    threshold = raw.pop("threshold", 0.5)
    thresholds = _list(raw.pop("thresholds", []), "thresholds")
    for t in [threshold, *thresholds]:
        check_open_unit("threshold", _number("threshold", t))
    grid_points = raw.pop("grid_points", 25)
    if isinstance(grid_points, bool) or not isinstance(grid_points, int) or grid_points < 2:
        raise ValueError(f"grid_points must be an integer >= 2, got {grid_points!r}")
    seed = raw.pop("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    data_dir = raw.pop("data_dir", None)
    removal = _removal_entry(raw.pop("removal", None), [s.label for s in settings])
    spec = SweepSpec(name=str(raw.pop("name", "sweep")), settings=settings, methods=methods,
                     groundtruth=groundtruth, seed=seed, threshold=float(threshold),
                     thresholds=[float(t) for t in thresholds], grid_points=grid_points,
                     data_dir=None if data_dir is None else str(data_dir), removal=removal)
    labels = [s.label for s in spec.settings]
    for method in spec.methods:
        for point in sub_experiment_points(method):
            _check_point(method, point)
        unknown = sorted(set(method.settings or []) - set(labels))
        if unknown:
            raise ValueError(f"{method.label}: settings names {', '.join(unknown)}, which "
                             f"{'is' if len(unknown) == 1 else 'are'} not a setting of this "
                             f"sweep ({', '.join(labels)})")
        for setting in spec.settings:
            if not method.runs_on(setting.label):
                continue
            n_test = (setting.sizes or setting.setting().sizes)[2]  # given, else the default's
            if method.explain and method.explain > n_test:
                raise ValueError(f"{method.label}: explain = {method.explain}, but "
                                 f"{setting.label} has only {n_test} test examples")
    return spec


# -- sub-experiments ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One point of a sub-experiment: fit values, score values (``lam`` may be "spectrum"), and
    the ground truth's alpha (None: the sweep's)."""

    fit: tuple[tuple[str, Any], ...]
    score: tuple[tuple[str, Any], ...]
    alpha: float | None


def sub_experiment_points(method: MethodSpec, index: int | None = None) -> list[Point]:
    """Every point of one sub-experiment (``index``) or of all of them, others at defaults."""
    indices = range(len(method.vary)) if index is None else [index]
    return [point for i in indices for _, point in experiment_points(method, i)]


def experiment_points(method: MethodSpec, index: int) -> list[tuple[dict[str, Any], Point]]:
    """(the varied values as the spec names them, the full point) for sub-experiment ``index``."""
    experiment = method.vary[index]
    base = method.base_values()
    spec = method.cls.spec()
    out = []
    for combo in itertools.product(*experiment.values()):
        varied = dict(zip(experiment, combo, strict=True))
        values = dict(base)
        for key, value in varied.items():
            if key != ALPHA:
                name, value = method.translate(key, value)
                values[name] = value
        named = {k: v for k, v in values.items()
                 if spec[k].named_at_default or v != spec[k].default}
        fit = tuple(sorted((k, _hashable(v)) for k, v in named.items() if spec[k].stage == "fit"))
        score = tuple(sorted((k, _hashable(v)) for k, v in named.items()
                             if spec[k].stage == "score"))
        alpha = float(varied[ALPHA]) if ALPHA in varied else None
        out.append((varied, Point(fit, score, alpha)))
    return out


def _check_point(method: MethodSpec, point: Point) -> None:
    cls = method.cls
    fit = {k: _plain(v) for k, v in point.fit}
    score = {k: _plain(v) for k, v in point.score}
    try:
        cls(**fit)
    except ValueError as err:
        raise ValueError(f"method {method.label!r}: {err}") from None
    if score.get("lam") == SPECTRUM:
        if not method.eigen:
            raise ValueError(f"method {method.label!r}: {method.name} has no eigen spectrum, so "
                             "lam = \"spectrum\" is not available; give lam as a list of values")
        score.pop("lam")
    try:
        cls._resolve(score, stage="score")
    except ValueError as err:
        raise ValueError(f"method {method.label!r}: {err}") from None
    if point.alpha is not None:
        try:
            check_open_unit("alpha", point.alpha)
        except ValueError as err:
            raise ValueError(f"method {method.label!r}: {err}") from None


# -- entries -----------------------------------------------------------------------------------

def _removal_entry(value: Any, labels: list[str]) -> dict[str, Any] | None:
    """The checked ``[removal]`` table (None when absent)."""
    if value is None:
        return None
    table = dict(_table(value, "[removal]"))
    _check_keys("[removal]", table, REMOVAL_KEYS)
    only = table.get("settings")
    if only is not None:
        only = [str(x) for x in _list(only, "settings of [removal]")]
        unknown = sorted(set(only) - set(labels))
        if unknown:
            raise ValueError(f"[removal] settings names {', '.join(unknown)}, not a setting of "
                             f"this sweep ({', '.join(labels)})")
        table["settings"] = only
    loo = table.get("loo")
    if isinstance(loo, list):
        unknown = sorted({str(x) for x in loo} - set(only if only is not None else labels))
        if unknown:
            raise ValueError(f"[removal] loo names {', '.join(unknown)}, not a setting the "
                             "removal experiment runs on")
        table["loo"] = [str(x) for x in loo]
    try:
        RemovalConfig(**{k: (False if k == "loo" and isinstance(v, list) else v)
                         for k, v in table.items() if k != "settings"})
    except (TypeError, ValueError) as err:
        raise ValueError(f"[removal]: {err}") from err
    return table


def _setting_entry(entry: Any, top_sizes: dict[str, Any], top_recipes: dict[str, Any]) -> SettingSpec:
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(_table(entry, "[[settings]] entry"))
    _check_keys("[[settings]] entry", entry, SETTING_KEYS)
    if ("name" in entry) == ("task" in entry):
        raise ValueError("each [[settings]] entry needs exactly one of `name` (a built-in setting, "
                         "see `tdatune settings`) or `task` (\"package.module:function\")")
    name = str(entry.pop("name", None) or entry.pop("task"))
    setting = get_setting(name)
    label = str(entry.get("label") or name)
    spec = SettingSpec(name=name, label=label, sizes=entry.get("sizes", top_sizes.get(label)),
                       recipe=_table(entry.get("recipe", top_recipes.get(label, {})),
                                     f"recipe of {label}"),
                       model=_table(entry.get("model", {}), f"model of {label}"),
                       data=_table(entry.get("data", {}), f"data of {label}"),
                       data_dir=_data_dir(entry.get("data_dir"), label),
                       label_noise=_label_noise(entry.get("label_noise"), label))
    if spec.sizes is not None:
        sizes = spec.sizes
        if (not isinstance(sizes, list) or len(sizes) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
                or sizes[0] < 2 or sizes[1] < 1 or sizes[2] < 2):
            raise ValueError(f"sizes of {label} must be [train, val, test] integers with train >= 2, "
                             f"val >= 1 (the surrogate selects on it) and test >= 2; got {sizes!r}")
    _check_keys(f"recipe of {label}", spec.recipe, [f.name for f in fields(TrainRecipe)])
    try:
        spec.resolved_recipe()
    except (TypeError, ValueError) as err:
        raise ValueError(f"recipe of {label}: {err}") from err
    check_options(f"model options of {label}", spec.model, setting.make_task, setting.task_options)
    check_options(f"data options of {label}", spec.data, setting.load, setting.load_options)
    return spec


def _label_noise(value: Any, label: str) -> float | None:
    """A setting's flipped-label fraction, in (0, 1) (None: clean labels)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"label_noise of {label} is the fraction of training labels flipped, "
                         f"a number in (0, 1) such as 0.1; got {value!r}")
    return float(value)


def _data_dir(value: Any, label: str) -> str | None:
    """A [[settings]] entry's ``data_dir``: a path string (None when not given)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"data_dir of {label} must be a path string, got {value!r}")
    return value


def check_options(what: str, values: dict[str, Any], func: Any, known: dict[str, Any]) -> None:
    """Refuse model / data option names that a setting's builder does not take (when its
    signature says which it takes), naming the valid ones."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = set(known)
        if not valid:
            return
    else:
        skip = {"splits", "n_train", "n_val", "n_test", "seed", "data_dir", "name"}
        valid = {n for n, p in params.items() if n not in skip
                 and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
        valid |= set(known)
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(valid)) or '(none)'}")


def _method_entry(entry: Any) -> MethodSpec:
    entry = dict(_table(entry, "[[methods]] entry"))
    _check_keys("[[methods]] entry", entry, METHOD_KEYS)
    name = entry.get("name")
    if name not in ATTRIBUTORS:
        raise ValueError(f"unknown attributor {name!r} in [[methods]]; choose one of: "
                         f"{', '.join(ATTRIBUTORS)}")
    label = str(entry.get("label") or name)
    defaults = _table(entry.get("defaults", {}), f"defaults of {label}")
    explain = entry.get("explain")
    if explain is not None and (isinstance(explain, bool) or not isinstance(explain, int)
                                or explain < 2):
        raise ValueError(f"{label}: explain is the number of test examples to explain (an "
                         f"integer >= 2, the LDS averages over them); got {explain!r}")
    only = entry.get("settings")
    if only is not None and (not isinstance(only, list) or not only
                             or not all(isinstance(x, str) for x in only)):
        raise ValueError(f"{label}: settings is a list of setting labels this entry runs on; "
                         f"got {only!r}")
    method = MethodSpec(name=name, label=label, explain=explain, settings=only,
                        defaults={k: grid_values(v)[0] if not isinstance(v, list) else v
                                  for k, v in defaults.items()})
    spec = method.cls.spec()
    valid = [*spec, EPOCH, ALPHA] if ("checkpoint" in spec or "checkpoints" in spec) else [*spec, ALPHA]
    for key in method.defaults:
        if key not in spec:
            raise ValueError(f"{label}: unknown hyperparameter {key!r} in defaults; valid: "
                             f"{', '.join(spec)}")
    fit, score = (_table(entry.get(k, {}), f"{k} of {label}") for k in ("fit", "score"))
    for key, stage in [(k, "fit") for k in fit] + [(k, "score") for k in score]:
        if key not in spec:
            raise ValueError(f"{label}: unknown hyperparameter {key!r}; valid: {', '.join(spec)}")
        if spec[key].stage != stage:
            raise ValueError(f"{label}: {key} is a {spec[key].stage}-stage hyperparameter; "
                             f"put it under `{spec[key].stage}`")
    vary = [_table(v, f"vary of {label}") for v in _list(entry.get("vary", []), f"vary of {label}")]
    if fit or score:
        vary.append({**fit, **score})
    if not vary:
        vary = [{"lam": SPECTRUM}] if is_eigen(method.cls) else [{}]
    method.vary = []
    for experiment in vary:
        for key in experiment:
            if key not in valid:
                raise ValueError(f"{label}: unknown hyperparameter {key!r} in vary; valid: "
                                 f"{', '.join(valid)}")
        if EPOCH in experiment and ({"checkpoint", "checkpoints"} & set(experiment)):
            raise ValueError(f"{label}: vary `epoch` or the checkpoint hyperparameter, not both")
        method.vary.append({k: grid_values(v) for k, v in experiment.items()})
    return method


def grid_values(value: Any) -> list[Any]:
    """A grid from TOML: a list, a scalar, or {logspace = [lo, hi, num]}; "none" means None."""
    if isinstance(value, dict):
        if set(value) != {"logspace"} or len(value["logspace"]) != 3:
            raise ValueError(f"a grid is a list, a value or {{logspace = [lo, hi, num]}}; got {value!r}")
        lo, hi, num = value["logspace"]
        return np.logspace(float(lo), float(hi), int(num)).tolist()
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        raise ValueError("an empty grid: give at least one value")
    return [None if isinstance(v, str) and v.lower() == "none" else v for v in items]


def _check_keys(where: str, table: dict[str, Any], valid: Any) -> None:
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: "
                         f"{', '.join(sorted(valid))}")


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table (key = value pairs), got {value!r}")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list, got {value!r}")
    return value


def _unique(what: str, labels: list[str]) -> None:
    dup = [x for x in labels if labels.count(x) > 1]
    if dup:
        raise ValueError(f"two {what} entries are both called {dup[0]!r}; give each a distinct "
                         "`label`")


def _number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def plain(items: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """A point's (key, value) pairs as a dict of JSON-friendly values."""
    return {k: _plain(v) for k, v in items}


def point_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-friendly parts (cell ids)."""
    return fingerprint_config(list(parts))[:10]
