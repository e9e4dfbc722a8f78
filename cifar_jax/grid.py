"""The study's grid: claim trials, train them in packs, isolate failures, then report.

Each trial runs in `workdir/trials/<model>/<name>` with everything a single run writes, so the
reliability guarantees (resume, pre-emption, non-finite loss) hold per trial. Any number of
processes may work on one grid workdir: each claims a trial by taking its run lock, so a trial
is run by exactly one of them (`--shard_index/--num_shards` only choose the order of work).
Trials of one model that share a static structure train together in packs of up to
`config.grid.pack_size` (0: the measured best for this device, see PACK_SIZES).

In multi-process mode (distributed.py) the processes of one run are one worker: all train the
same pack at a time. Process 0 claims it, as above, and sends it to the others (`_follow`),
and writes the report; a failed trial stops the group instead of being isolated (the others
would wait for it in their collectives).
"""

import dataclasses
import errno
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import ml_collections
from absl import logging

from cifar_jax import (config_checks, distill, distributed, engine as engine_lib, input_pipeline,
                       metric_writing, report, train, trials as trials_lib, workdir as workdir_lib)
from cifar_jax.augment import AUGMENTATIONS
from cifar_jax.optim import OPTIMIZERS
from cifar_jax.trials import Trial

# Pack sizes that beat one trial at a time, measured (train images/s per trial over a whole
# run), by device kind and model. Models and devices not listed train one trial at a time.
PACK_SIZES = {
    # 2026-11-29, 2-core x86 CPU: 8 AlexNet trials (2 epochs of 15 steps at batch 128) took
    # 291 s as one pack of 8 against 108 s one at a time: XLA:CPU runs the vmapped (grouped)
    # convolutions slowly, so the CPU trains one trial at a time.
    ("cpu", "alexnet"): 1,
    # 2026-11-30, one H200 (cifar_jax.bench, batch 128, on-device loop, TF32): AlexNet trains
    # 99,308 images/s one trial at a time and 107,360 in packs of 4 (evaluation 0.74M vs 1.03M);
    # ResNet-18 23,950 vs 10,642: its vmapped convolutions become grouped ones, slower in cuDNN.
    # MobileNetV2 (already grouped, depthwise) one at a time until a pack is measured.
    ("nvidia h200", "alexnet"): 4,
    ("nvidia h200", "resnet18"): 1,
    ("nvidia h200", "mobilenetv2"): 1,
}


def run_training(config: ml_collections.ConfigDict, workdir: str,
                 dataset: Optional[input_pipeline.Dataset] = None,
                 engine: Optional[engine_lib.Engine] = None) -> Dict[str, Any]:
    """One run with `config.framework`: JAX (cifar_jax.train) or the PyTorch twin."""
    if config.framework == "torch":
        from cifar_jax.torch_twin import train as torch_train  # optional extra
        return torch_train.train_and_evaluate(config, workdir, dataset=dataset)
    return train.train_and_evaluate(config, workdir, dataset=dataset, engine=engine)


def pack_size(config, model: str) -> int:
    if config.framework == "torch":
        return 1
    size = config.grid.pack_size
    if size == 0:
        return PACK_SIZES.get((jax.devices()[0].device_kind.lower(), model), 1)
    return size


def validate(config, trials: Sequence[Trial]) -> None:
    """Every trial's config is valid before anything runs (one error listing them all)."""
    if not isinstance(config.grid.pack_size, int) or config.grid.pack_size < 0:
        raise config_checks.ConfigError(f"config.grid.pack_size={config.grid.pack_size!r} is "
                                        "not valid; expected 0 (automatic) or a positive integer.")
    trials_lib.repeat_seeds(config)  # refuses a malformed value now, not after the grid
    if config.grid.get("default_trial"):
        _check_default_trial(config.grid.default_trial)
    if config.evaluate_test:
        raise config_checks.ConfigError(
            "config.evaluate_test=True in a grid would test every trial; the report tests only "
            "each model's selected configuration. Leave it False (as configs/grid.py sets it).")
    # The twin runs on one device; asking JAX for its devices would start its GPU backend.
    devices = 1 if config.framework == "torch" else jax.device_count()
    _check_each(config, trials, lambda c: config_checks.validate_config(c, devices))
    distill.load_teacher(config)  # a missing, unfinished or foreign teacher stops it now


