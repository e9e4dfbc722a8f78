"""One trained model, loaded: from a run's workdir (or a grid's, with a model name) to the weights
its reported test accuracy came from, and batched logits of uint8 images.

The one place `predict`, `evaluate` and `export` (and the grid's report) get a model from:
  - a single run: its best epoch's weights (`best_weights/`; EMA weights where the run kept an
    average, which is what it evaluated), with the run's flip test-time augmentation;
  - a grid and `model`: the selected configuration's trial with seed 0 (or `seed`);
  - a run of the PyTorch twin: its best weights (`torch_best.pt`), converted into the Flax
    model through `torch_twin.convert` (the parity tests bound the difference at 1e-4).
Only finished runs are served; everything is read, nothing written.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cifar_jax import augment, checkpointing, input_pipeline, models
from cifar_jax import trials as trials_lib, workdir as workdir_lib
from cifar_jax.workdir import WorkdirError


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    workdir: str  # the run directory the weights come from
    config: ml_collections.ConfigDict  # its stored config
    result: Dict[str, Any]  # its result.json
    variables: Dict[str, Any]  # {'params', 'batch_stats'}: the weights it evaluated
    description: str  # which run this is, and why it was chosen

    @property
    def framework(self) -> str:
        return self.result.get("framework", "jax")

    @property
    def tta_flip(self) -> bool:
        return bool(self.config.get("tta_flip", False))

    @property
    def classes(self) -> Tuple[str, ...]:
        return tuple(self.result.get("classes") or input_pipeline.CIFAR10_CLASSES)

    @property
    def model(self):
        return models.get_model(self.config.model)

    def logits_fn(self, tta_flip: Optional[bool] = None) -> Callable:
        """A pure function (variables, uint8 [N, 32, 32, 3]) -> float32 logits [N, classes]:
        the training normalisation, the model in inference mode and, where the run (or
        `tta_flip`) says so, the mean with the mirror image's logits."""
        return logits_function(self.model, self.tta_flip if tta_flip is None else tta_flip)


def logits_function(model, tta_flip: bool) -> Callable:
    return functools.partial(_logits, model, tta_flip)


def _logits(model, tta_flip: bool, variables, images):
    x = augment.normalize(images)
    out = model.apply(variables, x, train=False)
    if tta_flip:
        out = 0.5 * (out + model.apply(variables, x[:, :, ::-1, :], train=False))
    return out


# Compiled once per (model, TTA, batch shape): the trials of one model share it.
_jitted_logits = jax.jit(_logits, static_argnums=(0, 1))


