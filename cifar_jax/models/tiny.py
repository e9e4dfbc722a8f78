"""TinyCNN: a two-block CNN of 5,466 parameters for tests and quick checks of the
pipeline, not a model of the study.

3x3 conv (16) + BatchNorm + ReLU + 2x2 max-pool, 3x3 conv (32) + BatchNorm + ReLU, global
average pool, dropout, Dense. It has what the study's models have that the machinery must
handle (BatchNorm statistics, dropout, convolutions and a classifier) at a size that compiles
in a second and checkpoints in kilobytes.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import (BatchNorm, dropout, torch_default_bias,
                                     torch_default_kernel)


class TinyCNN(nn.Module):
    classifier = "fc"  # the classifier layer's name (not a field)
    num_classes: int = 10
    dropout_rate: float = 0.2  # default; the train step may pass the rate as data instead
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate

        def block(y, features, name):
            y = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                        kernel_init=torch_default_kernel, dtype=self.dtype, name=f"conv{name}")(y)
            return nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype,
                                     name=f"bn{name}")(y))

        x = x.astype(self.dtype)
        x = nn.max_pool(block(x, 16, 1), (2, 2), (2, 2))
        x = block(x, 32, 2).mean(axis=(1, 2))
        x = dropout(x, rate, deterministic=not train, module=self)
        x = nn.Dense(self.num_classes, kernel_init=torch_default_kernel,
                     bias_init=torch_default_bias(x.shape[-1]), dtype=self.dtype,
                     name=self.classifier)(x)
        return x.astype(jnp.float32)
