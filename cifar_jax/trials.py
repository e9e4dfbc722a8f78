"""Trials of a grid: expansion of `config.grid`, lossless names, directories, claims, status.

A trial is one model with one value per sweep axis. Its name lists those values
(`adam_lr0.001_wd1e-4_basic_do0.5_seed1`) so that the name alone determines them; it lives in
`<grid workdir>/trials/<model>/<name>`. Processes sharing a grid workdir claim a trial by
taking its run lock, so each trial is run by exactly one of them.
"""

import csv
import dataclasses
import itertools
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
from absl import logging

from cifar_jax import config_checks, workdir as workdir_lib
from cifar_jax.models import MODELS


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str  # name in result.json / results.csv
    grid_field: str  # field of config.grid holding comma-separated values
    path: str  # where a trial's value goes in its config
    prefix: str  # in the trial name; "" for the two text axes
    cast: type
    optional: bool = False  # part of a grid (and of names) only where config.grid defines it


AXES = (
    Axis("optimizer", "optimizer", "optimizer", "", str),
    Axis("learning_rate", "learning_rate", "learning_rate", "lr", float),
    Axis("weight_decay", "weight_decay", "weight_decay", "wd", float),
    Axis("augmentation", "augmentation", "data.augmentation", "", str),
    Axis("dropout_rate", "dropout_rate", "dropout_rate", "do", float),  # dropout_models only
    Axis("label_smoothing", "label_smoothing", "label_smoothing", "ls", float, optional=True),
    Axis("warmup_epochs", "warmup_epochs", "warmup_epochs", "wu", float, optional=True),
    Axis("ema_decay", "ema_decay", "ema_decay", "ema", float, optional=True),
    Axis("seed", "seeds", "seed", "seed", int),  # in the name when not 0
)
_BY_PREFIX = {a.prefix: a for a in AXES if a.prefix}


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    model: str
    values: Tuple[Tuple[str, Any], ...]  # (axis key, value), in AXES order

    @property
    def name(self) -> str:
        return trial_name(dict(self.values))

    @property
    def relpath(self) -> str:
        return os.path.join("trials", self.model, self.name)

    @property
    def config_name(self) -> str:
        """The name without the seed: trials that differ only in seed share it."""
        return trial_name({k: v for k, v in self.values if k != "seed"})

    def hyperparameters(self) -> Dict[str, Any]:
        return {"model": self.model, **dict(self.values)}


def format_number(x: float) -> str:
    """The shortest text that reads back as exactly `x`: 0.001 -> '0.001', 5e-4 -> '5e-4',
    1.2e-4 -> '1.2e-4', 10000.0 -> '10000'. Distinct values never share a name."""
    if x != 0 and abs(x) < 1e-3:
        for digits in range(17):
            mantissa, exponent = f"{x:.{digits}e}".split("e")
            text = f"{mantissa}e{int(exponent)}"
            if float(text) == x:
                return text
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def trial_name(values: Dict[str, Any]) -> str:
    parts = []
    for axis in AXES:
        if axis.key not in values or (axis.key == "seed" and values[axis.key] == 0):
            continue
        v = values[axis.key]
        parts.append(f"{axis.prefix}{format_number(v) if axis.cast is float else v}")
    return "_".join(parts)


def parse_name(name: str) -> Dict[str, Any]:
    """The values a trial name stands for (the inverse of `trial_name`); ValueError for a name
    that no trial has."""
    values: Dict[str, Any] = {"seed": 0}
    text_axes = iter(a for a in AXES if not a.prefix)
    try:
        for part in name.split("_"):
            for prefix in sorted(_BY_PREFIX, key=len, reverse=True):
                rest = part[len(prefix):]
                if part.startswith(prefix) and rest and (rest[0].isdigit() or rest[0] == "."):
                    axis = _BY_PREFIX[prefix]
                    values[axis.key] = axis.cast(rest)
                    break
            else:
                values[next(text_axes).key] = part
    except (StopIteration, ValueError):
        raise ValueError(f"{name!r} is not a trial name (e.g. adam_lr0.001_wd1e-4_basic)") \
            from None
    return values


def _values(text, cast, field: str) -> List[Any]:
    """Comma-separated values of one axis, cast, duplicates (by value) merged with a log line."""
    raw = [v.strip() for v in str(text).split(",") if v.strip()]
    if not raw:
        example = {"models": "resnet18,alexnet", "seeds": "0,1,2", "optimizer": "sgd,adam",
                   "augmentation": "basic,advanced", "dropout_models": "alexnet"}.get(
                       field, "0.001,0.01")
        raise config_checks.ConfigError(f"config.grid.{field} is empty; give comma-separated "
                                        f"values, e.g. {example}.")
    try:
        values = [cast(v) for v in raw]
    except ValueError as e:
        raise config_checks.ConfigError(f"config.grid.{field}={text!r}: {e}.") from e
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        logging.warning("config.grid.%s=%r lists the same value more than once; running each "
                        "value once: %s.", field, text, ", ".join(map(str, unique)))
    return unique