def _check_each(config, trials: Sequence[Trial], check) -> None:
    """Runs `check` on every trial's config; one error that says each problem once, with the
    trials it concerns, before any trial runs."""
    errors: Dict[str, List[str]] = {}
    for t in trials:
        try:
            check(trials_lib.trial_config(config, t))
        except config_checks.ConfigError as e:
            errors.setdefault(str(e), []).append(t.name)
    if errors:
        raise config_checks.ConfigError("\n".join(
            f"{msg}\n  ({len(names)} of {len(trials)} trials: {', '.join(names[:3])}"
            f"{' ...' if len(names) > 3 else ''})" for msg, names in errors.items()))


def _check_default_trial(name: str) -> None:
    """grid.default_trial reads as a trial name (optimizer first); the plots look it up."""
    try:
        values = trials_lib.parse_name(name)
        if values.get("optimizer") not in OPTIMIZERS or values.get(
                "augmentation", "basic") not in AUGMENTATIONS:
            raise ValueError(f"{name!r} is not a trial name (e.g. sgd_lr0.01_wd5e-4_basic)")
    except ValueError as e:
        raise config_checks.ConfigError(f"config.grid.default_trial: {e}; or '' for no "
                                        "baseline in the plots.") from None


class _Runner:
    """Claims trials of this process's share and runs them in packs."""

    def __init__(self, config, workdir: str, dataset, engine: engine_lib.Engine):
        self.config, self.workdir, self.dataset, self.engine = config, workdir, dataset, engine
        self.failed: List[Trial] = []
        self.skipped: List[Trial] = []  # locked by a process on another host
        self.busy: List[Trial] = []  # locked by another process when this one came to them
        self.done = 0
        self.durations: List[float] = []
        self._specs: Dict[Trial, Any] = {}
        self.queue: List[Trial] = []  # claimed by no process yet (as far as this one knows)
        self.speed: Dict[str, float] = {}  # model -> a pack's measured steps/s
        self.repeats_to_come = bool(trials_lib.repeat_seeds(config))  # until they are queued

    def directory(self, trial: Trial) -> str:
        return os.path.join(self.workdir, trial.relpath)

    def _spec(self, trial: Trial):
        """What a trial must share with its pack-mates (computed once per trial)."""
        if trial not in self._specs:
            self._specs[trial] = engine_lib.static_spec(
                trials_lib.trial_config(self.config, trial), len(self.dataset.train),
                largest_eval=self.dataset.largest_eval)
        return self._specs[trial]

    def claim_pack(self, queue: List[Trial]) -> List[tuple]:
        """Claims up to pack_size trials of one model, static structure and resume step."""
        claimed: List[tuple] = []
        for trial in list(queue):
            if claimed:
                first = claimed[0][0]
                if (len(claimed) >= pack_size(self.config, first.model)
                        or self._spec(trial) != self._spec(first)
                        or workdir_lib.latest_step_on_disk(self.directory(trial))
                        != workdir_lib.latest_step_on_disk(self.directory(first))):
                    continue
            queue.remove(trial)
            try:
                lock = trials_lib.claim(self.workdir, trial)
            except workdir_lib.WorkdirError as e:  # a lock this host cannot judge
                logging.warning("Grid: skipping %s/%s: %s", trial.model, trial.name, e)
                self.skipped.append(trial)
                continue
            if lock is None:
                logging.info("Grid: %s/%s is being run by another process; skipping it.",
                             trial.model, trial.name)
                self.busy.append(trial)
                continue
            status = trials_lib.trial_status(self.workdir, trial)
            if status in ("completed", "diverged", "mismatched", "unreadable"):
                lock.release()
                if status in ("mismatched", "unreadable"):
                    logging.error("Grid: %s: result.json is %s; move the directory away to "
                                  "rerun the trial.", trial.relpath, status)
                    self._fail([trial], f"{trial.relpath}: result.json is {status}; move the "
                                        "directory away to rerun the trial.", write=False)
                continue
            claimed.append((trial, lock))
        return claimed

    def run_pack(self, claimed: List[tuple]) -> None:
        pack = [t for t, _ in claimed]
        names = ", ".join(t.name for t in pack)
        logging.info("Grid: %d done, %d failed; running %s: %s", self.done, len(self.failed),
                     pack[0].model, names)
        distributed.broadcast_json({"pack": [dataclasses.asdict(t) for t in pack]})
        t0 = time.perf_counter()
        try:
            self._train(pack)
        finally:
            for _, lock in claimed:
                lock.release()
        self.durations.append((time.perf_counter() - t0) / len(pack))

    def _train(self, pack: List[Trial]) -> None:
        try:
            results, error, oom = self.run_trials(pack), None, False
        except (train.Preempted, KeyboardInterrupt, workdir_lib.WriteError):
            raise  # the whole grid stops; rerunning (after the fix) resumes these trials
        except Exception as e:  # isolation: record and go on
            if _write_failure(e) or distributed.multiprocess():
                raise
            # Retried below, outside this block: the failed pack's device buffers are
            # released with the exception, before the retries allocate theirs.
            results, error, oom = None, f"{type(e).__name__}: {e}", _out_of_memory(e)
        if results is None:
            self._retry_or_fail(pack, error, oom)
            return
        for t, r in zip(pack, results):
            if r["status"] == "completed":
                self.done += 1
            else:
                self.failed.append(t)

    def _retry_or_fail(self, pack: List[Trial], error: str, oom: bool) -> None:
        """A failed pack: out of memory, as two smaller packs; otherwise each trial alone, so
        that one trial's problem (a damaged file, a changed config) fails only that trial."""
        if len(pack) == 1:
            logging.error("Grid: %s/%s failed: %s", pack[0].model, pack[0].name, error)
            self._fail(pack, error)
            return
        half = len(pack) // 2
        parts = [pack[:half], pack[half:]] if oom else [[t] for t in pack]
        logging.warning("Grid: a pack of %d %s trials %s; retrying as %s.", len(pack),
                        pack[0].model, "ran out of device memory" if oom else f"failed ({error})",
                        f"packs of {half} and {len(pack) - half}" if oom else "single trials")
        for part in parts:
            self._train(part)

    def run_trials(self, pack: List[Trial]) -> List[Dict[str, Any]]:
        """Trains `pack` together (the caller holds the trials' locks, or process 0 does)."""
        configs = [trials_lib.trial_config(self.config, t) for t in pack]
        if configs[0].framework == "torch":
            from cifar_jax.torch_twin import train as torch_train  # optional extra
            return [torch_train.train_locked(c, self.directory(t), self.dataset)
                    for c, t in zip(configs, pack)]
        return train.train_pack(configs, [self.directory(t) for t in pack], self.dataset,
                                self.engine, outlook=self._outlook(pack[0]))

    def _outlook(self, current: Trial):
        """The progress line's projection of this process's time left in the grid: the
        remaining steps of the current pack, of each queued trial and of the seeds
        grid.repeat_selected_seeds will add, each at its model's measured speed (the model's
        compile is in its first measurement); models not started yet are named, not guessed."""
        def describe(steps_per_sec: float, steps_left: int) -> str:
            first = current.model not in self.speed
            self.speed[current.model] = steps_per_sec
            seconds, unmeasured = steps_left / steps_per_sec, set()
            for model, steps in self._work_left(current):
                if model in self.speed:
                    seconds += steps / self.speed[model] / pack_size(self.config, model)
                else:
                    unmeasured.add(model)
            text = f"grid: about {metric_writing.format_duration(seconds)} left" + (
                f" + {', '.join(sorted(unmeasured))} (not started yet)" if unmeasured else "")
            if first:
                logging.info("Grid: %s trains at %.2f steps/s; projected time left for this "
                             "process: %s.", current.model, steps_per_sec, text[len("grid: "):])
            return text
        return describe

    def _work_left(self, current: Trial) -> List[tuple]:
        """(model, steps) of each trial still to train after the current pack."""
        work = [(t.model, self._spec(t).total_steps - (
            workdir_lib.latest_step_on_disk(self.directory(t)) or 0)) for t in self.queue]
        if self.repeats_to_come:  # the selected configuration costs what any trial costs
            models = {t.model: t for t in [current] + self.queue}
            work += [(m, self._spec(t).total_steps) for m, t in models.items()
                     for _ in trials_lib.repeat_seeds(self.config)]
        return work

    def _fail(self, pack: Sequence[Trial], error: str, write: bool = True) -> None:
        self.failed.extend(pack)
        if write:
            for t in pack:
                _record_failure(self.directory(t), t, error)


