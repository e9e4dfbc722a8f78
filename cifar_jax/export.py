"""Exports a trained model for deployment.

  python -m cifar_jax.export --workdir runs/default --format stablehlo --out model.stablehlo
  python -m cifar_jax.export --workdir runs/grid --model alexnet --format onnx --out m.onnx
  python -m cifar_jax.export --workdir runs/x --format onnx --quantize int8 --out m.int8.onnx
  python -m cifar_jax.export --workdir runs/x --format torch --out model.pt

The contract of `stablehlo` and `onnx`: one input, uint8 NHWC images (batch, 32, 32, 3), any
batch size; one output, float32 logits (batch, classes); the training normalisation (and the
run's flip test-time augmentation, where it used it) is inside, so the file is all a deployment
needs. The class names are written beside it (PATH.classes.json).

  stablehlo  `jax.export`, lowered for cpu and cuda, with a symbolic batch dimension; load it
             with `jax.export.deserialize(open(PATH, 'rb').read()).call(images)` in any JAX
             within the compatibility window (an artifact loads in a JAX up to about six months
             newer than the one that wrote it, and a few weeks older).
  onnx       through the PyTorch twin (weights converted by torch_twin.convert, exported by
             torch.onnx); `--quantize int8`: onnxruntime static quantization (QDQ, per-channel
             int8 weights in a 7-bit range, uint8 activations) calibrated on
             --calibration_images training images, with its size and test accuracy against
             float32 in PATH.int8.json.
  torch      the twin's state_dict with the model name, class names, normalisation constants
             and TTA flag; loading it needs the twin's model code (cifar_jax.torch_twin).

The onnx format needs the `deploy` extra: pip install -e '.[deploy]'.
"""

import json
import os
import tempfile
from typing import Any, Dict, Optional

import numpy as np
from absl import flags, logging

from cifar_jax import cli

FORMATS = ("stablehlo", "onnx", "torch")
CALIBRATION_IMAGES = 512  # training images that calibrate the int8 activation ranges


def _need(module: str):
    """An optional dependency, or a one-line error naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise cli.UsageError(f"this export needs {module.split('.')[0]} ({e}): pip install -e "
                             "'.[deploy]'") from None


# ----------------------------------------------------------------------------------------------
# StableHLO.


def export_stablehlo(trained, path: str) -> None:
    import jax

    fn = trained.logits_fn()
    variables = trained.variables
    images = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 32, 32, 3"), np.uint8)
    exported = jax.export.export(jax.jit(lambda x: fn(variables, x)),
                                 platforms=("cpu", "cuda"))(images)
    _write_bytes(path, exported.serialize())


# ----------------------------------------------------------------------------------------------
# The PyTorch twin: torch and onnx.


def twin_module(trained):
    """The twin with the trained weights, wrapped to take uint8 NHWC images and return logits
    (normalisation and TTA inside), in eval mode on the CPU."""
    torch = _need("torch")
    from cifar_jax.torch_twin import models

    net = models.get_model(trained.config.model, num_classes=trained.info.num_classes)
    net.load_state_dict(trained.torch_state)

    class Deployable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(trained.info.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(trained.info.std).view(1, 3, 1, 1))

        def forward(self, images):
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
            logits = self.net(x)
            if trained.tta_flip:
                logits = 0.5 * (logits + self.net(x.flip(3)))
            return logits

    return Deployable().eval()


def export_torch(trained, path: str) -> None:
    torch = _need("torch")

    payload = {"model": trained.config.model, "state_dict": trained.torch_state,
               "classes": list(trained.classes), "tta_flip": trained.tta_flip,
        "dataset": trained.info.name, "mean": list(trained.info.mean),
        "std": list(trained.info.std),
        "input": "float NCHW in [0, 1], normalised with mean/std"}
    with _atomic(path) as tmp:
        torch.save(payload, tmp)


def export_onnx(trained, path: str) -> None:
    """torch.onnx's exporter (torch.export based), with a free batch dimension."""
    import logging as py_logging
    import warnings

    torch = _need("torch")
    _need("onnx")
    _need("onnxscript")
    module = twin_module(trained)
    example = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    quiet = py_logging.getLogger("torch.onnx")  # notes on torchvision ops this model lacks
    level = quiet.level
    quiet.setLevel(py_logging.ERROR)
    try:
        with _atomic(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            torch.onnx.export(module, (example,), tmp, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: batch},),
                              dynamo=True, external_data=False, verbose=False)
    finally:
        quiet.setLevel(level)


