#!/usr/bin/env bash
# One sitting on a lent GPU, as one device call: the preflight, the bench, as much of the study
# as the bench says fits, then the dtype profile. Each phase is a scripts/gpu_study.sh phase
# stopped at a time limit, and the results are packed after each, so a phase that overruns
# loses only itself. The study runs one grid process per model, all in one grid workdir, and
# only the models whose grid the bench projects to end in the time left (scripts/sitting_plan.py):
# a model's selection, test evaluation and repeat seeds need its weights, which cannot travel back.
#
#   scripts/gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS [--config.FIELD=VALUE ...]
#
# Overrides apply to the study's grid (configs/grid.py) and to its projection alike.
# As a device call (scripts/prepare_device.sh prepares what it carries), with a timeout a minute
# above SECONDS:
#   command: scripts/gpu_sitting.sh $OUT folder:.device/data/cifar10-jpeg.tar.gz 500
#   carry:   [".whl", ".device/data"]  (and ".device/runs" to continue an earlier sitting's grid)
# What comes back: OUT_DIR/results.tar.gz (the runs' results and reports) and OUT_DIR/sitting/
# (each phase's log, bench.json, run_log.json for `python -m cifar_jax.publish --run_log`).
# Env: SITTING_MODELS (study models, in order of preference), BENCH_SECONDS (the bench's share),
# SITTING_PROFILE=0 (no profile phase),
# and gpu_study.sh's bench variables.
set -uo pipefail
OUT=${1:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
DATA=${2:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
TOTAL=${3:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
shift 3
GRID=(--config.grid.repeat_selected_seeds=1,2 --config.data.source="$DATA" "$@")
cd "$(dirname "$0")/.."
export RUNS=${RUNS:-.device/runs} PACK="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/results.tar.gz"
STAGE="$OUT/sitting"
mkdir -p "$STAGE" "$RUNS"
source scripts/run_log.sh
deadline=$(( $(date +%s) + TOTAL ))
left() { echo $(( deadline - $(date +%s) )); }

# phase NAME SECONDS [gpu_study.sh overrides...]: the phase, stopped after SECONDS.
phase() {
  local name=$1 budget=$2; shift 2
  echo "=== $name: up to $budget s of the $(left) s left"
  timeout -k 20 "$budget" scripts/gpu_study.sh "$name" "$STAGE" "$DATA" "$@"
  local rc=$?
  [ "$rc" = 124 ] && echo "=== $name: stopped at its limit of $budget s"
  pack_results "$RUNS" "$PACK"
  return "$rc"
}

phase preflight 150 || { echo "=== the preflight failed: nothing else runs"; exit 3; }
export JAX_VARIANTS=${JAX_VARIANTS:-loop} PACK_SIZES=${PACK_SIZES:-1,4}  # bfloat16: the profile
export TORCH_VARIANTS=${TORCH_VARIANTS:-eager,channels_last_amp} BENCH_FLAGS=${BENCH_FLAGS:---windows 3}
export BENCH_MODELS=${BENCH_MODELS:-resnet18,alexnet,mobilenetv2}
phase bench "${BENCH_SECONDS:-170}"
python3 scripts/sitting_plan.py --bench_json "$STAGE/bench.json" --seconds_left "$(( $(left) - 30 ))" \
  --candidates "${SITTING_MODELS:-resnet18,alexnet,mobilenetv2}" --config configs/grid.py "${GRID[@]}" \
  > "$STAGE/plan.txt"
while read -r model pack projected; do
  phase study "$(( $(left) - 10 ))" "${GRID[@]}" --config.grid.models="$model" \
    --config.grid.pack_size="$pack" < /dev/null
  echo "=== study $model: projected $projected s"
done < "$STAGE/plan.txt"
if [ "${SITTING_PROFILE:-1}" = 1 ] && [ "$(left)" -gt 90 ]; then phase profile "$(( $(left) - 10 ))"; fi
echo "=== sitting done, $(left) s to spare; $(du -h "$PACK" | cut -f1) in $PACK"
