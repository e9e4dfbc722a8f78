#!/usr/bin/env bash
# The study's grid as a SLURM array: each task works through its share of the trials in one
# shared workdir (shards default to SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT). Tasks claim
# each trial before running it (the trial's run lock), so shards only set the order: any number
# of plain copies of the same command, one per GPU, also share the work without running a trial
# twice. Rerun the same array to resume: finished trials are skipped, interrupted ones resume
# from their checkpoints, and the last task to finish writes the complete report.
#
#   sbatch scripts/slurm_grid.sh                  # 8 tasks, one GPU each
#   sbatch --array=0-15%4 scripts/slurm_grid.sh   # 16 shards, 4 at a time
#
# Several tasks may share one GPU (e.g. --gres=gpu:1 with oversubscription): give each process
# a fraction of its memory with XLA_PYTHON_CLIENT_MEM_FRACTION (0.9 / tasks per GPU) so that
# they do not fight over it.
#SBATCH --job-name=cifar_jax_grid
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%A_%a.out
#SBATCH --signal=B:TERM@120   # SIGTERM two minutes before the time limit: checkpoint and stop
set -euo pipefail
WORKDIR=${WORKDIR:-runs/grid}
TASKS_PER_GPU=${TASKS_PER_GPU:-1}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(python3 -c "print(round(0.9 / $TASKS_PER_GPU, 2))")}
cd "${SLURM_SUBMIT_DIR:-.}"
# exec: the training process receives SLURM's SIGTERM itself.
exec python3 -m cifar_jax.main --config configs/grid.py --workdir "$WORKDIR" "$@"
# Any time (e.g. while tasks still run): python3 -m cifar_jax.report --workdir "$WORKDIR"
