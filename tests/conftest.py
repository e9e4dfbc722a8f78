import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for `configs`


@pytest.fixture
def tiny_config():
    """A seconds-long AlexNet run on small synthetic data."""
    from configs import default

    config = default.get_config()
    config.model = "alexnet"
    config.num_epochs = 2
    config.batch_size = 32
    config.eval_batch_size = 64
    config.log_every_steps = 4
    config.data.source = "synthetic"
    config.data.synthetic_train_size = 360
    config.data.synthetic_test_size = 100
    config.data.val_size = 100
    return config
