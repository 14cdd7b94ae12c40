"""Sweep specs: a YAML file -> a validated `SweepSpec` -> a `SweepPlan` (the list of trials).

A spec names a base preset (or config file), overrides applied to it, a search space over any
config key, the seeds to repeat every configuration with, the metric that ranks configurations,
a scheduler, the resources of one trial and how many trials may run at once::

    name: classes-x-kappa            # MLflow parent run + sweep folder; rerunning resumes it
    base: synthetic-supervised       # preset or YAML file
    overrides: {optim.steps: 2000}   # applied to the base first
    classes: {grid: [10, 100]}       # first-class axis: number of classes = data.num_classes
    kappa: {grid: [5, 10]}           # first-class axis: the DGP's concentration κ = data.kappa
    beta: {loguniform: [0.5, 50]}    # first-class axis: the head's temperature β = model.temperature
    learn_beta: {grid: [false, true]}  # β fixed or learned = model.learn_temperature
    space:                           # any other config key
      optim.lr: {choice: [0.001, 0.003]}
    seeds: 2                         # run.seed = 0..k-1 (or a list); data.seed follows run.seed
    num_samples: 1                   # draws of the random dimensions per grid point
    metric: probe/r2_affine
    mode: max
    scheduler: fifo                  # or {asha: {metric: probe/r2_affine, grace_period: 200, max_t: 2000}}
    resources: {workers: 1, cpus_per_worker: 1, use_gpu: false}
    max_concurrent: 2                # null = as many as the cluster's CPUs/GPUs fit

Dimensions: `{grid: [...]}` (every value; a bare list means the same), `{choice: [...]}`,
`{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` (random draws, `num_samples` per grid point,
seeded by `sample_seed`). The plan is the cartesian product of the grid dimensions x the random
draws x the seeds, fixed on the driver: the same spec always gives the same trials with the same
names, which is what lets a rerun resume them.

Every problem (unknown key, empty grid, bad range, a value the config refuses) is a `UserError`
that names the spec file and the offending key, raised before Ray starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config import Config, ConfigError, config_field, load_raw, parse_override, resolve
from trainer.errors import UserError
from trainer.storage import Location, locate

SPEC_DIR = Path(__file__).parent / "specs"
SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# The two axes users sweep most, as first-class spec keys (documented in the module docstring).
AXES = {
    "classes": "data.num_classes",        # |C| (synthetic) / K of the `partition` label scheme
    "kappa": "data.kappa",                # the DGP's concentration κ (data-side temperature)
    "beta": "model.temperature",          # the head's temperature β (initial value if learned)
    "learn_beta": "model.learn_temperature",
}
# Short labels for trial names: ci-grid-C10-k5-s0.
ABBREVIATIONS = {
    "data.num_classes": "C", "data.kappa": "k", "model.temperature": "b", "model.learn_temperature": "lb",
    "data.dim": "d", "data.num_instances": "N", "optim.lr": "lr", "optim.steps": "T",
}
# Keys the sweep itself controls: trial names and resume are per trial; seeds via `seeds`.
RESERVED = ("run.name", "run.resume", "run.seed")
# Per sweep, never swept: run.storage=... (an override) is the storage root the sweep folder lives
# under (<run.storage>/sweeps/<name>); each trial's run.storage is then set to <sweep folder>/runs.
PER_SWEEP = ("run.storage",)
RESOURCE_KEYS = {"workers": "run.workers", "cpus_per_worker": "run.cpus_per_worker", "use_gpu": "run.use_gpu"}
METRIC_PREFIXES = ("probe/", "train/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Strict):
    """One swept key: exactly one of grid / choice / uniform / loguniform."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_grid(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {"grid": value}
        if not isinstance(value, dict):
            raise ValueError("must be {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]} or {loguniform: [lo, hi]}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of grid, choice, uniform, loguniform"
                             + (f" (got {', '.join(kinds)})" if kinds else ""))
        if self.grid is not None and not self.grid:
            raise ValueError("empty grid: list at least one value")
        if self.choice is not None and not self.choice:
            raise ValueError("empty choice: list at least one value")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise ValueError(f"bad range {list(self.uniform)}: uniform needs lo < hi")
        if self.loguniform is not None:
            lo, hi = self.loguniform
            if not 0 < lo < hi:
                raise ValueError(f"bad range {[lo, hi]}: loguniform needs 0 < lo < hi")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    @property
    def is_random(self) -> bool:
        return self.kind != "grid"

    def extremes(self) -> list[Any]:
        """Values to validate before any draw: every listed value, or both ends of a range."""
        return list(getattr(self, self.kind))

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.choice[int(rng.integers(len(self.choice)))]
        if self.kind == "uniform":
            return _round_sig(float(rng.uniform(*self.uniform)))
        lo, hi = self.loguniform
        return _round_sig(float(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


class AshaSpec(_Strict):
    """ASHA early stopping, on a metric the trials report at every checkpoint (train/loss, probe/*)."""

    metric: str | None = None          # default: the spec's metric
    mode: Literal["max", "min"] | None = None
    time_attr: Literal["step"] = "step"
    grace_period: int = Field(1, ge=1)  # in optimiser steps
    max_t: int | None = Field(None, ge=1)  # default: the largest optim.steps of the plan
    reduction_factor: float = Field(2.0, gt=1)


class SchedulerSpec(_Strict):
    asha: AshaSpec


class Resources(_Strict):
    """Resources of ONE trial: its Ray Train workers (the trial function itself takes no CPU), or,
    for an in-process trial, the trial function that trains (tune/sweep.py)."""

    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    in_process: bool | None = None
    """Train each trial inside its Tune trial process (no Ray Train worker group): None (auto)
    when every trial is one CPU worker on the torch engine, false to always use Ray Train, true to
    require it. run.max_failures restarts a failed worker from the newest checkpoint either way."""


class SweepSpec(_Strict):
    name: str
    base: str
    description: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Dimension] = Field(default_factory=dict)
    classes: Dimension | None = None
    kappa: Dimension | None = None
    beta: Dimension | None = None
    learn_beta: Dimension | None = None
    seeds: int | list[int] = 1
    num_samples: int = Field(1, ge=1)
    sample_seed: int = 0
    metric: str = "probe/r2_affine"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["fifo"] | SchedulerSpec = "fifo"
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    storage: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not SWEEP_NAME.match(v):
            raise ValueError(f"'{v}' must be 1-64 of A-Z a-z 0-9 . _ - (it names a folder and an MLflow run)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("seeds must be >= 1 (the number of repeats) or a non-empty list of seeds")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("a list of seeds must be non-empty and without duplicates")
        return v

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, v: Any) -> Any:
        if v == "fifo" or (isinstance(v, dict) and set(v) == {"asha"}):
            return v
        raise ValueError(f"{json.dumps(v)[:60]} is not a scheduler: give fifo, or {{asha: {{metric, grace_period, max_t}}}}")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not v.startswith(METRIC_PREFIXES):
            raise ValueError(f"'{v}' is not a reported metric (probe/... or train/..., e.g. probe/r2_affine)")
        return v

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def dimensions(self) -> dict[str, tuple[str, Dimension]]:
        """config key -> (spec key that set it, dimension), first-class axes first."""
        out: dict[str, tuple[str, Dimension]] = {}
        for axis, key in AXES.items():
            dim = getattr(self, axis)
            if dim is not None:
                out[key] = (axis, dim)
        for key, dim in self.space.items():
            if key in out:
                raise UserError(f"space.{key} repeats the first-class axis '{out[key][0]}': give it once")
            out[key] = (f"space.{key}", dim)
        return out

    @property
    def asha(self) -> AshaSpec | None:
        return self.scheduler.asha if isinstance(self.scheduler, SchedulerSpec) else None


# ---- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trial:
    """One trial: a full trainer run of `base` + `overrides` (its run.name is `key`)."""

    key: str                       # run.name: the MLflow child run and the Ray Train run folder
    base: str                      # preset or config file
    overrides: dict[str, Any]      # config key -> value (spec overrides, resources, swept values, seed)
    values: dict[str, Any]         # the swept values that name its configuration (seed excluded)
    seed: int
    group: str                     # configuration label: the seeds of one group are averaged


@dataclass
class SweepPlan:
    """Everything a sweep runs, fixed before Ray starts."""

    name: str
    trials: list[Trial]
    swept: list[str]                       # config keys that vary across configurations
    metric: str = "probe/r2_affine"
    mode: str = "max"
    asha: dict[str, Any] | None = None     # resolved ASHA settings, or None for FIFO
    resources: dict[str, Any] = field(default_factory=lambda: Resources().model_dump())
    max_concurrent: int | None = None
    experiment: str = "synthetic"
    storage: str = "./ray_results/sweeps"  # absolute path or URI after resolve: the sweep folder is storage/name
    spec_text: str = ""                    # what the parent run keeps as its spec artifact
    kind: str = "sweep"                    # sweep | reproduce

    @property
    def sweep_dir(self) -> Location:
        """<storage>/<name>: a local folder or a URI (trainer.storage)."""
        return locate(self.storage) / self.name

    def fingerprint(self) -> str:
        """What must not change between a sweep and its resumption."""
        body = [(t.key, t.base, t.overrides) for t in self.trials]
        # where a trial trains (resources.in_process) changes no figure: a resume may switch it
        resources = {k: v for k, v in self.resources.items() if k != "in_process"}
        return _hash([body, self.metric, self.mode, self.asha, resources])

    def trial(self, key: str) -> Trial:
        return next(t for t in self.trials if t.key == key)

    def groups(self) -> list[str]:
        """Configuration labels in plan order."""
        return list(dict.fromkeys(t.group for t in self.trials))

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k != "spec_text"}
        return json.dumps(d, indent=2, sort_keys=False, default=str)


