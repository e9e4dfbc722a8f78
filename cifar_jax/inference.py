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

from cifar_jax import augment, checkpointing, datasets, input_pipeline, models
from cifar_jax import trials as trials_lib, workdir as workdir_lib
from cifar_jax.workdir import WorkdirError


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    workdir: str  # the run directory the weights come from
    config: ml_collections.ConfigDict  # its stored config
    result: Dict[str, Any]  # its result.json
    weights: Dict[str, Any]  # JAX runs: Flax {'params', 'batch_stats'}; twin runs: state_dict
    description: str  # which run this is, and why it was chosen
    grid_trial: str = ""  # a trial of a grid its report did not select: that grid's workdir

    @property
    def framework(self) -> str:
        return self.result.get("framework", self.config.get("framework", "jax"))

    @property
    def tta_flip(self) -> bool:
        return bool(self.config.get("tta_flip", False))

    @property
    def info(self) -> datasets.DatasetInfo:
        """The data set it was trained on."""
        return datasets.of_config(self.config)

    @property
    def classes(self) -> Tuple[str, ...]:
        return tuple(self.result.get("classes") or self.info.classes)

    @property
    def model(self):
        """The Flax model as the run evaluated it: its dtype, depthwise form and classes."""
        return models.get_model(self.config.model, self.config.get("depthwise", "auto"),
                                dtype=jnp.dtype(self.config.get("dtype", "float32")),
                                num_classes=self.info.num_classes)

    @property
    def precision(self) -> str:
        return self.config.get("precision", "default")

    @property
    def image_size(self) -> int:
        """The side its images were resized to (config.data.image_size)."""
        return int(self.config.data.get("image_size", 32))

    @functools.cached_property
    def variables(self) -> Dict[str, Any]:
        """The Flax variables (a twin run's weights converted by torch_twin.convert)."""
        if self.framework != "torch":
            return self.weights
        from cifar_jax.torch_twin import convert

        template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), flax_template(
            self.config.model, self.info.num_classes))
        try:
            return convert.torch_to_flax(self.weights, template)
        except (KeyError, ValueError) as e:
            raise checkpointing.CheckpointError(
                f"{self.workdir}/torch_best.pt does not fit a {self.config.model}: {e}") from e

    @property
    def torch_state(self) -> Dict[str, Any]:
        """The weights as the PyTorch twin's state_dict."""
        if self.framework == "torch":
            return self.weights
        from cifar_jax.torch_twin import convert

        return convert.flax_to_torch(self.variables)

    def check_test_split_allowed(self) -> None:
        """The test split is for each model's selected configuration: refused for a grid's
        trial that its report did not select."""
        if self.grid_trial:
            raise WorkdirError(
                f"{self.workdir} is a trial of the grid in {self.grid_trial} that its report "
                "did not select; the grid keeps the test split for each model's selected "
                f"configuration. Use the validation split, or --workdir {self.grid_trial} "
                f"--model {self.config.model}.")

    def logits_fn(self, tta_flip: Optional[bool] = None) -> Callable:
        """A pure function (variables, uint8 [N, 32, 32, 3]) -> float32 logits [N, classes]:
        the training normalisation, the model in inference mode at the run's precision and,
        where the run (or `tta_flip`) says so, the mean with the mirror image's logits."""
        return functools.partial(_logits, self.model, self.tta_flip if tta_flip is None
                                 else tta_flip, self.precision, self.info, self.image_size)


def _logits(model, tta_flip: bool, precision: str, info: datasets.DatasetInfo, size: int,
            variables, images):
    from cifar_jax.engine import PRECISIONS

    with jax.default_matmul_precision(PRECISIONS[precision]):
        x = augment.normalize(images, model.dtype, info, size)
        out = model.apply(variables, x, train=False)
        if tta_flip:
            out = 0.5 * (out + model.apply(variables, x[:, :, ::-1, :], train=False))
    return out


# Compiled once per (model, TTA, precision, data set, image size, batch shape): the trials of
# one model share it.
_jitted_logits = jax.jit(_logits, static_argnums=(0, 1, 2, 3, 4))


