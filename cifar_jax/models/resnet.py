"""ResNet-18 (torchvision topology) adapted to 32x32 CIFAR images.

Changes from the ImageNet model: the stem is a 3x3 stride-1 convolution and there is no
max-pool, so the 32x32 input keeps its resolution through the first stage.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import (BatchNorm, conv_kaiming_fan_out, torch_default_bias,
                                     torch_default_kernel)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN projection when shape changes."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda f, k, s, p, name: nn.Conv(  # noqa: E731 - local shorthand
            f, (k, k), (s, s), padding=((p, p), (p, p)), use_bias=False,
            kernel_init=conv_kaiming_fan_out, dtype=self.dtype, name=name)
        norm = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)  # noqa: E731

        y = conv(self.features, 3, self.strides, 1, "conv1")(x)
        y = nn.relu(norm("bn1")(y))
        y = conv(self.features, 3, 1, 1, "conv2")(y)
        y = norm("bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.strides, 0, "downsample_conv")(x)
            x = norm("downsample_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR: [2, 2, 2, 2] BasicBlocks of width 64-128-256-512."""

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        del dropout_rate  # ResNet-18 has no dropout; accepted for a uniform model interface.
        x = x.astype(self.dtype)
        x = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    kernel_init=conv_kaiming_fan_out, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = BasicBlock(width, strides, dtype=self.dtype,
                               name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                     bias_init=torch_default_bias(x.shape[-1]), dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)
