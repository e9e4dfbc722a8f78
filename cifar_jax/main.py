"""Command line: `python -m cifar_jax.main --config configs/default.py --workdir runs/x`.

A config with a `grid` field (configs/grid.py) runs the whole study; any other config runs
one training run. Config fields are overridden with --config.FIELD=VALUE.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cifar_jax import config_checks, input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("dry_run", False, "Grid configs: print the trial list and count, then exit.")
flags.DEFINE_integer("shard_index", None, "Grid configs: this process's shard (default: "
                     "$SLURM_ARRAY_TASK_ID, else 0).")
flags.DEFINE_integer("num_shards", None, "Grid configs: number of shards (default: "
                     "$SLURM_ARRAY_TASK_COUNT, else 1).")
flags.mark_flags_as_required(["config", "workdir"])


def _shard_flags():
    """--shard_index/--num_shards, defaulting to a SLURM array's task id and count."""
    index = FLAGS.shard_index
    count = FLAGS.num_shards
    if index is None:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(
            os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if count is None:
        count = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    return index, count


def quiet_library_logs():
    """Keeps orbax's per-save INFO lines out of the run log (warnings still show)."""
    import logging as py_logging

    class _Filter(py_logging.Filter):
        def filter(self, record):
            return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname

    logging.get_absl_handler().addFilter(_Filter())


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    from cifar_jax import grid, train  # after flag parsing: keeps --help fast

    try:
        if "grid" in FLAGS.config:
            trials = grid.expand(FLAGS.config)
            if FLAGS.dry_run:
                print(grid.describe(trials))
                return
            if not grid.run_grid(FLAGS.config, FLAGS.workdir, *_shard_flags()):
                print("error: some trials failed; see results.csv", file=sys.stderr)
                sys.exit(1)
        else:
            if FLAGS.dry_run:
                print(FLAGS.config)
                return
            grid.run_training(FLAGS.config, FLAGS.workdir)
    except (config_checks.ConfigError, input_pipeline.DataError, OSError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.Preempted as e:
        logging.warning("%s", e)
        print(str(e), file=sys.stderr)
        sys.exit(143)
    except train.Diverged as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
