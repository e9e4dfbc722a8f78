"""cifar_jax: a functional JAX/Flax CIFAR-10 study of ResNet-18, AlexNet and MobileNetV2."""

from cifar_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

_xla_flags.apply()  # before any JAX backend starts (see cifar_jax/xla_flags.py)
