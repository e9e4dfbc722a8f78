"""TensorBoard summaries and the progress estimate of a run.

Event files are written with TensorBoard's own record writer and protos (the `tensorboard`
package) into a plain file: no TensorFlow import (3 s at every start) and events on GPU boxes
that only have JAX.
Without the package, scalars go to scalars.jsonl instead, with one warning: training never fails
for lack of TensorBoard. Scalars are not echoed to the log: the training loop prints one
progress line per chunk of steps itself.
"""

import json
import math
import os
import socket
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging


class TensorBoardWriter:
    """Scalars and hyperparameters as a TensorBoard event file in `workdir`."""

    def __init__(self, workdir: str):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event = event_pb2.Event
        os.makedirs(workdir, exist_ok=True)
        name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}."
                f"{os.getpid()}.v2")
        self._writer = RecordWriter(open(os.path.join(workdir, name), "wb"))
        self._add(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def _add_summary(self, step: int, summary) -> None:
        self._add(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        from tensorboard.compat.proto import summary_pb2

        self._add_summary(step, summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]))

    def write_hparams(self, hparams: Mapping[str, Any]):
        from tensorboard.plugins.hparams import summary_v2

        self._add_summary(0, summary_v2.hparams_pb(dict(hparams)))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class NullWriter:
    """The writer's methods, writing nothing: the processes of a multi-process run but the
    first."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        pass

    def write_hparams(self, hparams: Mapping[str, Any]):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(NullWriter):
    """Scalars appended to scalars.jsonl (no TensorBoard installed)."""

    def __init__(self, workdir: str):
        self._path = os.path.join(workdir, "scalars.jsonl")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
                    + "\n")


def create_writer(workdir: str):
    """A TensorBoard writer for `workdir`, or the JSON-lines fallback without TensorBoard."""
    try:
        return TensorBoardWriter(workdir)
    except ImportError as e:
        logging.log_first_n(logging.WARNING, "TensorBoard is not installed (%s): scalars go to "
                            "scalars.jsonl in each run directory instead of event files.", 1, e)
        return JsonlWriter(workdir)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Eta:
    """Steps per second after the first chunk of steps (which includes compilation), and the
    time left; `describe` gives the progress line's tail, and `outlook(steps_per_sec,
    steps_left)` (optional) adds to it, e.g. the whole grid's time left."""

    def __init__(self, total_steps: int, start_step: int,
                 outlook: Optional[Callable[[float, int], str]] = None):
        self._outlook = outlook
        self._total = total_steps
        self._created = time.perf_counter()
        self._t0 = None
        self._s0 = self._step = start_step
        self.steps_per_sec = float("nan")
        self.first_chunk_s = float("nan")

    def update(self, step: int):
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._s0 = now, step
            self.first_chunk_s = now - self._created
        elif step > self._s0:
            self.steps_per_sec = (step - self._s0) / (now - self._t0)
        self._step = step

    def seconds_left(self) -> float:
        if not self.steps_per_sec > 0:
            return float("nan")
        return (self._total - self._step) / self.steps_per_sec

    def describe(self) -> str:
        if not self.steps_per_sec > 0:
            return f"first chunk {self.first_chunk_s:.1f}s (with compilation)"
        text = f"{self.steps_per_sec:.2f} steps/s  eta {format_duration(self.seconds_left())}"
        if self._outlook is not None:
            text += f"  {self._outlook(self.steps_per_sec, self._total - self._step)}"
        return text
