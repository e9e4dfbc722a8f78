import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # for `configs`

# One persistent compilation cache for the whole session, shared by this process and every
# subprocess a test starts (through the CLI flag below): most tests compile the same small
# programs (the tiny CNN, AlexNet), which then compile once.
CACHE_DIR = os.path.join(os.environ.get("PYTEST_CACHE_ROOT", "/tmp"),
                         f"cifar_jax_test_xla_cache_{os.getuid()}")
CACHE_FLAG = f"--config.compilation_cache_dir={CACHE_DIR}"


def pytest_configure(config):
    from cifar_jax import main

    main.enable_compilation_cache(CACHE_DIR)


@pytest.fixture
def tiny_config():
    """A seconds-long run of the tiny CNN on small synthetic data (8 steps per epoch)."""
    return make_tiny_config()


def make_tiny_config():
    """`tiny_config`, for fixtures of a wider scope."""
    from configs import default

    config = default.get_config()
    config.model = "tiny"
    config.num_epochs = 2
    config.batch_size = 32
    config.eval_batch_size = 64
    config.log_every_steps = 4
    config.compilation_cache_dir = CACHE_DIR
    config.data.source = "synthetic"
    config.data.synthetic_train_size = 360
    config.data.synthetic_test_size = 100
    config.data.val_size = 100
    return config


def read_metrics(workdir):
    """A run's metrics.jsonl records without their timings, which legitimately differ
    between runs that are otherwise identical."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        r.pop("epoch_time_s"), r.pop("images_per_sec")
    return records
