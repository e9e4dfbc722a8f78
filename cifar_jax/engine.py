"""Compiled training and evaluation for a pack of K trials of one model (a single run: K = 1).

Everything here is written for one trial and then packed: `pack` vmaps a per-trial function
over a leading trial axis (K > 1) or squeezes that axis away (K = 1, so a single run compiles to
the plain, unbatched program). What differs between the trials of one model is data: the
optimizer kind, learning rate and weight decay live in the optimizer state, the dropout rate,
label smoothing, augmentation and EMA decay in `state.hyper`, the seed in `state.rng`. So the
study's grid compiles once per model; what does require a compile is `StaticSpec` (e.g. the
warm-up length, EMA on or off, the pack size).

A chunk of steps runs as one `fori_loop` inside one dispatch, with the metrics accumulated on
the device and a trial frozen at its last finite state when its loss stops being finite.
Randomness is a pure function of (seed, step), so a resumed run continues exactly.
"""

import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cifar_jax import augment, datasets, input_pipeline, models, optim

# Sub-streams of a trial's key: each random choice has its own, folded with step or epoch.
_INIT, _SHUFFLE, _AUGMENT, _DROPOUT = range(4)
# config.precision -> jax.default_matmul_precision (None: the backend's default, which is
# TF32 for float32 convolutions and matmuls on NVIDIA GPUs since Ampere).
PRECISIONS = {"default": None, "tf32": "tensorfloat32", "highest": "highest"}


@flax.struct.dataclass
class Hyper:
    """Per-trial hyperparameters the step reads as data (the optimizer's are in its state)."""

    dropout_rate: jax.Array
    label_smoothing: jax.Array
    augmentation: jax.Array  # index into augment.AUGMENTATIONS
    ema_decay: jax.Array


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # the trial's base key; per-step keys are folded from it
    hyper: Hyper
    ema: Any  # {"params", "batch_stats"} averaged over steps; None when EMA is off


@flax.struct.dataclass
class Metrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Accuracy


@flax.struct.dataclass
class Progress:
    """What a trial accumulates on the device between host syncs."""

    epoch: Metrics  # since the start of the epoch
    chunk: Metrics  # since the start of the last chunk
    first_bad_step: jax.Array  # the step whose loss was first non-finite; -1 while none was
    bad_loss: jax.Array

    @classmethod
    def empty(cls) -> "Progress":
        return cls(Metrics.empty(), Metrics.empty(), jnp.asarray(-1, jnp.int32),
                   jnp.asarray(0.0, jnp.float32))


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    """Everything that shapes a compiled program; trials that share it share the programs."""

    model: str
    dataset: str  # datasets.DATASETS: the classifier's size and the normalisation statistics
    image_size: int  # the side images are resized to on the device (the data stay 32x32)
    dtype: str
    precision: str
    batch_size: int
    eval_batch_size: int
    num_train: int
    num_epochs: int
    warmup_epochs: float
    momentum: float
    nesterov: bool
    decay_bn_and_bias: bool
    ema: bool  # keep an exponential moving average of the weights (evaluated instead)
    tta_flip: bool  # evaluate on the image and its mirror image, logits averaged
    device_loop: bool  # a chunk of steps is one on-device loop (else one dispatch per step)
    depthwise: str  # how depthwise convolutions are computed (models.layers.DEPTHWISE_IMPLS)
    # Knowledge distillation (distill.py): the teacher's architecture ('' = none), run in
    # inference mode on the step's batch, and the loss's temperature and weight.
    teacher: str
    distill_temperature: float
    distill_alpha: float
    # Fine-tuning (configs/transfer.py): the learning rate's factor for everything but the
    # classifier, which stays still for the first `freeze_epochs`.
    backbone_lr_scale: float
    freeze_epochs: float
    pack_size: int
    num_devices: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_epochs * self.steps_per_epoch))

    @property
    def freeze_steps(self) -> int:
        return int(round(self.freeze_epochs * self.steps_per_epoch))


def device_loop(step_loop: str, platform: str) -> bool:
    """config.step_loop -> whether a chunk runs as an on-device loop. 'auto' loops everywhere
    but on the CPU, where XLA runs convolutions inside a loop several times slower than
    outside one (jax issue #12868; AlexNet here: 7x at batch 16, 29x at batch 128): there each
    step is its own dispatch, still without a host sync until the chunk ends."""
    if step_loop == "auto":
        return platform != "cpu"
    return step_loop == "device"


