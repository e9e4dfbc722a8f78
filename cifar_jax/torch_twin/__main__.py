"""Trains one run with the PyTorch twin (the same config and data as the JAX run).

  python -m cifar_jax.torch_twin --config configs/default.py --workdir runs/torch
"""

from absl import flags
from ml_collections import config_flags

from cifar_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, results and the checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from cifar_jax.torch_twin import train

    cli.check_workdir_flag(FLAGS.workdir)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
