#!/usr/bin/env bash
# Prepares what a device call of scripts/gpu_study.sh carries, once, on the machine that makes
# the call (it has the package registries; the GPU machine has none):
#   .whl/          pure-Python wheels of the packages the GPU image lacks (clu, ml_collections,
#                  dm-pix, and onnxscript with onnx-ir for the ONNX export of the deploy phase;
#                  the image has JAX, flax, optax, orbax, torch, tensorboard, onnx, onnxruntime)
#   .device/data/  the CIFAR-10 JPEG copy (ignored by git; the device call carries it)
# Then, one device call per phase (device tool `run`):
#   command: scripts/gpu_study.sh study $OUT folder:.device/data/cifar10-jpeg.tar.gz
#   carry:   [".whl", ".device/data"]      (add ".device/runs" for phases that read earlier runs)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/cifar10-jpeg.tar.gz}
mkdir -p .whl .device/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .whl \
  clu==0.0.12 ml_collections==1.1.0 dm-pix==0.4.5 onnxscript==0.7.2 onnx-ir==1.1.0
cp "$DATA" .device/data/
du -sh .whl .device/data