def eval_batch_size(config, largest_eval: Optional[int], num_devices: int = 1) -> int:
    """config.eval_batch_size, or the largest evaluation split (rounded up to a multiple of the
    devices) where that is smaller: evaluation pads and masks, so the result is the same, and
    a batch larger than every split would only evaluate padding."""
    if largest_eval is None or config.eval_batch_size <= largest_eval:
        return config.eval_batch_size
    return -(-largest_eval // num_devices) * num_devices


def static_spec(config, num_train: int, pack_size: int = 1, num_devices: int = 1,
                largest_eval: Optional[int] = None, teacher: str = "") -> StaticSpec:
    """The compiled structure of `config`'s runs on a training set of `num_train` images
    (`largest_eval`: the size of its largest evaluation split, see `eval_batch_size`;
    `teacher`: the architecture of its distillation teacher, if it has one)."""
    distill = config.get("distill") or {}
    return StaticSpec(
        model=config.model, dataset=datasets.of_config(config).name,
        image_size=int(config.data.get("image_size", 32)), dtype=config.dtype,
        precision=config.precision,
        batch_size=config.batch_size,
        eval_batch_size=eval_batch_size(config, largest_eval, num_devices),
        num_train=num_train, num_epochs=config.num_epochs,
        warmup_epochs=float(config.warmup_epochs), momentum=float(config.momentum),
        nesterov=bool(config.nesterov), decay_bn_and_bias=bool(config.decay_bn_and_bias),
        ema=config.ema_decay > 0, tta_flip=bool(config.tta_flip),
        device_loop=device_loop(config.step_loop, jax.default_backend()),
        depthwise=config.get("depthwise", "auto"),  # .get: configs stored before the field
        teacher=teacher,
        distill_temperature=float(distill.get("temperature", 1.0)) if teacher else 1.0,
        distill_alpha=float(distill.get("alpha", 0.0)) if teacher else 0.0,
        backbone_lr_scale=float(config.get("backbone_lr_scale", 1.0)),
        freeze_epochs=float(config.get("freeze_backbone_epochs", 0.0)),
        pack_size=pack_size,
        num_devices=num_devices)


def hyper_of(config) -> Hyper:
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return Hyper(dropout_rate=f32(models.dropout_rate(config.model, config.dropout_rate)),
                 label_smoothing=f32(config.label_smoothing),
                 augmentation=jnp.asarray(augment.augmentation_index(config.data.augmentation),
                                          jnp.int32),
                 ema_decay=f32(config.ema_decay))


def with_config_hyperparameters(state: TrainState, config) -> TrainState:
    """`state` with the config's hyperparameters: the config is their source of truth, also on
    resume (they differ from the checkpoint's only under allow_config_change). A changed
    optimizer kind starts its moments afresh, as the PyTorch twin's new optimizer does."""
    previous = optim.OPTIMIZERS[int(state.opt_state.hyperparams["optimizer"])]
    if previous != config.optimizer:
        logging.warning("The optimizer changes from %s to %s (allow_config_change): its moments "
                        "start afresh; the schedule goes on.", previous, config.optimizer)
        state = state.replace(opt_state=optim.with_fresh_moments(
            state.opt_state, state.tx.init(state.params)))
    return _set_hyperparameters(state, config)


def _set_hyperparameters(state: TrainState, config) -> TrainState:
    return state.replace(hyper=hyper_of(config), opt_state=optim.with_hyperparams(
        state.opt_state, config.optimizer, config.learning_rate, config.weight_decay))


def cross_entropy_loss(logits, labels, label_smoothing=0.0):
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def distillation_loss(logits, teacher_logits, labels, temperature: float, alpha: float,
                      label_smoothing=0.0):
    """Per-example (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T)
    (Hinton et al. 2015; T^2 keeps the soft term's gradients at the hard term's scale)."""
    soft = optax.kl_divergence(jax.nn.log_softmax(logits / temperature),
                               jax.nn.softmax(teacher_logits / temperature))
    return ((1.0 - alpha) * cross_entropy_loss(logits, labels, label_smoothing)
            + alpha * temperature ** 2 * soft)


def _loss(logits, x, y, teacher, state: TrainState, spec: StaticSpec):
    """The per-example training loss: cross-entropy, or with a teacher (and alpha > 0) the
    distillation loss against its inference-mode logits of the same batch `x`."""
    if not spec.teacher or spec.distill_alpha == 0:
        return cross_entropy_loss(logits, y, state.hyper.label_smoothing)
    teacher_model = models.get_model(spec.teacher, num_classes=logits.shape[-1])
    teacher_logits = jax.lax.stop_gradient(teacher_model.apply(teacher, x, train=False))
    return distillation_loss(logits, teacher_logits, y, spec.distill_temperature,
                             spec.distill_alpha, state.hyper.label_smoothing)


# ----------------------------------------------------------------------------------------------
# One trial.


def train_step(state: TrainState, images, labels, perm, teacher, *, spec: StaticSpec,
               sharding=None):
    """One update on the next batch of the epoch's order `perm`: gather, augment, forward,
    backward, update (`teacher`: the distillation teacher's variables, or {}). Returns the new
    state, the step's metrics and its mean loss."""
    start = (state.step % spec.steps_per_epoch) * spec.batch_size
    idx = jax.lax.dynamic_slice(perm, (start,), (spec.batch_size,))
    key = lambda stream: jax.random.fold_in(jax.random.fold_in(state.rng, stream), state.step)  # noqa: E731
    x = augment.augment(key(_AUGMENT), images[idx], state.hyper.augmentation,
                        jnp.dtype(spec.dtype), datasets.get(spec.dataset), spec.image_size)
    y = labels[idx]
    if sharding is not None:
        x, y = (jax.lax.with_sharding_constraint(a, sharding) for a in (x, y))

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            dropout_rate=state.hyper.dropout_rate, mutable=["batch_stats"],
            rngs={"dropout": key(_DROPOUT)})
        per_example = _loss(logits, x, y, teacher, state, spec)
        return per_example.mean(), (per_example, logits, updates)

    grads, (per_example, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    new = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    if spec.ema:
        averaged = {"params": new.params, "batch_stats": new.batch_stats}
        new = new.replace(ema=optax.incremental_update(averaged, state.ema,
                                                       1.0 - state.hyper.ema_decay))
    step_metrics = Metrics.single_from_model_output(loss=per_example, logits=logits, labels=y)
    return new, step_metrics, per_example.mean()


def guarded_step(state: TrainState, progress: Progress, images, labels, perm, teacher,
                 **kwargs):
    """`train_step`, except that a trial whose loss is not finite keeps its last finite state
    (it is frozen there) and records the step."""
    new, step_metrics, loss = train_step(state, images, labels, perm, teacher, **kwargs)
    ok = jnp.isfinite(loss) & (progress.first_bad_step < 0)
    bad_now = ~jnp.isfinite(loss) & (progress.first_bad_step < 0)
    progress = Progress(
        epoch=progress.epoch.merge(step_metrics), chunk=progress.chunk.merge(step_metrics),
        first_bad_step=jnp.where(bad_now, state.step + 1, progress.first_bad_step),
        bad_loss=jnp.where(bad_now, loss, progress.bad_loss))
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), progress


