"""ResNet-18 and ResNet-50 (torchvision topology) adapted to 32x32 CIFAR images, and their
ImageNet forms (transfer learning from torchvision's weights).

Changes from the ImageNet models: the stem is a 3x3 stride-1 convolution and there is no
max-pool, so the 32x32 input keeps its resolution through the first stage. `stem='imagenet'`
restores torchvision's own stem (7x7 stride-2 convolution, 3x3 stride-2 max-pool), the rest
being the same blocks. Optional dropout before the classifier (default 0: the torchvision
models have none).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import (BatchNorm, conv_kaiming_fan_out, dropout,
                                     torch_default_bias, torch_default_kernel)


def _conv(features, kernel, strides, dtype, name):
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=conv_kaiming_fan_out, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 conv + BN projection when the shape changes."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)  # noqa: E731
        y = nn.relu(norm("bn1")(_conv(self.features, 3, self.strides, self.dtype, "conv1")(x)))
        y = norm("bn2")(_conv(self.features, 3, 1, self.dtype, "conv2")(y))
        return nn.relu(_shortcut(self, x, self.features, norm) + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's ResNet v1.5), 1x1 expand by 4."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)  # noqa: E731
        out = self.features * self.expansion
        y = nn.relu(norm("bn1")(_conv(self.features, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(norm("bn2")(_conv(self.features, 3, self.strides, self.dtype, "conv2")(y)))
        y = norm("bn3")(_conv(out, 1, 1, self.dtype, "conv3")(y))
        return nn.relu(_shortcut(self, x, out, norm) + y)


def _shortcut(block, x, features, norm):
    if block.strides != 1 or x.shape[-1] != features:
        x = _conv(features, 1, block.strides, block.dtype, "downsample_conv")(x)
        x = norm("downsample_bn")(x)
    return x


class ResNet(nn.Module):
    """CIFAR ResNet: stages of `block` of width 64-128-256-512 (times the block's expansion)."""

    classifier = "fc"  # the classifier layer's name (not a field)

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: Any = BasicBlock
    widths: Sequence[int] = (64, 128, 256, 512)
    dropout_rate: float = 0.0  # default; the train step passes the rate as data
    dtype: Any = jnp.float32
    stem: str = "cifar"  # 'cifar': 3x3 stride 1; 'imagenet': torchvision's 7x7/2 + max-pool/2

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        x = x.astype(self.dtype)
        imagenet = self.stem == "imagenet"
        x = _conv(64, 7 if imagenet else 3, 2 if imagenet else 1, self.dtype, "conv1")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn1")(x))
        if imagenet:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block(width, strides, dtype=self.dtype,
                               name=f"layer{stage + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = dropout(x, rate, deterministic=not train, module=self)
        x = nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                     bias_init=torch_default_bias(x.shape[-1]), dtype=self.dtype,
                     name=self.classifier)(x)
        return x.astype(jnp.float32)


class ResNet18(ResNet):
    """ResNet-18 for CIFAR: [2, 2, 2, 2] BasicBlocks."""


class ResNet50(ResNet):
    """ResNet-50 for CIFAR: [3, 4, 6, 3] Bottlenecks (23.5M parameters)."""

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block: Any = Bottleneck


class ResNet18ImageNet(ResNet18):
    """torchvision's ResNet-18 (ImageNet stem), to fine-tune from its ImageNet weights."""

    stem: str = "imagenet"


class ResNet50ImageNet(ResNet50):
    """torchvision's ResNet-50 (ImageNet stem), to fine-tune from its ImageNet weights."""

    stem: str = "imagenet"
