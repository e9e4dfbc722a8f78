"""Start-up checks of a run's config: fail before any data is read or anything compiled.

Every value is checked against the range in which it has a distinct meaning; a refusal names
the field, the value and what is valid. `check_run_shape` adds the checks that need the data
set's size.
"""

import math
from typing import Any, Dict, List

import ml_collections

from cifar_jax.augment import AUGMENTATIONS
from cifar_jax.datasets import DATASETS
from cifar_jax.engine import PRECISIONS
from cifar_jax.input_pipeline import DataError, parse_source
from cifar_jax.models import MODELS
from cifar_jax.models.layers import DEPTHWISE_IMPLS
from cifar_jax.optim import OPTIMIZERS

DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("jax", "torch")
STEP_LOOPS = ("auto", "device", "host")
INT32_MAX = 2**31 - 1  # step counters and seeds are int32 on the device
FLOAT32_MAX = 3.4028234663852886e38  # hyperparameters are float32 on the device
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
# Fields that do not change a run's result: they may differ when a run is resumed.
NON_RESULT_FIELDS = frozenset({
    "allow_config_change", "log_every_steps", "checkpoint_max_to_keep", "eval_batch_size",
    "data.tfds_data_dir", "evaluate_test", "keep_full_checkpoints", "compilation_cache_dir", "step_loop",
    "depthwise",
})


class ConfigError(ValueError):
    """A config field has an invalid value; the message names field, value and valid choices."""


def _choice(errors: List[str], field: str, value: Any, valid):
    if value not in valid:
        errors.append(f"config.{field}={value!r} is not valid; choose one of: "
                      f"{', '.join(map(str, valid))}.")


