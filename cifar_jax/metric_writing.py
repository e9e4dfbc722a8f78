"""Where a run's numbers go: TensorBoard (through CLU), metrics.jsonl and result.json.

CLU's TensorBoard writer imports TensorFlow. Where TensorFlow is missing (a GPU box with only
JAX installed) the run falls back to tensorboardX if present, else to JSON lines only, with one
warning: training never fails for lack of TensorFlow.
"""

import json
import os
import time
from typing import Any, Mapping, Optional

from absl import logging


class JsonlWriter:
    """Minimal writer with CLU's MetricWriter methods; appends scalars to a JSON-lines file."""

    def __init__(self, workdir: str, tensorboardx_writer=None):
        self._path = os.path.join(workdir, "scalars.jsonl")
        self._tbx = tensorboardx_writer

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        scalars = {k: float(v) for k, v in scalars.items()}
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tbx is not None:
            for k, v in scalars.items():
                self._tbx.add_scalar(k, v, int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        if self._tbx is not None:
            self._tbx.add_hparams(dict(hparams), {})

    def flush(self):
        if self._tbx is not None:
            self._tbx.flush()

    def close(self):
        if self._tbx is not None:
            self._tbx.close()


def create_writer(workdir: str):
    """CLU's default writer (TensorBoard + log), or a fallback without TensorFlow."""
    from cifar_jax import tf_runtime

    if tf_runtime.hide_gpus_from_tensorflow():
        try:
            from clu import metric_writers
            return metric_writers.create_default_writer(workdir, asynchronous=False)
        except ImportError as e:
            logging.warning("CLU's TensorBoard writer is unavailable (%s).", e)
    try:
        import tensorboardX
        logging.warning("TensorFlow is not installed: writing TensorBoard events with "
                        "tensorboardX and scalars to %s/scalars.jsonl.", workdir)
        return JsonlWriter(workdir, tensorboardX.SummaryWriter(workdir))
    except ImportError:
        logging.warning("Neither TensorFlow nor tensorboardX is installed: no TensorBoard "
                        "events; scalars go to %s/scalars.jsonl.", workdir)
        return JsonlWriter(workdir)


class ProgressReporter:
    """Steps/s and ETA: CLU's ReportProgress where it imports, else a small local equivalent."""

    def __init__(self, num_train_steps: int, writer, every_steps: int):
        self._num_train_steps = num_train_steps
        self._clu = None
        try:
            from clu import periodic_actions
            self._clu = periodic_actions.ReportProgress(
                num_train_steps=num_train_steps, writer=writer, every_steps=every_steps)
        except ImportError:
            pass
        self._t0: Optional[float] = None
        self._s0 = 0
        self.steps_per_sec = float("nan")

    def __call__(self, step: int):
        if self._clu is not None:
            self._clu(step)
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._s0 = now, step
        elif step > self._s0 and now > self._t0:
            self.steps_per_sec = (step - self._s0) / (now - self._t0)

    def eta_seconds(self, step: int) -> float:
        if not self.steps_per_sec > 0:
            return float("nan")
        return (self._num_train_steps - step) / self.steps_per_sec


def append_jsonl(path: str, record: Mapping[str, Any]):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str, obj: Any):
    """Writes JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
