"""The command lines: help, one-line errors, exit codes, quiet start-up."""

import os
import subprocess
import sys

import pytest

from conftest import CACHE_FLAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("module", ["cifar_jax.main", "cifar_jax.report", "cifar_jax.bench",
                                    "cifar_jax.torch_twin"])
def test_help_exits_0(module):
    proc = _run(module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--" in proc.stdout and ("workdir" in proc.stdout or "models" in proc.stdout)


def test_misspelt_field_is_one_line_with_the_suggestion(tmp_path):
    proc = _run("cifar_jax.main", "--config", "configs/default.py", "--workdir", str(tmp_path),
                "--config.learning_rat=0.1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no config field 'learning_rat'. Did you mean \"learning_rate\" instead of "
        "\"learning_rat\"? (see --help)"]
    proc = _run("cifar_jax.main", "--config", str(tmp_path / "missing.py"), "--workdir",
                str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --config: cannot load the config file: [Errno 2] No such file or directory: "
        f"'{tmp_path}/missing.py' (see --help)"]


def test_workdir_must_be_a_directory_name(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for workdir in ("", "--config.num_epochs=1", str(tmp_path / "a_file"), None):
        args = ["--workdir", workdir] if workdir is not None else []
        proc = _run("cifar_jax.main", "--config", "configs/smoke.py", *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(("error: --workdir", f"error: {tmp_path}/a_file is a file"))
    assert not os.path.exists(os.path.join(ROOT, "config.json"))


def test_divergence_is_reported_once_with_exit_3(tmp_path):
    proc = _run("cifar_jax.main", "--config", "configs/smoke.py", "--workdir", str(tmp_path),
                "--config.model=tiny", "--config.optimizer=sgd", "--config.learning_rate=1e30",
                "--config.num_epochs=1", "--config.batch_size=50",
                "--config.data.synthetic_train_size=300", "--config.data.val_size=100",
                "--config.data.synthetic_test_size=50", "--config.eval_batch_size=50",
                "--config.log_every_steps=1", CACHE_FLAG)
    assert proc.returncode == 3
    assert proc.stderr.count("Non-finite loss") == 1 and "Traceback" not in proc.stderr


def test_invalid_config_is_one_error_line_before_anything_runs(tmp_path):
    proc = _run("cifar_jax.main", "--config", "configs/smoke.py", "--workdir",
                str(tmp_path / "w"), "--config.model=vgg16", "--config.learning_rate=nan",
                CACHE_FLAG)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("config.model='vgg16'") == 1  # printed once, not logged as well
    assert "config.learning_rate=nan" in proc.stderr
    assert not os.path.exists(tmp_path / "w")


def test_smoke_run_output_is_quiet_and_complete(tmp_path):
    """One progress line per chunk (the first chunks ramp up: 1, 2, 2 steps here, so the
    first line comes one step after the compile), one summary line per epoch, no library
    chatter."""
    proc = _run("cifar_jax.main", "--config", "configs/smoke.py", "--workdir", str(tmp_path),
                "--config.model=tiny", "--config.num_epochs=1",
                "--config.data.synthetic_train_size=820",
                "--config.data.val_size=100", "--config.log_every_steps=5",
                "--config.batch_size=144", CACHE_FLAG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    progress = [line.split("] ")[1].split(" (")[0] for line in lines
                if "step " in line and "/5 (epoch 1/1)" in line]
    assert progress == ["step 1/5", "step 3/5", "step 5/5"], "\n".join(lines)
    assert "first chunk" in lines[1] and "steps/s" in lines[2]  # compile, then the speed
    assert sum("epoch 1/1  train loss" in line for line in lines) == 1
    for noise in ("oneDNN", "libtpu", "orbax", "Saving checkpoint", socket_host()):
        assert not any(noise in line for line in lines), noise
    assert len(lines) <= 8, "\n".join(lines)
    assert os.listdir(os.path.expanduser(CACHE_FLAG.split("=", 1)[1]))  # compile cache filled


def socket_host():
    import socket

    return f"] {socket.gethostname()}:"


def test_orbax_tracebacks_of_a_failed_write_are_left_to_the_one_error_line():
    import logging as py_logging

    from cifar_jax import cli

    def record(path, level, msg, error=None):
        exc_info = (type(error), error, None) if error else None
        return py_logging.LogRecord("absl", level, path, 1, msg, (), exc_info)

    quiet = cli._QuietLibraries()
    orbax = "/site-packages/orbax/checkpoint/_src/futures/future.py"
    full = OSError(28, "No space left on device")
    assert not quiet.filter(record(orbax, py_logging.ERROR, "Background save failed", full))
    assert quiet.filter(record(orbax, py_logging.ERROR, "Background save failed",
                               ValueError("a bug")))  # anything else still shows
    assert quiet.filter(record("/work/cifar_jax/train.py", py_logging.ERROR,
                               "No space left on device"))  # our own lines always show


def test_xla_cpu_defaults_keep_the_users_own_and_take_effect():
    """Importing cifar_jax turns YNNPACK's convolutions off in XLA:CPU (see xla_flags.py),
    keeping a user's own setting of the flag."""
    import jax
    import jax.numpy as jnp

    from cifar_jax import xla_flags

    ours = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert xla_flags.with_cpu_defaults("--a=1") == f"--a=1 {ours}"
    own = "--xla_cpu_experimental_ynn_fusion_type= --a=1"
    assert xla_flags.with_cpu_defaults(own) == own
    assert ours in os.environ["XLA_FLAGS"]  # this process imported cifar_jax before JAX started
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = conv.lower(jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
    assert "convolution" in hlo and "ynn" not in hlo  # YNNPACK takes this one by default
