"""The study's grid: expand `config.grid` into trials, run them resumably, isolate failures.

Each trial is one `run_training` (JAX, or the PyTorch twin) in `workdir/trials/<model>/<name>`,
so the reliability guarantees (resume, pre-emption, NaN) hold per trial. Trials that differ only in
learning rate, weight decay or dropout share compiled steps (those reach the step as data).
"""

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import ml_collections
from absl import logging

from cifar_jax import config_checks, input_pipeline, metric_writing

# Trial fields and how they are set in a trial's config.
_FIELD_PATHS = {"model": "model", "optimizer": "optimizer", "learning_rate": "learning_rate",
                "weight_decay": "weight_decay", "augmentation": "data.augmentation",
                "dropout_rate": "dropout_rate", "seed": "seed"}


@dataclasses.dataclass(frozen=True)
class Trial:
    index: int
    model: str
    optimizer: str
    learning_rate: float
    weight_decay: float
    augmentation: str
    dropout_rate: Optional[float]
    seed: int
    with_seed_in_name: bool = False

    @property
    def name(self) -> str:
        parts = [self.optimizer, f"lr{format_number(self.learning_rate)}",
                 f"wd{format_number(self.weight_decay)}", self.augmentation]
        if self.dropout_rate is not None:
            parts.append(f"do{format_number(self.dropout_rate)}")
        if self.with_seed_in_name:
            parts.append(f"seed{self.seed}")
        return "_".join(parts)

    @property
    def relpath(self) -> str:
        return os.path.join("trials", self.model, self.name)

    def hyperparameters(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in _FIELD_PATHS}


def format_number(x: float) -> str:
    """0.001 -> '0.001', 0.0005 -> '5e-4', 0.3 -> '0.3' (readable, stable directory names)."""
    if x != 0 and abs(x) < 1e-3:
        mantissa, exponent = f"{x:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:g}"


def _split(text, cast, field: str) -> List[Any]:
    values = [v.strip() for v in str(text).split(",") if v.strip()]
    if not values:
        raise config_checks.ConfigError(f"config.grid.{field} is empty; give comma-separated "
                                        "values, e.g. 0.001,0.01.")
    try:
        return [cast(v) for v in values]
    except ValueError as e:
        raise config_checks.ConfigError(f"config.grid.{field}={text!r}: {e}.") from e


def expand(config: ml_collections.ConfigDict) -> List[Trial]:
    """All trials of `config.grid`, in a fixed order (model, optimizer, lr, wd, aug, dropout, seed)."""
    g = config.grid
    models = _split(g.models, str, "models")
    seeds = _split(g.seeds, int, "seeds")
    dropout_models = set(_split(g.dropout_models, str, "dropout_models")) if g.dropout_models else set()
    trials: List[Trial] = []
    for model in models:
        dropouts = _split(g.dropout_rate, float, "dropout_rate") if model in dropout_models else [None]
        for opt in _split(g.optimizer, str, "optimizer"):
            for lr in _split(g.learning_rate, float, "learning_rate"):
                for wd in _split(g.weight_decay, float, "weight_decay"):
                    for aug in _split(g.augmentation, str, "augmentation"):
                        for do in dropouts:
                            for seed in seeds:
                                trials.append(Trial(len(trials), model, opt, lr, wd, aug, do,
                                                    seed, with_seed_in_name=len(seeds) > 1))
    return trials


