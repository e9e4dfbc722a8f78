"""One training run: `train_and_evaluate(config, workdir)`.

Pure functions around one immutable `TrainState`; I/O (checkpoints, metrics, logging, signals)
stays in the host loop. The whole data set sits on the device; every batch is gathered,
augmented and consumed inside one jitted step whose randomness is a pure function of
(config.seed, step), so a resumed run continues exactly where it stopped.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import socket
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cifar_jax import augment, config_checks, input_pipeline, metric_writing, models, optim
from cifar_jax.checkpointing import Checkpoints

# Sub-streams of the run's key: each random choice has its own, folded with step or epoch.
_INIT, _SHUFFLE, _AUGMENT, _DROPOUT = range(4)


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # the run's base key; per-step keys are folded from it
    dropout_rate: jax.Array  # data, not code: trials differing in dropout share a compile


@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint at the current step was saved."""


class Diverged(Exception):
    """A non-finite loss appeared."""


@dataclasses.dataclass(frozen=True)
class RunShape:
    """Static sizes of a run, fixed by config and data."""

    num_train: int
    batch_size: int
    steps_per_epoch: int
    num_epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs


def dropout_rate_for(config) -> float:
    return models.dropout_rate(config.model, config.dropout_rate)


def build_model(config):
    return _model(config.model, config.dtype)


@functools.lru_cache(maxsize=None)
def _model(name: str, dtype: str):
    # One module instance per (name, dtype): its `apply` is a static part of the train state,
    # so reusing it lets trials of the same model share the compiled step.
    return models.get_model(name, dtype=jnp.dtype(dtype))


def make_tx(config, shape: RunShape):
    return optim.make_optimizer(config.optimizer, shape.total_steps, steps_warmup(config, shape),
                                config.momentum, config.nesterov, config.decay_bn_and_bias)


@functools.lru_cache(maxsize=None)
def _jitted_init(model):
    """One compiled initialiser per model definition (modules are hashable dataclasses)."""
    return jax.jit(functools.partial(model.init, train=False))


def create_train_state(rng, config, model, shape: RunShape) -> TrainState:
    """Initialises parameters, BN statistics and optimizer state (hyperparameters as data)."""
    variables = _jitted_init(model)(jax.random.fold_in(rng, _INIT),
                                    jnp.zeros((1, 32, 32, 3), jnp.float32))
    tx = make_tx(config, shape)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), tx=tx, rng=rng,
        dropout_rate=jnp.asarray(dropout_rate_for(config), jnp.float32))
    return state.replace(opt_state=optim.with_hyperparams(
        state.opt_state, config.learning_rate, config.weight_decay))


