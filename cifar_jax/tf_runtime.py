"""The one place that touches TensorFlow's runtime (used by tfds and TensorBoard writers)."""

from absl import logging


def hide_gpus_from_tensorflow() -> bool:
    """Keeps TensorFlow off the GPUs so that it takes no memory from JAX.

    Returns False when TensorFlow is not installed (nothing to hide).
    """
    try:
        import tensorflow as tf
    except ImportError:
        return False
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # raised once TF has initialised its devices; harmless then
        logging.debug("TensorFlow devices already initialised: %s", e)
    return True
