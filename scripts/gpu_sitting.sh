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
# As a device call (scripts/prepare_device.sh prepares what it carries), timeout_s 600, SECONDS
# 570 (the last pack and the return need the rest):
#   command: scripts/gpu_sitting.sh $OUT folder:.device/data/cifar10-jpeg.tar.gz 570
#   carry:   [".whl", ".device/data"]
# The second H200 sitting: SITTING_CONTINUE=results/2026-11-30-h200/grid_records.tar.gz
# SITTING_BENCH=results/2026-11-30-h200/bench.json SITTING_PROFILE=0 before the command; the
# plan then has about 490 s for ResNet-18's share (projected 471 s: a thin margin).
# What comes back: OUT_DIR/results.tar.gz (the runs' results and reports) and OUT_DIR/sitting/
# (each phase's log, bench.json, run_log.json for `python -m cifar_jax.publish --run_log`).
# Env: SITTING_MODELS (study models, in order of preference), BENCH_SECONDS (the bench's share),
# SITTING_BENCH (an earlier sitting's bench.json, carried: no bench phase), SITTING_CONTINUE (an
# earlier sitting's grid records, e.g. results/2026-11-30-h200/grid_records.tar.gz: its finished
# models are kept, reported and not run again), SITTING_PROFILE=0
# (no profile phase), and gpu_study.sh's bench variables.
set -uo pipefail
OUT=${1:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
DATA=${2:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
TOTAL=${3:?usage: gpu_sitting.sh OUT_DIR DATA_SOURCE SECONDS}
shift 3
# The study as gpu_study.sh runs it (its seeds and data), for the plan's projection.
GRID=(--config.grid.repeat_selected_seeds=1,2 --config.data.source="$DATA" "$@")
cd "$(dirname "$0")/.."
export RUNS=${RUNS:-.device/runs} PACK="$(mkdir -p "$OUT" && cd "$OUT" && pwd)/results.tar.gz"
STAGE="$OUT/sitting"
mkdir -p "$STAGE" "$RUNS"
source scripts/run_log.sh
install_wheels  # the plan needs ml_collections too
if [ -n "${SITTING_CONTINUE:-}" ]; then tar xzf "$SITTING_CONTINUE" -C "$RUNS" || exit 2; fi
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
export TORCH_VARIANTS=${TORCH_VARIANTS:-eager,channels_last_amp}
export BENCH_FLAGS=${BENCH_FLAGS:---windows 3}
export BENCH_MODELS=${BENCH_MODELS:-resnet18,alexnet,mobilenetv2}
if [ -n "${SITTING_BENCH:-}" ]; then cp "$SITTING_BENCH" "$STAGE/bench.json"  # an earlier sitting's
else phase bench "${BENCH_SECONDS:-170}"; fi
python3 scripts/sitting_plan.py --bench_json "$STAGE/bench.json" \
  --seconds_left "$(( $(left) - 30 ))" \
  --candidates "${SITTING_MODELS:-resnet18,alexnet,mobilenetv2}" --grid_workdir "$RUNS/grid" \
  --config configs/grid.py "${GRID[@]}" > "$STAGE/plan.txt"
# finished MODEL...: the candidates whose grid ended with every selected trial tested, as
# "m1,m2," (each grid process lists them too, so that its report covers every model).
finished() {
  python3 scripts/sitting_plan.py --finished_only --grid_workdir "$RUNS/grid" \
    --candidates "${SITTING_MODELS:-resnet18,alexnet,mobilenetv2}" --config configs/grid.py \
    "${GRID[@]}" | awk '{printf "%s,", $2}'
}
while read -r kind model pack projected; do
  [ "$kind" = run ] || continue
  if [ "$(left)" -lt "$projected" ]; then
    echo "=== study $model: projected $projected s, $(left) s left: not started"; continue
  fi
  phase study "$(( $(left) - 10 ))" "$@" --config.grid.models="$(finished)$model" \
    --config.grid.pack_size="$pack" < /dev/null
  rc=$?
  echo "=== study $model: exit $rc, projected $projected s"
  case $rc in 124|137) break ;; esac  # stopped at the sitting's limit: nothing else fits
done < "$STAGE/plan.txt"
if [ "${SITTING_PROFILE:-1}" = 1 ] && [ "$(left)" -gt 90 ]; then
  phase profile "$(( $(left) - 10 ))"
fi
echo "=== sitting done, $(left) s to spare; $(du -h "$PACK" | cut -f1) in $PACK"
