"""Process-wide XLA settings, made when `cifar_jax` is imported, before JAX starts a backend.

XLA:CPU (jaxlib 0.10) hands convolutions to YNNPACK by default, and on this project's training
steps that is the slow path: on a 2-core x86 CPU (batch 64, one step per dispatch), ResNet-18
trains at 10 images/s with it and 31 without, MobileNetV2 at 22 and 32, AlexNet at 115 and
153-167. So YNNPACK keeps the matrix products and XLA's own (Eigen) kernels take the convolutions. The
flag only concerns XLA:CPU; a user's own `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS
is kept as it is.
"""

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_DEFAULTS = (f"{YNN_FLAG}=-individual_convolution",)


def with_cpu_defaults(xla_flags: str) -> str:
    """XLA_FLAGS with this project's CPU defaults appended, except those the user set."""
    flags = xla_flags.split()
    for default in CPU_DEFAULTS:
        name = default.split("=", 1)[0]
        if not any(f == name or f.startswith(name + "=") for f in flags):
            flags.append(default)
    return " ".join(flags)


def apply() -> None:
    """Sets XLA_FLAGS for this process and the processes it starts (JAX reads it when its
    first backend starts, so a backend started before this keeps its settings)."""
    os.environ["XLA_FLAGS"] = with_cpu_defaults(os.environ.get("XLA_FLAGS", ""))