def _number(errors: List[str], field: str, value: Any, low=None, high=None, *,
            integer: bool = False, low_open: bool = False, high_open: bool = False):
    """Checks `low <= value <= high` (or strict, per side) for a finite number (an integer).
    Floats must also survive float32, as the device holds them: no overflow to inf, and no
    non-zero value that rounds to 0 (it would mean something else)."""
    kind = "an integer" if integer else "a finite number"
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    ok = ok and not isinstance(value, bool) and math.isfinite(value)
    if ok and not integer and not (
            abs(value) <= FLOAT32_MAX and (value == 0 or abs(value) >= FLOAT32_TINY)):
        ok, kind = False, "a number that float32 holds (0, or 1.2e-38 <= |x| <= 3.4e38)"
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        fmt = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
        lo = "" if low is None else f"{'>' if low_open else '>='} {fmt(low)}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {fmt(high)}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        errors.append(f"config.{field}={value!r} is not valid; expected {kind}"
                      f"{' ' + bounds if bounds else ''}.")
    return ok


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError listing every invalid field."""
    errors: List[str] = []
    _choice(errors, "model", config.model, sorted(MODELS))
    _choice(errors, "optimizer", config.optimizer, OPTIMIZERS)
    _choice(errors, "data.augmentation", config.data.augmentation, AUGMENTATIONS)
    _choice(errors, "data.dataset", config.data.get("dataset", "cifar10"), tuple(DATASETS))
    _choice(errors, "dtype", config.dtype, DTYPES)
    _choice(errors, "precision", config.precision, tuple(PRECISIONS))
    _choice(errors, "framework", config.framework, FRAMEWORKS)
    _choice(errors, "step_loop", config.step_loop, STEP_LOOPS)
    _choice(errors, "depthwise", config.get("depthwise", "auto"), DEPTHWISE_IMPLS)
    _number(errors, "learning_rate", config.learning_rate, 0, low_open=True)
    _number(errors, "weight_decay", config.weight_decay, 0)
    _number(errors, "momentum", config.momentum, 0, 1, high_open=True)
    _number(errors, "label_smoothing", config.label_smoothing, 0, 1, high_open=True)
    _number(errors, "ema_decay", config.ema_decay, 0, 1, high_open=True)
    if config.dropout_rate is not None:
        _number(errors, "dropout_rate", config.dropout_rate, 0, 1, high_open=True)
    epochs_ok = _number(errors, "num_epochs", config.num_epochs, 1, INT32_MAX, integer=True)
    if _number(errors, "warmup_epochs", config.warmup_epochs, 0) and epochs_ok and \
            config.warmup_epochs >= config.num_epochs > 0 and config.warmup_epochs > 0:
        errors.append(f"config.warmup_epochs={config.warmup_epochs!r} is not valid: the warm-up "
                      f"must end before training does (num_epochs={config.num_epochs}).")
    for field in ("batch_size", "eval_batch_size"):
        if _number(errors, field, config[field], 1, INT32_MAX, integer=True) \
                and config[field] % num_devices:
            errors.append(f"config.{field}={config[field]} is not divisible by the {num_devices} "
                          f"devices; use a multiple of {num_devices}.")
    _number(errors, "seed", config.seed, 0, INT32_MAX, integer=True)
    _number(errors, "data.split_seed", config.data.split_seed, 0, 2**63 - 1, integer=True)
    _number(errors, "log_every_steps", config.log_every_steps, 1, INT32_MAX, integer=True)
    _number(errors, "checkpoint_max_to_keep", config.checkpoint_max_to_keep, 1, 1000,
            integer=True)
    _number(errors, "data.val_size", config.data.val_size, 0, INT32_MAX, integer=True)
    _check_distill(errors, config)
    _check_transfer(errors, config)
    _check_no_effect(errors, config)
    _check_data_source(errors, config)
    if errors:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(errors))


# Models whose layers fix the input's side (AlexNet's classifier, the ViT's positions).
FIXED_SIZE_MODELS = ("alexnet", "vit")


def _check_transfer(errors: List[str], config) -> None:
    """The fine-tuning fields (the weights file itself: transfer.pretrained_variables)."""
    size = config.data.get("image_size", 32)
    if _number(errors, "data.image_size", size, 16, 512, integer=True) and size != 32 and \
            config.model in FIXED_SIZE_MODELS:
        errors.append(f"config.data.image_size={size} does not fit {config.model}, whose "
                      "layers are sized for 32x32 images; keep 32 for it.")
    _number(errors, "backbone_lr_scale", config.get("backbone_lr_scale", 1.0), 0)
    freeze = config.get("freeze_backbone_epochs", 0.0)
    if _number(errors, "freeze_backbone_epochs", freeze, 0) and freeze and \
            freeze >= config.num_epochs:
        errors.append(f"config.freeze_backbone_epochs={freeze!r} is not valid: the backbone "
                      f"must move before training ends (num_epochs={config.num_epochs}).")
    if config.get("init_from") and config.framework == "torch":
        errors.append("config.init_from is set with framework='torch': transfer learning "
                      "runs in JAX only; use framework='jax'.")


def _check_distill(errors: List[str], config) -> None:
    """config.distill's values (the teacher itself is checked by distill.load_teacher)."""
    d = config.get("distill")
    if d is None:
        return
    _number(errors, "distill.temperature", d.temperature, 0, low_open=True)
    _number(errors, "distill.alpha", d.alpha, 0, 1)
    if not d.teacher_workdir and (d.temperature, d.alpha) != (
            LATER_FIELDS["distill.temperature"], LATER_FIELDS["distill.alpha"]):
        errors.append(f"config.distill.temperature={d.temperature!r} / alpha={d.alpha!r} have "
                      "no effect without config.distill.teacher_workdir (the teacher).")
    if d.teacher_model and not d.teacher_workdir:
        errors.append(f"config.distill.teacher_model={d.teacher_model!r} has no effect without "
                      "config.distill.teacher_workdir (the grid whose selected trial teaches).")
    if d.teacher_workdir and config.framework == "torch":
        errors.append("config.distill.teacher_workdir is set with framework='torch': "
                      "distillation runs in JAX only; use framework='jax'.")


def _check_no_effect(errors: List[str], config) -> None:
    """Settings that would silently do nothing for this run are refused."""
    if config.nesterov and config.optimizer != "sgd":
        errors.append(f"config.nesterov=True has no effect with optimizer "
                      f"{config.optimizer!r}; it applies to 'sgd' only.")
    if config.data.tfds_data_dir is not None and config.data.source != "tfds":
        errors.append(f"config.data.tfds_data_dir={config.data.tfds_data_dir!r} has no effect "
                      f"with data.source={config.data.source!r}; it applies to 'tfds' only.")
    if config.framework == "torch" and config.ema_decay > 0:
        errors.append("config.ema_decay > 0 is not implemented by the PyTorch twin; set it to 0 "
                      "or use framework 'jax'.")
    if config.framework == "torch" and config.dtype != "float32":
        errors.append(f"config.dtype={config.dtype!r} is not implemented by the PyTorch twin "
                      "(it trains in float32; `cifar_jax.bench` measures its AMP speed); set "
                      "'float32' or use framework 'jax'.")