def _write_failure(error: BaseException) -> bool:
    """A failed write (full disk, read-only, no permission): every later trial would fail too."""
    return isinstance(error, OSError) and error.errno in (
        errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def _out_of_memory(error: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _record_failure(trial_dir: str, trial: Trial, error: str) -> None:
    """Marks a trial failed in its own result.json (a diverged one stays diverged, and a
    pack-mate that completed before the failure stays completed)."""
    try:
        result = workdir_lib.read_result(trial_dir) or {}
    except workdir_lib.WorkdirError:
        return  # unreadable: left for the user, as the error says
    if trials_lib.mismatch(trial, result) or result.get("status") == "completed":
        return
    if result.get("status") != "diverged":
        result["status"] = "failed"
    result.update(trial.hyperparameters(), error=error)
    os.makedirs(trial_dir, exist_ok=True)
    workdir_lib.write_result(trial_dir, result)


def _check_finished(config, workdir: str, trials: Sequence[Trial]) -> None:
    """Refuses a grid workdir whose finished trials ran with a different config (another
    number of epochs, batch size, data, ...): their results would be reported as this grid's."""
    problems = []
    for t in trials:
        directory = os.path.join(workdir, t.relpath)
        if trials_lib.trial_status(workdir, t) not in ("completed", "diverged"):
            continue
        stored = workdir_lib.read_json_object(os.path.join(directory, "config.json")) or {}
        diffs = config_checks.result_changing_differences(stored, trials_lib.trial_config(
            config, t)) if stored else []
        if diffs:
            problems.append(f"{t.relpath}: {'; '.join(diffs)}")
    if problems and not config.allow_config_change:
        raise config_checks.ConfigError(
            f"{workdir!r} holds {len(problems)} finished trials run with a different config:\n  "
            + "\n  ".join(problems[:5]) + ("\n  ..." if len(problems) > 5 else "") +
            "\nUse a new --workdir, or --config.allow_config_change=true to keep their results.")
    if problems:
        logging.warning("Keeping %d finished trials run with a different config "
                        "(allow_config_change=true).", len(problems))


def run_grid(config: ml_collections.ConfigDict, workdir: str, shard_index: int = 0,
             num_shards: int = 1, dataset: Optional[input_pipeline.Dataset] = None,
             engine: Optional[engine_lib.Engine] = None) -> bool:
    """Runs this process's share of the unfinished trials, then writes the report.

    Returns True when no trial failed or diverged, in this process or before it (trials that
    other live processes are still running do not count).
    """
    all_trials = trials_lib.expand(config)
    mine = trials_lib.shard_of(all_trials, shard_index, num_shards)
    workdir = os.path.abspath(workdir)
    dataset = distributed.agreed(lambda: _start(config, workdir, all_trials, mine, dataset))
    distributed.check_shared(workdir)
    runner = _Runner(config, workdir, dataset, engine or engine_lib.Engine())
    if not distributed.is_writer():
        return _follow(runner)
    ok = _run_claims(runner, config, workdir, all_trials, mine, shard_index, num_shards)
    distributed.broadcast_json({"done": ok})
    return ok


def _start(config, workdir: str, all_trials: Sequence[Trial], mine: Sequence[Trial],
           dataset: Optional[input_pipeline.Dataset]) -> input_pipeline.Dataset:
    """Every check before a trial runs; grid_config.json; the data set."""
    validate(config, mine)
    workdir_lib.ensure_writable(workdir)
    if distributed.is_writer():
        workdir_lib.write_json_atomic(os.path.join(workdir, "grid_config.json"),
                                      config.to_dict())
    if dataset is None:
        dataset = input_pipeline.load_dataset(config.data)
    _check_each(config, all_trials, lambda c: config_checks.check_run_shape(c, dataset))
    _check_finished(config, workdir, all_trials)
    return dataset


def _follow(runner: _Runner) -> bool:
    """Multi-process mode, every process but 0: trains the packs process 0 claims, until it
    says the grid is done (and whether every trial completed)."""
    while True:
        message = distributed.broadcast_json()
        if "done" in message:
            return message["done"]
        runner.run_trials([Trial(t["index"], t["model"], tuple(map(tuple, t["values"])))
                           for t in message["pack"]])


def _run_claims(runner: _Runner, config, workdir: str, all_trials: Sequence[Trial],
                mine: Sequence[Trial], shard_index: int, num_shards: int) -> bool:
    """Claims and runs this process's share, then the rest, then writes the report; True
    when every trial completed."""
    engine, dataset = runner.engine, runner.dataset
    finished = {"completed", "diverged"}
    # This shard's trials first, then the others: a process that finishes its share helps
    # with what is left (claims keep any trial from running twice).
    ordered = mine + [t for t in all_trials if t not in mine]
    queue = [t for t in ordered if trials_lib.trial_status(workdir, t) not in finished]
    logging.info("Grid: %d trials in all, %d in this shard (shard %d of %d, run first), %d "
                 "already finished, %d to run.", len(all_trials), len(mine), shard_index,
                 num_shards, len(all_trials) - len(queue), len(queue))
    _work_through(runner, queue, config)
    if config.grid.repeat_selected_seeds:
        _run_repeats(runner, config, workdir, mine)
    logging.info("Grid: this process finished: %d trials completed, %d failed. Train-step "
                 "compilations: %s.", runner.done, len(runner.failed),
                 ", ".join(f"{m} {n}" for m, n in engine.compiles("train").items()) or "none")
    rows = report.write_report(workdir, config, dataset=dataset)["rows"]
    # Trials that no live process is taking to the end (diverged, failed, damaged, abandoned by
    # a process that died, or held by a process this host cannot check) make the exit status
    # 1, in every process.
    stuck = [f"{r['model']}/{r['name']} ({r['status']})" for r in rows
             if r["status"] not in ("completed", "running")]
    stuck += [f"{t.model}/{t.name} (held by another host)" for t in runner.skipped]
    if stuck:
        logging.warning("Grid: not every trial completed: %d did not: %s", len(stuck),
                        ", ".join(stuck[:10]) + (" ..." if len(stuck) > 10 else ""))
    return not runner.failed and not stuck


def _run_repeats(runner: _Runner, config, workdir: str, mine: Sequence[Trial]) -> None:
    """Runs the selected configuration of each model again with grid.repeat_selected_seeds,
    once every trial of that model's grid has finished (in any process)."""
    best = report.best_configurations(workdir, config)
    waiting = sorted({t.model for t in mine} - set(best))
    if waiting:
        logging.info("Grid: the repeats of the selected configuration of %s wait until its "
                     "grid has finished; run this command again then.", ", ".join(waiting))
    runner.repeats_to_come = False
    repeats = [t for t in report.repeat_trials(config, best)
               if trials_lib.trial_status(workdir, t) not in ("completed", "diverged")]
    if repeats:
        logging.info("Grid: repeating the selected configurations with seeds %s: %d trials.",
                     config.grid.repeat_selected_seeds, len(repeats))
        _work_through(runner, repeats, config)


def _work_through(runner: _Runner, queue: List[Trial], config) -> None:
    """Claims and runs the trials of `queue`, then takes over, once, each trial that another
    process held when this one came to it and has since abandoned (its process died: the lock
    is free, the trial unfinished)."""
    _claim_and_run(runner, queue, config)
    abandoned = [t for t in runner.busy if trials_lib.trial_status(runner.workdir, t) in (
        "interrupted", "preempted", "pending")]
    runner.busy = []
    if abandoned and not (runner.failed and config.grid.fail_fast):
        logging.warning("Grid: taking over %d trials that another process started and left "
                        "unfinished: %s", len(abandoned), ", ".join(t.name for t in abandoned))
        _claim_and_run(runner, abandoned, config)


def _claim_and_run(runner: _Runner, queue: List[Trial], config) -> None:
    runner.queue = queue
    while queue:
        claimed = runner.claim_pack(queue)
        if not claimed:
            continue
        left = len(queue)
        if runner.durations:
            per_trial = sum(runner.durations) / len(runner.durations)
            logging.info("Grid: about %s left for this process.",
                         metric_writing.format_duration(per_trial * (left + len(claimed))))
        runner.run_pack(claimed)
        if runner.failed and config.grid.fail_fast:
            logging.error("config.grid.fail_fast=true: stopping at the first failure.")
            break
