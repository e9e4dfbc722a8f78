"""The PyTorch twin: the same three models and training recipe in plain PyTorch.

Optional (`pip install -e '.[torch]'`); the JAX package never imports this subpackage.
Module names mirror the Flax ones (`layer1_0.conv1` <-> `layer1_0/conv1`), so weights convert
mechanically (`convert.py`).
"""
