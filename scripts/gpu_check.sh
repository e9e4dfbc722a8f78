#!/usr/bin/env bash
# One prepared check for a lent GPU machine (about 8 minutes): the JAX/PyTorch benchmark and a
# 10-epoch ResNet-18 run (the study's best config) on real data, everything into one folder.
#
#   scripts/gpu_check.sh OUT_DIR DATA_SOURCE
#   e.g. scripts/gpu_check.sh /tmp/gpu folder:/data/cifar10-jpeg.tar.gz
#
# Images with JAX, flax, optax, orbax and torch but without clu / ml_collections / dm-pix can
# bring them as wheels in .whl/ (pure Python); TensorFlow is not needed.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR DATA_SOURCE}
DATA=${2:?usage: gpu_check.sh OUT_DIR DATA_SOURCE}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, torch, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
} 2>&1 | tee "$OUT/env.txt"

echo "== JAX: 10-epoch ResNet-18, Adam lr 0.001 wd 1e-4 basic augmentation"
timeout 300 python3 -m cifar_jax.main --config configs/default.py --workdir /tmp/gpu_resnet18 \
  --config.data.source="$DATA" 2>&1 | grep -v "logging_writer\|local.py" | tee "$OUT/jax_resnet18.log"
cp /tmp/gpu_resnet18/result.json "$OUT/jax_resnet18_result.json" 2>/dev/null
cp /tmp/gpu_resnet18/metrics.jsonl "$OUT/jax_resnet18_metrics.jsonl" 2>/dev/null

echo "== Benchmark, float32 both"
timeout 240 python3 -m cifar_jax.bench --models resnet18,alexnet,mobilenetv2 \
  --frameworks jax,torch --batch_size 128 --window_steps 20 --windows 5 \
  --output "$OUT/bench_fp32.json" 2>&1 | grep "^|" | tee "$OUT/bench.md"
echo "== Benchmark, fast paths: JAX bfloat16; PyTorch AMP bf16 + channels_last"
timeout 240 python3 -m cifar_jax.bench --models resnet18,alexnet \
  --frameworks jax,torch --batch_size 128 --window_steps 20 --windows 3 \
  --jax_dtype bfloat16 --torch_amp --torch_channels_last \
  --output "$OUT/bench_bf16.json" 2>&1 | grep "^|" | tee -a "$OUT/bench.md"
echo "done"
