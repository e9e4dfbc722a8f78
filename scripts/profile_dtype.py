"""Why is bfloat16 not faster? Compares one model's train step in float32 and bfloat16.

  python3 scripts/profile_dtype.py --model resnet18 --batch_size 128 [--trace_dir DIR]

For each dtype: the step's time (median of chunks on the device), the optimized HLO's op census
(convolutions and their operand types and layouts, dtype converts, transposes and copies that
change layouts, fusions) and, with --trace_dir, a jax.profiler trace of a few steps to open in
TensorBoard's profile plugin or Perfetto. The census is what the device compiled, so it runs on
any backend; only the GPU's answer matters for the question.
"""

import argparse
import collections
import os
import re
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import engine as engine_lib  # noqa: E402
from configs import default  # noqa: E402

OPS = re.compile(r"=\s*(\w+)\[[^\]]*\][^ ]*\s+(\w[\w-]*)\(")


def census(hlo_text: str) -> collections.Counter:
    """Counts of the ops that matter for mixed precision in an optimized HLO module."""
    counts = collections.Counter()
    for line in hlo_text.splitlines():
        m = OPS.search(line)
        if not m:
            continue
        dtype, op = m.groups()
        if op in ("convert", "transpose", "copy", "fusion", "custom-call", "convolution", "dot"):
            key = op
            if op in ("custom-call", "convolution", "dot"):
                target = re.search(r'custom_call_target="([^"]+)"', line)
                key = f"{op}:{target.group(1) if target else ''}:{dtype}"
            elif op == "convert":
                key = f"convert->{dtype}"
            counts[key] += 1
    return counts


def run(model: str, dtype: str, batch: int, steps: int, trace_dir: str = None):
    config = default.get_config()
    config.model, config.dtype, config.step_loop = model, dtype, "device"
    config.batch_size = batch
    n = batch * steps
    programs = engine_lib.Engine().programs(engine_lib.static_spec(config, n))
    rng = np.random.default_rng(0)
    images = programs.to_device(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    labels = programs.to_device(rng.integers(0, 10, (n,), dtype=np.int32))
    states = programs.to_device(engine_lib.stack([jax.device_get(programs.init_state(config))]))
    progress = programs.to_device(engine_lib.stack([engine_lib.Progress.empty()]))
    perms = programs.permutations(states, 0)
    args = (states, progress, images, labels, perms, steps)
    hlo = programs.lowered_train_chunk(*args).compile().as_text()
    states, progress = programs.train_chunk(*args)
    jax.block_until_ready(progress)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        states, progress = programs.train_chunk(states, progress, images, labels, perms, steps)
        jax.block_until_ready(progress)
        times.append(time.perf_counter() - t0)
    if trace_dir:
        with jax.profiler.trace(os.path.join(trace_dir, dtype)):
            states, progress = programs.train_chunk(states, progress, images, labels, perms, 5)
            jax.block_until_ready(progress)
    return n / statistics.median(times), census(hlo), hlo


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--trace_dir")
    p.add_argument("--hlo_dir", help="write each dtype's optimized HLO here")
    a = p.parse_args()
    results = {dt: run(a.model, dt, a.batch_size, a.steps, a.trace_dir)
               for dt in ("float32", "bfloat16")}
    print(f"{a.model}, batch {a.batch_size}, {jax.devices()[0].device_kind}")
    for dt, (rate, _, hlo) in results.items():
        print(f"  {dt}: {rate:,.0f} train images/s")
        if a.hlo_dir:
            os.makedirs(a.hlo_dir, exist_ok=True)
            with open(os.path.join(a.hlo_dir, f"{a.model}_{dt}.hlo.txt"), "w") as f:
                f.write(hlo)
    keys = sorted(set(results["float32"][1]) | set(results["bfloat16"][1]))
    print(f"  {'op':<60} {'float32':>8} {'bfloat16':>8}")
    for k in keys:
        print(f"  {k:<60} {results['float32'][1][k]:>8} {results['bfloat16'][1][k]:>8}")


if __name__ == "__main__":
    main()
