"""Layers shared by the CIFAR models, written to match PyTorch semantics exactly.

The models have a PyTorch twin (`cifar_jax.torch_twin`) that must agree layer for layer,
so the few places where Flax defaults differ from PyTorch are pinned down here.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convs of ResNet and MobileNetV2 with kaiming_normal_(mode="fan_out",
# nonlinearity="relu"): an untruncated normal with variance 2 / fan_out.
conv_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default for nn.Conv2d / nn.Linear weights (kaiming_uniform_(a=sqrt(5))) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    A bias initialiser cannot see the kernel, so the layer passes its fan-in. Without BatchNorm
    (AlexNet) these non-zero biases keep early ReLUs alive; zeros train measurably slower.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics.

    Differs from `flax.linen.BatchNorm` in one way that matters for parity with PyTorch: the
    running variance is updated with the *unbiased* batch variance (n / (n - 1)), as
    `torch.nn.BatchNorm2d` does, while normalisation uses the biased one. Under `jit` with a
    batch sharded over devices the reductions are global, so statistics cover the global batch.

    Attributes:
      use_running_average: evaluation mode (use and do not update the running statistics).
      momentum: Flax-style momentum: running = momentum * running + (1 - momentum) * batch.
        0.9 here equals PyTorch's momentum=0.1.
      epsilon: added to the variance, as in PyTorch (1e-5).
      dtype: computation dtype (e.g. bfloat16); statistics and parameters stay float32.
    """

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        # Statistics in at least float32 (bfloat16 compute keeps float32 statistics).
        stat_dtype = jnp.promote_types(self.dtype, jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(stat_dtype)
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = x.size // features
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased

        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        y = x.astype(stat_dtype) * mul + (bias - mean * mul)
        return y.astype(self.dtype)


def dropout(x, rate, *, deterministic: bool, rng_collection: str = "dropout", module: nn.Module):
    """Inverted dropout whose rate may be a traced value.

    `flax.linen.Dropout` needs a Python float rate, which would make every dropout value a
    separate compilation. Passing the rate as data lets a grid reuse one compiled step.
    """
    if deterministic:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(module.make_rng(rng_collection), keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


# How a depthwise convolution is computed (config.depthwise): 'grouped' is XLA's grouped
# convolution, 'shifts' the same sum written as k*k shifted multiply-adds, 'auto' shifts on the
# CPU (XLA:CPU has no fast grouped convolution: a 3x3 depthwise layer of MobileNetV2, forward
# and backward, runs 5x faster as shifts) and grouped elsewhere (cuDNN's depthwise kernels; a
# GPU measurement may move this), chosen when the program is lowered for its platform, so an
# exported program carries both.
DEPTHWISE_IMPLS = ("auto", "shifts", "grouped")


def depthwise_shifts(x, kernel, strides: int):
    """A k x k depthwise convolution with 'same' zero padding, as k*k shifted multiply-adds.

    x: [N, H, W, C]; kernel: [k, k, 1, C] (nn.Conv's layout). Equal to
    `lax.conv_general_dilated(..., feature_group_count=C)` up to float rounding (the sum runs
    in another order); XLA fuses it into one loop over the output, forward and backward.
    """
    k = kernel.shape[0]
    pad = (k - 1) // 2
    n, h, w, c = x.shape
    ho, wo = (h + 2 * pad - k) // strides + 1, (w + 2 * pad - k) // strides + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            window = jax.lax.slice(
                padded, (0, i, j, 0),
                (n, i + strides * (ho - 1) + 1, j + strides * (wo - 1) + 1, c),
                (1, strides, strides, 1))
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nn.Module):
    """A k x k depthwise convolution (one filter per channel, no bias, 'same' padding) whose
    parameter is exactly `nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)`'s: a
    `kernel` of shape [k, k, 1, C], drawn by the same initialiser. So either `impl` gives the
    same initialisation and reads the same checkpoints.
    """

    kernel_size: int = 3
    strides: int = 1
    impl: str = "auto"  # see DEPTHWISE_IMPLS
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, channels), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)  # as nn.Conv promotes
        forms = {"shifts": functools.partial(depthwise_shifts, strides=self.strides),
                 "grouped": functools.partial(depthwise_grouped, strides=self.strides)}
        if self.impl == "auto":
            return jax.lax.platform_dependent(x, kernel, cpu=forms["shifts"],
                                              default=forms["grouped"])
        if self.impl not in forms:
            raise ValueError(f"Unknown depthwise implementation {self.impl!r}; valid: "
                             f"{', '.join(DEPTHWISE_IMPLS)}.")
        return forms[self.impl](x, kernel)


def depthwise_grouped(x, kernel, strides: int):
    """The same convolution as `depthwise_shifts`, as XLA's grouped convolution."""
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])
