"""The study: per model, optimizer x learning rate x weight decay x augmentation (AlexNet also
x dropout), 10 epochs each, batch 128, the same seed. 16 + 16 + 32 = 64 trials.

  python -m cifar_jax.main --config configs/grid.py --workdir runs/grid [--dry_run]

The sweep is plain data: comma-separated values, narrowed or changed on the command line, e.g.
  --config.grid.models=alexnet,mobilenetv2 --config.grid.learning_rate=0.001 --config.num_epochs=2
Every other field is the base config of each trial (configs/default.py documents them).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.evaluate_test = False  # the grid evaluates the test split for selected trials only

    grid = config.grid = ml_collections.ConfigDict()
    grid.models = "resnet18,alexnet,mobilenetv2"
    grid.optimizer = "sgd,adam"
    grid.learning_rate = "0.001,0.01"
    grid.weight_decay = "5e-4,1e-4"
    grid.augmentation = "basic,advanced"
    grid.dropout_rate = "0.3,0.5"  # swept for the models in dropout_models only
    grid.dropout_models = "alexnet"  # the study's: others keep their config.dropout_rate
    # Axes (field names above) whose values pair up one to one instead of crossing, e.g.
    # "optimizer,learning_rate" with "sgd,adam" and "0.01,0.001": SGD at 0.01, Adam at 0.001.
    grid.paired_axes = ""
    grid.seeds = "0"  # several seeds repeat every trial; selection uses their mean
    grid.fail_fast = False  # stop at the first failed trial instead of recording it and going on
    # The untuned baseline drawn against the best trial in the plots: the textbook starting point
    # for CIFAR (SGD with momentum 0.9, lr 0.01, weight decay 5e-4, crop + flip), in this grid.
    grid.default_trial = "sgd_lr0.01_wd5e-4_basic"
    # Trials of one model trained together in one compiled program: 1 = one at a time, K = up
    # to K, 0 = the size measured best for this device and model (grid.PACK_SIZES; else 1).
    grid.pack_size = 0
    # After the grid: rerun each model's selected configuration with these seeds (e.g. "1,2");
    # the report then gives its test accuracy as mean and std over all its seeds.
    grid.repeat_selected_seeds = ""
    # Per-model sweep values overriding the ones above (None = the grid's), e.g.
    # --config.grid.per_model.alexnet.learning_rate=0.001,0.02
    grid.per_model = per_model_fields()
    return config


def per_model_fields() -> ml_collections.ConfigDict:
    """per_model.<model>.<axis>, every one None (unset) and settable from the command line."""
    axes = ("optimizer", "learning_rate", "weight_decay", "augmentation", "dropout_rate",
            "label_smoothing", "warmup_epochs", "ema_decay")
    return ml_collections.ConfigDict({
        model: {axis: ml_collections.FieldReference(None, field_type=str) for axis in axes}
        for model in ("resnet18", "alexnet", "mobilenetv2", "resnet50", "vit")})