class Predictor:
    """Logits of many images in fixed-size batches (the last batch padded). A twin run's
    logits come from the twin itself (PyTorch), as its own evaluation computes them."""

    def __init__(self, trained: TrainedModel, batch_size: int = 256,
                 tta_flip: Optional[bool] = None):
        self.batch_size = batch_size
        self.tta_flip = trained.tta_flip if tta_flip is None else tta_flip
        if trained.framework == "torch":
            self._batch = _twin_forward(trained, self.tta_flip)
        else:
            model, precision, info = trained.model, trained.precision, trained.info
            variables = jax.device_put(trained.variables)
            self._batch = lambda x: np.asarray(_jitted_logits(  # noqa: E731
                model, self.tta_flip, precision, info, trained.image_size, variables, x))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pad = self.batch_size - len(batch)
            if pad:
                batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
            out.append(self._batch(batch)[:len(batch) - pad])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _twin_forward(trained: TrainedModel, tta_flip: bool) -> Callable:
    """uint8 NHWC images -> logits with the twin (the training normalisation, eval mode)."""
    import torch

    from cifar_jax.torch_twin import augment as twin_augment, train as twin_train

    device = twin_train._device()
    net = twin_train.build_model(trained.config).to(device)
    net.load_state_dict(trained.weights)
    net.eval()

    @torch.no_grad()
    def forward(images):
        x = twin_augment.augment(images, "none", None, trained.info).to(device)
        logits = net(x).float()
        if tta_flip:
            logits = 0.5 * (logits + net(x.flip(3)).float())
        return logits.cpu().numpy()

    return forward


def flax_template(model: str, num_classes: int = 10) -> Dict[str, Any]:
    """The shapes of a model's {'params', 'batch_stats'} (nothing computed)."""
    shapes = jax.eval_shape(lambda: models.get_model(model, num_classes=num_classes).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


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
    if split == "test":
        trained.check_test_split_allowed()
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
    grid = os.path.dirname(os.path.dirname(os.path.dirname(workdir)))
    unselected = (os.path.exists(os.path.join(grid, "grid_config.json"))
                  and not (workdir_lib.read_result(workdir) or {}).get("selected"))
    return load_run(workdir, f"the run in {workdir}", grid if unselected else "")


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


def load_run(directory: str, description: str, grid_trial: str = "") -> TrainedModel:
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
    if config.get("model") not in models.MODELS:
        raise WorkdirError(f"{directory}/config.json names no model this version knows "
                           f"({config.get('model')!r}).")
    framework = result.get("framework", config.get("framework", "jax"))
    weights = (_twin_weights(directory) if framework == "torch"
               else _jax_weights(directory, config))
    return TrainedModel(directory, config, result, weights,
                        description + (" (PyTorch twin)" if framework == "torch" else ""),
                        grid_trial)


def _jax_weights(directory: str, config) -> Dict[str, Any]:
    """The weights a completed JAX run kept (best_weights/: the EMA average where it kept
    one), or its best epoch's checkpoint where it kept full checkpoints instead."""
    template = flax_template(config.model, datasets.of_config(config).num_classes)
    ema = config.get("ema_decay", 0) > 0
    kept = {**template, **({"ema": template} if ema else {})}
    if os.path.isdir(os.path.join(directory, "best_weights")):
        weights = checkpointing.load_weights(os.path.join(directory, "best_weights"), kept)
    else:
        weights = _best_checkpoint_weights(directory, config, kept)
    return weights["ema"] if ema else {k: weights[k] for k in template}


def _best_checkpoint_weights(directory: str, config, kept: Dict[str, Any]) -> Dict[str, Any]:
    from cifar_jax import engine as engine_lib

    if workdir_lib.latest_step_on_disk(directory) is None:
        raise WorkdirError(f"{directory} keeps neither best_weights/ nor checkpoints: its "
                           "trained weights are gone.")
    programs = engine_lib.Engine().programs(engine_lib.static_spec(config, config.batch_size))
    abstract = jax.eval_shape(lambda: programs.init_state(config))
    ckpts = checkpointing.Checkpoints(directory, config.get("checkpoint_max_to_keep", 2),
                                      this_process_only=True)
    try:
        best = ckpts.restore_best(checkpointing.restore_template(abstract))
    finally:
        ckpts.close()
    if best is None:
        raise WorkdirError(f"{directory} has no best checkpoint to serve.")
    state = best[1]["train_state"]
    return {k: state[k] for k in kept}


def _twin_weights(directory: str) -> Dict[str, Any]:
    """A twin run's best weights (its state_dict)."""
    try:
        import torch
    except ImportError as e:
        raise WorkdirError(f"{directory} is a run of the PyTorch twin; reading its weights "
                           f"needs PyTorch ({e}): pip install -e '.[torch]'.") from None
    path = os.path.join(directory, "torch_best.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise checkpointing.CheckpointError(
            f"{path} is unreadable ({checkpointing.error_summary(e)}).") from e
