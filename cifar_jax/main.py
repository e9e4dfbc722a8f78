"""Trains CIFAR-10 models: one run, or the whole study.

  python -m cifar_jax.main --config configs/default.py --workdir runs/x
  python -m cifar_jax.main --config configs/grid.py --workdir runs/grid [--dry_run]

A config with a `grid` field (configs/grid.py) runs every trial of the grid and writes the
report; any other config is one training run. Override config fields with --config.FIELD=VALUE.
One run (or grid) across several processes and hosts: start one process per host (or GPU) with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (under `srun`, no flags: SLURM's
variables say it); README, "More than one process or host".

Exit status: 0 done, 1 some grid trials did not complete (failed or diverged), 2 invalid
config/data/workdir or a failed write, 3 diverged, 4 another process of a multi-process run
was lost, 143 pre-empted (rerun the same command to resume; every process, in multi-process mode).
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from cifar_jax import cli, distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("dry_run", False, "Print the trial list (grid) or the config, then exit.")
flags.DEFINE_integer("shard_index", None, "Grid configs: this process's shard (default: "
                     "$SLURM_ARRAY_TASK_ID, else 0).")
flags.DEFINE_integer("num_shards", None, "Grid configs: number of shards (default: "
                     "$SLURM_ARRAY_TASK_COUNT, else 1).")
flags.DEFINE_string("selected_from", None, "Grid configs: run only the configuration that the "
                    "report in this grid workdir selected per model (e.g. the PyTorch twin, or "
                    "more seeds, on the JAX grid's winners).")
flags.DEFINE_string("coordinator_address", None, "Multi-process mode: HOST:PORT of process 0's "
                    "coordination service, the same in every process (it listens on that address "
                    "only; keep the port inside the cluster's network).")
flags.DEFINE_integer("num_processes", None, "Multi-process mode: the number of processes (one "
                     "per host or GPU). Default: 1, or SLURM's task count under srun.")
flags.DEFINE_integer("process_id", None, "Multi-process mode: this process's index, 0 to "
                     "num_processes - 1 (process 0 writes the run's files).")
flags.mark_flags_as_required(["config"])  # --workdir too, unless --dry_run


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise cli.UsageError(f"${name}={value!r} is not an integer; unset it or pass "
                             "--shard_index / --num_shards.") from None


def _shard_flags():
    """--shard_index/--num_shards, defaulting to a SLURM array's task id and count."""
    index, count = FLAGS.shard_index, FLAGS.num_shards
    if index is None:
        index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    if count is None:
        count = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    return index, count


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory` ('' leaves it off)."""
    if not directory:
        return
    import jax

    directory = os.path.expanduser(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise cli.UsageError(f"config.compilation_cache_dir={directory!r} cannot be used as a "
                             f"directory ({e.strerror or e}); choose another, or '' to turn the "
                             "cache off.") from e
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def join_group(config) -> None:
    """Multi-process mode, before any other JAX call; nothing for a single process."""
    group = distributed.group_from(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    if group is None:
        return
    if config.framework == "torch":
        raise cli.UsageError("config.framework='torch' runs in one process; drop the "
                             "multi-process flags (or leave srun at one task).")
    if FLAGS.dry_run:
        return
    distributed.initialize(group)


def checked_config():
    """FLAGS.config after every check that needs no data: the flags, and each grid trial's
    config (`grid.validate`)."""
    from cifar_jax import grid, trials

    config = FLAGS.config
    if FLAGS.workdir is None and not FLAGS.dry_run:
        raise cli.UsageError("--workdir is required (the directory for checkpoints and "
                             "results), except with --dry_run.")
    if FLAGS.workdir is not None:
        cli.check_workdir_flag(FLAGS.workdir)
    if FLAGS.selected_from:
        if "grid" not in config:
            raise cli.UsageError("--selected_from needs a grid config (configs/grid.py).")
        config = trials.restrict(config, trials.selected_in(FLAGS.selected_from))
    if "grid" in config:
        grid.validate(config, trials.expand(config))
    return config


def _command(config) -> str:
    """What every process of a group must be given alike."""
    return "\n".join([config.to_json_best_effort(sort_keys=True), str(FLAGS.workdir),
                      str(FLAGS.selected_from), str(_shard_flags()), str(FLAGS.num_processes),
                      str(FLAGS.coordinator_address)])


def main(argv):
    del argv
    from cifar_jax import grid, trials  # after flag parsing: keeps --help fast

    join_group(FLAGS.config)
    config = distributed.agreed(checked_config)  # in every process; said once if wrong
    distributed.agreed(lambda: distributed.require_same("configs or flags", _command(config)))
    if FLAGS.dry_run:
        print(trials.describe(trials.expand(config)) if "grid" in config else config)
        return
    enable_compilation_cache(config.compilation_cache_dir)
    if "grid" in config:
        if not grid.run_grid(config, FLAGS.workdir, *_shard_flags()):
            if distributed.is_writer():
                logging.error("Not every trial completed (failed, diverged or left "
                              "unfinished); see %s/results.csv.", FLAGS.workdir)
            raise SystemExit(1)
        return
    grid.run_training(config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
