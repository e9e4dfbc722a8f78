#!/usr/bin/env bash
# The CPU slice of the study (configs/cpu_slice.py), on the real images, in phases:
#
#   scripts/cpu_slice.sh [PHASE] [--config.FIELD=VALUE ...]
#
#   grid     the JAX grid (4 AlexNet trials, 2 epochs), selection, the test split once, then
#            the selected configuration with seeds 1 and 2
#   twin     the PyTorch twin on the selected configuration, seeds 0, 1, 2
#   publish  results/<date>-cpu-slice/ and the README's Results entry
#   all      the three in order (the default)
#
# About an hour on a 2-core CPU. Every phase resumes: stop it (Ctrl-C, SIGTERM) and run the same
# command again. Runs go to $RUNS (default runs/); logs and run_log.json (commands, versions,
# machine, wall times: REPRODUCE.md) to $OUT (default runs/cpu_slice_log). The data:
# $DATA (default ../shared/data/cifar10-jpeg.tar.gz, the JPEG copy of CIFAR-10). $NOTE, if
# set, is a sentence the publication adds (e.g. how the wall times were measured).
set -uo pipefail
PHASE=${1:-all}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
OUT=${OUT:-$RUNS/cpu_slice_log}
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
RESULTS=${RESULTS:-results/$(date +%F)-cpu-slice}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/run_log.sh
LOG="$OUT/run_log.json"
COMMON=(--config.data.source="folder:$DATA" "$@")

grid() {
  run grid "$LOG" python3 -m cifar_jax.main --config configs/cpu_slice.py \
    --workdir "$RUNS/cpu_slice" "${COMMON[@]}"
}
twin() {
  run twin "$LOG" python3 -m cifar_jax.main --config configs/cpu_slice.py \
    --workdir "$RUNS/cpu_slice_torch" --selected_from "$RUNS/cpu_slice" \
    --config.framework=torch --config.grid.seeds=0,1,2 --config.grid.repeat_selected_seeds= \
    "${COMMON[@]}"
}
publish() {
  run publish "$LOG" python3 -m cifar_jax.publish --out "$RESULTS" \
    --jax_grid "$RUNS/cpu_slice" --torch_grid "$RUNS/cpu_slice_torch" --run_log "$LOG" \
    --title "A CPU slice of the study" --readme README.md ${NOTE:+--note "$NOTE"}
}

case "$PHASE" in
  grid) grid ;;
  twin) twin ;;
  publish) publish ;;
  all) grid && twin && publish ;;
  *) echo "unknown phase $PHASE (grid, twin, publish, all)" >&2; exit 2 ;;
esac
