"""Optimizers and the learning-rate schedule, with PyTorch's weight-decay semantics.

The peak learning rate and the weight decay are injected hyperparameters
(`optax.inject_hyperparams`): they live in the optimizer state as data, so trials that differ
only in them reuse one compiled train step. The transformation itself is cached per structure.
"""

import functools

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")


def unit_schedule(total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Multiplier of the peak learning rate: optional linear warm-up, then cosine to 0.

    Evaluated at the number of updates already applied, this is the per-iteration form of
    PyTorch's CosineAnnealingLR(T_max=total_steps) stepped after every optimizer step.
    """
    if warmup_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0)
    return optax.cosine_decay_schedule(1.0, max(total_steps, 1))


def _kernels_only(params):
    """Decay mask that skips BatchNorm scales/biases and all biases (ndim < 2)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@functools.lru_cache(maxsize=None)
def make_optimizer(name: str, total_steps: int, warmup_steps: int = 0, momentum: float = 0.9,
                   nesterov: bool = False, decay_bn_and_bias: bool = True):
    """Returns an optax transformation with injected `learning_rate` and `weight_decay`.

    sgd:   torch.optim.SGD(momentum, weight_decay): g += wd * p; buf = m * buf + g.
    adam:  torch.optim.Adam(weight_decay): coupled L2, g += wd * p before the moments.
    adamw: torch.optim.AdamW: decoupled, p -= lr * (adam_update + wd * p).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
    schedule = unit_schedule(total_steps, warmup_steps)
    mask = None if decay_bn_and_bias else _kernels_only

    def build(learning_rate, weight_decay):
        decay = optax.add_decayed_weights(weight_decay, mask)
        if name == "sgd":
            core = [decay, optax.trace(decay=momentum, nesterov=nesterov)]
        elif name == "adam":
            core = [decay, optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
        else:
            core = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), decay]
        return optax.chain(*core, optax.scale_by_schedule(schedule),
                           optax.scale_by_learning_rate(learning_rate))

    return optax.inject_hyperparams(build)(learning_rate=0.0, weight_decay=0.0)


def with_hyperparams(opt_state, learning_rate: float, weight_decay: float):
    """Sets the injected hyperparameters of a fresh optimizer state."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    hp["weight_decay"] = jnp.asarray(weight_decay, jnp.float32)
    return opt_state._replace(hyperparams=hp)


def learning_rate_at(step, peak_learning_rate, total_steps: int, warmup_steps: int = 0):
    """The learning rate used by the update at `step` (number of updates already applied)."""
    return peak_learning_rate * unit_schedule(total_steps, warmup_steps)(step)
