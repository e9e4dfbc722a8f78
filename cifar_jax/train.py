"""Training runs: `train_and_evaluate(config, workdir)` for one, `train_pack` for K trials of one
model trained together. A single run is a pack of one.

The host loop has three phases, each a short function below:
  prepare  every check (config, workdir, data), then the stored config, compiled programs,
           states fresh or restored, data on the device
  train    chunks of steps (one dispatch and one host sync each): a progress line, the
           non-finite check, SIGTERM; at each epoch end validation, metrics.jsonl, checkpoints
  finish   best weights kept and test-evaluated, result.json, full checkpoints pruned
The compiled code lives in `engine.py`; this module is the I/O around it. The train state on
the device is immutable (each chunk returns a new one); the host's bookkeeping about it (Pack,
Member: steps, best epoch, writers) is plain mutable Python.
"""

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax
import jax
import ml_collections
import numpy as np
from absl import logging

from cifar_jax import (checkpointing, config_checks, distill, distributed,
                       engine as engine_lib, input_pipeline, metric_writing, optim, transfer,
                       workdir as workdir_lib)
from cifar_jax.checkpointing import Checkpoints
from cifar_jax.engine import Metrics, Progress, TrainState
# The ways a run stops early, re-exported: callers catch train.Preempted / train.Diverged.
from cifar_jax.stopping import Diverged, Preempted, SignalFlag  # noqa: F401


@dataclasses.dataclass
class Member:
    """One trial of a pack and what the host keeps about it."""

    config: ml_collections.ConfigDict
    workdir: str
    status: str = "running"  # running | completed | diverged | preempted
    result: Optional[Dict[str, Any]] = None
    ckpts: Optional[Checkpoints] = None
    writer: Any = None
    best_val: float = -1.0
    best_epoch: int = 0  # 1-based, like the logs; 0 = none yet
    train_time: float = 0.0
    last_record: Dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher: Optional[Dict[str, Any]] = None  # its distillation teacher, as result.json says

    @property
    def name(self) -> str:
        return os.path.basename(self.workdir)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")