def cross_entropy_loss(logits, labels, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, images, labels, *, augmentation: str, dtype,
               label_smoothing: float, batch_sharding=None) -> Tuple[TrainState, Metrics]:
    """One SGD step on a uint8 batch: augment, forward, backward, update."""
    step_key = lambda stream: jax.random.fold_in(jax.random.fold_in(state.rng, stream), state.step)  # noqa: E731
    x = augment.augment(step_key(_AUGMENT), images, augmentation, dtype)
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        labels = jax.lax.with_sharding_constraint(labels, batch_sharding)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            dropout_rate=state.dropout_rate, mutable=["batch_stats"],
            rngs={"dropout": step_key(_DROPOUT)})
        per_example = cross_entropy_loss(logits, labels, label_smoothing)
        return per_example.mean(), (per_example, logits, updates)

    grads, (per_example, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return new_state, Metrics.single_from_model_output(
        loss=per_example, logits=logits, labels=labels)


def eval_step(state: TrainState, images, labels, mask, *, dtype) -> Metrics:
    """Metrics of one padded uint8 batch in eval mode; `mask` drops the padding."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            augment.normalize(images, dtype), train=False)
    per_example = cross_entropy_loss(logits, labels)
    return Metrics.single_from_model_output(loss=per_example, logits=logits, labels=labels,
                                            mask=mask)


# ----------------------------------------------------------------------------------------------
# Compiled functions. Cached per static structure so that a grid of trials reuses them.


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    model: str
    dtype: str
    augmentation: str
    label_smoothing: float
    batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    num_devices: int


class CompiledSteps:
    """The jitted train/eval/shuffle functions of one StaticSpec, on a data-parallel mesh."""

    def __init__(self, spec: StaticSpec, mesh: Mesh):
        self.spec = spec
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        dtype = jnp.dtype(spec.dtype)
        step = functools.partial(train_step, augmentation=spec.augmentation, dtype=dtype,
                                 label_smoothing=spec.label_smoothing,
                                 batch_sharding=self.batch_sharding)
        B, spe = spec.batch_size, spec.steps_per_epoch

        def train_fn(state, train_images, train_labels, perm):
            # The position in the epoch is state.step: nothing outside the state decides it.
            start = (state.step % spe) * B
            idx = jax.lax.dynamic_slice(perm, (start,), (B,))
            return step(state, train_images[idx], train_labels[idx])

        def eval_fn(state, images, labels, mask, index):
            start = index * spec.eval_batch_size
            take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, spec.eval_batch_size)  # noqa: E731
            x, y, m = take(images), take(labels), take(mask)
            x, y, m = (jax.lax.with_sharding_constraint(a, self.batch_sharding) for a in (x, y, m))
            return eval_step(state, x, y, m, dtype=dtype)

        self.train = jax.jit(train_fn, donate_argnums=0,
                             out_shardings=(self.replicated, self.replicated))
        self.eval = jax.jit(eval_fn, out_shardings=self.replicated)
        self.permutation = jax.jit(
            lambda rng, epoch, n: jax.random.permutation(
                jax.random.fold_in(jax.random.fold_in(rng, _SHUFFLE), epoch), n),
            static_argnums=2, out_shardings=self.replicated)


def static_spec(config, steps_per_epoch: int, num_devices: int) -> StaticSpec:
    """The static structure of `config`'s compiled steps."""
    return StaticSpec(model=config.model, dtype=config.dtype,
                      augmentation=config.data.augmentation,
                      label_smoothing=float(config.label_smoothing),
                      batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                      steps_per_epoch=steps_per_epoch, num_devices=num_devices)


_COMPILED: Dict[StaticSpec, CompiledSteps] = {}


def compiled_steps(spec: StaticSpec) -> CompiledSteps:
    """The jitted steps for `spec`, built once per process and reused by later runs."""
    if spec not in _COMPILED:
        devices = np.array(jax.devices()[: spec.num_devices])
        _COMPILED[spec] = CompiledSteps(spec, Mesh(devices, ("data",)))
    return _COMPILED[spec]


def count_compilations() -> int:
    """How many train-step executables this process has compiled so far."""
    return sum(cs.train._cache_size() for cs in _COMPILED.values())


# ----------------------------------------------------------------------------------------------
# Evaluation over a whole split.


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    num_batches: int
    size: int


def put_eval_split(split: input_pipeline.Split, batch_size: int, sharding) -> DeviceSplit:
    """Pads a split to whole batches (masked) and puts it on the device."""
    n = len(split)
    num_batches = max(1, math.ceil(n / batch_size))
    pad = num_batches * batch_size - n
    images = np.concatenate([split.images, np.zeros((pad, 32, 32, 3), np.uint8)])
    labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
    mask = np.concatenate([np.ones((n,), bool), np.zeros((pad,), bool)])
    put = lambda a: jax.device_put(a, sharding)  # noqa: E731
    return DeviceSplit(put(images), put(labels), put(mask), num_batches, n)


def evaluate(steps: CompiledSteps, state: TrainState, split: DeviceSplit) -> Dict[str, float]:
    total = None
    for i in range(split.num_batches):
        m = steps.eval(state, split.images, split.labels, split.mask, i)
        total = m if total is None else total.merge(m)
    return {k: float(v) for k, v in total.compute().items()}


# ----------------------------------------------------------------------------------------------
# The host loop.


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the run is not pre-emptible
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second Ctrl-C: give up on the graceful path
            raise KeyboardInterrupt
        self.received = signum
        logging.warning("Received %s: saving a checkpoint at the current step, then stopping.",
                        signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_workdir_writable(workdir: str) -> None:
    """Fails early, with the reason, if the workdir cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_") as f:
            f.write(b"0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"The workdir {workdir!r} is not writable ({e.strerror or e}). Choose "
                      "another --workdir or free space / fix permissions there.") from e


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _state_for_checkpoint(state: TrainState, epoch_metrics: Metrics) -> Dict[str, Any]:
    return {"train_state": flax.serialization.to_state_dict(state),
            "epoch_metrics": flax.serialization.to_state_dict(epoch_metrics)}


def _from_checkpoint(template_state: TrainState, restored: Dict[str, Any]):
    state = flax.serialization.from_state_dict(template_state, restored["train_state"])
    epoch_metrics = flax.serialization.from_state_dict(Metrics.empty(), restored["epoch_metrics"])
    return state, epoch_metrics


def load_or_store_config(config, workdir: str) -> None:
    """Stores the run's config; on resume refuses result-changing differences."""
    path = os.path.join(workdir, "config.json")
    stored = metric_writing.read_json(path)
    if stored is not None:
        diffs = config_checks.result_changing_differences(stored, config)
        if diffs and not config.allow_config_change:
            raise config_checks.ConfigError(
                f"{workdir!r} holds a run with a different config:\n  " + "\n  ".join(diffs) +
                "\nUse a new --workdir, or pass --config.allow_config_change=true to resume "
                "with the new values.")
        if diffs:
            logging.warning("Resuming with a changed config (allow_config_change=true):\n  %s",
                            "\n  ".join(diffs))
    metric_writing.write_json_atomic(path, config.to_dict())


def _log_epoch(epoch: int, num_epochs: int, record: Dict[str, Any], eta: float):
    val = (f"val loss {record['val_loss']:.4f} acc {100 * record['val_accuracy']:.2f}%"
           if "val_accuracy" in record else "val skipped")
    logging.info("epoch %d/%d  train loss %.4f acc %.2f%%  %s  lr %.2e  %.0f img/s  "
                 "epoch %.1fs  eta %s", epoch + 1, num_epochs, record["train_loss"],
                 100 * record["train_accuracy"], val, record["learning_rate"],
                 record["images_per_sec"], record["epoch_time_s"], _fmt_time(eta))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[input_pipeline.Dataset] = None,
                       stop_requested: Optional[Callable[[int], bool]] = None
                       ) -> Dict[str, Any]:
    """Trains `config` in `workdir` (resuming if it holds a run); returns the result dict.

    Args:
      config: the run's config (configs/default.py documents every field).
      workdir: where checkpoints, metrics and results go; a run found there is resumed.
      dataset: an already loaded data set, to share one across several runs (the grid).
      stop_requested: called with the step after each step; True stops the run like SIGTERM
        does (checkpoint, then `Preempted`). Signals always stop it too.
    """
    num_devices = jax.device_count()
    config_checks.validate_config(config, num_devices)
    workdir = os.path.abspath(workdir)
    check_workdir_writable(workdir)
    load_or_store_config(config, workdir)
    result_path = os.path.join(workdir, "result.json")
    previous = metric_writing.read_json(result_path)
    if previous and previous.get("status") == "completed":
        logging.info("Run in %s already finished: %s", workdir, json.dumps(previous))
        return previous

    if dataset is None:
        dataset = input_pipeline.load_dataset(config.data)
    if dataset.val is None:
        logging.warning("config.data.val_size=0: validation is skipped; the best checkpoint "
                        "and model selection fall back to training metrics.")
    shape = RunShape(num_train=len(dataset.train), batch_size=config.batch_size,
                     steps_per_epoch=len(dataset.train) // config.batch_size,
                     num_epochs=config.num_epochs)
    if shape.steps_per_epoch == 0:
        raise config_checks.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {shape.num_train} "
            "training images: no full batch per epoch. Use a smaller batch size.")
    steps = compiled_steps(static_spec(config, shape.steps_per_epoch, num_devices))
    rep = steps.replicated

    model = build_model(config)
    rng = jax.random.PRNGKey(config.seed)
    state = jax.device_put(create_train_state(rng, config, model, shape), rep)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    epoch_metrics = jax.device_put(Metrics.empty(), rep)

    ckpts = Checkpoints(workdir, config.checkpoint_max_to_keep)
    restored = ckpts.restore_latest(_state_for_checkpoint(state, epoch_metrics))
    meta: Dict[str, Any] = {}
    if restored is not None:
        ckpt_step, ckpt, meta = restored
        state, epoch_metrics = _from_checkpoint(state, ckpt)
        # The config is the source of truth for the injected hyperparameters (they differ
        # from the checkpoint's only under allow_config_change).
        epoch_metrics = jax.device_put(epoch_metrics, rep)
        state = jax.device_put(state.replace(
            opt_state=optim.with_hyperparams(state.opt_state, config.learning_rate,
                                             config.weight_decay),
            dropout_rate=jnp.asarray(dropout_rate_for(config), jnp.float32)), rep)
        _truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), max_step=ckpt_step)
        logging.info("Resumed from %s/checkpoints/%d (epoch %d, step %d of %d).", workdir,
                     ckpt_step, ckpt_step // shape.steps_per_epoch + 1, ckpt_step,
                     shape.total_steps)

    # Data on the device, replicated; batches are gathered from it inside the step.
    train_images = jax.device_put(dataset.train.images, rep)
    train_labels = jax.device_put(dataset.train.labels, rep)
    val = put_eval_split(dataset.val, config.eval_batch_size, rep) if dataset.val else None

    writer = metric_writing.create_writer(workdir)
    if int(state.step) == 0:
        writer.write_hparams({k: v for k, v in config_checks.flatten(config).items()
                              if isinstance(v, (int, float, str, bool))})
    progress = metric_writing.ProgressReporter(shape.total_steps, writer,
                                               config.log_every_steps)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    best_val = meta.get("best_val_accuracy", -1.0)
    best_epoch = meta.get("best_epoch", -1)
    train_time = meta.get("train_time_s", 0.0)
    host = socket.gethostname()
    logging.info("%s: %s, %d params, %d devices (%s), %d train / %s val / %d test images, "
                 "%d steps/epoch", host, config.model, num_params, num_devices,
                 jax.devices()[0].platform, shape.num_train,
                 len(dataset.val) if dataset.val else 0, len(dataset.test),
                 shape.steps_per_epoch)

    def write_result(status: str, **extra):
        result = {"status": status, "framework": "jax", "model": config.model,
                  "optimizer": config.optimizer, "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
                  "augmentation": config.data.augmentation,
                  "dropout_rate": dropout_rate_for(config), "seed": config.seed,
                  "num_params": num_params, "step": int(state.step),
                  "total_steps": shape.total_steps, "best_val_accuracy": best_val,
                  "best_epoch": best_epoch + 1, "train_time_s": train_time,
                  "devices": f"{num_devices}x {jax.devices()[0].device_kind}", **extra}
        metric_writing.write_json_atomic(result_path, result)
        return result

    def meta_now(epoch: int) -> Dict[str, Any]:
        return {"epoch": epoch, "step": int(state.step),
                "position_in_epoch": int(state.step) % shape.steps_per_epoch,
                "best_val_accuracy": best_val, "best_epoch": best_epoch,
                "train_time_s": train_time}

    last_record: Dict[str, Any] = {}
    start_step = int(state.step)
    try:
        with _SignalFlag() as stop:

            def should_stop(step: int) -> bool:
                return stop.received is not None or (
                    stop_requested is not None and stop_requested(step))

            for epoch in range(start_step // shape.steps_per_epoch, shape.num_epochs):
                perm = steps.permutation(state.rng, epoch, shape.num_train)
                t0 = time.perf_counter()
                first = int(state.step)
                end = (epoch + 1) * shape.steps_per_epoch
                pending = []  # (step, loss) not yet checked for finiteness
                for step in range(first, end):
                    state, m = steps.train(state, train_images, train_labels, perm)
                    epoch_metrics = epoch_metrics.merge(m)
                    pending.append((step, m.loss.total))
                    progress(step + 1)
                    if (step + 1) % config.log_every_steps == 0 or step + 1 == end:
                        _check_finite(pending, ckpts)
                        pending = []
                        lr = optim.learning_rate_at(step, config.learning_rate,
                                                    shape.total_steps, steps_warmup(config, shape))
                        last = m.compute()
                        writer.write_scalars(step + 1, {"train/loss": last["loss"],
                                                        "train/accuracy": last["accuracy"],
                                                        "train/learning_rate": lr})
                    if step + 1 < end and should_stop(step + 1):
                        _check_finite(pending, ckpts)
                        train_time += time.perf_counter() - t0
                        ckpts.save(int(state.step), _state_for_checkpoint(state, epoch_metrics),
                                   {**meta_now(epoch), "status": "preempted"})
                        raise Preempted(_stop_message(stop, state, epoch, workdir))
                jax.block_until_ready(state)
                epoch_time = time.perf_counter() - t0
                train_time += epoch_time
                train = epoch_metrics.compute()
                record = {"epoch": epoch + 1, "step": int(state.step),
                          "train_loss": float(train["loss"]),
                          "train_accuracy": float(train["accuracy"]),
                          "learning_rate": float(optim.learning_rate_at(
                              int(state.step) - 1, config.learning_rate, shape.total_steps,
                              steps_warmup(config, shape))),
                          "epoch_time_s": epoch_time,
                          "images_per_sec": (end - first) * shape.batch_size / epoch_time}
                if val is not None:
                    v = evaluate(steps, state, val)
                    record.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
                    writer.write_scalars(int(state.step), {"val/loss": v["loss"],
                                                           "val/accuracy": v["accuracy"]})
                selection_metric = record.get("val_accuracy", record["train_accuracy"])
                is_best = selection_metric > best_val
                if is_best:
                    best_val, best_epoch = selection_metric, epoch
                epoch_metrics = jax.device_put(Metrics.empty(), rep)
                ckpts.save(int(state.step), _state_for_checkpoint(state, epoch_metrics),
                           {**meta_now(epoch + 1), "status": "epoch_end"}, best=is_best)
                metric_writing.append_jsonl(metrics_path, record)
                writer.flush()
                last_record = record
                _log_epoch(epoch, shape.num_epochs, record, progress.eta_seconds(int(state.step)))
                if epoch + 1 < shape.num_epochs and should_stop(int(state.step)):
                    raise Preempted(_stop_message(stop, state, epoch + 1, workdir))
    except Diverged as e:
        ckpts.wait()
        write_result("diverged", error=str(e))
        writer.close()
        ckpts.close()
        raise
    except Preempted:
        ckpts.wait()  # the checkpoint is complete before the process exits
        write_result("preempted")
        writer.close()
        ckpts.close()
        raise
    ckpts.wait()

    t = {"loss": None, "accuracy": None}
    if config.get("evaluate_test", True):
        t = evaluate(steps, state, put_eval_split(dataset.test, config.eval_batch_size, rep))
        writer.write_scalars(int(state.step), {"test/loss": t["loss"],
                                               "test/accuracy": t["accuracy"]})
    writer.close()
    if not last_record and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            lines = f.read().splitlines()
        last_record = json.loads(lines[-1]) if lines else {}
    result = write_result(
        "completed", final_val_accuracy=last_record.get("val_accuracy"),
        final_val_loss=last_record.get("val_loss"), test_accuracy=t["accuracy"],
        test_loss=t["loss"],
        images_per_sec=shape.total_steps * shape.batch_size / train_time if train_time else None)
    ckpts.close()
    test_text = f"test accuracy {100 * t['accuracy']:.2f}%, " if t["accuracy"] is not None else ""
    logging.info("Finished: %sbest val accuracy %.2f%% (epoch %d), train time %s. Results in %s",
                 test_text, 100 * best_val, best_epoch + 1, _fmt_time(train_time), result_path)
    return result


def evaluate_checkpoint(config, workdir: str, split: input_pipeline.Split,
                        which: str = "best") -> Dict[str, float]:
    """Loss and accuracy of a run's best (or latest) checkpoint on `split`."""
    steps = compiled_steps(static_spec(config, 1, jax.device_count()))
    shape = RunShape(len(split), config.batch_size, 1, config.num_epochs)
    template = create_train_state(jax.random.PRNGKey(config.seed), config, build_model(config),
                                  shape)
    ckpts = Checkpoints(workdir, config.checkpoint_max_to_keep)
    target = _state_for_checkpoint(template, Metrics.empty())
    found = ckpts.restore_best(target) if which == "best" else ckpts.restore_latest(target)
    ckpts.close()
    if found is None:
        raise FileNotFoundError(f"No {which} checkpoint in {workdir}.")
    state, _ = _from_checkpoint(template, found[1])
    state = jax.device_put(state, steps.replicated)
    return evaluate(steps, state, put_eval_split(split, config.eval_batch_size, steps.replicated))


def _stop_message(stop: "_SignalFlag", state: TrainState, epoch: int, workdir: str) -> str:
    why = signal.Signals(stop.received).name if stop.received is not None else "request"
    return (f"Stopped by {why} at step {int(state.step)} (epoch {epoch + 1}); checkpoint saved "
            f"in {workdir}/checkpoints. Run the same command again to resume.")


def _truncate_jsonl(path: str, max_step: int):
    """Drops per-epoch records written after the checkpoint a run resumes from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    keep = [r for r in records if r["step"] <= max_step]
    if len(keep) != len(records):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)


def steps_warmup(config, shape: RunShape) -> int:
    return int(round(config.warmup_epochs * shape.steps_per_epoch))


def _check_finite(pending, ckpts: Checkpoints):
    """Raises Diverged naming the first step whose loss was not finite."""
    if not pending:
        return
    losses = jax.device_get([loss for _, loss in pending])
    for (step, _), loss in zip(pending, losses):
        if not np.isfinite(loss):
            ckpts.wait()
            good = ckpts.latest.latest_step()
            raise Diverged(
                f"Non-finite loss ({loss}) at step {step + 1}. The last good checkpoint is "
                f"{ckpts.workdir}/checkpoints/{good} and stays intact." if good is not None else
                f"Non-finite loss ({loss}) at step {step + 1}; no checkpoint was saved yet.")
