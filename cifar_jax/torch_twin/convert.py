"""Weight conversion between Flax variables and PyTorch state dicts (both directions).

Names correspond one to one: Flax path 'layer1_0/conv1/kernel' <-> torch 'layer1_0.conv1.weight'.
Layouts: conv kernels HWIO <-> OIHW, dense kernels (in, out) <-> (out, in); BatchNorm
scale/bias/mean/var <-> weight/bias/running_mean/running_var (LayerNorm: scale/bias <->
weight/bias); the ViT's cls_token and pos_embedding keep their names and layouts.
"""

from typing import Any, Dict

import numpy as np
import torch
from flax import traverse_util

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
