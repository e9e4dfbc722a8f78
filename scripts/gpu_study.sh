#!/usr/bin/env bash
# The study on a lent GPU, in phases that each fit one device call (10 minutes at most):
#
#   scripts/gpu_study.sh PHASE OUT_DIR DATA_SOURCE [--config.FIELD=VALUE ...]
#
#   study   the JAX grid (configs/grid.py; narrow it with --config.grid.models=...), then each
#           model's selected configuration again with seeds 1 and 2
#   twin    the PyTorch twin on the JAX grid's selected configurations, seeds 0, 1, 2
#           (needs the study's results.csv under $RUNS/grid)
#   recipe  configs/recipe.py: the beyond-the-study recipe, 3 seeds per model
#   bench   the speed table: JAX variants and pack sizes against PyTorch's fastest settings
#   profile why bfloat16 did not pay: ResNet-18's step in float32 and bfloat16, timed, with
#           the compiled programs' op census (converts, layout copies, convolution types)
#
# Runs go to $RUNS (default .device/runs, ignored by git, so a later call can carry what it
# needs). Everything a report needs, and nothing else (no checkpoints, no weights), is packed
# into OUT_DIR/results.tar.gz; OUT_DIR/run_log.json records the commands, package versions,
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
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
COMMON=(--config.data.source="$DATA" --config.compilation_cache_dir="$RUNS/xla_cache" "$@")

# run NAME COMMAND...: runs it, appends its output to OUT/NAME.log, records command and time.
run() {
  local name=$1; shift
  local start; start=$(date +%s.%N)
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  python3 - "$OUT/run_log.json" "$name" "$start" "$rc" "$*" <<'PY'
import json, os, platform, sys, time
path, name, start, rc, command = sys.argv[1:]
log = json.load(open(path)) if os.path.exists(path) else {"commands": [], "wall_times": {}}
log["commands"].append(command)
log["wall_times"][name] = time.time() - float(start)
log.setdefault("exit_codes", {})[name] = int(rc)
versions = {"python": platform.python_version()}
for module in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch"):
    try:
        versions[module] = __import__(module, fromlist=["_"]).__version__
    except Exception:
        pass
try:
    import torch
    versions["cuda (torch)"] = torch.version.cuda
except Exception:
    pass
try:
    import jax
    log["device"] = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
except Exception:
    pass
log["versions"] = versions
json.dump(log, open(path, "w"), indent=2)
PY
  return "$rc"
}

case "$PHASE" in
  study)
    run study python3 -m cifar_jax.main --config configs/grid.py --workdir "$RUNS/grid" \
      --config.grid.repeat_selected_seeds=1,2 "${COMMON[@]}" ;;
  twin)
    run twin python3 -m cifar_jax.main --config configs/grid.py --workdir "$RUNS/grid_torch" \
      --selected_from "$RUNS/grid" --config.framework=torch --config.grid.seeds=0,1,2 \
      "${COMMON[@]}" ;;
  recipe)
    run recipe python3 -m cifar_jax.main --config configs/recipe.py --workdir "$RUNS/recipe" \
      "${COMMON[@]}" ;;
  bench)
    run bench python3 -m cifar_jax.bench --models "${BENCH_MODELS:-resnet18,alexnet,mobilenetv2}" \
      --frameworks jax,torch --jax_variants "${JAX_VARIANTS:-steps,loop,loop_bf16}" \
      --pack_sizes "${PACK_SIZES:-1,4,8}" --precision tf32 \
      --torch_variants "${TORCH_VARIANTS:-eager,channels_last_amp,compile,compile_amp,reduce_overhead,reduce_overhead_amp}" \
      --out "$OUT/bench.json" ;;
  profile)
    run profile python3 scripts/profile_dtype.py --model "${PROFILE_MODEL:-resnet18}" \
      --batch_size 128 --hlo_dir "$RUNS/profile" ;;
  *) echo "unknown phase $PHASE (study, twin, recipe, bench, profile)" >&2; exit 2 ;;
esac
rc=$?
# What the report needs: per trial result.json, metrics.jsonl, config.json; the report's files.
(cd "$RUNS" && find . \( -name checkpoints -o -name best_weights -o -name xla_cache \) -prune \
   -o \( -name result.json -o -name metrics.jsonl -o -name config.json -o -name grid_config.json \
   -o -name results.csv -o -name summary.md -o -name '*.png' -o -name '*.hlo.txt' \) -print \
   | tar czf "$(cd - >/dev/null && cd "$OUT" && pwd)/results.tar.gz" -T -)
echo "phase $PHASE: exit $rc; $(du -h "$OUT/results.tar.gz" | cut -f1) packed into $OUT/results.tar.gz"
exit "$rc"
