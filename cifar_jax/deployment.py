"""The deployment table: a trained model as JAX (jit), ONNX float32 and ONNX int8, each with its
file size, batch-1 latency, batch-256 throughput and test accuracy, on the current machine.

  python -m cifar_jax.bench --frameworks= --deploy runs/alexnet,runs/grid:resnet18

Each entry of --deploy is a finished run's workdir, or GRID:MODEL for a grid's selected
configuration of MODEL. The JAX file is the StableHLO export (`cifar_jax.export`); all three
take uint8 images and include the normalisation (and the run's TTA).
"""

import os
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

LATENCY_CALLS = 50  # batch-1 calls timed; the median is reported
THROUGHPUT_BATCH = 256
THROUGHPUT_CALLS = 5


def _timed(fn: Callable, calls: int) -> float:
    """The median wall time of `calls` calls of `fn` (after one untimed call)."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _figures(name: str, path: str, logits: Callable[[np.ndarray], np.ndarray],
             test) -> Dict[str, Any]:
    """`logits` takes a batch of any size and returns its logits."""
    one = test.images[:1]
    batch = np.resize(test.images, (THROUGHPUT_BATCH,) + test.images.shape[1:])
    predicted = np.concatenate([logits(test.images[i:i + THROUGHPUT_BATCH]).argmax(1)
                                for i in range(0, len(test.images), THROUGHPUT_BATCH)])
    return {"format": name, "file_mb": os.path.getsize(path) / 2**20,
            "latency_batch1_ms": 1000 * _timed(lambda: logits(one), LATENCY_CALLS),
            "throughput_batch256": THROUGHPUT_BATCH / _timed(lambda: logits(batch),
                                                             THROUGHPUT_CALLS),
            "test_accuracy": float(np.mean(predicted == test.labels))}


def resolve(entry: str):
    """A --deploy entry (a run's workdir, or GRID:MODEL) -> the trained model, with every
    refusal said before any timing."""
    from cifar_jax import cli, inference

    workdir, _, model = entry.partition(":")
    try:
        trained = inference.load(workdir, model or None)
        trained.check_test_split_allowed()
    except Exception as e:  # noqa: BLE001 - said in --deploy's terms, once
        if type(e).__name__ not in ("WorkdirError", "CheckpointError"):
            raise
        raise cli.UsageError(f"--deploy entry {entry!r}: {e} (an entry is a run's workdir or "
                             "GRID:MODEL)") from None
    return trained


def measure(trained) -> List[Dict[str, Any]]:
    """The three rows of one trained model (see `resolve`)."""
    import jax

    from cifar_jax import export, inference

    dataset = inference.load_dataset(trained)
    about = {"model": trained.config.model, "run": trained.description,
             "epochs": trained.config.num_epochs, "data": trained.config.data.source,
             "tta_flip": trained.tta_flip}
    with tempfile.TemporaryDirectory() as d:
        hlo, fp32, int8 = (os.path.join(d, n) for n in ("m.stablehlo", "m.onnx", "m.int8.onnx"))
        export.export_stablehlo(trained, hlo)
        forward = jax.jit(trained.logits_fn())
        variables = jax.device_put(trained.variables)
        jax_logits = lambda x: np.asarray(forward(variables, x))  # noqa: E731
        rows = [_figures("JAX (jit)", hlo, jax_logits, dataset.test)]
        export.export_onnx(trained, fp32)
        export.quantize_int8(fp32, int8, dataset.train.images[:export.CALIBRATION_IMAGES])
        for name, path in (("ONNX float32", fp32), ("ONNX int8", int8)):
            session = export.onnx_session(path)
            rows.append(_figures(name, path, lambda x, s=session: s.run(
                ["logits"], {"images": x})[0], dataset.test))
    return [{**about, **r} for r in rows]


def table(rows: List[Dict[str, Any]]) -> str:
    """The deployment table in markdown, with how each model was trained."""
    lines = ["| model | trained | format | file MB | latency, batch 1 (ms, median) | batch-256 "
             "img/s | test accuracy |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['epochs']} epochs{', flip TTA' if r['tta_flip'] else ''}"
                     f" | {r['format']} | {r['file_mb']:.1f} | {r['latency_batch1_ms']:.2f} | "
                     f"{r['throughput_batch256']:,.0f} | {100 * r['test_accuracy']:.2f}% |")
    return "\n".join(lines)