def train_loop(state, progress, images, labels, perm, teacher, num_steps, **kwargs):
    """`num_steps` guarded steps in one loop (the count is data: one compile for any chunk)."""
    progress = progress.replace(chunk=Metrics.empty())

    def body(_, carry):
        return guarded_step(*carry, images, labels, perm, teacher, **kwargs)

    return jax.lax.fori_loop(0, num_steps, body, (state, progress))


def eval_logits(state: TrainState, x, spec: StaticSpec):
    weights = state.ema if spec.ema else {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(weights, x, train=False)
    if spec.tta_flip:  # horizontal-flip test-time augmentation: average the two views
        logits = 0.5 * (logits + state.apply_fn(weights, x[:, :, ::-1, :], train=False))
    return logits


def evaluate_batch(state, images, labels, mask, batch, *, spec: StaticSpec,
                   sharding=None) -> Metrics:
    """Metrics of padded batch number `batch` (masked examples do not count)."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(  # noqa: E731
        a, batch * spec.eval_batch_size, spec.eval_batch_size)
    x, y, m = take(images), take(labels), take(mask)
    if sharding is not None:
        x, y, m = (jax.lax.with_sharding_constraint(a, sharding) for a in (x, y, m))
    x = augment.normalize(x, jnp.dtype(spec.dtype), datasets.get(spec.dataset), spec.image_size)
    logits = eval_logits(state, x, spec)
    return Metrics.single_from_model_output(loss=cross_entropy_loss(logits, y), logits=logits,
                                            labels=y, mask=m)


def evaluate_batches(state, images, labels, mask, first_batch, num_batches, **kwargs) -> Metrics:
    """Metrics over `num_batches` padded batches from `first_batch` on, in one loop."""
    def body(i, total):
        return total.merge(evaluate_batch(state, images, labels, mask, first_batch + i,
                                          **kwargs))

    return jax.lax.fori_loop(0, num_batches, body, Metrics.empty())


def permutation(state: TrainState, epoch, *, num_train: int):
    """The trial's order of the training set in `epoch`."""
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _SHUFFLE), epoch)
    return jax.random.permutation(key, num_train)


