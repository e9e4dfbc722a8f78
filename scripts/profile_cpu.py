"""Where a train step's time goes on the CPU: one model's step (as the engine runs it on the CPU,
one dispatch per step), traced with jax.profiler, each executed XLA op (thunk) timed and sorted
into what it computes.

  python3 scripts/profile_cpu.py --model resnet18 --batch_size 64 [--steps 5] [--depthwise auto]

Categories, from the compiled HLO of each thunk: convolution (and its fusions), dot (matmul),
reduction (BatchNorm statistics, loss and metric sums; a fusion whose root reduces),
elementwise (fusions of pointwise ops: BatchNorm's normalisation, ReLU, the optimizer update,
augmentation), data movement (transposes, copies, slices, pads, gathers), other.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import engine as engine_lib  # noqa: E402
from configs import default  # noqa: E402

MOVEMENT = ("transpose", "copy", "slice", "dynamic-slice", "pad", "gather", "concatenate",
            "reshape", "broadcast", "dynamic-update-slice", "scatter", "reverse")


def categories(hlo: str):
    """instruction name -> category, from an optimized HLO module's text."""
    computations, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = computations.setdefault(head.group(1), [])
        elif current is not None and "=" in line:
            current.append(line)
    ops = lambda lines: [m.group(1) for m in (re.search(r"\s([a-z][\w\-]*)\(", line.split("=", 1)[1])  # noqa: E731
                                             for line in lines) if m]
    out = {}
    for lines in computations.values():
        for line in lines:
            name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) =", line)
            if not name:
                continue
            own = ops([line])
            called = re.findall(r"calls=%?([\w.\-]+)", line)
            inner = [op for c in called for op in ops(computations.get(c, []))]
            out[name.group(1)] = classify(own[0] if own else "", inner, line)
    return out


def classify(op: str, inner, line: str) -> str:
    every = [op] + inner
    if "convolution" in every or "__onednn$convolution" in line:
        return "convolution"
    if "dot" in every:
        return "dot (matmul)"
    if op in ("reduce", "reduce-window") or (op == "fusion" and "reduce" in inner):
        return "reduction"
    if op == "fusion" and inner and all(o in MOVEMENT or o in ("parameter", "constant")
                                        for o in inner):
        return "data movement"
    if op in MOVEMENT:
        return "data movement"
    if op == "fusion":
        return "elementwise"
    return "other"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--depthwise", default="auto")
    p.add_argument("--augmentation", default="basic")
    args = p.parse_args()

    config = default.get_config()
    config.model, config.batch_size, config.step_loop = args.model, args.batch_size, "host"
    config.depthwise, config.data.augmentation = args.depthwise, args.augmentation
    n = args.batch_size * (args.steps + 2)
    programs = engine_lib.Engine().programs(engine_lib.static_spec(config, n))
    rng = np.random.default_rng(0)
    images = programs.to_device(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    labels = programs.to_device(rng.integers(0, 10, (n,), dtype=np.int32))
    states = programs.to_device(engine_lib.stack([jax.device_get(programs.init_state(config))]))
    progress = programs.to_device(engine_lib.stack([engine_lib.Progress.empty()]))
    perms = programs.permutations(states, 0)
    states, progress = programs.train_chunk(states, progress, images, labels, perms, 2)
    jax.block_until_ready(progress)
    hlo = programs._train_step.lower(states, progress, images, labels, perms).compile().as_text()
    kinds = categories(hlo)

    trace = tempfile.mkdtemp()
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace, create_perfetto_trace=True)
    states, progress = programs.train_chunk(states, progress, images, labels, perms, args.steps)
    jax.block_until_ready(progress)
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - t0) / args.steps
    events = json.load(gzip.open(glob.glob(f"{trace}/**/*.json.gz", recursive=True)[0]))
    per_op = collections.Counter()
    for e in events["traceEvents"]:
        if e.get("ph") == "X" and e["name"] in kinds:
            per_op[e["name"]] += e["dur"] / 1000 / args.steps  # ms per step
    by_kind = collections.Counter()
    for name, ms in per_op.items():
        by_kind[kinds[name]] += ms
    total = sum(per_op.values())
    print(f"{args.model}, batch {args.batch_size}, depthwise {args.depthwise}: "
          f"{1000 * wall:.0f} ms per step in the trace ({args.batch_size / wall:.0f} img/s); "
          f"{total:.0f} ms of it in XLA ops")
    print("| category | ms per step | share of op time |\n| --- | ---: | ---: |")
    for kind, ms in by_kind.most_common():
        print(f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print("\nlargest ops:")
    for name, ms in per_op.most_common(12):
        print(f"  {ms:8.1f} ms  {kinds[name]:<14} {name}")


if __name__ == "__main__":
    main()
