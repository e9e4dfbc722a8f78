"""MobileNetV2 (torchvision topology, width 1.0) adapted to 32x32 CIFAR images, and its
ImageNet form (transfer learning from torchvision's weights).

Changes from the ImageNet model: the stem conv and the first t=6 stage (c=24) run at
stride 1 instead of 2, so the network downsamples 32 -> 4 instead of 224 -> 7.
`MobileNetV2ImageNet` keeps torchvision's strides, with the same blocks.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import BatchNorm, DepthwiseConv, conv_kaiming_fan_out, dropout

# (expansion t, output channels c, repeats n, first stride s), CIFAR strides.
CIFAR_INVERTED_RESIDUAL_SETTING: Tuple[Tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in torchvision
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# torchvision's own (ImageNet) strides.
IMAGENET_INVERTED_RESIDUAL_SETTING = tuple(
    (t, c, n, 2 if c == 24 else s) for t, c, n, s in CIFAR_INVERTED_RESIDUAL_SETTING)


def relu6(x):
    return jnp.clip(x, 0, 6)


class ConvBNReLU6(nn.Module):
    features: int
    kernel: int = 1
    strides: int = 1
    depthwise: str = ""  # '' = a full convolution; else depthwise, computed by this impl
    activation: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depthwise:
            assert x.shape[-1] == self.features, "a depthwise layer keeps its channels"
            x = DepthwiseConv(self.kernel, self.strides, self.depthwise,
                              kernel_init=conv_kaiming_fan_out, dtype=self.dtype, name="conv")(x)
        else:
            pad = (self.kernel - 1) // 2
            x = nn.Conv(self.features, (self.kernel, self.kernel), (self.strides, self.strides),
                        padding=((pad, pad), (pad, pad)), use_bias=False,
                        kernel_init=conv_kaiming_fan_out, dtype=self.dtype, name="conv")(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        return relu6(x) if self.activation else x


class InvertedResidual(nn.Module):
    features: int
    strides: int
    expansion: int
    depthwise: str = "auto"  # how the depthwise layer is computed (layers.DEPTHWISE_IMPLS)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        in_features = x.shape[-1]
        hidden = in_features * self.expansion
        y = x
        if self.expansion != 1:
            y = ConvBNReLU6(hidden, 1, dtype=self.dtype, name="expand")(y, train)
        y = ConvBNReLU6(hidden, 3, self.strides, depthwise=self.depthwise, dtype=self.dtype,
                        name="depthwise")(y, train)
        y = ConvBNReLU6(self.features, 1, activation=False, dtype=self.dtype,
                        name="project")(y, train)
        if self.strides == 1 and in_features == self.features:
            return x + y
        return y


class MobileNetV2(nn.Module):
    classifier = "classifier"  # the classifier layer's name (not a field)
    num_classes: int = 10
    dropout_rate: float = 0.2
    setting: Sequence[Tuple[int, int, int, int]] = CIFAR_INVERTED_RESIDUAL_SETTING
    # How the depthwise layers are computed: 'auto' (shifted multiply-adds on the CPU, XLA's
    # grouped convolution elsewhere), 'shifts' or 'grouped'; the same parameters either way.
    depthwise: str = "auto"
    dtype: Any = jnp.float32
    stem_strides: int = 1  # 2 in torchvision

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        x = x.astype(self.dtype)
        x = ConvBNReLU6(32, 3, self.stem_strides, dtype=self.dtype, name="stem")(x, train)
        index = 0
        for t, c, n, s in self.setting:
            for i in range(n):
                x = InvertedResidual(c, s if i == 0 else 1, t, self.depthwise, dtype=self.dtype,
                                     name=f"block{index}")(x, train)
                index += 1
        x = ConvBNReLU6(1280, 1, dtype=self.dtype, name="head")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = dropout(x, rate, deterministic=not train, module=self)
        # torchvision: Linear weights ~ N(0, 0.01), bias 0.
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                     dtype=self.dtype, name=self.classifier)(x)
        return x.astype(jnp.float32)


class MobileNetV2ImageNet(MobileNetV2):
    """torchvision's MobileNetV2 (its strides), to fine-tune from its ImageNet weights."""

    setting: Sequence[Tuple[int, int, int, int]] = IMAGENET_INVERTED_RESIDUAL_SETTING
    stem_strides: int = 2
