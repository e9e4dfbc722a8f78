"""Training speed of the JAX engine and of the PyTorch twin on the current device.

  python -m cifar_jax.bench --models resnet18,alexnet,mobilenetv2 --frameworks jax,torch
  python -m cifar_jax.bench --jax_variants steps,loop,loop_bf16 --pack_sizes 1,2,4,8 \
      --torch_variants eager,channels_last_amp,compile --precision tf32 --out bench.json
  python -m cifar_jax.bench --models= --deploy runs/alexnet,runs/grid:resnet18  # deployment

JAX variants: `steps` (one dispatch per step: the engine's CPU path and the pre-chunking
engine), `loop` (a chunk of steps in one on-device loop), `loop_bf16` (the same in bfloat16);
each at every pack size (K trials trained at once; images/s counts all K). PyTorch variants:
`eager`, `channels_last`, `amp` (bfloat16 autocast), `channels_last_amp`, and torch.compile
(channels_last) as `compile` (default mode), `max_autotune`, `reduce_overhead` (CUDA graphs),
each also with `_amp`; compile time apart. JAX float32 rows are compared with the fastest
float32 PyTorch variant, bfloat16 rows with the fastest AMP one.
Both sides time the full optimizer step (Adam, cosine schedule) on device-resident data, with
the same `--precision` (TF32 or true float32), set explicitly on both and recorded.

Per model the table gives train images/s, the first step's time (compilation included; JAX
also warm, from the persistent compilation cache), eval images/s, device memory (JAX: held
while training, states and data included, as JAX keeps no per-program peak; PyTorch: peak
allocated), evaluation in GFLOP/s (2 per multiply-accumulate) beside JAX's own rate for one
large float32 matmul on the device (measured first, in the settings line: how near a network's
evaluation runs to XLA's best kernel), and the projected wall time of the model's share of the
study's grid (configs/grid.py). The JSON (`--out`) holds every number.
"""

import os
import statistics
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
from absl import flags, logging

from cifar_jax import cli, deployment, workdir as workdir_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet18", "alexnet", "mobilenetv2"], "Models to time.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "jax and/or torch.")
flags.DEFINE_integer("batch_size", 128, "Training batch size (per trial).")
flags.DEFINE_integer("eval_batch_size", 1000, "Evaluation batch size.")
flags.DEFINE_integer("chunk_steps", 20, "Steps per timed chunk (one host sync each).")
flags.DEFINE_integer("windows", 5, "Timed chunks after the first; the median is reported.")
flags.DEFINE_list("jax_variants", ["steps", "loop"], "steps, loop, loop_bf16.")
flags.DEFINE_list("pack_sizes", ["1"], "Trials per pack to time (JAX).")
flags.DEFINE_list("torch_variants", ["eager"], "eager, channels_last, amp, channels_last_amp, "
                  "compile, max_autotune, reduce_overhead (float32, channels_last), and each "
                  "of the compiled three with _amp (bfloat16 autocast).")
flags.DEFINE_enum("precision", "default", ["default", "tf32", "highest"],
                  "float32 matmul/convolution precision, set on both sides.")
flags.DEFINE_bool("efficiency", False, "Also measure the study's efficiency table (JAX): "
                  "checkpoint size, inference latency at batch 1, throughput at batch 1024.")
flags.DEFINE_list("deploy", [], "Trained models for the deployment table (cifar_jax/"
                  "deployment.py): run workdirs, or GRID:MODEL for a grid's selected "
                  "configuration; JAX, ONNX float32 and ONNX int8 each.")
flags.DEFINE_string("out", None, "Write the full results as JSON here (default: print only).")

JAX_VARIANTS = {  # (dtype, step_loop, depthwise form: config.depthwise)
    "steps": ("float32", "host", "auto"), "loop": ("float32", "device", "auto"),
    "loop_bf16": ("bfloat16", "device", "auto"),
    # The two depthwise forms side by side (MobileNetV2; the other models have none).
    "steps_grouped": ("float32", "host", "grouped"), "steps_shifts": ("float32", "host", "shifts"),
    "loop_grouped": ("float32", "device", "grouped"), "loop_shifts": ("float32", "device", "shifts")}
