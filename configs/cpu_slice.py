"""A CPU slice of the study on the real images: AlexNet, 2 epochs, 4 trials, 3 seeds of the
winner; the PyTorch twin then trains the winner with 3 seeds (scripts/cpu_slice.sh).

  python -m cifar_jax.main --config configs/cpu_slice.py --workdir runs/cpu_slice

Not the study (that is 64 trials of three models for 10 epochs on a GPU): a slice small enough
for a 2-core CPU (about an hour here, with the twin), which runs the study's whole chain on
real images: grid, selection on the validation split, the test split once, repeat seeds,
report. The model and recipe are the study's: batch 128, the per-step cosine schedule,
AlexNet's dropout 0.5, weight decay 5e-4; the grid pairs SGD-momentum with lr 0.01 and Adam
with lr 0.001, each with basic and advanced augmentation.
"""

import ml_collections

from configs import grid as study


def get_config() -> ml_collections.ConfigDict:
    config = study.get_config()
    config.num_epochs = 2
    # The JPEG copy of CIFAR-10 beside the checkout (45,000 / 5,000 / 10,000 as the study).
    config.data.source = "folder:../shared/data/cifar10-jpeg.tar.gz"
    g = config.grid
    g.models = "alexnet"
    g.optimizer = "sgd,adam"
    g.learning_rate = "0.01,0.001"
    g.paired_axes = "optimizer,learning_rate"  # SGD at 0.01, Adam at 0.001
    g.weight_decay = "5e-4"
    g.augmentation = "basic,advanced"
    g.dropout_models = ""  # AlexNet keeps its default dropout, 0.5
    g.repeat_selected_seeds = "1,2"  # the selected configuration again with seeds 1 and 2
    return config
