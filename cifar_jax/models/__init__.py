"""Model registry: `get_model(name, **kwargs)` returns a Flax module."""

from typing import Callable, Dict

import flax.linen as nn

from cifar_jax.models.alexnet import AlexNet
from cifar_jax.models.mobilenetv2 import MobileNetV2
from cifar_jax.models.resnet import ResNet18

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "alexnet": AlexNet,
    "mobilenetv2": MobileNetV2,
}

# Models whose forward pass has dropout (the config's dropout_rate reaches them).
MODELS_WITH_DROPOUT = ("alexnet", "mobilenetv2")


def dropout_rate(name: str, override=None) -> float:
    """The dropout rate a run of model `name` uses: `override`, else the model's default."""
    if override is not None:
        return float(override)
    return float(getattr(MODELS[name], "dropout_rate", 0.0))


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds the model called `name` ('resnet18', 'alexnet' or 'mobilenetv2')."""
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}.")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "MODELS_WITH_DROPOUT", "dropout_rate", "get_model", "AlexNet", "MobileNetV2", "ResNet18"]