def trial_config(config: ml_collections.ConfigDict, trial: Trial) -> ml_collections.ConfigDict:
    """The base config with the trial's hyperparameters and without the grid."""
    d = config.to_dict()
    d.pop("grid", None)
    c = ml_collections.ConfigDict(d)
    for field, path in _FIELD_PATHS.items():
        value = getattr(trial, field)
        if field == "dropout_rate" and value is None:
            continue
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def shard_of(trials: Sequence[Trial], shard_index: int, num_shards: int) -> List[Trial]:
    """Round-robin share of the trials: disjoint across shards, together all of them."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise config_checks.ConfigError(
            f"--shard_index={shard_index} --num_shards={num_shards}: need 0 <= shard_index < "
            "num_shards.")
    return [t for t in trials if t.index % num_shards == shard_index]


def describe(trials: Sequence[Trial]) -> str:
    lines = [f"{'#':>3}  {'model':<12} {'name':<40} hyperparameters"]
    for t in trials:
        hp = ", ".join(f"{k}={v}" for k, v in t.hyperparameters().items() if k != "model")
        lines.append(f"{t.index:>3}  {t.model:<12} {t.name:<40} {hp}")
    lines.append(f"{len(trials)} trials")
    return "\n".join(lines)


def trial_status(workdir: str, trial: Trial) -> str:
    result = metric_writing.read_json(os.path.join(workdir, trial.relpath, "result.json"))
    if result is None:
        started = os.path.exists(os.path.join(workdir, trial.relpath, "config.json"))
        return "interrupted" if started else "pending"
    return result.get("status", "unknown")


def run_training(config: ml_collections.ConfigDict, workdir: str,
                 dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, Any]:
    """One run with `config.framework`: JAX (cifar_jax.train) or the PyTorch twin."""
    if config.get("framework", "jax") == "torch":
        from cifar_jax.torch_twin import train as torch_train  # optional extra
        return torch_train.train_and_evaluate(config, workdir, dataset=dataset)
    from cifar_jax import train
    return train.train_and_evaluate(config, workdir, dataset=dataset)


def run_grid(config: ml_collections.ConfigDict, workdir: str, shard_index: int = 0,
             num_shards: int = 1, dataset: Optional[input_pipeline.Dataset] = None) -> bool:
    """Runs this shard's unfinished trials; returns True when none failed."""
    from cifar_jax import report, train

    all_trials = expand(config)
    trials = shard_of(all_trials, shard_index, num_shards)
    for t in trials:  # every trial's config is valid before anything runs
        config_checks.validate_config(trial_config(config, t), jax.device_count())
    workdir = os.path.abspath(workdir)
    train.check_workdir_writable(workdir)
    metric_writing.write_json_atomic(os.path.join(workdir, "grid_config.json"), config.to_dict())
    if dataset is None:
        dataset = input_pipeline.load_dataset(config.data)

    failed, durations = [], []
    # Diverged trials are final (a rerun would diverge again); failed ones are retried.
    todo = [t for t in trials if trial_status(workdir, t) not in ("completed", "diverged")]
    done = len(trials) - len(todo)
    logging.info("Grid: %d trials in all, %d in this shard (%d/%d), %d already finished, %d to run.",
                 len(all_trials), len(trials), shard_index, num_shards, done, len(todo))
    compiles_before = train.count_compilations()
    for i, trial in enumerate(todo):
        trial_dir = os.path.join(workdir, trial.relpath)
        left = len(todo) - i
        eta = (sum(durations) / len(durations) * left) if durations else float("nan")
        logging.info("Grid: %d done, %d failed, %d left; running %s/%s; ETA %s", done,
                     len(failed), left, trial.model, trial.name, train._fmt_time(eta))
        t0 = time.perf_counter()
        try:
            run_training(trial_config(config, trial), trial_dir, dataset=dataset)
            done += 1
        except (train.Preempted, KeyboardInterrupt):
            raise  # the whole grid stops; rerunning resumes this trial
        except Exception as e:  # isolation: record and go on
            logging.exception("Trial %s/%s failed.", trial.model, trial.name)
            _record_failure(trial_dir, trial, e)
            failed.append(trial)
            if config.grid.fail_fast:
                logging.error("config.grid.fail_fast=true: stopping at the first failure.")
                break
        durations.append(time.perf_counter() - t0)
    logging.info("Grid shard finished: %d done, %d failed. Train-step compilations in this "
                 "process: %d.", done, len(failed), train.count_compilations() - compiles_before)
    report.write_report(workdir, config, dataset=dataset)
    return not failed


def _record_failure(trial_dir: str, trial: Trial, error: BaseException):
    path = os.path.join(trial_dir, "result.json")
    os.makedirs(trial_dir, exist_ok=True)
    result = metric_writing.read_json(path) or {}
    if result.get("status") != "diverged":
        result["status"] = "failed"
    result.update(trial.hyperparameters())
    result["error"] = f"{type(error).__name__}: {error}"
    metric_writing.write_json_atomic(path, result)