@dataclasses.dataclass
class Pack:
    """K trials of one model on the device, stepping together."""

    members: List[Member]
    programs: engine_lib.Programs
    states: TrainState  # leading trial axis
    progress: Progress  # leading trial axis
    step: int
    dataset: input_pipeline.Dataset
    images: jax.Array
    labels: jax.Array
    eval_data: engine_lib.EvalData
    abstract: TrainState  # one trial's state, shapes only: the template for restores
    teacher: Any = None  # the distillation teacher's variables on the device, or None

    @property
    def spec(self) -> engine_lib.StaticSpec:
        return self.programs.spec

    @property
    def running(self) -> List[Member]:
        return [m for m in self.members if m.status == "running"]

    def index(self, member: Member) -> int:
        return self.members.index(member)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract.params))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[input_pipeline.Dataset] = None,
                       engine: Optional[engine_lib.Engine] = None,
                       stop_requested: Optional[Callable[[int], bool]] = None) -> Dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds a run); returns the result dict.

    Args:
      config: the run's config (configs/default.py documents every field).
      workdir: where checkpoints, metrics and results go; a run found there is resumed. The
        run holds the directory's lock while it works (a second process is refused; the
        processes of one multi-process run are one owner, process 0 holds it).
      dataset: an already loaded data set, to share one across several runs.
      engine: compiled programs to reuse across runs (a new one when None).
      stop_requested: called with the step after each chunk of steps; True stops the run like
        SIGTERM does (checkpoint, then `Preempted`). Signals always stop it too.

    Raises:
      Diverged: the loss became non-finite (result.json says so).
      Preempted: stopped by a signal or `stop_requested`, after saving a checkpoint.
    """
    workdir = os.path.abspath(workdir)
    lock = distributed.agreed(lambda: _take_workdir(config, workdir),
                              undo=lambda held: held and held.release())
    try:
        distributed.check_shared(workdir)
        (result,) = train_pack([config], [workdir], dataset, engine, stop_requested)
    finally:
        if lock is not None:
            lock.release()
    if result["status"] == "diverged":
        raise Diverged(result["error"])
    return result


def _take_workdir(config, workdir: str) -> Optional[workdir_lib.RunLock]:
    """The config checked, the workdir checked writable (by every process: each writes its
    share of a checkpoint), and its run lock (process 0's, for the group); WorkdirError if
    another run holds it."""
    config_checks.validate_config(config, jax.device_count())
    workdir_lib.ensure_writable(workdir)
    return workdir_lib.RunLock(workdir).acquire() if distributed.is_writer() else None


def train_pack(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str],
               dataset: Optional[input_pipeline.Dataset] = None,
               engine: Optional[engine_lib.Engine] = None,
               stop_requested: Optional[Callable[[int], bool]] = None,
               outlook: Optional[Callable[[float, int], str]] = None) -> List[Dict[str, Any]]:
    """Trains K trials of one model together; returns their results (in order).

    The caller holds each workdir's lock. Every config must be valid (validate_config) and
    share one static structure (engine.StaticSpec); they may differ in everything the engine
    takes as data. A trial that diverges is recorded and frozen while the others go on.
    `outlook(steps_per_sec, steps_left)`, once the pack's speed is measured, gives text for the
    progress line (the grid's projected time left).
    """
    members = [Member(c, os.path.abspath(w)) for c, w in zip(configs, workdirs)]
    pack = _prepare(members, dataset, engine or engine_lib.Engine())
    if pack is not None:
        lost = None
        try:
            with SignalFlag() as signals:
                _train(pack, signals, stop_requested, outlook)
                signals.finishing = True
                _finish(pack)
            _agreed_stop(signals, None, pack.step)  # a signal that came while finishing
            signals.stop_if_received()
        except Exception as e:
            lost = distributed.lost(e, f"at step {pack.step} of {pack.spec.total_steps}")
            if lost is None:
                raise
            raise lost from e
        finally:
            if lost is None:  # closing would wait for a save the lost process never joins
                _close(pack)
    return [m.result for m in members]


# ----------------------------------------------------------------------------------------------
# Prepare.


def _check_member(member: Member) -> None:
    """What can be checked before the data is read; sets `result` for a finished run (a
    completed one, or a diverged one rerun with the same config: it would diverge again)."""
    member.result = workdir_lib.finished_run(member.config, member.workdir)
    if member.result is not None:
        member.status = member.result["status"]
        return
    checkpointing.check_layout(os.path.join(member.workdir, "checkpoints"))
    if not os.path.exists(os.path.join(member.workdir, "result.json")) and os.path.isdir(
            os.path.join(member.workdir, "best_weights")) and \
            workdir_lib.latest_step_on_disk(member.workdir) is None:
        raise workdir_lib.WorkdirError(
            f"{member.workdir} holds best_weights/ but neither result.json nor checkpoints: a "
            "completed run whose result.json was lost. Move best_weights/ away to train it "
            "again (or restore result.json).")


def _check_pack(members: List[Member], dataset, teacher: Optional[distill.Teacher]
                ) -> engine_lib.StaticSpec:
    """The pack's one static structure; refuses members that cannot train together."""
    num_train = len(dataset.train)
    for m in members:
        config_checks.check_run_shape(m.config, dataset)
    specs = {engine_lib.static_spec(m.config, num_train, len(members), jax.device_count(),
                                    dataset.largest_eval, teacher.model if teacher else "")
             for m in members}
    pack_level = {(m.config.log_every_steps, m.config.evaluate_test) for m in members}
    for spec in specs:
        if spec.freeze_steps >= spec.total_steps > 0:
            raise config_checks.ConfigError(
                f"config.freeze_backbone_epochs={spec.freeze_epochs!r} freezes all "
                f"{spec.total_steps} steps of this run ({spec.steps_per_epoch} per epoch): the "
                "backbone would never move. Freeze fewer epochs.")
    if len(specs) != 1 or len(pack_level) != 1:
        raise config_checks.ConfigError(
            "These trials cannot train as one pack: they differ in fields that shape the "
            "compiled program or the loop (engine.StaticSpec, log_every_steps, evaluate_test): "
            f"{', '.join(m.workdir for m in members)}.")
    return specs.pop()


def _checked(members: List[Member], dataset, engine: engine_lib.Engine):
    """Every check before the first checkpoint read: (running members, data set, programs,
    teacher), or None when every member has finished."""
    for m in members:
        _check_member(m)
    running = [m for m in members if m.status == "running"]
    if not running:
        return None
    teacher = distill.load_teacher(running[0].config)  # the pack's trials share one
    for m in running:
        m.teacher = teacher.record if teacher else None
    if dataset is None:
        dataset = input_pipeline.load_dataset(running[0].config.data)
    return running, dataset, engine.programs(_check_pack(running, dataset, teacher)), teacher


def _prepare(members: List[Member], dataset, engine: engine_lib.Engine) -> Optional[Pack]:
    # Agreed: a process that fails a check (say, its host lacks the data) stops all of them.
    checked = distributed.agreed(lambda: _checked(members, dataset, engine))
    if checked is None:
        return None
    running, dataset, programs, teacher = checked
    config = running[0].config
    if programs.spec.eval_batch_size != config.eval_batch_size:
        logging.info("config.eval_batch_size=%d is larger than the largest evaluation split "
                     "(%d images): evaluating in batches of %d instead (evaluation pads and "
                     "masks, so the result is the same).", config.eval_batch_size,
                     dataset.largest_eval, programs.spec.eval_batch_size)
    abstract = jax.eval_shape(lambda: programs.init_state(config))
    # Read (and checked) only where a run starts afresh: a resume has its weights.
    pretrained = functools.partial(transfer.pretrained_variables, config,
                                   {"params": abstract.params, "batch_stats": abstract.batch_stats})
    try:
        states, epoch_metrics, step = distributed.agreed(  # a damaged checkpoint: said once
            lambda: _restore_or_init(running, programs, abstract, pretrained))
        # Every check has passed: from here on the workdirs are written (by process 0).
        for m in running:
            _start_writing(m, step)
        progress = engine_lib.stack([Progress.empty()] * len(running)).replace(epoch=epoch_metrics)
        splits = {"val": dataset.val, "test": dataset.test} if dataset.val else {
            "test": dataset.test}
        pack = Pack(members=running, programs=programs, states=programs.to_device(states),
                    progress=programs.to_device(progress), step=step, dataset=dataset,
                    images=programs.to_device(dataset.train.images),
                    labels=programs.to_device(dataset.train.labels),
                    eval_data=engine_lib.put_eval_splits(splits, programs.spec.eval_batch_size,
                                                         programs),
                    abstract=abstract,
                    teacher=programs.to_device(teacher.variables) if teacher else None)
    except BaseException:
        for m in running:
            _close_member(m)
        raise
    _log_start(pack)
    return pack


def _start_writing(member: Member, step: int) -> None:
    """The stored config, metrics.jsonl cut back to `step`, and the TensorBoard writer."""
    if not distributed.is_writer():
        member.writer = metric_writing.NullWriter()
        return
    workdir_lib.store_config(member.config, member.workdir)
    workdir_lib.truncate_jsonl(member.metrics_path, max_step=step)
    member.writer = metric_writing.create_writer(member.workdir)
    if step == 0:
        member.writer.write_hparams({k: v for k, v in config_checks.flatten(
            member.config).items() if isinstance(v, (int, float, str, bool))})


def _restore_or_init(members: List[Member], programs: engine_lib.Programs, abstract,
                     pretrained: Optional[Callable[[], Optional[Dict[str, Any]]]] = None):
    """Each member's checkpoints opened, and its state, from its latest checkpoint or fresh
    (from the weights `pretrained()` returns, if any: transfer learning); all at one common
    step.

    Members of a pack saved together, so they normally share their latest step; after a
    damaged checkpoint one may fall back further, and the others then go back to that step
    too (their metrics after it are dropped and retrained, to the same values).
    """
    for m in members:
        m.ckpts = Checkpoints(m.workdir, m.config.checkpoint_max_to_keep)
    template = checkpointing.restore_template(abstract)
    restored = [m.ckpts.restore_latest(template) for m in members]
    steps = {r[0] if r else 0 for r in restored}
    if len(steps) > 1:
        target = min(steps)
        if target == 0:
            raise checkpointing.CheckpointError(
                "These trials cannot resume as one pack: some have checkpoints, some none: "
                f"{', '.join(m.workdir for m in members)}. Run them one at a time "
                "(--config.grid.pack_size=1).")
        restored = [r if r[0] == target else m.ckpts.restore_latest(template, max_step=target)
                    for m, r in zip(members, restored)]
    step = restored[0][0] if restored[0] else 0
    weights = pretrained() if pretrained and any(r is None for r in restored) else None
    states, epoch_metrics = [], []
    for m, r in zip(members, restored):
        if r is None:
            state, metrics = jax.device_get(programs.init_state(m.config)), Metrics.empty()
            if weights:
                state = _with_pretrained(state, weights)
        else:
            _, tree, meta = r
            state = flax.serialization.from_state_dict(abstract, tree["train_state"])
            metrics = flax.serialization.from_state_dict(Metrics.empty(), tree["epoch_metrics"])
            m.best_val = meta.get("best_val_accuracy", -1.0)
            m.best_epoch = meta.get("best_epoch", 0)
            m.train_time = meta.get("train_time_s", 0.0)
            spe = programs.spec.steps_per_epoch
            where = (f"in epoch {step // spe + 1}" if step % spe else
                     f"at the end of epoch {step // spe}" if step else "at the start")
            logging.info("Resumed %s from checkpoint %d (%s, step %d of %d).", m.workdir,
                         step, where, step, programs.spec.total_steps)
        states.append(jax.device_get(engine_lib.with_config_hyperparameters(state, m.config)))
        epoch_metrics.append(metrics)
    return engine_lib.stack(states), engine_lib.stack(epoch_metrics), step


def _with_pretrained(state: TrainState, pretrained: Dict[str, Any]) -> TrainState:
    """A fresh state with the pretrained weights in place of the initial ones (the classifier,
    absent from them, keeps its initialisation); the weight average starts from them too."""
    params = transfer.merged(state.params, pretrained["params"])
    stats = transfer.merged(state.batch_stats, pretrained.get("batch_stats", {}))
    ema = {"params": params, "batch_stats": stats} if state.ema is not None else None
    return state.replace(params=params, batch_stats=stats, ema=ema)


def _log_start(pack: Pack) -> None:
    spec, ds = pack.spec, pack.dataset
    trials = (f"{len(pack.members)} trials" if len(pack.members) > 1
              else pack.members[0].name)
    logging.info("%s (%s): %s parameters on %d %s device(s); %d train / %d val / %d test "
                 "images; %d steps per epoch, a host sync every %d (%s)", spec.model, trials,
                 f"{pack.num_params:,}", spec.num_devices, jax.devices()[0].platform, len(ds.train),
                 len(ds.val) if ds.val else 0, len(ds.test), spec.steps_per_epoch,
                 pack.members[0].config.log_every_steps,
                 "in one on-device loop" if spec.device_loop else "one dispatch per step")
    if ds.val is None:
        logging.warning("config.data.val_size=0: validation is skipped; the best checkpoint "
                        "and model selection fall back to training accuracy.")


# ----------------------------------------------------------------------------------------------
# Train.


def _train(pack: Pack, signals: "SignalFlag", stop_requested: Optional[Callable[[int], bool]],
           outlook: Optional[Callable[[float, int], str]]) -> None:
    spec, programs = pack.spec, pack.programs
    eta = metric_writing.Eta(spec.total_steps, pack.step, outlook)
    every = pack.members[0].config.log_every_steps
    stop = lambda: _agreed_stop(signals, stop_requested, pack.step)  # noqa: E731
    start = pack.step
    for epoch in range(pack.step // spec.steps_per_epoch, spec.num_epochs):
        perms = programs.permutations(pack.states, epoch)
        end = (epoch + 1) * spec.steps_per_epoch
        t0, first = time.perf_counter(), pack.step
        while pack.step < end:
            n = chunk_steps(pack.step, start, end, every)
            pack.states, pack.progress = programs.train_chunk(
                pack.states, pack.progress, pack.images, pack.labels, perms, n, pack.teacher)
            pack.step += n
            _after_chunk(pack, epoch, eta)
            if not pack.running:
                return
            if pack.step < end and stop():
                _add_train_time(pack, time.perf_counter() - t0)
                _preempt(pack, signals, epoch)
        _end_epoch(pack, epoch, time.perf_counter() - t0, pack.step - first, eta)
        if not pack.running:
            return
        if epoch + 1 < spec.num_epochs and stop():
            _preempt(pack, signals, epoch + 1)


def _agreed_stop(signals: SignalFlag, stop_requested, step: int) -> bool:
    """Whether to stop now, for a signal or the caller's request; the processes of a
    multi-process run answer alike (a signal that reached one stops them all, at one step)."""
    mine = signals.received or (-1 if stop_requested and stop_requested(step) else 0)
    agreed = distributed.first_nonzero(mine)
    if agreed > 0 and signals.received is None:
        signals.received, signals.received_by = agreed, "another process"
    return agreed != 0


def chunk_steps(step: int, start: int, end: int, every: int) -> int:
    """Steps in the next chunk: up to the next multiple of `every` (or `end`, the epoch's last
    step), except that the first chunks after `start` ramp up, 1, 2, 4, 8, ... steps: the first
    progress line then comes one step (and the compile) after the start, whatever the device's
    speed, and the second one already measures it. The chunking never changes the result."""
    boundary = min(end, (step // every + 1) * every)
    return min(boundary - step, step - start + 1)


def _learning_rate(member: Member, spec, step: int) -> float:
    return float(optim.learning_rate_at(step, member.config.learning_rate, spec.total_steps,
                                        spec.warmup_steps))


def _after_chunk(pack: Pack, epoch: int, eta: "metric_writing.Eta") -> None:
    """The chunk's one host sync: divergence, TensorBoard scalars, one progress line."""
    chunk, first_bad, bad_loss = engine_lib.fetch(
        (pack.progress.chunk, pack.progress.first_bad_step, pack.progress.bad_loss))
    losses, accs = [], []
    for m in list(pack.running):
        i = pack.index(m)
        if first_bad[i] >= 0:
            _diverge(m, int(first_bad[i]), float(bad_loss[i]))
            continue
        computed = engine_lib.unstack(chunk, i).compute()
        losses.append(float(computed["loss"]))
        accs.append(float(computed["accuracy"]))
        m.writer.write_scalars(pack.step, {
            "train/loss": losses[-1], "train/accuracy": accs[-1],
            "train/learning_rate": _learning_rate(m, pack.spec, pack.step - 1)})
        m.ckpts.poll()
    if losses:
        eta.update(pack.step)
        spread = lambda xs, f: f(xs[0]) if len(xs) == 1 else f"{f(min(xs))}..{f(max(xs))}"  # noqa: E731
        logging.info("step %d/%d (epoch %d/%d)  loss %s  acc %s  %s", pack.step,
                     pack.spec.total_steps, epoch + 1, pack.spec.num_epochs,
                     spread(losses, "{:.4f}".format), spread(accs, lambda a: f"{100 * a:.2f}%"),
                     eta.describe())


def _diverge(member: Member, step: int, loss: float) -> None:
    member.ckpts.wait()
    good = member.ckpts.latest_step()
    where = (f"The last good checkpoint is {member.ckpts.directory}/{good} and stays intact."
             if good is not None else "No checkpoint was saved before it.")
    error = f"Non-finite loss ({loss}) at step {step}. {where}"
    logging.error("%s: %s", member.name, error)
    member.status = "diverged"
    _write_result(member, "diverged", step=step, error=error)


def _add_train_time(pack: Pack, seconds: float) -> None:
    for m in pack.running:
        m.train_time += seconds


def _meta(pack: Pack, member: Member, epoch: int, status: str) -> Dict[str, Any]:
    return {"epoch": epoch, "step": pack.step,
            "position_in_epoch": pack.step % pack.spec.steps_per_epoch,
            "best_val_accuracy": member.best_val, "best_epoch": member.best_epoch,
            "train_time_s": member.train_time, "status": status}


def _end_epoch(pack: Pack, epoch: int, seconds: float, steps: int, eta) -> None:
    """Validation, metrics.jsonl, TensorBoard, one summary line and a checkpoint per trial."""
    _add_train_time(pack, seconds)
    val = (engine_lib.evaluate(pack.programs, pack.states, pack.eval_data, "val")
           if "val" in pack.eval_data.splits else None)
    states, epoch_metrics = engine_lib.fetch((pack.states, pack.progress.epoch))
    pack.progress = pack.progress.replace(
        epoch=pack.programs.to_device(engine_lib.stack([Metrics.empty()] * len(pack.members))))
    for m in pack.running:
        i = pack.index(m)
        train = engine_lib.unstack(epoch_metrics, i).compute()
        record = {"epoch": epoch + 1, "step": pack.step, "train_loss": float(train["loss"]),
                  "train_accuracy": float(train["accuracy"]),
                  "learning_rate": _learning_rate(m, pack.spec, pack.step - 1),
                  "epoch_time_s": seconds, "images_per_sec": steps * pack.spec.batch_size / seconds}
        if val is not None:
            record.update(val_loss=val[i]["loss"], val_accuracy=val[i]["accuracy"])
            m.writer.write_scalars(pack.step, {"val/loss": val[i]["loss"],
                                               "val/accuracy": val[i]["accuracy"]})
        selection = workdir_lib.selection_accuracy(record)
        if selection > m.best_val:
            m.best_val, m.best_epoch = selection, epoch + 1
        # metrics.jsonl first: a resume from an older checkpoint drops this record again.
        if distributed.is_writer():
            workdir_lib.append_jsonl(m.metrics_path, record)
        m.ckpts.save(pack.step, checkpointing.checkpoint_tree(engine_lib.unstack(states, i),
                                                              Metrics.empty()),
                     _meta(pack, m, epoch + 1, "epoch_end"), selection=selection)
        m.writer.flush()
        m.last_record = record
        _log_epoch(m, record, pack, eta)


def _log_epoch(member: Member, record: Dict[str, Any], pack: Pack, eta) -> None:
    val = (f"val loss {record['val_loss']:.4f} acc {100 * record['val_accuracy']:.2f}%"
           if "val_accuracy" in record else "val skipped")
    who = f"{member.name}: " if len(pack.members) > 1 else ""
    logging.info("%sepoch %d/%d  train loss %.4f acc %.2f%%  %s  %.0f img/s  epoch %.1fs  eta %s",
                 who, record["epoch"], pack.spec.num_epochs, record["train_loss"],
                 100 * record["train_accuracy"], val, record["images_per_sec"],
                 record["epoch_time_s"], metric_writing.format_duration(eta.seconds_left()))


def _preempt(pack: Pack, signals: SignalFlag, epoch: int) -> None:
    """Saves every running trial at the current step, waits for the saves, raises Preempted."""
    if pack.step % pack.spec.steps_per_epoch:  # mid-epoch: the epoch-end save did not cover it
        states, epoch_metrics = engine_lib.fetch((pack.states, pack.progress.epoch))
        for m in pack.running:
            i = pack.index(m)
            m.ckpts.save(pack.step, checkpointing.checkpoint_tree(engine_lib.unstack(states, i),
                                                     engine_lib.unstack(epoch_metrics, i)),
                         _meta(pack, m, epoch, "preempted"))
    for m in pack.running:
        m.ckpts.wait()  # complete before the process exits
        m.status = "preempted"
        _write_result(m, "preempted")
    why = signal.Signals(signals.received).name if signals.received is not None else "request"
    if signals.received_by:
        why += f" (sent to {signals.received_by})"
    where = pack.members[0].workdir if len(pack.members) == 1 else \
        f"the {len(pack.members)} trial directories"
    raise Preempted(f"Stopped by {why} at step {pack.step} (epoch {epoch + 1}); checkpoint "
                    f"saved in {where}. Run the same command again to resume.")


# ----------------------------------------------------------------------------------------------
# Finish.


def _write_result(member: Member, status: str, **fields) -> Dict[str, Any]:
    record = workdir_lib.result_record(
        member.config, status, "jax", **{
            "best_val_accuracy": member.best_val if member.best_epoch else None,
            "best_epoch": member.best_epoch or None,
            "train_time_s": member.train_time,
            "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
            **({"teacher": member.teacher} if member.teacher else {}), **fields})
    if distributed.is_writer():
        workdir_lib.write_result(member.workdir, record)
    member.result = record
    return record


def _finish(pack: Pack) -> None:
    """Best weights kept, test evaluation of those weights (one dispatch for the pack),
    result.json, then the full checkpoints pruned."""
    running = pack.running
    if not running:
        return
    for m in running:
        m.ckpts.wait()
    best = _keep_best_weights(pack)
    test = _test_best(pack, best) if running[0].config.evaluate_test else {}
    for m in running:
        t = test.get(m.workdir, {"loss": None, "accuracy": None})
        if t["accuracy"] is not None:
            m.writer.write_scalars(pack.step, {"test/loss": t["loss"],
                                               "test/accuracy": t["accuracy"]})
        if not m.last_record:
            records = workdir_lib.read_jsonl(m.metrics_path)
            m.last_record = records[-1] if records else {}
        m.status = "completed"
        _write_result(m, "completed", num_params=pack.num_params, step=pack.step,
                      classes=list(pack.dataset.classes),
                      total_steps=pack.spec.total_steps,
                      final_val_accuracy=m.last_record.get("val_accuracy"),
                      final_val_loss=m.last_record.get("val_loss"),
                      test_accuracy=t["accuracy"], test_loss=t["loss"],
                      pack_size=len(pack.members),  # images_per_sec is this trial's share
                      images_per_sec=(pack.spec.total_steps * pack.spec.batch_size / m.train_time
                                      if m.train_time else None))
        if m.workdir in best and not m.config.keep_full_checkpoints:
            m.ckpts.remove_full_checkpoints()  # only once the result says completed
        test_text = (f"test accuracy {100 * t['accuracy']:.2f}% (best epoch's weights), "
                     if t["accuracy"] is not None else "")
        logging.info("Finished %s: %sbest val accuracy %.2f%% (epoch %d), train time %s.",
                     m.workdir, test_text, 100 * m.best_val, m.best_epoch,
                     metric_writing.format_duration(m.train_time))


def _keep_best_weights(pack: Pack) -> Dict[str, Dict[str, Any]]:
    """Saves each trial's best epoch's weights (best_weights/); returns them by workdir."""
    template = checkpointing.restore_template(pack.abstract)
    kept = {}
    for m in pack.running:
        found = m.ckpts.restore_best(template)
        if found is not None:
            _, state, meta = found
            if meta.get("epoch") != m.best_epoch:  # the best checkpoint was damaged, moved away
                logging.warning("%s: keeping epoch %s, the best of the epoch checkpoints left "
                                "(the best epoch was %d).", m.workdir, meta.get("epoch"),
                                m.best_epoch)
                m.best_epoch = meta["epoch"]
                m.best_val = workdir_lib.selection_accuracy(
                    workdir_lib.epoch_record(m.metrics_path, m.best_epoch))
            kept[m.workdir] = _weights(state["train_state"])
            m.ckpts.save_weights(kept[m.workdir])
    return kept


def _test_best(pack: Pack, best: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Test loss and accuracy of the weights each trial keeps (its best epoch's)."""
    states = engine_lib.fetch(pack.states)
    members = []
    for m in pack.running:
        i = pack.index(m)
        state = flax.serialization.to_state_dict(engine_lib.unstack(states, i))
        members.append(flax.serialization.from_state_dict(
            pack.abstract, {**state, **best.get(m.workdir, {})}))
    members += [members[-1]] * (len(pack.members) - len(members))  # diverged: placeholders
    results = engine_lib.evaluate(pack.programs, pack.programs.to_device(
        engine_lib.stack(members)), pack.eval_data, "test")
    return {m.workdir: r for m, r in zip(pack.running, results)}


def _weights(state: Dict[str, Any]) -> Dict[str, Any]:
    """What a completed run keeps of a train state (as a state dict): the evaluated weights."""
    keep = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if state.get("ema") is not None:
        keep["ema"] = state["ema"]
    return keep


def _close_member(member: Member) -> None:
    """Closes a trial's writer and checkpoints. Runs on the way out of an error too, so a
    failure here is logged rather than raised over the error already on its way (the saves
    that matter were waited for, and their failures raised, before results were written)."""
    for resource in (member.writer, member.ckpts):
        try:
            if resource is not None:
                resource.close()
        except Exception as e:  # noqa: BLE001 - see the docstring
            logging.warning("%s: closing %s failed: %s", member.workdir,
                            type(resource).__name__, e)


def _close(pack: Pack) -> None:
    for m in pack.members:
        _close_member(m)


# ----------------------------------------------------------------------------------------------
# Evaluation of a finished run.


def evaluate_checkpoint(config, workdir: str, split: input_pipeline.Split,
                        engine: Optional[engine_lib.Engine] = None,
                        dataset: Optional[input_pipeline.Dataset] = None) -> Dict[str, float]:
    """Loss and accuracy on `split` of a run's best weights (its best epoch).

    `dataset` (the run's data set) lets `engine` reuse the run's own compiled evaluation; any
    `split` evaluates correctly without it.
    """
    engine = engine or engine_lib.Engine()
    programs = engine.programs(engine_lib.static_spec(
        config, len(dataset.train) if dataset else len(split), 1, jax.device_count(),
        dataset.largest_eval if dataset else len(split)))
    state = jax.device_get(programs.init_state(config))
    ckpts = Checkpoints(workdir, config.checkpoint_max_to_keep)
    try:
        state_dict = flax.serialization.to_state_dict(state)
        if ckpts.has_weights():
            weights = ckpts.load_weights(_weights(state_dict))
        else:
            template = checkpointing.checkpoint_tree(state, Metrics.empty())
            best = ckpts.restore_best(template)
            if best is None:
                raise FileNotFoundError(f"No best checkpoint or best_weights in {workdir}.")
            weights = _weights(best[1]["train_state"])
    finally:
        ckpts.close()
    state = flax.serialization.from_state_dict(state, {**state_dict, **weights})
    data = engine_lib.put_eval_splits({"split": split}, programs.spec.eval_batch_size, programs)
    return engine_lib.evaluate(programs, programs.to_device(engine_lib.stack([state])), data,
                               "split")[0]