TORCH_VARIANTS = {  # (channels_last, amp (bf16 autocast), torch.compile mode or None)
    "eager": (False, False, None), "channels_last": (True, False, None),
    "amp": (False, True, None), "channels_last_amp": (True, True, None),
    "compile": (True, False, "default"), "compile_amp": (True, True, "default"),
    "max_autotune": (True, False, "max-autotune"),
    "max_autotune_amp": (True, True, "max-autotune"),
    "reduce_overhead": (True, False, "reduce-overhead"),
    "reduce_overhead_amp": (True, True, "reduce-overhead")}
CIFAR10_TRAIN_IMAGES = 50_000  # before the validation split


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


def matmul_gflops(precision: str) -> float:
    """float32 GFLOP/s of one large square matmul at `precision` on the default device, in
    JAX: XLA's best kernel, a yardstick for a network's evaluation (almost all matmuls and
    convolutions; other libraries' kernels may run faster). 2048 wide on a CPU (as fast as
    larger ones there), 8192 on an accelerator. Median of max(3, --windows) timed calls."""
    import jax
    import jax.numpy as jnp

    from cifar_jax.engine import PRECISIONS

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    with jax.default_matmul_precision(PRECISIONS[precision]):
        dot = jax.jit(lambda x: x @ x)
        dot(a).block_until_ready()  # compile
        calls_per_s = _median_rate(lambda: dot(a).block_until_ready(), 1, max(3, FLAGS.windows))
    return 2 * n ** 3 * calls_per_s / 1e9


def _median_rate(run, images: int, windows: int) -> float:
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def _jax_config(model: str, variant: str, precision: str):
    from configs import default

    config = default.get_config()
    config.dtype, config.step_loop, config.depthwise = JAX_VARIANTS[variant]
    config.model, config.precision = model, precision
    config.data.augmentation = "basic"
    config.batch_size, config.eval_batch_size = FLAGS.batch_size, FLAGS.eval_batch_size
    return config


def bench_jax(model: str, variant: str, pack_size: int, precision: str) -> Dict[str, Any]:
    """Train images/s (all trials of the pack), first chunk cold and warm, eval images/s."""
    import jax

    from cifar_jax import engine as engine_lib

    config = _jax_config(model, variant, precision)
    n = FLAGS.batch_size * FLAGS.chunk_steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.int32)

    def first_chunk():
        """A fresh engine's first chunk: tracing, compilation (or cache load) and running."""
        engine = engine_lib.Engine()
        programs = engine.programs(engine_lib.static_spec(config, n, pack_size))
        states = programs.to_device(engine_lib.stack(
            [jax.device_get(programs.init_state(config))] * pack_size))
        progress = programs.to_device(engine_lib.stack([engine_lib.Progress.empty()] * pack_size))
        data = programs.to_device(images), programs.to_device(labels)
        perms = programs.permutations(states, 0)
        t0 = time.perf_counter()
        states, progress = programs.train_chunk(states, progress, *data, perms, 1)
        jax.block_until_ready(progress)
        return time.perf_counter() - t0, programs, states, progress, data, perms

    cold, *_ = first_chunk()  # each variant's programs are new to the (fresh) cache
    jax.clear_caches()  # the next compile can only come from the persistent cache
    warm, programs, states, progress, data, perms = first_chunk()

    def chunk():
        nonlocal states, progress
        states, progress = programs.train_chunk(states, progress, *data, perms,
                                                FLAGS.chunk_steps - 1)
        jax.device_get(progress.chunk)  # the loop's one host sync per chunk
        states, progress = programs.train_chunk(states, progress, *data, perms, 1)

    chunk()  # settle
    rate = _median_rate(chunk, pack_size * n, FLAGS.windows)
    eval_rate, eval_images = _jax_eval_rate(programs, states, pack_size)
    stats = jax.devices()[0].memory_stats() or {}  # None on the CPU
    return {"framework": "jax", "model": model, "variant": variant, "dtype": config.dtype,
            "precision": precision, "pack_size": pack_size, "train_images_per_s": rate,
            "first_step_cold_s": cold, "first_step_warm_s": warm,
            "eval_images_per_s": eval_rate, "eval_images": eval_images,
            "memory_mb": stats.get("bytes_in_use", 0) / 2**20 or None,
            "device": jax.devices()[0].device_kind}


EVAL_BATCHES = 2  # full evaluation batches per timed evaluation


