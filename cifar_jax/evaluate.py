"""Evaluates a trained model in depth on the test or validation split.

  python -m cifar_jax.evaluate --workdir runs/default
  python -m cifar_jax.evaluate --workdir runs/grid --model resnet18 [--seed 1] [--split val]
  python -m cifar_jax.evaluate --workdir runs/x --data folder:/elsewhere/cifar10-jpeg.tar.gz

Writes <run>/evaluation/<split>/: summary.md (accuracy, per-class precision and recall,
expected calibration error over 15 bins, negative log-likelihood), per_class.csv,
confusion_matrix.png, reliability.png and mistakes.png (cifar_jax/evaluation.py). The run's
recorded data source and split are used; --data points at another copy of the same data set
(checked by its class names) when that one has moved.
"""

import os

from absl import flags, logging

from cifar_jax import cli


def main(argv):
    del argv
    from cifar_jax import evaluation, inference

    f = flags.FLAGS
    cli.check_workdir_flag(f.workdir)
    trained = inference.load(f.workdir, f.model, f.seed)
    logging.info("Evaluating %s on the %s split.", trained.description, f.split)
    split = inference.load_split(trained, f.split, f.data)
    e = evaluation.evaluate_split(trained, split, f.split,
                                  inference.Predictor(trained, f.batch_size))
    out = os.path.join(trained.workdir, "evaluation", f.split)
    print(f"{trained.description}: {f.split} accuracy {100 * e.accuracy:.2f}%, NLL "
          f"{e.nll:.4f}, ECE {100 * e.ece():.2f}% ({len(split)} images). Written to {out}/.")


def _define_flags() -> None:
    """Flags only when run as a program (main's --workdir would clash in one process)."""
    cli.define_trained_model_flags("evaluate")
    flags.DEFINE_enum("split", "test", ["test", "val"], "The split to evaluate.")
    flags.DEFINE_string("data", None, "Another copy of the run's data set (a "
                        "config.data.source value), where the recorded one cannot be read.")
    flags.DEFINE_integer("batch_size", 256, "Images per forward pass.", lower_bound=1)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