def _axis_text(grid, model: str, axis: Axis, dropout_models: Sequence[str]) -> Optional[str]:
    """The values of `axis` for `model`: a per-model override, else the grid's, else None."""
    per_model = grid.get("per_model") or {}
    override = (per_model.get(model) or {}).get(axis.grid_field)
    if override is not None:
        return override
    if axis.key == "dropout_rate":
        return grid.dropout_rate if model in dropout_models else None
    return grid.get(axis.grid_field)


def expand(config: ml_collections.ConfigDict) -> List[Trial]:
    """All trials of `config.grid`, in a fixed order (model, then the axes in AXES order)."""
    grid = config.grid
    models = _values(grid.models, str, "models")
    dropout_models = (_values(grid.dropout_models, str, "dropout_models")
                      if grid.get("dropout_models") else [])
    _check_model_names(grid, {"models": models, "dropout_models": dropout_models})
    paired = _paired_axes(grid)
    trials: List[Trial] = []
    for model in models:
        axes = [(a, _axis_text(grid, model, a, dropout_models)) for a in AXES]
        axes = [(a, _values(text, a.cast, a.grid_field)) for a, text in axes if text is not None]
        for combo in _combinations(axes, paired, model):
            values = tuple((a.key, v) for (a, _), v in zip(axes, combo))
            trials.append(Trial(len(trials), model, values))
    return trials


def _paired_axes(grid) -> List[str]:
    """config.grid.paired_axes: axes (grid field names) whose values pair up one to one."""
    text = grid.get("paired_axes") or ""
    names = _values(text, str, "paired_axes") if str(text).strip() else []
    fields = {a.grid_field for a in AXES}
    unknown = [n for n in names if n not in fields]
    if unknown or len(names) == 1:
        raise config_checks.ConfigError(
            f"config.grid.paired_axes={text!r}: give two or more of "
            f"{', '.join(a.grid_field for a in AXES)} (e.g. optimizer,learning_rate)"
            + (f"; no axis {', '.join(map(repr, unknown))}" if unknown else "") + ".")
    return names


def _combinations(axes, paired: Sequence[str], model: str):
    """Every combination of the axes' values [(Axis, values)]: their product, except that the
    `paired` axes step together (their i-th values form one choice, at the first one's place)."""
    groups, together = [], [i for i, (a, _) in enumerate(axes) if a.grid_field in paired]
    if together:
        lengths = {a.grid_field: len(v) for a, v in (axes[i] for i in together)}
        absent = [name for name in paired if name not in lengths]
        if absent:
            raise config_checks.ConfigError(
                f"config.grid.paired_axes={','.join(paired)}: {model} has no "
                f"{', '.join(absent)} axis to pair (e.g. dropout_rate is swept for "
                "grid.dropout_models only).")
        if len(set(lengths.values())) > 1:
            raise config_checks.ConfigError(
                f"config.grid.paired_axes={','.join(paired)}: for {model} these axes need the "
                f"same number of values to pair them; they have {lengths}.")
        groups.append((together, list(zip(*(axes[i][1] for i in together)))))
    groups += [([i], [(v,) for v in values]) for i, (_, values) in enumerate(axes)
               if i not in together]
    groups.sort(key=lambda g: g[0][0])
    for choice in itertools.product(*(options for _, options in groups)):
        combo = [None] * len(axes)
        for (indices, _), values in zip(groups, choice):
            for i, v in zip(indices, values):
                combo[i] = v
        yield tuple(combo)


def _check_model_names(grid, named: Dict[str, List[str]]) -> None:
    """Model names in grid.models and grid.dropout_models (`named`: field -> parsed names)
    exist (a misspelt name would silently drop the dropout axis, or fail late as
    config.model)."""
    for field, names in named.items():
        unknown = [m for m in names if m not in MODELS]
        if unknown:
            raise config_checks.ConfigError(
                f"config.grid.{field}={grid[field]!r}: no model {', '.join(map(repr, unknown))}"
                f"; choose from {', '.join(sorted(MODELS))}.")