def onnx_session(path: str):
    """An onnxruntime session of an exported ONNX file, on the CPU."""
    ort = _need("onnxruntime")
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_logits(path: str, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of an exported ONNX file under onnxruntime (CPU)."""
    session = onnx_session(path)
    return np.concatenate([session.run(["logits"], {"images": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def quantize_int8(fp32_path: str, path: str, calibration: np.ndarray) -> None:
    """onnxruntime static quantization: QDQ, per-channel int8 weights in a 7-bit range, uint8
    activations, ranges calibrated on `calibration` (uint8 images).

    The 7-bit range (`reduce_range`): x86 CPUs without VNNI multiply uint8 by int8 in pairs
    summed into int16 (vpmaddubsw), which saturates with full-range weights. On this project's
    smoke model (2-core AVX2 CPU), int8 predictions agreed with float32 on 86.6% of the test
    images with 8-bit weights and on 99.8% with 7-bit ones.
    """
    quantization = _need("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"images": calibration[i:i + 64]}
                                  for i in range(0, len(calibration), 64)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as d:
        prepared = os.path.join(d, "prepared.onnx")
        quantization.shape_inference.quant_pre_process(fp32_path, prepared)
        with _atomic(path) as tmp:
            quantization.quantize_static(
                prepared, tmp, Reader(), quant_format=quantization.QuantFormat.QDQ,
                per_channel=True, reduce_range=True, weight_type=quantization.QuantType.QInt8,
                activation_type=quantization.QuantType.QUInt8)


def int8_report(trained, fp32_path: str, int8_path: str, dataset, calibration: int
                ) -> Dict[str, Any]:
    """Size and test accuracy of the int8 file against the float32 one."""
    test = dataset.test
    fp32 = onnx_logits(fp32_path, test.images).argmax(1)
    int8 = onnx_logits(int8_path, test.images).argmax(1)
    return {"calibration_images": calibration, "test_images": len(test),
            "float32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(int8_path),
            "float32_test_accuracy": float(np.mean(fp32 == test.labels)),
            "int8_test_accuracy": float(np.mean(int8 == test.labels)),
            "agreement_with_float32": float(np.mean(fp32 == int8)), "model": trained.description}


# ----------------------------------------------------------------------------------------------


def _write_bytes(path: str, data: bytes) -> None:
    with _atomic(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


class _atomic:
    """A temporary path beside `path`, renamed into place when the block succeeds."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def __enter__(self) -> str:
        self.tmp = os.path.join(os.path.dirname(self.path),
                                f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        return self.tmp

    def __exit__(self, kind, error, tb):
        from cifar_jax import workdir

        if kind is None:
            try:
                os.replace(self.tmp, self.path)
            except OSError as e:
                raise workdir.write_error(os.path.dirname(self.path), e,
                                          what=f"write {self.path}") from e
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


def export(trained, fmt: str, path: str, quantize: str = "none", data: Optional[str] = None,
           calibration: int = CALIBRATION_IMAGES) -> Dict[str, Any]:
    """Writes `trained` as `fmt` to `path` (and PATH.classes.json); returns what was written."""
    from cifar_jax import inference, workdir

    if quantize == "int8" and fmt != "onnx":
        raise cli.UsageError("--quantize int8 applies to --format onnx.")
    if fmt in ("onnx", "torch") and (trained.config.model.endswith("_imagenet")
                                      or trained.image_size != 32):
        raise cli.UsageError(
            f"--format {fmt} goes through the PyTorch twin, which has the 32x32 CIFAR models "
            f"only; {trained.config.model} at image size {trained.image_size} exports as "
            "--format stablehlo.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise cli.UsageError(f"--out={path!r}: the directory {directory} does not exist.")
    workdir.ensure_writable(directory, what=f"write {path}")
    if quantize == "int8":  # its report includes the test accuracy
        trained.check_test_split_allowed()
    dataset = inference.load_dataset(trained, data) if quantize == "int8" else None
    info: Dict[str, Any] = {"format": fmt, "path": path, "model": trained.description,
                            "tta_flip": trained.tta_flip}
    if fmt == "stablehlo":
        export_stablehlo(trained, path)
    elif fmt == "torch":
        export_torch(trained, path)
    elif quantize == "int8":
        with tempfile.TemporaryDirectory() as d:
            fp32 = os.path.join(d, "float32.onnx")
            export_onnx(trained, fp32)
            images = dataset.train.images[:calibration]
            quantize_int8(fp32, path, images)
            info["int8"] = int8_report(trained, fp32, path, dataset, len(images))
        workdir.write_json_atomic(path + ".int8.json", info["int8"])
    else:
        export_onnx(trained, path)
    workdir.write_json_atomic(path + ".classes.json", list(trained.classes))
    info["bytes"] = os.path.getsize(path)
    return info


def main(argv):
    del argv
    from cifar_jax import inference

    f = flags.FLAGS
    cli.check_workdir_flag(f.workdir)
    trained = inference.load(f.workdir, f.model, f.seed)
    logging.info("Exporting %s as %s%s.", trained.description, f.format,
                 " (int8)" if f.quantize == "int8" else "")
    info = export(trained, f.format, f.out, f.quantize, f.data, f.calibration_images)
    text = f"Wrote {f.out} ({info['bytes'] / 2**20:.1f} MB) and {f.out}.classes.json"
    if "int8" in info:
        q = info["int8"]
        text += (f"; int8 {q['int8_bytes'] / 2**20:.1f} MB vs float32 "
                 f"{q['float32_bytes'] / 2**20:.1f} MB, test accuracy "
                 f"{100 * q['int8_test_accuracy']:.2f}% vs {100 * q['float32_test_accuracy']:.2f}%"
                 f", predictions agree on {100 * q['agreement_with_float32']:.1f}% (calibrated on "
                 f"{q['calibration_images']} training images; {f.out}.int8.json)")
    print(text + ".")


if __name__ == "__main__":
    cli.define_trained_model_flags("export")
    flags.DEFINE_enum("format", None, list(FORMATS), "stablehlo, onnx or torch.")
    flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: onnxruntime static "
                      "quantization (onnx only).")
    flags.DEFINE_integer("calibration_images", CALIBRATION_IMAGES, "Training images that "
                         "calibrate the int8 ranges.", lower_bound=1)
    flags.DEFINE_string("data", None, "Another copy of the run's data set, where the recorded "
                        "one cannot be read (int8 calibration and accuracy).")
    flags.DEFINE_string("out", None, "The file to write.")
    flags.mark_flags_as_required(["format", "out"])
    cli.run(main)
