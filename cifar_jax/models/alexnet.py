"""AlexNet adapted to 32x32 CIFAR images (no BatchNorm).

Five 3x3 convs (the first at stride 2) with three 2x2 max-pools leave a 2x2x256 map, which
feeds a 4096-4096-10 classifier with dropout before each hidden Dense layer (`hidden`: 4096,
the study's width; a test uses a narrower one).
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models.layers import dropout, torch_default_bias, torch_default_kernel


class AlexNet(nn.Module):
    classifier = "fc3"  # the classifier layer's name (not a field)
    num_classes: int = 10
    dropout_rate: float = 0.5  # default; the train step may pass the rate as data instead
    hidden: int = 4096  # width of the two hidden Dense layers
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, dropout_rate: Optional[Any] = None):
        rate = self.dropout_rate if dropout_rate is None else dropout_rate
        def conv(y, f, s, name):
            return nn.Conv(f, (3, 3), (s, s), padding=((1, 1), (1, 1)),
                           kernel_init=torch_default_kernel,
                           bias_init=torch_default_bias(9 * y.shape[-1]),
                           dtype=self.dtype, name=name)(y)

        def dense(y, f, name):
            return nn.Dense(f, kernel_init=torch_default_kernel,
                            bias_init=torch_default_bias(y.shape[-1]), dtype=self.dtype,
                            name=name)(y)

        pool = lambda y: nn.max_pool(y, (2, 2), (2, 2))  # noqa: E731

        x = x.astype(self.dtype)
        x = pool(nn.relu(conv(x, 64, 2, "conv1")))
        x = pool(nn.relu(conv(x, 192, 1, "conv2")))
        x = nn.relu(conv(x, 384, 1, "conv3"))
        x = nn.relu(conv(x, 256, 1, "conv4"))
        x = pool(nn.relu(conv(x, 256, 1, "conv5")))
        # Flatten in PyTorch's (C, H, W) order so converted weights line up with the twin.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = dropout(x, rate, deterministic=not train, module=self)
        x = nn.relu(dense(x, self.hidden, "fc1"))
        x = dropout(x, rate, deterministic=not train, module=self)
        x = nn.relu(dense(x, self.hidden, "fc2"))
        x = dense(x, self.num_classes, self.classifier)
        return x.astype(jnp.float32)