def repeat_seeds(config) -> List[int]:
    """config.grid.repeat_selected_seeds as integers ('' -> none)."""
    text = config.grid.get("repeat_selected_seeds") or ""
    seeds = _values(text, int, "repeat_selected_seeds") if str(text).strip() else []
    if any(not 0 <= s <= config_checks.INT32_MAX for s in seeds):
        raise config_checks.ConfigError(
            f"config.grid.repeat_selected_seeds={text!r}: seeds must lie in "
            f"0..{config_checks.INT32_MAX}.")
    return seeds


def trial_config(config: ml_collections.ConfigDict, trial: Trial) -> ml_collections.ConfigDict:
    """The base config with the trial's values and without the grid."""
    d = config.to_dict()
    d.pop("grid", None)
    c = ml_collections.ConfigDict(d)
    c.model = trial.model
    paths = {a.key: a.path for a in AXES}
    for key, value in trial.values:
        node = c
        *parents, leaf = paths[key].split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def restrict(config: ml_collections.ConfigDict, selections: Dict[str, Dict[str, Any]]
             ) -> ml_collections.ConfigDict:
    """`config` with its grid narrowed to one configuration per model (`selections`: model ->
    axis values, e.g. from another grid's report); the seeds axis stays the config's own."""
    config = config.copy_and_resolve_references()
    axes = {a.key: a for a in AXES}
    with config.unlocked():
        config.grid.models = ",".join(selections)
        for model, values in selections.items():
            for key, value in values.items():
                if key != "seed":
                    config.grid.per_model[model][axes[key].grid_field] = str(value)
    return config


def shard_of(trials: Sequence[Trial], shard_index: int, num_shards: int) -> List[Trial]:
    """Round-robin share of the trials: disjoint across shards, together all of them."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise config_checks.ConfigError(
            f"--shard_index={shard_index} --num_shards={num_shards}: need 0 <= shard_index < "
            "num_shards.")
    return [t for t in trials if t.index % num_shards == shard_index]


def describe(trials: Sequence[Trial]) -> str:
    width = max([len(t.name) for t in trials] + [4])
    lines = [f"{'#':>3}  {'model':<12} {'name':<{width}}  hyperparameters"]
    for t in trials:
        hp = ", ".join(f"{k}={v}" for k, v in t.values)
        lines.append(f"{t.index:>3}  {t.model:<12} {t.name:<{width}}  {hp}")
    lines.append(f"{len(trials)} trials")
    return "\n".join(lines)


def mismatch(trial: Trial, result: Dict[str, Any]) -> Optional[str]:
    """Why `result` (a result.json) does not belong to `trial`, or None when it does."""
    wrong = [f"{k}={result.get(k)!r} (expected {v!r})" for k, v in trial.hyperparameters().items()
             if k in result and result[k] != v]
    if wrong:
        return (f"{trial.relpath}/result.json belongs to another trial: " + ", ".join(wrong) +
                ". Move the directory away and run again.")
    return None


# Statuses of trials that a rerun (or a live process) will still take to the end.
UNFINISHED = ("pending", "interrupted", "preempted", "running")


def trial_status(grid_workdir: str, trial: Trial) -> str:
    """completed | diverged | failed | preempted | interrupted | pending | running | mismatched |
    unreadable. `running`: a live process holds the trial (its result.json, if any, is from an
    earlier attempt)."""
    directory = os.path.join(grid_workdir, trial.relpath)
    try:
        result = workdir_lib.read_result(directory)
    except workdir_lib.WorkdirError:
        return "unreadable"
    if (result or {}).get("status") != "completed" and workdir_lib.RunLock.probably_held(
            directory):
        return "running"
    if result is None:
        started = os.path.exists(os.path.join(directory, "config.json"))
        return "interrupted" if started else "pending"
    if mismatch(trial, result):
        return "mismatched"
    return result.get("status", "unknown")


def claim(grid_workdir: str, trial: Trial) -> Optional[workdir_lib.RunLock]:
    """The trial's run lock when this process gets it; None when a live process holds it."""
    lock = workdir_lib.RunLock(os.path.join(grid_workdir, trial.relpath))
    return lock if lock.try_acquire() else None


def selected_in(grid_workdir: str) -> Dict[str, Dict[str, Any]]:
    """model -> the axis values of the configuration a finished grid's report selected."""
    path = os.path.join(grid_workdir, "results.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {grid_workdir!r} has no report yet.")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("selected") == "True"]
    if not rows:
        raise workdir_lib.WorkdirError(f"{path} selects no configuration yet: a model is "
                                       "selected once all of its grid trials have finished.")
    try:
        return {r["model"]: parse_name(r["name"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise workdir_lib.WorkdirError(f"{path} is not a grid report ({e}).") from None
