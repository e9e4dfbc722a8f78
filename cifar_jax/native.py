"""Native libraries that print to the stderr file descriptor themselves, past Python's logging:
TensorFlow at import (its oneDNN and CPU-feature notices), tensorstore after a failed checkpoint
read (tracebacks of callbacks into orbax's closed event loop). The one place that touches
TensorFlow's runtime, too (used by the tfds data source)."""

import contextlib
import io
import os
import sys
import threading
from typing import Sequence

from absl import logging


@contextlib.contextmanager
def quiet_stderr():
    """Silences what is written to the stderr file descriptor inside the block (the caller
    logs what matters after it)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (e.g. captured): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow():
    """TensorFlow, imported without its start-up chatter; None when it is not installed."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        with quiet_stderr():
            import tensorflow as tf
    except ImportError:
        return None
    return tf


def hide_gpus_from_tensorflow() -> bool:
    """Keeps TensorFlow off the GPUs so that it takes no memory from JAX.

    Returns False when TensorFlow is not installed (nothing to hide).
    """
    tf = import_tensorflow()
    if tf is None:
        return False
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # raised once TF has initialised its devices; harmless then
        logging.debug("TensorFlow devices already initialised: %s", e)
    return True


class TracebackFilter(io.TextIOBase):
    """A text stream (sys.stderr) that drops whole Python tracebacks whose last line is one of
    `noise`, and passes everything else through as it comes.

    tensorstore prints a traceback for each of its callbacks that finds orbax's event loop
    closed, after a failed checkpoint write or read: dozens of them, none telling more than the
    one error line the run prints itself. A block starts at one of HEADERS and ends at its
    exception line; writes from several threads are serialised.
    """

    HEADERS = ("Traceback (most recent call last):", "Exception ignored in", "Exception in thread")

    def __init__(self, stream, noise: Sequence[str]):
        super().__init__()
        self.stream = stream
        self._noise = set(noise)
        self._held = None  # the text of a traceback in progress
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            if self._held is None and not text.startswith(self.HEADERS):
                return self.stream.write(text)
            self._held = (self._held or "") + text
            lines = self._held.split("\n")
            for i, line in enumerate(lines[1:-1], 1):  # complete lines after the first
                if line and not line[0].isspace() and not line.startswith(self.HEADERS[0]):
                    block, rest = "\n".join(lines[:i + 1]) + "\n", "\n".join(lines[i + 1:])
                    self._held = None
                    if line.strip() not in self._noise:
                        self.stream.write(block)
                    if rest:
                        self.write(rest)
                    break
            return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._held:  # an unfinished block is shown rather than lost
                self.stream.write(self._held)
                self._held = None
            self.stream.flush()

    def fileno(self) -> int:
        return self.stream.fileno()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")
