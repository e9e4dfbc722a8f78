"""TensorBoard summaries (through CLU) and the progress estimate of a run.

CLU's TensorBoard writer imports TensorFlow. Where TensorFlow is missing (a GPU box with only
JAX installed) the run falls back to tensorboardX if present, else to JSON lines only, with one
warning: training never fails for lack of TensorFlow. Scalars are not echoed to the log: the
training loop prints one progress line per chunk of steps itself.
"""

import json
import math
import os
import time
from typing import Any, Mapping

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


_warned = set()


def _warn_once(message: str, *args):
    if message not in _warned:
        _warned.add(message)
        logging.warning(message, *args)


def create_writer(workdir: str):
    """CLU's TensorBoard SummaryWriter, or a fallback without TensorFlow."""
    from cifar_jax import tf_runtime

    if tf_runtime.hide_gpus_from_tensorflow():
        try:
            from clu import metric_writers
            return metric_writers.SummaryWriter(workdir)
        except ImportError as e:
            _warn_once("CLU's TensorBoard writer is unavailable (%s).", e)
    try:
        import tensorboardX
        _warn_once("TensorFlow is not installed: TensorBoard events come from tensorboardX, "
                   "scalars also go to scalars.jsonl in each run directory.")
        return JsonlWriter(workdir, tensorboardX.SummaryWriter(workdir))
    except ImportError:
        _warn_once("Neither TensorFlow nor tensorboardX is installed: no TensorBoard events; "
                   "scalars go to scalars.jsonl in each run directory.")
        return JsonlWriter(workdir)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Eta:
    """Steps per second since the first measured step, and the time left."""

    def __init__(self, total_steps: int, start_step: int):
        self._total = total_steps
        self._t0 = None
        self._s0 = self._step = start_step
        self.steps_per_sec = float("nan")

    def update(self, step: int):
        now = time.perf_counter()
        if self._t0 is None:  # the first chunk includes compilation: start timing after it
            self._t0, self._s0 = now, step
        elif step > self._s0:
            self.steps_per_sec = (step - self._s0) / (now - self._t0)
        self._step = step

    def seconds_left(self) -> float:
        if not self.steps_per_sec > 0:
            return float("nan")
        return (self._total - self._step) / self.steps_per_sec
