"""Side-by-side speed of the JAX models and their PyTorch twins on the current device.

python -m cifar_jax.bench --models resnet18,alexnet,mobilenetv2 --frameworks jax,torch \
    --batch_size 128 [--jax_dtype bfloat16] [--torch_channels_last --torch_amp --torch_compile]

Per model and framework: steady-state training images/s (median over timed windows after
warm-up; the first step, with compilation, is reported apart), evaluation images/s, peak device
memory where the framework reports it, and the JAX/PyTorch ratio. The training step is the full
optimizer step (Adam, cosine schedule) on device-resident data with augmentation 'none', so both
frameworks time the same work. Also per model: parameters and multiply-accumulates per image
(counted from the convolutions and matmuls of the forward pass). Output: a markdown table on stdout and JSON.
"""

import json
import statistics
import time
from typing import Any, Dict, List

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet18", "alexnet", "mobilenetv2"], "Models to time.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "jax and/or torch.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("eval_batch_size", 1000, "Evaluation batch size.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps after the first (compiling) step.")
flags.DEFINE_integer("window_steps", 10, "Steps per timed window.")
flags.DEFINE_integer("windows", 5, "Timed windows; the median is reported.")
flags.DEFINE_enum("jax_dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
flags.DEFINE_bool("torch_channels_last", False, "PyTorch channels_last memory format.")
flags.DEFINE_bool("torch_amp", False, "PyTorch autocast to bfloat16.")
flags.DEFINE_bool("torch_compile", False, "torch.compile the PyTorch model.")
flags.DEFINE_string("output", "bench.json", "Where to write the JSON results.")
flags.DEFINE_bool("efficiency", False, "Also measure the study's efficiency table (JAX): "
                  "checkpoint size, inference latency at batch 1, throughput at batch 1024.")


def count_macs(fn, *args) -> int:
    """Multiply-accumulates of `fn(*args)`, from the convolutions and matmuls of its jaxpr."""
    import jax

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                kernel = eqn.invars[1].aval.shape
                dn = eqn.params["dimension_numbers"]
                # MACs = output elements x (kernel window x input features per group).
                k_in = kernel[dn.rhs_spec[1]]
                window = int(np.prod([kernel[d] for d in dn.rhs_spec[2:]]))
                total += int(np.prod(out)) * k_in * window
            elif name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += int(np.prod(eqn.outvars[0].aval.shape)) * int(
                    np.prod([lhs[d] for d in lhs_contract]))
            for p in eqn.params.values():  # nested jaxprs (jit, custom_jvp, ...)
                inner = getattr(p, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    total += walk(inner)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _median_rate(run_window, images_per_window: int, windows: int) -> float:
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        run_window()
        rates.append(images_per_window / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_jax(model_name: str, batch_size: int, eval_batch_size: int, dtype: str, warmup: int,
              window_steps: int, windows: int) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from configs import default
    from cifar_jax import train

    config = default.get_config()
    config.model, config.dtype = model_name, dtype
    config.data.augmentation = "none"
    config.batch_size, config.eval_batch_size = batch_size, eval_batch_size
    n = batch_size * 4
    steps = train.compiled_steps(train.static_spec(config, n // batch_size, jax.device_count()))
    shape = train.RunShape(n, batch_size, n // batch_size, 10)
    model = train.build_model(config)
    state = jax.device_put(train.create_train_state(jax.random.PRNGKey(0), config, model, shape),
                           steps.replicated)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), steps.replicated)
    labels = jax.device_put(rng.integers(0, 10, (n,), dtype=np.int32), steps.replicated)
    perm = steps.permutation(state.rng, 0, n)

    t0 = time.perf_counter()
    state, m = steps.train(state, images, labels, perm)
    jax.block_until_ready(m)
    first_step = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = steps.train(state, images, labels, perm)
    jax.block_until_ready(m)

    def window():
        nonlocal state
        for _ in range(window_steps):
            state, out = steps.train(state, images, labels, perm)
        jax.block_until_ready(out)

    train_rate = _median_rate(window, window_steps * batch_size, windows)

    eval_split = train.put_eval_split(
        train.input_pipeline.Split(rng.integers(0, 256, (eval_batch_size, 32, 32, 3), np.uint8),
                                   rng.integers(0, 10, (eval_batch_size,), np.int32)),
        eval_batch_size, steps.replicated)
    jax.block_until_ready(steps.eval(state, eval_split.images, eval_split.labels,
                                     eval_split.mask, 0))
    eval_rate = _median_rate(
        lambda: jax.block_until_ready(steps.eval(state, eval_split.images, eval_split.labels,
                                                 eval_split.mask, 0)),
        eval_batch_size, max(3, windows))

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    macs = count_macs(lambda v, x: model.apply(v, x, train=False), variables,
                      jnp.zeros((1, 32, 32, 3), jnp.float32))
    stats = jax.devices()[0].memory_stats() or {}
    return {"framework": "jax", "model": model_name, "dtype": dtype,
            "params": sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
            "macs_per_image": macs,
            "first_step_s": first_step, "train_images_per_s": train_rate,
            "eval_images_per_s": eval_rate,
            "peak_memory_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
            "device": jax.devices()[0].device_kind}


def bench_torch(model_name: str, batch_size: int, eval_batch_size: int, channels_last: bool,
                amp: bool, compile_model: bool, warmup: int, window_steps: int,
                windows: int) -> Dict[str, Any]:
    import torch

    from cifar_jax.torch_twin.models import get_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = get_model(model_name).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10_000)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randn(batch_size, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.train()
    t0 = time.perf_counter()
    step()
    sync()
    first_step = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()

    def window():
        for _ in range(window_steps):
            step()
        sync()

    train_rate = _median_rate(window, window_steps * batch_size, windows)
    model.eval()
    xe = torch.randn(eval_batch_size, 3, 32, 32, device=device).to(memory_format=fmt)

    @torch.no_grad()
    def evaluate():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            step_model(xe)
        sync()

    evaluate()
    eval_rate = _median_rate(evaluate, eval_batch_size, max(3, windows))
    return {"framework": "torch", "model": model_name,
            "dtype": "bfloat16-amp" if amp else "float32",
            "params": sum(p.numel() for p in model.parameters()),
            "first_step_s": first_step, "train_images_per_s": train_rate,
            "eval_images_per_s": eval_rate,
            "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                               if device.type == "cuda" else None),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def efficiency_jax(model_name: str, repeats: int = 20) -> Dict[str, Any]:
    """Checkpoint size on disk, batch-1 latency and batch-1024 inference throughput."""
    import os
    import subprocess
    import tempfile

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from cifar_jax.models import get_model

    model = get_model(model_name)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "weights")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(path, variables)
        ckptr.wait_until_finished()
        size = int(subprocess.run(["du", "-sb", path], capture_output=True, text=True)
                   .stdout.split()[0])
    out = {}
    for batch in (1, 1024):
        x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
        jax.block_until_ready(forward(variables, x))
        times = []
        for _ in range(repeats if batch == 1 else max(3, repeats // 5)):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(variables, x))
            times.append(time.perf_counter() - t0)
        out[batch] = statistics.median(times)
    return {"model": model_name, "checkpoint_mb": size / 2**20,
            "latency_batch1_ms": 1000 * out[1], "throughput_batch1024": 1024 / out[1024]}


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    jax_rate = {r["model"]: r["train_images_per_s"] for r in rows if r["framework"] == "jax"}
    lines = ["| model | framework | dtype | params | MACs/image | first step s | train img/s "
             "| eval img/s | peak MB | JAX/PyTorch train |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = (f"{jax_rate[r['model']] / r['train_images_per_s']:.2f}x"
                 if r["framework"] == "torch" and r["model"] in jax_rate else "")
        macs = f"{r['macs_per_image'] / 1e6:.1f}M" if r.get("macs_per_image") else ""
        mem = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "n/a"
        lines.append(f"| {r['model']} | {r['framework']} | {r['dtype']} | {r['params']:,} | "
                     f"{macs} | {r['first_step_s']:.1f} | {r['train_images_per_s']:.0f} | "
                     f"{r['eval_images_per_s']:.0f} | {mem} | {ratio} |")
    return "\n".join(lines)


def main(argv):
    del argv
    bad = set(FLAGS.frameworks) - {"jax", "torch"}
    if bad:
        raise app.UsageError(f"--frameworks: unknown {sorted(bad)}; valid: jax, torch.")
    rows = []
    for model_name in FLAGS.models:
        if "jax" in FLAGS.frameworks:
            logging.info("Timing JAX %s ...", model_name)
            rows.append(bench_jax(model_name, FLAGS.batch_size, FLAGS.eval_batch_size,
                                  FLAGS.jax_dtype, FLAGS.warmup_steps, FLAGS.window_steps,
                                  FLAGS.windows))
        if "torch" in FLAGS.frameworks:
            logging.info("Timing PyTorch %s ...", model_name)
            rows.append(bench_torch(model_name, FLAGS.batch_size, FLAGS.eval_batch_size,
                                    FLAGS.torch_channels_last, FLAGS.torch_amp,
                                    FLAGS.torch_compile, FLAGS.warmup_steps,
                                    FLAGS.window_steps, FLAGS.windows))
    table = markdown_table(rows)
    print(table)
    efficiency = []
    if FLAGS.efficiency:
        macs = {r["model"]: r.get("macs_per_image") for r in rows if r["framework"] == "jax"}
        rate = {r["model"]: r["train_images_per_s"] for r in rows if r["framework"] == "jax"}
        params = {r["model"]: r["params"] for r in rows}
        lines = ["", "| model | params | MACs/image | checkpoint MB | train img/s | latency at "
                 "batch 1 (ms) | inference img/s at batch 1024 |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for model_name in FLAGS.models:
            e = efficiency_jax(model_name)
            efficiency.append(e)
            m = macs.get(model_name)
            lines.append(f"| {model_name} | {params.get(model_name, 0):,} | "
                         f"{'' if m is None else f'{m / 1e6:.1f}M'} | {e['checkpoint_mb']:.1f} | "
                         f"{rate.get(model_name, float('nan')):.0f} | "
                         f"{e['latency_batch1_ms']:.2f} | {e['throughput_batch1024']:.0f} |")
        print("\n".join(lines))
        table += "\n" + "\n".join(lines)
    with open(FLAGS.output, "w") as f:
        json.dump({"batch_size": FLAGS.batch_size, "rows": rows, "efficiency": efficiency,
                   "table": table}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
