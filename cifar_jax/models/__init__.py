"""Model registry: `get_model(name, **kwargs)` returns a Flax module."""

from typing import Callable, Dict, Optional

import flax.linen as nn

from cifar_jax.models.alexnet import AlexNet
from cifar_jax.models.mobilenetv2 import MobileNetV2, MobileNetV2ImageNet
from cifar_jax.models.resnet import ResNet18, ResNet18ImageNet, ResNet50, ResNet50ImageNet
from cifar_jax.models.tiny import TinyCNN
from cifar_jax.models.vit import ViT

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "alexnet": AlexNet,
    "mobilenetv2": MobileNetV2,
    "resnet50": ResNet50,
    "vit": ViT,  # future work of the study: ViT-Lite-7/4 (configs/vit.py)
    "tiny": TinyCNN,  # tests and quick checks of the pipeline; not in the study
    # torchvision's ImageNet forms, to fine-tune from its weights (config.init_from):
    "resnet18_imagenet": ResNet18ImageNet,
    "resnet50_imagenet": ResNet50ImageNet,
    "mobilenetv2_imagenet": MobileNetV2ImageNet,
}


def classifier_name(name: str) -> str:
    """The name of model `name`'s classifier layer (its parameters' top-level key)."""
    return MODELS[name].classifier


def dropout_rate(name: str, override=None) -> float:
    """The dropout rate before the classifier of a run of `name`: `override`, else the model's
    default (AlexNet 0.5, MobileNetV2 0.2, the ResNets 0, ViT 0.1, TinyCNN 0.2)."""
    if override is not None:
        return float(override)
    return float(MODELS[name].dropout_rate)


def get_model(name: str, depthwise: Optional[str] = None, **kwargs) -> nn.Module:
    """Builds the model called `name` (see MODELS). `depthwise` (layers.DEPTHWISE_IMPLS) goes
    to the models that have depthwise layers and is ignored by the others."""
    if name not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}. Valid models: {', '.join(sorted(MODELS))}.")
    if depthwise is not None and "depthwise" in MODELS[name].__dataclass_fields__:
        kwargs["depthwise"] = depthwise
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "dropout_rate", "get_model", "AlexNet", "MobileNetV2", "ResNet18",
           "ResNet50", "TinyCNN", "ViT"]
