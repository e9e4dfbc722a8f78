"""cifar_jax: a functional JAX/Flax CIFAR-10 study of ResNet-18, AlexNet and MobileNetV2."""

__version__ = "0.1.0"
