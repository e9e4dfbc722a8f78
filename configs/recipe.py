"""Beyond the study's recipe: the same budget (10 epochs, batch 128, the same data and
architectures) trained the way well-known CIFAR recipes train, 3 seeds per model.

  python -m cifar_jax.main --config configs/recipe.py --workdir runs/recipe

SGD with Nesterov momentum at a high peak learning rate, one epoch of linear warm-up then
cosine, label smoothing, no weight decay on BatchNorm parameters and biases, an exponential
moving average of the weights evaluated instead of the raw ones, and horizontal-flip test-time
augmentation. Per-model values (learning rate, weight decay, dropout) are in `grid.per_model`.
These are the starting values of the recipe search (configs/recipe_search.py), from the
literature; the search's measured winners replace them where they help.
"""

import ml_collections

from configs import grid as study


def get_config() -> ml_collections.ConfigDict:
    config = study.get_config()
    config.nesterov = True
    config.decay_bn_and_bias = False  # no weight decay on BatchNorm scales/biases and biases
    config.tta_flip = True

    g = config.grid
    g.models = "resnet18,mobilenetv2,alexnet"
    g.optimizer = "sgd"
    g.learning_rate = "0.1"
    g.weight_decay = "5e-4"
    g.augmentation = "basic"
    g.label_smoothing = "0.1"
    g.warmup_epochs = "1"
    g.ema_decay = "0.999"  # about 1,000 steps of averaging (3 epochs at batch 128)
    g.dropout_models = "resnet18,mobilenetv2,alexnet"  # dropout before each classifier
    g.dropout_rate = "0.0"
    g.seeds = "0,1,2"
    g.default_trial = ""  # no untuned baseline in this grid
    g.per_model.alexnet.learning_rate = "0.02"  # no BatchNorm: a lower peak
    g.per_model.alexnet.dropout_rate = "0.5"
    g.per_model.mobilenetv2.weight_decay = "1e-4"
    g.per_model.mobilenetv2.dropout_rate = "0.2"
    return config
