"""Weight conversion between Flax variables and PyTorch state dicts (both directions).

Names correspond one to one: Flax path 'layer1_0/conv1/kernel' <-> torch 'layer1_0.conv1.weight'.
Layouts: conv kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in); BatchNorm
scale/bias/mean/var <-> weight/bias/running_mean/running_var (LayerNorm: scale/bias <->
weight/bias); the ViT's cls_token and pos_embedding keep their names and layouts.
"""

import re
from typing import Any, Dict

import numpy as np
import torch
from flax import traverse_util

from cifar_jax import models

# Parameters that are neither layer weights nor biases (the ViT's) keep their names.
_PARAM_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight",
                "cls_token": "cls_token", "pos_embedding": "pos_embedding"}
_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if name == "kernel" and value.ndim == 2:
        return value.T
    return value


def _to_flax_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name == "kernel" and value.ndim == 2:
        return value.T
    return value


def flax_to_torch(variables: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Flax {'params', 'batch_stats'} -> a PyTorch state dict (for load_state_dict)."""
    out: Dict[str, torch.Tensor] = {}
    for collection, names in (("params", _PARAM_NAMES), ("batch_stats", _STAT_NAMES)):
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path, value in flat.items():
            key = ".".join(path[:-1] + (names[path[-1]],))
            value = np.asarray(value)
            if value.dtype != np.float64:  # float64 stays (parity tests); others -> float32
                value = value.astype(np.float32)
            out[key] = torch.from_numpy(np.array(_to_torch_layout(path[-1], value)))
            if collection == "batch_stats" and path[-1] == "mean":
                out[".".join(path[:-1] + ("num_batches_tracked",))] = torch.tensor(0)
    return out


def torch_to_flax(state_dict: Dict[str, torch.Tensor], template: Dict[str, Any]) -> Dict[str, Any]:
    """A PyTorch state dict -> Flax variables shaped like `template` (e.g. from model.init)."""
    result = {}
    for collection, names in (("params", _PARAM_NAMES), ("batch_stats", _STAT_NAMES)):
        flat = traverse_util.flatten_dict(dict(template.get(collection, {})))
        converted = {}
        for path, like in flat.items():
            key = ".".join(path[:-1] + (names[path[-1]],))
            if key not in state_dict:
                raise KeyError(f"PyTorch state dict lacks {key!r} (for Flax {'/'.join(path)}).")
            value = _to_flax_layout(path[-1], state_dict[key].detach().cpu().numpy())
            if value.shape != tuple(like.shape):
                raise ValueError(f"{key}: shape {value.shape} does not fit Flax "
                                 f"{'/'.join(path)} {tuple(like.shape)}.")
            converted[path] = value if value.dtype == np.float64 else value.astype(np.float32)
        if converted:
            result[collection] = traverse_util.unflatten_dict(converted)
    return result


# ----------------------------------------------------------------------------------------------
# torchvision's ImageNet state dicts (config.init_from): its names -> these models' names.


def _torchvision_resnet_name(key: str) -> str:
    """'layer1.0.downsample.1.weight' -> 'layer1_0.downsample_bn.weight'."""
    key = re.sub(r"^layer(\d)\.(\d+)\.", r"layer\1_\2.", key)
    return key.replace("downsample.0.", "downsample_conv.").replace("downsample.1.",
                                                                  "downsample_bn.")


def _torchvision_mobilenetv2_name(key: str) -> str:
    """'features.0.1.weight' -> 'stem.bn.weight', 'features.2.conv.1.0.weight' ->
    'block1.depthwise.conv.weight', 'classifier.1.bias' -> 'classifier.bias'."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return ".".join(["classifier"] + parts[2:])
    index, rest = int(parts[1]), parts[2:]
    layer = {"0": "conv", "1": "bn"}
    if index == 0 or index == 18:
        return ".".join(["stem" if index == 0 else "head", layer[rest[0]]] + rest[1:])
    # features.i.conv: [expand (t != 1)], depthwise, project conv, project bn.
    names = ["expand", "depthwise"] if index > 1 else ["depthwise"]
    position = int(rest[1])
    if position < len(names):  # a Conv2dNormActivation: .0 conv, .1 bn
        return ".".join([f"block{index - 1}", names[position], layer[rest[2]]] + rest[3:])
    project = "conv" if position == len(names) else "bn"
    return ".".join([f"block{index - 1}", "project", project] + rest[2:])


TORCHVISION_NAMES = {"resnet18_imagenet": _torchvision_resnet_name,
                     "resnet50_imagenet": _torchvision_resnet_name,
                     "mobilenetv2_imagenet": _torchvision_mobilenetv2_name}


def from_torchvision(state_dict: Dict[str, torch.Tensor], model: str, template: Dict[str, Any],
                     with_classifier: bool = False) -> Dict[str, Any]:
    """A torchvision ImageNet state dict of `model` (TORCHVISION_NAMES) -> Flax variables
    shaped like `template`. Every tensor is mapped by name and its shape checked; a tensor the
    model lacks, or one the file lacks, is refused by name (ValueError). Without
    `with_classifier` the file's classifier is left out, and so is the template's: the caller
    keeps its own, initialised for its data set's classes."""
    head = models.classifier_name(model)  # the renamed file's classifier has our name

    def rename(key: str) -> str:
        try:
            return TORCHVISION_NAMES[model](key)
        except (IndexError, KeyError, ValueError):  # no torchvision name of this model
            return f"?{key}"

    renamed = {rename(k): v for k, v in state_dict.items()
               if not k.endswith("num_batches_tracked")}
    if not with_classifier:
        renamed = {k: v for k, v in renamed.items() if k.split(".")[0] != head}
        template = {c: {k: v for k, v in t.items() if k != head} for c, t in template.items()}
    expected = {".".join(path[:-1] + (names[path[-1]],))
                for collection, names in (("params", _PARAM_NAMES), ("batch_stats", _STAT_NAMES))
                for path in traverse_util.flatten_dict(dict(template.get(collection, {})))}
    unknown = sorted(set(renamed) - expected)
    if unknown:
        originals = {rename(k): k for k in state_dict}
        raise ValueError(f"{len(unknown)} tensors of the file have no place in {model}: "
                         f"{', '.join(originals[k] for k in unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''}. Is it torchvision's {model} "
                         "state dict?")
    try:
        return torch_to_flax(renamed, template)
    except KeyError as e:
        raise ValueError(f"the file is not a whole torchvision {model} state dict: "
                         f"{e.args[0]}") from None
    except ValueError as e:
        raise ValueError(f"the file does not fit {model}: {e}") from None