def _jax_eval_rate(programs, states, pack_size: int):
    """Evaluation images/s over EVAL_BATCHES full batches of real images (all trials of the
    pack), and the images one timed evaluation processes: only whole batches are timed, so
    that the padding of a partial batch is never timed without being counted."""
    from cifar_jax import engine as engine_lib, input_pipeline

    n = EVAL_BATCHES * FLAGS.eval_batch_size
    rng = np.random.default_rng(1)
    split = input_pipeline.Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                 rng.integers(0, 10, (n,), dtype=np.int32))
    eval_data = engine_lib.put_eval_splits({"x": split}, FLAGS.eval_batch_size, programs)
    engine_lib.evaluate(programs, states, eval_data, "x")  # compile
    rate = _median_rate(lambda: engine_lib.evaluate(programs, states, eval_data, "x"),
                        pack_size * n, max(3, FLAGS.windows))
    return rate, n


def _torch_eval_rate(forward, device, fmt, amp: bool, sync) -> float:
    """Evaluation images/s of the (possibly compiled) network in eval mode."""
    import torch

    xe = torch.randn(FLAGS.eval_batch_size, 3, 32, 32, device=device).to(memory_format=fmt)

    @torch.no_grad()
    def evaluate():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            forward(xe)
        sync()

    evaluate()  # compile / warm up
    return _median_rate(evaluate, FLAGS.eval_batch_size, max(3, FLAGS.windows))


