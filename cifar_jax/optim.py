"""Optimizers and the learning-rate schedule, with PyTorch's weight-decay semantics.

The optimizer kind (SGD-momentum, Adam, AdamW), the peak learning rate and the weight decay are
injected hyperparameters (`optax.inject_hyperparams`): they live in the optimizer state as data,
so every trial of a model reuses one compiled train step.
"""

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")


def optimizer_index(name: str) -> int:
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}.")
    return OPTIMIZERS.index(name)


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
    """Decay mask for convolution and dense kernels only: no decay on norm scales, biases, nor
    the ViT's position embedding and class token."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def _by_kind(kind, weight_decay, mask, momentum: float, nesterov: bool):
    """Direction of one update for optimizer `kind` (a traced index into OPTIMIZERS).

    sgd:   torch.optim.SGD(momentum, weight_decay): g += wd * p; buf = m * buf + g.
    adam:  torch.optim.Adam(weight_decay): coupled L2, g += wd * p before the moments.
    adamw: torch.optim.AdamW: decoupled, the step is adam_update + wd * p.

    One state serves all three: Adam's (count, mu, nu), whose `mu` doubles as the SGD momentum
    buffer (a run uses one kind, so the buffer is never shared), so the state is no larger
    than Adam's. Every kind's update is computed and the one of `kind` selected element by
    element: one elementwise loop per parameter that XLA fuses with the step around it (as
    `lax.switch` branches it could not; AlexNet's 23M-parameter update was the largest
    elementwise cost of its CPU step).
    """
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)

    def update(grads, state, params):
        is_sgd, coupled = kind == 0, kind < 2  # sgd and adam add the decay to the gradient
        masked = mask(params) if callable(mask) else jax.tree.map(lambda _: True, params)
        decay = jax.tree.map(lambda p, m: weight_decay * p if m else None, params, masked)
        add = lambda g, d: g if d is None else g + d  # noqa: E731
        g_in = jax.tree.map(lambda g, d: jnp.where(coupled, add(g, d), g), grads, decay,
                            is_leaf=lambda x: x is None)
        adam_u, adam_state = adam.update(g_in, state, params)
        trace = jax.tree.map(lambda g, t: g + momentum * t, g_in, state.mu)  # optax.trace
        sgd_u = jax.tree.map(lambda g, t: g + momentum * t, g_in, trace) if nesterov else trace
        adamw_u = jax.tree.map(add, adam_u, decay, is_leaf=lambda x: x is None)
        adam_u = jax.tree.map(lambda a, w: jnp.where(kind == 2, w, a), adam_u, adamw_u)
        pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(is_sgd, x, y), a, b)  # noqa: E731
        return pick(sgd_u, adam_u), adam_state._replace(
            count=jnp.where(is_sgd, state.count, adam_state.count),
            mu=pick(trace, adam_state.mu), nu=pick(state.nu, adam_state.nu))

    return optax.GradientTransformation(adam.init, update)


def backbone_scaling(head: str, scale: float, freeze_steps: int):
    """Fine-tuning (optax.multi_transform): updates of every parameter but the classifier
    `head` scaled by `scale`, and by 0 for the first `freeze_steps` updates."""
    factor = lambda step: jnp.where(step < freeze_steps, 0.0, scale)  # noqa: E731
    return optax.multi_transform(
        {"head": optax.identity(), "backbone": optax.scale_by_schedule(factor)},
        lambda params: {k: "head" if k == head else "backbone" for k in params})


def make_optimizer(total_steps: int, warmup_steps: int = 0, momentum: float = 0.9,
                   nesterov: bool = False, decay_bn_and_bias: bool = True, head: str = "",
                   backbone_lr_scale: float = 1.0, freeze_steps: int = 0):
    """An optax transformation with injected `optimizer` (index), `learning_rate` and
    `weight_decay`; set them with `with_hyperparams`. With a `backbone_lr_scale` other than 1
    or `freeze_steps`, the parameters other than the classifier `head` learn slower, or not
    at first (`backbone_scaling`)."""
    schedule = unit_schedule(total_steps, warmup_steps)
    mask = None if decay_bn_and_bias else _kernels_only
    fine_tuning = backbone_lr_scale != 1.0 or freeze_steps > 0

    def build(optimizer, learning_rate, weight_decay):
        return optax.chain(_by_kind(optimizer, weight_decay, mask, momentum, nesterov),
                           optax.scale_by_schedule(schedule),
                           optax.scale_by_learning_rate(learning_rate),
                           *([backbone_scaling(head, backbone_lr_scale, freeze_steps)]
                             if fine_tuning else []))

    return optax.inject_hyperparams(build)(optimizer=0, learning_rate=0.0, weight_decay=0.0)


def with_hyperparams(opt_state, optimizer: str, learning_rate: float, weight_decay: float):
    """Sets the injected hyperparameters of an optimizer state."""
    hp = dict(opt_state.hyperparams)
    hp["optimizer"] = jnp.asarray(optimizer_index(optimizer), jnp.int32)
    hp["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    hp["weight_decay"] = jnp.asarray(weight_decay, jnp.float32)
    return opt_state._replace(hyperparams=hp)


def with_fresh_moments(opt_state, fresh_state):
    """`opt_state` with the moments of `fresh_state` (an `init`) and its own schedule count:
    for a resume that switches the optimizer kind, whose old buffer means nothing to the new
    kind (an SGD momentum buffer is no Adam first moment)."""
    inner = (fresh_state.inner_state[0],) + tuple(opt_state.inner_state[1:])
    return opt_state._replace(inner_state=inner)


def learning_rate_at(step, peak_learning_rate, total_steps: int, warmup_steps: int = 0):
    """The learning rate used by the update at `step` (number of updates already applied)."""
    return peak_learning_rate * unit_schedule(total_steps, warmup_steps)(step)
