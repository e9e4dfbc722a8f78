"""Native libraries that print to the stderr file descriptor themselves, past Python's logging:
TensorFlow at import (its oneDNN and CPU-feature notices), tensorstore after a failed checkpoint
read (tracebacks of callbacks into orbax's closed event loop). The one place that touches
TensorFlow's runtime, too (used by the tfds data source)."""

import contextlib
import os
import sys

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