# ----------------------------------------------------------------------------------------------
# Packs.


def pack(fn: Callable, pack_size: int, in_axes: Sequence) -> Callable:
    """`fn` of one trial -> `fn` of a pack: arguments with in_axes 0 (and every output) carry a
    leading trial axis of size `pack_size`. K = 1 squeezes it away instead of vmapping."""
    if pack_size > 1:
        return jax.vmap(fn, in_axes=tuple(in_axes))

    def single(*args):
        args = [jax.tree.map(lambda x: x[0], a) if axis == 0 else a
                for a, axis in zip(args, in_axes)]
        return jax.tree.map(lambda x: x[None], fn(*args))

    return single


def fetch(tree: Any) -> Any:
    """`tree`'s replicated arrays as numpy, from this process's own copy: with several
    processes, a global array spans devices another process owns (`jax.device_get` refuses)."""
    local = lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x  # noqa: E731
    return jax.device_get(jax.tree.map(local, tree))


def stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, index: int) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


class Programs:
    """The compiled programs of one StaticSpec on a data-parallel mesh over the devices of
    every process (of this one, outside multi-process mode)."""

    def __init__(self, spec: StaticSpec, traces: collections.Counter):
        self.spec = spec
        devices = np.array(jax.devices()[: spec.num_devices])
        self.mesh = Mesh(devices, ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        batch = NamedSharding(self.mesh, P("data"))
        precision = PRECISIONS[spec.precision]
        model = models.get_model(spec.model, spec.depthwise, dtype=jnp.dtype(spec.dtype),
                                 num_classes=datasets.get(spec.dataset).num_classes)
        self.tx = optim.make_optimizer(spec.total_steps, spec.warmup_steps, spec.momentum,
                                       spec.nesterov, spec.decay_bn_and_bias,
                                       models.classifier_name(spec.model),
                                       spec.backbone_lr_scale, spec.freeze_steps)
        self.apply_fn = model.apply
        self._init = jax.jit(functools.partial(model.init, train=False))
        K = spec.pack_size

        def traced(fn, count_as=None):
            def wrapper(*args):
                if count_as:
                    traces[(spec.model, count_as)] += 1  # runs once per trace (compile)
                with jax.default_matmul_precision(precision):
                    return fn(*args)
            return wrapper

        train_args = (0, 0, None, None, 0, None)  # states, progress, images, labels, perms,
        # and the teacher's variables (arguments, not constants baked into the program)
        if spec.device_loop:
            chunk = functools.partial(train_loop, spec=spec, sharding=batch)
            self._train_loop = jax.jit(traced(pack(chunk, K, train_args + (None,)), "train"),
                                       donate_argnums=(0, 1), out_shardings=self.replicated)
        else:
            step = functools.partial(guarded_step, spec=spec, sharding=batch)
            self._train_step = jax.jit(traced(pack(step, K, train_args), "train"),
                                       donate_argnums=(0, 1), out_shardings=self.replicated)
            self._reset_chunk = jax.jit(
                lambda p: p.replace(chunk=jax.tree.map(jnp.zeros_like, p.chunk)),
                donate_argnums=0, out_shardings=self.replicated)
        eval_args = (0, None, None, None, None)  # states, images, labels, mask, batch
        if spec.device_loop:
            evaluate = functools.partial(evaluate_batches, spec=spec, sharding=batch)
            self._eval_loop = jax.jit(traced(pack(evaluate, K, eval_args + (None,)), "eval"),
                                      out_shardings=self.replicated)
        else:
            evaluate = functools.partial(evaluate_batch, spec=spec, sharding=batch)
            self._eval_batch = jax.jit(traced(pack(evaluate, K, eval_args), "eval"),
                                       out_shardings=self.replicated)
        self.permutations = jax.jit(
            pack(functools.partial(permutation, num_train=spec.num_train), K, (0, None)),
            out_shardings=self.replicated)

    def train_chunk(self, states, progress, images, labels, perms, num_steps: int,
                    teacher=None):
        """`num_steps` steps of every trial in the pack; nothing waits for the device.
        `teacher`: the distillation teacher's variables on the device (spec.teacher's)."""
        teacher = {} if teacher is None else teacher
        if self.spec.device_loop:
            return self._train_loop(states, progress, images, labels, perms, teacher,
                                    num_steps)
        progress = self._reset_chunk(progress)
        for _ in range(num_steps):
            states, progress = self._train_step(states, progress, images, labels, perms,
                                                teacher)
        return states, progress

    def lowered_train_chunk(self, *args):
        """The on-device chunk program, lowered for these arguments (for HLO inspection)."""
        return self._train_loop.lower(*args)

    def evaluate(self, states, images, labels, mask, first_batch: int, num_batches: int):
        """Metrics of every trial over `num_batches` padded batches from `first_batch` on."""
        if self.spec.device_loop:
            return self._eval_loop(states, images, labels, mask, first_batch, num_batches)
        total = None
        for i in range(first_batch, first_batch + num_batches):
            m = self._eval_batch(states, images, labels, mask, i)
            total = m if total is None else total.merge(m)
        return total

    def init_state(self, config) -> TrainState:
        """A fresh train state of one trial (its seed, its hyperparameters)."""
        rng = jax.random.PRNGKey(config.seed)
        side = self.spec.image_size
        variables = self._init(jax.random.fold_in(rng, _INIT),
                               jnp.zeros((1, side, side, 3), jnp.float32))
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        ema = {"params": params, "batch_stats": batch_stats} if self.spec.ema else None
        state = TrainState.create(apply_fn=self.apply_fn, params=params, tx=self.tx,
                                  batch_stats=batch_stats, rng=rng, hyper=hyper_of(config),
                                  ema=ema)
        return _set_hyperparameters(state, config)

    def to_device(self, tree):
        """`tree` (host arrays) replicated on the mesh. Several processes each put their own
        copy, the same by construction: `jax.device_put` would first compare the copies
        across processes, slowly (the whole data set) and wrongly for NaN (NaN != NaN)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), self.replicated, lambda index: np.asarray(x)[index]), tree)


class Engine:
    """Compiled programs, built once per StaticSpec and reused by every run the caller makes.

    Owned by its caller (main, the grid runner, the benchmark). `traces[(model, kind)]` counts
    how often a program of that model was traced, i.e. compiled or loaded from the persistent
    compilation cache.
    """

    def __init__(self):
        self._programs: Dict[StaticSpec, Programs] = {}
        self.traces: collections.Counter = collections.Counter()

    def programs(self, spec: StaticSpec) -> Programs:
        if spec not in self._programs:
            self._programs[spec] = Programs(spec, self.traces)
        return self._programs[spec]

    def compiles(self, kind: str = "train") -> Dict[str, int]:
        """Traces of `kind` programs per model."""
        out: Dict[str, int] = collections.Counter()
        for (model, k), n in self.traces.items():
            if k == kind:
                out[model] += n
        return dict(out)


# ----------------------------------------------------------------------------------------------
# Evaluation data: validation and test padded into one device array, so that one compiled
# evaluation serves both (the split is chosen by its first batch and batch count).


@dataclasses.dataclass(frozen=True)
class EvalData:
    images: jax.Array
    labels: jax.Array
    mask: jax.Array
    splits: Dict[str, tuple]  # name -> (first batch, number of batches, number of examples)


def put_eval_splits(splits: Dict[str, input_pipeline.Split], batch_size: int,
                    programs: Programs) -> EvalData:
    images, labels, mask, index, first = [], [], [], {}, 0
    for name, split in splits.items():
        n = len(split)
        num_batches = max(1, math.ceil(n / batch_size))
        pad = num_batches * batch_size - n
        images += [split.images, np.zeros((pad, 32, 32, 3), np.uint8)]
        labels += [split.labels, np.zeros((pad,), np.int32)]
        mask += [np.ones((n,), bool), np.zeros((pad,), bool)]
        index[name] = (first, num_batches, n)
        first += num_batches
    put = lambda parts: programs.to_device(np.concatenate(parts))  # noqa: E731
    return EvalData(put(images), put(labels), put(mask), index)


def evaluate(programs: Programs, states: TrainState, data: EvalData,
             split: str) -> List[Dict[str, float]]:
    """Loss and accuracy of every trial of the pack on `split`: one dispatch."""
    first, num_batches, _ = data.splits[split]
    m = fetch(programs.evaluate(states, data.images, data.labels, data.mask, first,
                                num_batches))
    return [{k: float(v) for k, v in unstack(m, i).compute().items()}
            for i in range(programs.spec.pack_size)]
