#!/usr/bin/env bash
# The study on a lent GPU, in phases that each fit one device call (10 minutes at most):
#
#   scripts/gpu_study.sh PHASE OUT_DIR DATA_SOURCE [--config.FIELD=VALUE ...]
#
#   preflight  a minute that proves the image before the long phases: the imports and versions,
#           the devices, and configs/smoke.py (synthetic data) trained on the GPU
#   study   the JAX grid (configs/grid.py; narrow it with --config.grid.models=...), then each
#           model's selected configuration again with seeds 1 and 2
#   twin    the PyTorch twin on the JAX grid's selected configurations, seeds 0, 1, 2
#           (needs the study's results.csv under $RUNS/grid)
#   recipe  configs/recipe.py: the beyond-the-study recipe, 3 seeds per model
#   bench   the speed table: JAX variants and pack sizes against PyTorch's fastest settings
#   profile why bfloat16 did not pay: ResNet-18's step in float32 and bfloat16, timed, with
#           the compiled programs' op census (converts, layout copies, convolution types)
#   depthwise  MobileNetV2's depthwise forms on the GPU (grouped convolution vs shifted
#           multiply-adds, float32 and in the on-device loop): which one config.depthwise=auto
#           should pick there
#   deploy  the deployment table (JAX, ONNX float32, ONNX int8) of the study's selected models
#           (needs the study's grid under $RUNS/grid)
#   vit     configs/vit.py: the ViT-Lite-7/4 recipe at the study's budget, 3 seeds
#   distill configs/distill.py: MobileNetV2 taught by the study grid's selected ResNet-18
#           ($RUNS/grid), seeds 0, 1, 2, and the same runs with alpha 0 (no teacher's term)
#   transfer  configs/transfer.py: torchvision's ImageNet ResNet-18 fine-tuned (3 seeds); needs
#           WEIGHTS=<path of resnet18-f37072fd.pth> (carried in .device/, never downloaded)
#   cifar100  the study's grid on CIFAR-100 (DATA_SOURCE must then be a CIFAR-100 copy, e.g.
#           cifar_dir:.device/data/cifar-100-python; none is carried by default)
#
# Runs go to $RUNS (default .device/runs, ignored by git, so a later call can carry what it
# needs). Everything a report needs, and nothing else (no checkpoints, no weights), is packed
# into OUT_DIR/results.tar.gz (or $PACK); OUT_DIR/run_log.json records the commands, package versions,
# device and wall times that `python -m cifar_jax.publish --run_log` turns into REPRODUCE.md.
# Images with JAX, flax, optax and orbax but without clu, ml_collections or dm-pix take them as
# pure-Python wheels from .whl/: scripts/prepare_device.sh puts them there, with the data in
# .device/data/, and says what a device call carries.
set -uo pipefail
PHASE=${1:?usage: gpu_study.sh PHASE OUT_DIR DATA_SOURCE [overrides...]}
OUT=${2:?usage: gpu_study.sh PHASE OUT_DIR DATA_SOURCE [overrides...]}
DATA=${3:?usage: gpu_study.sh PHASE OUT_DIR DATA_SOURCE [overrides...]}
shift 3
cd "$(dirname "$0")/.."
RUNS=${RUNS:-.device/runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# A time limit's SIGTERM (gpu_sitting.sh) stops the phase's command; the phase is still
# recorded in run_log.json and its results packed.
trap 'echo "phase $PHASE: stopped by SIGTERM"' TERM
COMMON=(--config.data.source="$DATA" --config.compilation_cache_dir="$RUNS/xla_cache" "$@")

# run NAME LOG_JSON COMMAND...: runs it, logs its output, records command, versions and time.
source scripts/run_log.sh
install_wheels
LOG="$OUT/run_log.json"

case "$PHASE" in
  preflight)
    run preflight "$LOG" python3 -c "import cifar_jax, flax, jax, optax, orbax.checkpoint, \
clu, ml_collections, dm_pix, os; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'orbax', orbax.checkpoint.__version__); print(jax.devices()); \
print('XLA_FLAGS', os.environ.get('XLA_FLAGS'))" &&
    run preflight "$LOG" python3 -m cifar_jax.main --config configs/smoke.py \
      --workdir "$RUNS/smoke" --config.compilation_cache_dir="$RUNS/xla_cache" ;;
  study)
    run study "$LOG" python3 -m cifar_jax.main --config configs/grid.py --workdir "$RUNS/grid" \
      --config.grid.repeat_selected_seeds=1,2 "${COMMON[@]}" ;;
  twin)
    run twin "$LOG" python3 -m cifar_jax.main --config configs/grid.py --workdir "$RUNS/grid_torch" \
      --selected_from "$RUNS/grid" --config.framework=torch --config.grid.seeds=0,1,2 \
      "${COMMON[@]}" ;;
  recipe)
    run recipe "$LOG" python3 -m cifar_jax.main --config configs/recipe.py --workdir "$RUNS/recipe" \
      "${COMMON[@]}" ;;
  bench)
    run bench "$LOG" python3 -m cifar_jax.bench --models "${BENCH_MODELS:-resnet18,alexnet,mobilenetv2}" \
      --frameworks jax,torch --jax_variants "${JAX_VARIANTS:-steps,loop,loop_bf16}" \
      --pack_sizes "${PACK_SIZES:-1,4,8}" --precision tf32 \
      --torch_variants "${TORCH_VARIANTS:-eager,channels_last_amp,compile,compile_amp,reduce_overhead,reduce_overhead_amp}" \
      --out "$OUT/bench.json" ${BENCH_FLAGS:-} ;;
  depthwise)
    run depthwise "$LOG" python3 -m cifar_jax.bench --models mobilenetv2 --frameworks jax \
      --jax_variants loop_grouped,loop_shifts,steps_grouped,steps_shifts --precision tf32 \
      --out "$OUT/depthwise.json" ;;
  deploy)
    run deploy "$LOG" python3 -m cifar_jax.bench --models= \
      --deploy "$RUNS/grid:resnet18,$RUNS/grid:alexnet,$RUNS/grid:mobilenetv2" \
      --out "$OUT/deploy.json" ;;
  vit)
    run vit "$LOG" python3 -m cifar_jax.main --config configs/vit.py --workdir "$RUNS/vit" \
      "${COMMON[@]}" ;;
  distill)
    for seed in 0 1 2; do
      for alpha in 0.9 0; do
        run distill "$LOG" python3 -m cifar_jax.main --config configs/distill.py \
          --workdir "$RUNS/distill/alpha$alpha/seed$seed" --config.seed=$seed \
          --config.distill.teacher_workdir="$RUNS/grid" --config.distill.alpha=$alpha \
          "${COMMON[@]}" || break 2
      done
    done ;;
  transfer)
    for seed in 0 1 2; do
      run transfer "$LOG" python3 -m cifar_jax.main --config configs/transfer.py \
        --workdir "$RUNS/transfer/seed$seed" --config.seed=$seed \
        --config.init_from="${WEIGHTS:?transfer needs WEIGHTS=path/to/resnet18-f37072fd.pth}" \
        "${COMMON[@]}" || break
    done ;;
  cifar100)
    run cifar100 "$LOG" python3 -m cifar_jax.main --config configs/grid.py \
      --workdir "$RUNS/grid_cifar100" --config.data.dataset=cifar100 \
      --config.grid.repeat_selected_seeds=1,2 "${COMMON[@]}" ;;
  profile)
    run profile "$LOG" python3 scripts/profile_dtype.py --model "${PROFILE_MODEL:-resnet18}" \
      --batch_size 128 --hlo_dir "$RUNS/profile" ;;
  *) echo "unknown phase $PHASE (preflight, study, twin, recipe, bench, profile, depthwise, deploy, vit, distill, transfer, cifar100)" >&2
     exit 2 ;;
esac
rc=$?
PACK=${PACK:-$OUT/results.tar.gz}
pack_results "$RUNS" "$PACK"
echo "phase $PHASE: exit $rc; $(du -h "$PACK" | cut -f1) packed into $PACK"
exit "$rc"