def _check_data_source(errors: List[str], config) -> None:
    try:
        parse_source(config.data.source)
    except DataError as e:
        errors.append(str(e))
        return
    if config.data.source != "synthetic":
        return
    for field in ("synthetic_train_size", "synthetic_test_size"):
        # Up to about three times CIFAR-10 (the arrays are built in host memory).
        _number(errors, f"data.{field}", config.data[field], 10, 200_000, integer=True)
    val, train = config.data.val_size, config.data.synthetic_train_size
    if isinstance(val, int) and isinstance(train, int) and val >= train:
        errors.append(f"config.data.val_size={val} must be smaller than the training set "
                      f"(config.data.synthetic_train_size={train}).")


def check_run_shape(config, dataset) -> None:
    """The checks that need the data set's sizes (after the validation split). (An
    eval_batch_size larger than every evaluation split is no error: see
    engine.eval_batch_size.)"""
    num_train = len(dataset.train)
    if config.batch_size > num_train:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {num_train} training "
            "images: no full batch per epoch. Use a smaller batch size (or more data).")
    total = (num_train // config.batch_size) * config.num_epochs
    if total > INT32_MAX:
        raise ConfigError(f"config.num_epochs={config.num_epochs} makes {total} steps, more "
                          f"than the step counter holds ({INT32_MAX}); use fewer epochs.")


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


# Fields a resumed run cannot change, even with allow_config_change: they change the number of
# steps, the data, or the shape of the saved state, so the checkpoint no longer fits.
FIXED_ON_RESUME = frozenset({
    "model", "framework", "batch_size", "num_epochs", "data.dataset", "data.source",
    "data.val_size",
    "data.split_seed", "data.synthetic_train_size", "data.synthetic_test_size",
})


# Fields added after configs were first stored, with the value a config without them meant.
LATER_FIELDS = {"data.dataset": "cifar10", "distill.teacher_workdir": "",
                "distill.teacher_model": "", "distill.temperature": 4.0, "distill.alpha": 0.9,
                "data.image_size": 32, "init_from": "", "backbone_lr_scale": 1.0,
                "freeze_backbone_epochs": 0.0}


def _stored(stored: Dict[str, Any]) -> Dict[str, Any]:
    return {**LATER_FIELDS, **flatten(stored)}


def result_changing_differences(stored: Dict[str, Any], current) -> List[str]:
    """Fields whose values differ between a stored and the current config, as readable lines."""
    a, b = _stored(stored), flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in NON_RESULT_FIELDS or key.startswith("grid."):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: stored {a.get(key, '<absent>')!r}, now {b.get(key, '<absent>')!r}")
    return lines


def fixed_field_changes(stored: Dict[str, Any], current) -> List[str]:
    """The differences that no resume can take (FIXED_ON_RESUME, and EMA on <-> off)."""
    a, b = _stored(stored), flatten(current)
    lines = [f"{k}: stored {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(FIXED_ON_RESUME)
             if a.get(k) != b.get(k)]
    if (a.get("ema_decay", 0) > 0) != (b.get("ema_decay", 0) > 0):
        lines.append(f"ema_decay: stored {a.get('ema_decay')!r}, now {b.get('ema_decay')!r} "
                     "(turns the weight average on or off)")
    tuning = lambda c: (c.get("backbone_lr_scale", 1.0) != 1.0  # noqa: E731
                        or c.get("freeze_backbone_epochs", 0.0) > 0)
    if tuning(a) != tuning(b):
        lines.append(f"backbone_lr_scale / freeze_backbone_epochs: stored "
                     f"{a.get('backbone_lr_scale')!r} / {a.get('freeze_backbone_epochs')!r}, now "
                     f"{b.get('backbone_lr_scale')!r} / {b.get('freeze_backbone_epochs')!r} "
                     "(turns the fine-tuning optimizer's own state on or off)")
    return lines
