#!/usr/bin/env bash
# One run (or one grid) across several hosts: one process per GPU on JAX's multi-controller
# runtime (README, "More than one process or host"). srun starts the tasks; each finds the
# others from SLURM's variables (no flags): process 0 serves the coordination service on the
# first node, at a port derived from the job id (or $JAX_COORDINATOR_PORT).
#
#   sbatch scripts/slurm_multinode.sh                                   # configs/default.py
#   CONFIG=configs/grid.py WORKDIR=runs/grid sbatch scripts/slurm_multinode.sh
#   sbatch --nodes=4 scripts/slurm_multinode.sh --config.batch_size=512  # 16 GPUs
#
# Keep --ntasks-per-node equal to the GPUs per node in --gres (one process per GPU).
#
# The batch is split over every GPU of the job, so config.batch_size must be a multiple of their
# number. The workdir must be on a file system every node mounts at the same path (the run
# checks). The coordination service has no authentication: keep its port reachable only inside
# the cluster's network. Rerun the same job to resume.
#SBATCH --job-name=cifar_jax_multinode
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:4          # every task sees the node's GPUs; jax gives task i GPU i (SLURM_LOCALID)
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=TERM@120   # every task gets SIGTERM two minutes before the limit: one agreed checkpoint
set -euo pipefail
CONFIG=${CONFIG:-configs/default.py}
WORKDIR=${WORKDIR:-runs/multinode}
cd "${SLURM_SUBMIT_DIR:-.}"
# One task failing does not make srun kill the others: they notice it themselves and stop with
# one line (exit 4), leaving the last checkpoint intact.
srun --kill-on-bad-exit=0 python3 -m cifar_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