class Predictor:
    """Logits of many images in fixed-size batches (the last batch padded)."""

    def __init__(self, trained: TrainedModel, batch_size: int = 256,
                 tta_flip: Optional[bool] = None):
        self.batch_size = batch_size
        self.model = trained.model
        self.tta_flip = trained.tta_flip if tta_flip is None else tta_flip
        self.variables = jax.device_put(trained.variables)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = [np.zeros((0, 0), np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pad = self.batch_size - len(batch)
            if pad:
                batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
            logits = _jitted_logits(self.model, self.tta_flip, self.variables, batch)
            out.append(np.asarray(logits)[:len(batch) - pad])
        return np.concatenate(out[1:]) if len(out) > 1 else out[0]


def load_dataset(trained: TrainedModel, source: Optional[str] = None) -> input_pipeline.Dataset:
    """The run's data set, as it was split, from its recorded source or `source` (another copy
    of the same data set, checked by its class names)."""
    data = trained.config.data.copy_and_resolve_references()
    if source:
        data.source = source
    try:
        dataset = input_pipeline.load_dataset(data)
    except input_pipeline.DataError as e:
        raise input_pipeline.DataError(
            f"the run's data ({data.source}) cannot be read: {e}"
            + ("" if source else " If it has moved, point --data at a copy of the same data "
               "set.")) from None
    if tuple(dataset.classes) != trained.classes:
        raise input_pipeline.DataError(
            f"{data.source} holds the classes {', '.join(dataset.classes)}, but the model was "
            f"trained on {', '.join(trained.classes)}: give a copy of the run's data set.")
    return dataset


def load_split(trained: TrainedModel, split: str, source: Optional[str] = None
               ) -> input_pipeline.Split:
    """The run's 'test' or 'val' split (see `load_dataset`)."""
    dataset = load_dataset(trained, source)
    chosen = dataset.val if split == "val" else dataset.test
    if chosen is None:
        raise input_pipeline.DataError("The run kept no validation split (data.val_size=0): "
                                       "use the test split.")
    return chosen


# ----------------------------------------------------------------------------------------------
# Loading.


def load(workdir: str, model: Optional[str] = None, seed: Optional[int] = None) -> TrainedModel:
    """The trained model of a finished run's workdir, or of a grid's (then `model` names the
    model, whose selected configuration is served, with seed 0 or `seed`). WorkdirError, with
    what to run, for anything else."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir} does not exist: give the --workdir of a finished run "
                           "or of a grid.")
    if os.path.exists(os.path.join(workdir, "grid_config.json")):
        return _load_grid(workdir, model, seed)
    if model is not None or seed is not None:
        raise WorkdirError(f"{workdir} is a single run, not a grid: --model and --seed choose "
                           "a trial of a grid's workdir; leave them out here.")
    return load_run(workdir, f"the run in {workdir}")


def _load_grid(workdir: str, model: Optional[str], seed: Optional[int]) -> TrainedModel:
    config = ml_collections.ConfigDict(workdir_lib.read_json_object(
        os.path.join(workdir, "grid_config.json")))
    grid_models = list(dict.fromkeys(t.model for t in trials_lib.expand(config)))
    if model is None:
        raise WorkdirError(f"{workdir} is a grid: pass --model NAME to use its selected "
                           f"configuration of that model ({', '.join(grid_models)}).")
    try:
        selections = trials_lib.selected_in(workdir)
    except FileNotFoundError as e:
        raise WorkdirError(f"{e} Run the grid to its end first.") from None
    if model not in selections:
        raise WorkdirError(
            f"The grid in {workdir} has no selected configuration of {model!r} yet "
            f"(selected: {', '.join(selections) or 'none'}; its models: "
            f"{', '.join(grid_models)}). A model is selected once all of its trials finished: "
            f"run the grid's command again, or `python -m cifar_jax.report --workdir {workdir}`.")
    values = dict(selections[model], seed=0 if seed is None else seed)
    name = trials_lib.trial_name(values)
    directory = os.path.join(workdir, "trials", model, name)
    if not os.path.isdir(directory):
        raise WorkdirError(f"The selected configuration of {model} has no trial with seed "
                           f"{values['seed']} in {workdir} (no {directory}); run it with "
                           f"--config.grid.repeat_selected_seeds={values['seed']}.")
    config_name = trials_lib.trial_name({k: v for k, v in values.items() if k != "seed"})
    return load_run(directory, f"the selected configuration of {model} in {workdir}, "
                                f"{config_name}, seed {values['seed']}")


def load_run(directory: str, description: str) -> TrainedModel:
    """The trained model of the finished run in `directory` (`description` says which)."""
    stored = workdir_lib.read_json_object(os.path.join(directory, "config.json"))
    if stored is None:
        raise WorkdirError(f"{directory} holds no run (no config.json): give the --workdir of "
                           "a finished run, or of a grid with --model.")
    config = ml_collections.ConfigDict(stored)
    result = workdir_lib.read_result(directory) or {}
    if result.get("status") != "completed":
        raise WorkdirError(
            f"{directory} has not finished (status: {result.get('status', 'no result yet')}): "
            "run the command that started it again, to the end, then use it.")
    framework = result.get("framework", config.get("framework", "jax"))
    template = jax.eval_shape(lambda: models.get_model(config.model).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
    if framework == "torch":
        variables = _twin_weights(directory, template)
    else:
        ema = config.get("ema_decay", 0) > 0
        kept = checkpointing.load_weights(os.path.join(directory, "best_weights"),
                                          {**template, **({"ema": template} if ema else {})})
        variables = kept["ema"] if ema else {k: kept[k] for k in template}
    return TrainedModel(directory, config, result, variables,
                        description + (" (PyTorch twin)" if framework == "torch" else ""))


def _twin_weights(directory: str, template: Dict[str, Any]) -> Dict[str, Any]:
    """A twin run's best weights, converted into the Flax model's variables."""
    try:
        import torch

        from cifar_jax.torch_twin import convert
    except ImportError as e:
        raise WorkdirError(f"{directory} is a run of the PyTorch twin; reading its weights "
                           f"needs PyTorch ({e}): pip install -e '.[torch]'.") from None
    path = os.path.join(directory, "torch_best.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise checkpointing.CheckpointError(
            f"{path} is unreadable ({checkpointing.error_summary(e)}).") from e
    shapes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    return convert.torch_to_flax(state, shapes)