def bench_torch(model: str, variant: str, precision: str) -> Dict[str, Any]:
    import torch

    from cifar_jax.torch_twin.models import get_model
    from cifar_jax.torch_twin.train import set_precision

    channels_last, amp, compile_mode = TORCH_VARIANTS[variant]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    set_precision(precision)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = get_model(model).to(device).to(memory_format=fmt)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10_000)
    forward = torch.compile(net, mode=compile_mode) if compile_mode else net
    x = torch.randn(FLAGS.batch_size, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, 10, (FLAGS.batch_size,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    net.train()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(3):
        step()
    sync()

    def chunk():
        for _ in range(FLAGS.chunk_steps):
            step()
        sync()

    rate = _median_rate(chunk, FLAGS.chunk_steps * FLAGS.batch_size, FLAGS.windows)
    net.eval()
    eval_rate = _torch_eval_rate(forward, device, fmt, amp, sync)
    return {"framework": "torch", "model": model, "variant": variant,
            "dtype": "bfloat16-amp" if amp else "float32", "precision": precision,
            "pack_size": 1, "train_images_per_s": rate, "first_step_cold_s": first,
            "first_step_warm_s": None, "eval_images_per_s": eval_rate,
            "eval_images": FLAGS.eval_batch_size,
            "memory_mb": (torch.cuda.max_memory_allocated() / 2**20
                          if device.type == "cuda" else None),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def study_shape(config=None) -> Dict[str, Any]:
    """From `config` (default configs/grid.py): trials per model, epochs, training and
    validation images."""
    import collections

    from cifar_jax import trials
    from configs import grid

    config = config or grid.get_config()
    images = (config.data.synthetic_train_size if config.data.source == "synthetic"
              else CIFAR10_TRAIN_IMAGES)
    return {"trials": collections.Counter(t.model for t in trials.expand(config)),
            "epochs": config.num_epochs, "val": config.data.val_size,
            "train": images - config.data.val_size}


def projected_grid_seconds(row: Dict[str, Any], study: Dict[str, Any]) -> float:
    """The model's share of the study's grid at this row's speed: packs of K trials, each
    training and validating every epoch, plus one compile."""
    trials = study["trials"].get(row["model"], 16)
    packs = -(-trials // row["pack_size"])
    per_pack = study["epochs"] * row["pack_size"] * (
        study["train"] / row["train_images_per_s"] + study["val"] / row["eval_images_per_s"])
    return row["first_step_cold_s"] + packs * per_pack


def model_info(model: str) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cifar_jax.models import get_model

    net = get_model(model, depthwise="grouped")  # MACs are counted from convolutions
    variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    macs = count_macs(lambda v, x: net.apply(v, x, train=False), variables,
                      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    return {"params": params, "macs_per_image": macs}


def efficiency_jax(model: str) -> Dict[str, Any]:
    """Checkpoint size on disk, batch-1 latency and batch-1024 inference throughput (medians
    of 4 x --windows and --windows timed calls)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from cifar_jax.models import get_model

    net = get_model(model)
    variables = jax.jit(lambda k: net.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))
    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "weights")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, variables)
            checkpointer.wait_until_finished()
        size = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    seconds = {}
    for batch in (1, 1024):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
        jax.block_until_ready(forward(variables, x))
        times = []
        for _ in range(4 * FLAGS.windows if batch == 1 else FLAGS.windows):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(variables, x))
            times.append(time.perf_counter() - t0)
        seconds[batch] = statistics.median(times)
    return {"model": model, "checkpoint_mb": size / 2**20,
            "latency_batch1_ms": 1000 * seconds[1], "throughput_batch1024": 1024 / seconds[1024]}


def efficiency_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | checkpoint MB | latency at batch 1 (ms) | inference img/s at batch 1024 |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {e['model']} | {e['checkpoint_mb']:.1f} | {e['latency_batch1_ms']:.2f} | "
              f"{e['throughput_batch1024']:,.0f} |" for e in rows]
    return "\n".join(lines)


def _kind(row: Dict[str, Any]) -> str:
    return "bf16" if "bfloat16" in row["dtype"] else "f32"


def settings_line(matmul: float) -> str:
    """What the table's figures were measured with, as its first line."""
    import jax

    return (f"Settings: training batch {FLAGS.batch_size} (per trial), timed in chunks of "
            f"{FLAGS.chunk_steps} steps, median of {FLAGS.windows} chunks; evaluation batch "
            f"{FLAGS.eval_batch_size}, full batches only; precision {FLAGS.precision}; device "
            f"{jax.devices()[0].device_kind} ({jax.device_count()} JAX device(s), "
            f"{os.cpu_count()} CPU cores); one large float32 matmul in JAX runs at "
            f"{matmul:,.0f} GFLOP/s here at that precision.")


def eval_gflops(row: Dict[str, Any], macs_per_image: int) -> float:
    """A row's evaluation throughput in GFLOP/s (2 per multiply-accumulate)."""
    return row["eval_images_per_s"] * 2 * macs_per_image / 1e9


def markdown_table(rows: List[Dict[str, Any]], info: Dict[str, Dict[str, Any]],
                   matmul: float) -> str:
    study = study_shape()
    fastest: Dict[tuple, float] = {}  # (model, dtype kind, metric) -> the best PyTorch figure
    for r in rows:
        if r["framework"] == "torch":
            for metric in ("train_images_per_s", "eval_images_per_s"):
                key = (r["model"], _kind(r), metric)
                fastest[key] = max(fastest.get(key, 0), r[metric])

    def ratio(r, metric):
        best = fastest.get((r["model"], _kind(r), metric))
        return f"{r[metric] / best:.2f}x" if r["framework"] == "jax" and best else ""

    lines = [settings_line(matmul), "",
             "| model | params | MACs/image | framework | variant | pack | precision | train "
             "img/s | vs fastest PyTorch of its dtype | first step s (cold / warm) | eval img/s "
             "| vs fastest PyTorch eval | eval GFLOP/s | device MB | projected grid share |",
             "| --- | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: |"]
    for r in rows:
        m = info[r["model"]]
        warm = "" if r["first_step_warm_s"] is None else f" / {r['first_step_warm_s']:.1f}"
        mem = f"{r['memory_mb']:.0f}" if r.get("memory_mb") else "n/a"
        lines.append(
            f"| {r['model']} | {m['params']:,} | {m['macs_per_image'] / 1e6:.1f}M | "
            f"{r['framework']} | {r['variant']} | {r['pack_size']} | {r['precision']} | "
            f"{r['train_images_per_s']:,.0f} | {ratio(r, 'train_images_per_s')} | "
            f"{r['first_step_cold_s']:.1f}{warm} | {r['eval_images_per_s']:,.0f} | "
            f"{ratio(r, 'eval_images_per_s')} | "
            f"{eval_gflops(r, m['macs_per_image']):,.0f} | {mem} | "
            f"{projected_grid_seconds(r, study) / 60:.1f} min |")
    return "\n".join(lines)


def _check_flags() -> list:
    """Refuses bad flags before any timing; returns the --deploy models, loaded."""
    for name, given, valid in (("frameworks", FLAGS.frameworks, ("jax", "torch")),
                               ("jax_variants", FLAGS.jax_variants, JAX_VARIANTS),
                               ("torch_variants", FLAGS.torch_variants, TORCH_VARIANTS)):
        bad = sorted(set(given) - set(valid))
        if bad:
            raise cli.UsageError(f"--{name}: unknown {', '.join(bad)}; valid: "
                                 f"{', '.join(valid)}.")
    from cifar_jax.models import MODELS
    bad = sorted(set(FLAGS.models) - set(MODELS))
    if bad:
        raise cli.UsageError(f"--models: unknown {', '.join(bad)}; valid: {', '.join(MODELS)}.")
    if not all(p.isdigit() and int(p) > 0 for p in FLAGS.pack_sizes):
        raise cli.UsageError(f"--pack_sizes={','.join(FLAGS.pack_sizes)}: expected positive "
                             "integers, e.g. 1,4,8.")
    for name in ("batch_size", "eval_batch_size", "chunk_steps", "windows"):
        if FLAGS[name].value < 1:
            raise cli.UsageError(f"--{name}={FLAGS[name].value}: expected a positive integer.")
    if FLAGS.out:
        _check_out(FLAGS.out)
    return [deployment.resolve(entry) for entry in FLAGS.deploy]


def _check_out(path: str) -> None:
    """--out must be writable before minutes of timing (on a rented GPU, they would be lost)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise cli.UsageError(f"--out={path!r} is a directory; give a file name, e.g. "
                             f"{os.path.join(path, 'bench.json')}.")
    if not os.path.isdir(directory):
        raise cli.UsageError(f"--out={path!r}: the directory {directory} does not exist; "
                             "create it first (or write elsewhere).")
    try:
        workdir_lib.ensure_writable(directory, what=f"write --out={path}")
    except workdir_lib.WorkdirError as e:
        raise cli.UsageError(str(e).split(". Everything written before")[0] + ".") from None


def main(argv):
    del argv
    to_deploy = _check_flags()
    import jax

    # A fresh persistent compilation cache for this process: the first compile of each
    # variant is cold, its repetition after clearing the in-memory caches warm.
    cache = tempfile.TemporaryDirectory()
    jax.config.update("jax_compilation_cache_dir", cache.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    matmul = matmul_gflops(FLAGS.precision) if FLAGS.models else 0.0  # --deploy alone: none
    rows, info = [], {}
    for model in FLAGS.models:
        info[model] = model_info(model)
        if "jax" in FLAGS.frameworks:
            for variant in FLAGS.jax_variants:
                for k in map(int, FLAGS.pack_sizes):
                    logging.info("Timing JAX %s, %s, pack of %d ...", model, variant, k)
                    rows.append(bench_jax(model, variant, k, FLAGS.precision))
                    write_out(info, rows, matmul)
        if "torch" in FLAGS.frameworks:
            for variant in FLAGS.torch_variants:
                logging.info("Timing PyTorch %s, %s ...", model, variant)
                rows.append(bench_torch(model, variant, FLAGS.precision))
                write_out(info, rows, matmul)
    efficiency = [efficiency_jax(m) for m in FLAGS.models] if FLAGS.efficiency else []
    deploy = [r for trained in to_deploy for r in deployment.measure(trained)]
    table = "\n\n".join(part for part in (
        markdown_table(rows, info, matmul) if rows else "",
        efficiency_table(efficiency) if efficiency else "",
        deployment.table(deploy) if deploy else "") if part)
    print(table)
    write_out(info, rows, matmul, efficiency, deploy, table)


def write_out(info, rows, matmul, efficiency=(), deploy=(), table=None) -> None:
    """--out, rewritten atomically after every measurement: a bench stopped by a time limit
    (a rented GPU's) keeps the rows it finished; `table` is None until the end."""
    if FLAGS.out:
        workdir_lib.write_json_atomic(FLAGS.out, {
            "batch_size": FLAGS.batch_size, "chunk_steps": FLAGS.chunk_steps, "models": info,
            "matmul_gflops": matmul, "rows": rows, "efficiency": list(efficiency),
            "deployment": list(deploy),
            "table": table if table is not None else markdown_table(rows, info, matmul)})

if __name__ == "__main__":
    cli.run(main)
