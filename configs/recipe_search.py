"""The search behind configs/recipe.py: per model, the recipe's candidates as grid axes.

  python -m cifar_jax.main --config configs/recipe_search.py --workdir runs/recipe_search

Each candidate of the recipe (peak learning rate, label smoothing, EMA, dropout before the
classifier, weight decay) is an axis here, at 10 epochs and seed 0, so the report's effects
table shows which of them help on this data; configs/recipe.py keeps the winners. 2 x 2 x 2 x
2 x 2 = 32 trials per model, packed where packing pays (grid.pack_size = 0).
"""

import ml_collections

from configs import recipe


def get_config() -> ml_collections.ConfigDict:
    config = recipe.get_config()
    g = config.grid
    g.seeds = "0"
    g.learning_rate = "0.05,0.1"
    g.weight_decay = "5e-4,1e-4"
    g.label_smoothing = "0.0,0.1"
    g.ema_decay = "0.0,0.999"
    g.dropout_rate = "0.0,0.2"
    g.per_model.mobilenetv2.weight_decay = None  # searched like the others
    g.per_model.mobilenetv2.dropout_rate = None
    g.per_model.alexnet.learning_rate = "0.01,0.02"
    g.per_model.alexnet.dropout_rate = "0.3,0.5"
    return config
