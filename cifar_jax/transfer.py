"""Transfer learning: a run's starting weights from a torchvision ImageNet checkpoint
(`config.init_from`, configs/transfer.py), checked before anything is compiled.

The file is the `state_dict` torchvision saves (`torch.save(model.state_dict())`, as its
download URLs serve it); nothing is downloaded here. Every tensor is mapped by name onto the
Flax model's ImageNet form (`torch_twin.convert.from_torchvision`); the classifier is left at
its initialisation, sized for the data set's classes.
"""

import os
from typing import Any, Dict, Optional

from absl import logging
from flax import traverse_util

from cifar_jax import config_checks, models

# Where torchvision's own ImageNet weights come from (and where torchvision keeps what it
# downloads: ~/.cache/torch/hub/checkpoints/).
WEIGHT_URLS = {
    "resnet18_imagenet": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50_imagenet": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "mobilenetv2_imagenet": "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
}


class InitError(config_checks.ConfigError):
    """config.init_from names no usable weights; the message says which and why."""


def pretrained_variables(config, template: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The Flax {'params', 'batch_stats'} (without the classifier) that `config.init_from`
    holds for `config.model`, shaped like `template`; None when it is ''."""
    path = os.path.expanduser(config.get("init_from") or "")
    if not path:
        return None
    where = f"config.init_from={config.init_from!r}"
    if config.model not in WEIGHT_URLS:
        raise InitError(f"{where} needs a model with torchvision's ImageNet form: "
                        f"{', '.join(WEIGHT_URLS)} (config.model={config.model!r}).")
    if os.path.isdir(path):
        raise InitError(f"{where} is a directory; give the weights file in it (torchvision's "
                        f"for {config.model}: {os.path.basename(WEIGHT_URLS[config.model])}).")
    if not os.path.isfile(path):
        raise InitError(f"{where}: no such file. torchvision's ImageNet weights for "
                        f"{config.model}: {WEIGHT_URLS[config.model]} (download it yourself; "
                        "torchvision keeps its downloads in ~/.cache/torch/hub/checkpoints/).")
    try:
        import torch

        from cifar_jax.torch_twin import convert
    except ImportError as e:
        raise InitError(f"{where}: reading a .pth file needs PyTorch ({e}); pip install "
                        "torch.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle and zip errors come in many types
        raise InitError(f"{where} cannot be read as a PyTorch state dict ({type(e).__name__}"
                        f"{': ' + str(e) if str(e) else ''}); expected the .pth file "
                        "torchvision serves, as torch.save(model.state_dict()) writes it (a "
                        "truncated download reads so too: fetch it again).") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InitError(f"{where} holds no state dict (a dict of tensors, as "
                        "torch.save(model.state_dict()) writes).")
    try:
        variables = convert.from_torchvision(state, config.model, template)
    except ValueError as e:
        raise InitError(f"{where}: {e}") from None
    logging.info("Initialised %s from %s (%d tensors); its classifier '%s' starts afresh for "
                 "this data set's classes.", config.model, path, len(state),
                 models.classifier_name(config.model))
    return variables


def merged(tree: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """`tree` (nested dicts) with the leaves `update` has replaced, the others kept."""
    flat = traverse_util.flatten_dict
    return traverse_util.unflatten_dict({**flat(tree), **flat(update)})
