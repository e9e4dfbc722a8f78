"""Start-up checks of a run's config: fail before any data is read or anything compiled."""

from typing import Any, Dict, List

import ml_collections

from cifar_jax.augment import AUGMENTATIONS
from cifar_jax.input_pipeline import DataError, parse_source
from cifar_jax.models import MODELS
from cifar_jax.optim import OPTIMIZERS

DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("jax", "torch")
# Fields that do not change a run's result: they may differ when a run is resumed.
NON_RESULT_FIELDS = frozenset({
    "allow_config_change", "log_every_steps", "checkpoint_max_to_keep", "eval_batch_size",
    "data.tfds_data_dir", "evaluate_test",
})


class ConfigError(ValueError):
    """A config field has an invalid value; the message names field, value and valid choices."""


def _choice(errors: List[str], field: str, value: Any, valid):
    if value not in valid:
        errors.append(f"config.{field}={value!r} is not valid; choose one of: "
                      f"{', '.join(map(str, valid))}.")


def _positive(errors: List[str], field: str, value: Any, integer: bool = False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        errors.append(f"config.{field}={value!r} is not valid; expected {what}.")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError listing every invalid field."""
    errors: List[str] = []
    _choice(errors, "model", config.model, sorted(MODELS))
    _choice(errors, "optimizer", config.optimizer, OPTIMIZERS)
    _choice(errors, "data.augmentation", config.data.augmentation, AUGMENTATIONS)
    _choice(errors, "dtype", config.dtype, DTYPES)
    _choice(errors, "framework", config.get("framework", "jax"), FRAMEWORKS)
    _positive(errors, "learning_rate", config.learning_rate)
    _positive(errors, "num_epochs", config.num_epochs, integer=True)
    _positive(errors, "batch_size", config.batch_size, integer=True)
    _positive(errors, "eval_batch_size", config.eval_batch_size, integer=True)
    _positive(errors, "log_every_steps", config.log_every_steps, integer=True)
    _positive(errors, "checkpoint_max_to_keep", config.checkpoint_max_to_keep, integer=True)
    if not isinstance(config.weight_decay, (int, float)) or config.weight_decay < 0:
        errors.append(f"config.weight_decay={config.weight_decay!r} is not valid; expected a "
                      "number >= 0.")
    if config.dropout_rate is not None and not 0 <= config.dropout_rate < 1:
        errors.append(f"config.dropout_rate={config.dropout_rate!r} is not valid; expected "
                      "None (model default) or a number in [0, 1).")
    if not 0 <= config.label_smoothing < 1:
        errors.append(f"config.label_smoothing={config.label_smoothing!r} is not valid; "
                      "expected a number in [0, 1).")
    if config.warmup_epochs < 0:
        errors.append(f"config.warmup_epochs={config.warmup_epochs!r} is not valid; expected "
                      "a number >= 0.")
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if isinstance(value, int) and value > 0 and value % num_devices:
            errors.append(f"config.{field}={value} is not divisible by the {num_devices} "
                          f"devices; use a multiple of {num_devices}.")
    if not isinstance(config.data.val_size, int) or config.data.val_size < 0:
        errors.append(f"config.data.val_size={config.data.val_size!r} is not valid; expected "
                      "an integer >= 0 (0 disables validation).")
    try:
        parse_source(config.data.source)
    except DataError as e:
        errors.append(str(e))
    if config.data.source == "synthetic" and isinstance(config.data.val_size, int):
        if config.data.val_size >= config.data.synthetic_train_size:
            errors.append(f"config.data.val_size={config.data.val_size} must be smaller than "
                          f"the training set (config.data.synthetic_train_size="
                          f"{config.data.synthetic_train_size}).")
    if errors:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(errors))


def flatten(config) -> Dict[str, Any]:
    """{'data.source': ..., 'model': ...} from a ConfigDict or nested dict."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flatten(v).items()})
        else:
            out[k] = v
    return out


def result_changing_differences(stored: Dict[str, Any], current) -> List[str]:
    """Fields whose values differ between a stored and the current config, as readable lines."""
    a, b = flatten(stored), flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in NON_RESULT_FIELDS or key.startswith("grid."):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: stored {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return lines