# ---- loading ---------------------------------------------------------------------------------
def list_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def spec_path(source: str) -> Path:
    """A YAML file, or the name of a spec in tune/specs."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"sweep spec {path} does not exist")
        return path
    named = SPEC_DIR / f"{source}.yaml"
    if named.is_file():
        return named
    raise UserError(f"unknown sweep spec '{source}' (a YAML file, or one of: {', '.join(list_specs())})")


def read_spec(path: Path) -> tuple[dict[str, Any], str]:
    """(raw mapping, text) of a spec file; one-line errors naming the file."""
    try:
        text = path.read_text()
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"sweep spec {path} is not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"sweep spec {path} cannot be read: {err.__class__.__name__}") from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep spec {path} must be a mapping (name, base, space, ...), got {type(raw).__name__}")
    return raw, text


def parse_spec(raw: dict[str, Any], where: str) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"sweep spec {where}: {_spec_error_line(err)}") from None


def _spec_error_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    # pydantic appends the union branch tried ('int', 'list[int]', 'SchedulerSpec', ...): drop it
    loc = [p for p in loc if not re.match(r"^(int|str|list\[.*\]|literal\[.*\]|SchedulerSpec|function-.*)$", p)]
    key = ".".join(loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        where = ".".join(loc[:-1])
        known = _known_spec_keys(loc[:-1])
        return f"unknown key '{key}'" + (f" in {where}" if where else "") + f" (known: {', '.join(known)})"
    if e["type"] == "missing":
        return f"missing key '{key}'"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"'{key}': {msg}"


def _known_spec_keys(loc: list[str]) -> list[str]:
    models = {"": SweepSpec, "resources": Resources, "scheduler": SchedulerSpec, "scheduler.asha": AshaSpec}
    model = models.get(".".join(loc))
    if model is None:
        model = Dimension
    return list(model.model_fields)


def load_spec(source: str, name: str | None = None) -> tuple[SweepSpec, str, Path]:
    """(spec, its text, its path); `name` (the CLI's --name) replaces the spec's name."""
    path = spec_path(source)
    raw, text = read_spec(path)
    if name is not None:
        raw["name"] = name
    return parse_spec(raw, str(path)), text, path


# ---- config keys ---------------------------------------------------------------------------
def is_int_key(key: str) -> bool:
    """An int field (int or int | None): random draws for it are rounded."""
    annotation = config_field(key).annotation
    args = typing.get_args(annotation) or (annotation,)
    return int in args and float not in args


def trial_config(trial: Trial, runs_dir: str | Path | None = None) -> Config:
    """The validated config of one trial (run.name = its key; run.storage = the sweep's runs folder)."""
    placement = {"run.name": trial.key, **({"run.storage": str(runs_dir)} if runs_dir is not None else {})}
    return resolve(trial.base, {**trial.overrides, **placement})


# ---- building the plan ---------------------------------------------------------------------
def build_plan(spec: SweepSpec, *, spec_text: str = "", where: str = "", cli_overrides: list[str] | None = None,
               storage: str | None = None) -> SweepPlan:
    """Validate every key and value of `spec` against the config tree, then list its trials."""
    where = where or spec.name
    fail = _failer(where)
    try:
        base_raw = load_raw(spec.base)
    except ConfigError as err:
        raise fail("base", str(err))
    fixed = _fixed_overrides(spec, cli_overrides or [], fail)
    run_storage = fixed.pop("run.storage", None)  # the sweep's root, not a trial override
    try:
        base_cfg = resolve(base_raw, fixed)
    except ConfigError as err:
        raise fail("overrides", str(err))
    try:
        dims = spec.dimensions()
    except UserError as err:
        raise UserError(f"sweep spec {where}: {err}") from None
    _check_dimensions(base_raw, dims, fixed, fail)
    if spec.classes is not None and not base_cfg.is_synthetic and base_cfg.data.labels != "partition":
        raise fail("classes", f"data.labels={base_cfg.data.labels} fixes the number of classes of "
                              f"{base_cfg.data.dataset}; sweep it with data.labels=partition (K Voronoi cells)")
    trials = []
    for values in configurations(spec, dims, fail):
        for seed in spec.seed_list():
            trials.append(Trial(key="", base=spec.base, overrides={**fixed, **values, "run.seed": seed},
                                values=values, seed=seed, group=group_label(values)))
    trials = name_trials(spec.name, trials)
    configs = [_trial_config_or_fail(t, fail) for t in trials]  # cross-field checks, before Ray starts
    root = sweep_root(storage, run_storage, spec.storage, base_cfg.run.storage)
    return SweepPlan(
        name=spec.name, trials=trials, swept=list(dims), metric=spec.metric, mode=spec.mode,
        asha=_resolve_asha(spec, max(c.optim.steps for c in configs), fail), resources=spec.resources.model_dump(),
        max_concurrent=spec.max_concurrent, experiment=base_cfg.experiment_name, storage=str(root),
        spec_text=spec_text)


def sweep_root(storage: str | None, run_storage: str | None, spec_storage: str | None, base_storage: str) -> str:
    """Where sweep folders live (a local folder, absolute, or a URI): --storage as given, else
    <run.storage override>/sweeps, else the spec's `storage:`, else <$LINREP_STORAGE or the
    base config's run.storage>/sweeps."""
    from trainer.run import storage_root

    if storage:
        return str(locate(storage))
    if run_storage:
        return str(locate(str(run_storage)) / "sweeps")
    if spec_storage:
        return str(locate(spec_storage))
    return str(locate(storage_root(base_storage)) / "sweeps")


def configurations(spec: SweepSpec, dims: dict[str, tuple[str, Dimension]], fail) -> list[dict[str, Any]]:
    """The grid's cartesian product, each point with `num_samples` draws of the random dimensions.

    Draws come from one generator seeded by spec.sample_seed, in a fixed order: the same spec
    always yields the same configurations (what resuming a sweep relies on).
    """
    grid = [(key, dim.grid) for key, (_, dim) in dims.items() if not dim.is_random]
    random_dims = [(key, dim) for key, (_, dim) in dims.items() if dim.is_random]
    if spec.num_samples > 1 and not random_dims:
        raise fail("num_samples", f"{spec.num_samples} > 1 needs a random dimension (choice, uniform, "
                                  "loguniform); repeat configurations with `seeds`")
    rng = np.random.default_rng(spec.sample_seed)
    int_keys = {key for key, _ in random_dims if is_int_key(key)}
    out = []
    for point in itertools.product(*[values for _, values in grid]):
        for _ in range(spec.num_samples):
            values = dict(zip([k for k, _ in grid], point))
            for key, dim in random_dims:
                v = dim.draw(rng)
                values[key] = int(round(v)) if key in int_keys and isinstance(v, float) else v
            out.append({k: values[k] for k in dims})  # spec order
    return out


def _failer(where: str):
    def fail(key: str, problem: str) -> UserError:
        return UserError(f"sweep spec {where}: {key}: {problem}")
    return fail


def _fixed_overrides(spec: SweepSpec, cli_overrides: list[str], fail) -> dict[str, Any]:
    """Spec overrides, then the command line's key=value items, then the trial resources."""
    fixed: dict[str, Any] = {}
    for key, value in spec.overrides.items():
        _check_key(key, f"overrides.{key}", fail, allow_tracking=True)
        fixed[key] = value
    for item in cli_overrides:
        try:
            path, value = parse_override(item)
        except ConfigError as err:
            raise fail("command line", str(err))
        key = ".".join(path)
        _check_key(key, f"override '{item}'", fail, allow_tracking=True)
        fixed[key] = value
    for name, key in RESOURCE_KEYS.items():
        fixed[key] = getattr(spec.resources, name)
    return fixed


def _check_key(key: str, label: str, fail, *, allow_tracking: bool = False) -> None:
    try:
        config_field(key)
    except UserError as err:
        raise fail(label, str(err))
    if key in RESERVED:
        hint = "use `seeds`" if key == "run.seed" else "the sweep sets it per trial"
        raise fail(label, f"'{key}' cannot be set in a sweep ({hint})")
    if key.startswith("tracking.") and not allow_tracking:
        raise fail(label, f"'{key}' is per sweep, not per trial: set it under overrides")


def _check_dimensions(base_raw: dict[str, Any], dims: dict[str, tuple[str, Dimension]], fixed: dict[str, Any],
                      fail) -> None:
    """Each swept key exists, is not reserved, and each of its values (or range ends) is valid alone."""
    for key, (label, dim) in dims.items():
        _check_key(key, label, fail)
        if key in PER_SWEEP:
            raise fail(label, f"'{key}' is per sweep (where its folder lives), not swept: set it under overrides")
        if key in RESOURCE_KEYS.values():
            raise fail(label, f"'{key}' is set by resources; change resources instead")
        if dim.kind in ("uniform", "loguniform") and _is_non_numeric(key):
            raise fail(label, f"{dim.kind} needs a numeric key; '{key}' takes {_describe(config_field(key).annotation)}")
        for value in dim.extremes():
            try:  # field checks only: cross-field ones need the whole trial
                resolve(base_raw, {**fixed, key: value}, cross_checks=False)
            except ConfigError as err:
                raise fail(label, f"value {value!r} is refused by {key}: {err.problem}") from None


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def _is_non_numeric(key: str) -> bool:
    ann = config_field(key).annotation
    args = typing.get_args(ann) or (ann,)
    return not any(a in (int, float) for a in args)


def _trial_config_or_fail(trial: Trial, fail) -> Config:
    """The trial's config; a combination the config refuses is named by its configuration label."""
    try:
        return trial_config(trial)
    except ConfigError as err:
        raise fail(f"trial {trial.group}", str(err))


def _resolve_asha(spec: SweepSpec, steps: int, fail) -> dict[str, Any] | None:
    """ASHA's settings; max_t defaults to `steps`, the longest trial of the plan."""
    asha = spec.asha
    if asha is None:
        return None
    metric = asha.metric or spec.metric
    if not metric.startswith(METRIC_PREFIXES):
        raise fail("scheduler.asha.metric", f"'{metric}' is not a reported metric (train/loss or probe/...)")
    max_t = asha.max_t or steps
    if asha.grace_period > max_t:
        raise fail("scheduler.asha.grace_period", f"{asha.grace_period} > max_t={max_t}")
    return {"metric": metric, "mode": asha.mode or spec.mode, "time_attr": asha.time_attr,
            "grace_period": asha.grace_period, "max_t": max_t, "reduction_factor": asha.reduction_factor}


# ---- names ---------------------------------------------------------------------------------
def group_label(values: dict[str, Any]) -> str:
    """'num_classes=10 kappa=5' (full keys where the last parts clash; 'base' when nothing is swept)."""
    short = [k.rsplit(".", 1)[-1] for k in values]
    names = short if len(set(short)) == len(short) else list(values)
    return " ".join(f"{n}={_fmt(v)}" for n, v in zip(names, values.values())) or "base"


def trial_label(values: dict[str, Any]) -> str:
    parts = []
    for key, value in values.items():
        abbr = ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1])
        parts.append(f"{abbr}{_fmt(value)}")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def name_trials(sweep: str, trials: list[Trial], max_len: int = 96) -> list[Trial]:
    """Readable, deterministic, unique keys: <sweep>-<label>-s<seed> (a hash where that is too long)."""
    named = []
    for t in trials:
        label = trial_label(t.values)
        key = f"{sweep}-{label}-s{t.seed}" if label else f"{sweep}-s{t.seed}"
        if len(key) > max_len:
            key = f"{sweep}-{_hash([t.base, t.overrides])[:10]}-s{t.seed}"
        named.append(key)
    if len(set(named)) != len(named):  # e.g. two random draws that print alike: disambiguate by hash
        named = [f"{k}-{_hash([t.base, t.overrides])[:6]}" for k, t in zip(named, trials)]
    return [Trial(key=k, base=t.base, overrides=t.overrides, values=t.values, seed=t.seed, group=t.group)
            for k, t in zip(named, trials)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _round_sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
