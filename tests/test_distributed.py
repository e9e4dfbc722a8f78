"""One run across two processes (jax.distributed, gloo on the CPU, 127.0.0.1): the same result as
one process with two devices, checkpoints that move between process counts, an agreed stop, a
lost process, a grid, and the start-up refusals.

The behaviour tests train the tiny CNN: AlexNet, split over two CPU devices of this 2-core
machine, trains at about one step a second at batch 32 (in one process or two alike, measured),
so it has one test of its own, two steps an epoch.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CACHE_FLAG, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny CNN, 2 epochs of 8 steps, a progress line every step (the tests act on them).
OVERRIDES = ["--config.model=tiny", "--config.num_epochs=2", "--config.batch_size=32",
             "--config.eval_batch_size=50", "--config.data.source=synthetic",
             "--config.data.synthetic_train_size=356", "--config.data.val_size=100",
             "--config.data.synthetic_test_size=100", "--config.log_every_steps=1",
             "--config.keep_full_checkpoints=true", "--config.checkpoint_max_to_keep=4",
             CACHE_FLAG]
GRID = ["--config.grid.models=tiny", "--config.grid.optimizer=adam",
        "--config.grid.learning_rate=0.001,0.003", "--config.grid.weight_decay=0",
        "--config.grid.augmentation=basic", "--config.grid.default_trial="]
pytestmark = pytest.mark.xdist_group("distributed")  # one worker: the reference is shared


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _command(workdir, config="configs/default.py", extra=()):
    return [sys.executable, "-m", "cifar_jax.main", "--config", config, "--workdir",
            str(workdir), *OVERRIDES, *extra]


def _start(workdir, processes=2, config="configs/default.py", extra=(), devices=1, only=None):
    """Starts the processes of one run (`only`: {process: its own extra flags}); process 0's
    stderr is a pipe, the others' a file."""
    group = ([] if processes == 1 else
             [f"--coordinator_address=127.0.0.1:{_port()}", f"--num_processes={processes}"])
    procs = []
    for i in range(processes):
        ident = [f"--process_id={i}"] if processes > 1 else []
        ident += (only or {}).get(i, [])
        err = subprocess.PIPE if i == 0 else open(f"{workdir}.stderr{i}", "w")
        procs.append(subprocess.Popen(_command(workdir, config, [*group, *ident, *extra]),
                                      cwd=ROOT, stderr=err, text=True, env=_env(devices)))
    return procs


def _finish(procs, timeout=300):
    """(exit codes, stderr of each process)."""
    texts = [procs[0].communicate(timeout=timeout)[1]]
    for p in procs[1:]:
        p.wait(timeout=timeout)
        with open(p.args[p.args.index("--workdir") + 1] + f".stderr{procs.index(p)}") as f:
            texts.append(f.read())
    return [p.returncode for p in procs], texts


def _run(workdir, processes=2, **kwargs):
    codes, texts = _finish(_start(workdir, processes, **kwargs))
    assert codes == [0] * processes, "\n".join(t[-2500:] for t in texts)
    return texts


def _wait_for(proc, text, timeout=120):
    """Reads process 0's stderr up to the first line containing `text`; returns the lines."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stderr:
        lines.append(line)
        if text in line or time.time() > deadline:
            break
    return "".join(lines)


def _final(workdir, step):
    """result.json without timings, and the final checkpoint's (`step`) arrays."""
    import orbax.checkpoint as ocp

    with open(os.path.join(workdir, "result.json")) as f:
        result = json.load(f)
    for k in ("train_time_s", "images_per_sec", "devices"):
        result.pop(k)
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return result, tree["train_state"]["params"]


def _assert_same_run(workdir, reference, steps=(8, 16)):
    """Epoch-end `steps`, their metrics, the test accuracy and the final weights agree."""
    ours, theirs = read_metrics(workdir), read_metrics(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(steps)
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    (result, params), (expected, expected_params) = (_final(w, steps[-1])
                                                     for w in (workdir, reference))
    assert result["status"] == "completed"
    np.testing.assert_allclose(result["test_accuracy"], expected["test_accuracy"], atol=1e-6)
    import jax

    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with two devices, uninterrupted."""
    workdir = tmp_path_factory.mktemp("distributed") / "reference"
    _run(workdir, processes=1, devices=2)
    return workdir


def test_killed_process_stops_the_other_and_both_resume_to_the_same_result(reference,
                                                                          tmp_path):
    workdir = tmp_path / "killed"
    procs = _start(workdir)
    _wait_for(procs[0], "step 10/16")  # epoch 1 is saved; epoch 2 under way
    killed_at = time.time()
    procs[1].send_signal(signal.SIGKILL)
    codes, (err0, _) = _finish(procs, timeout=60)
    waited = time.time() - killed_at
    assert codes == [4, -signal.SIGKILL], err0[-3000:]
    ours = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "process 0 of 2 lost contact with the others at step" in ours[0]
    assert "start every process again with the same command to resume" in ours[0]
    assert waited < 20, f"the survivor took {waited:.0f} s to stop"

    # The same command resumes from epoch 1's checkpoint; meanwhile the group holds the lock.
    procs = _start(workdir)
    head = _wait_for(procs[0], "Resumed")
    procs[1].send_signal(signal.SIGSTOP)  # holds the group (for less than a heartbeat timeout)
    try:
        intruder = subprocess.run(_command(workdir), cwd=ROOT, capture_output=True, text=True,
                                  env=_env(), timeout=120)
    finally:
        procs[1].send_signal(signal.SIGCONT)
    codes, (err0, err1) = _finish(procs)
    assert codes == [0, 0], err0[-3000:]
    assert intruder.returncode == 2 and "is in use by process" in intruder.stderr
    assert f"Resumed {workdir} from checkpoint 8 " in head
    assert "step 12/16" not in err1  # process 1 logs warnings only
    _assert_same_run(workdir, reference)  # both epochs trained by two processes
    assert len(glob.glob(str(workdir / "events.out.tfevents.*"))) == 2  # process 0's, per start


def test_checkpoints_move_between_process_counts_and_sigterm_stops_all_at_one_step(
        reference, tmp_path):
    # A checkpoint of the one-process run (epoch 1) resumes in two processes ...
    workdir = tmp_path / "one_two_one"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("16", "result.json",
                                                                      "best_weights"))
    procs = _start(workdir)
    _wait_for(procs[0], "step 10/16")
    procs[1].send_signal(signal.SIGTERM)  # ... where a pre-emption reaches one process ...
    codes, (err0, err1) = _finish(procs)
    assert codes == [143, 143], err0[-3000:]
    assert err0.count("Stopped by SIGTERM (sent to another process) at step") == 1
    assert "Stopped by" not in err1 and "Traceback" not in err0 + err1
    steps = sorted(int(os.path.basename(d)) for d in glob.glob(str(workdir / "checkpoints/*")))
    assert steps[0] == 8 and len(steps) == 2 and 10 <= steps[1] < 16, steps  # one save
    # ... and that two-process checkpoint resumes in one process, to the same result.
    _run(workdir, processes=1, devices=2)
    _assert_same_run(workdir, reference)


def test_alexnet_in_two_processes_equals_one_process_with_two_devices(tmp_path):
    """The issue's own case, as small as it goes: AlexNet (configs/smoke.py), 2 epochs of 2
    steps: metrics, test accuracy and final weights agree within 1e-5."""
    small = ["--config.num_epochs=2", "--config.batch_size=32", "--config.eval_batch_size=32",
             "--config.data.synthetic_train_size=96", "--config.data.val_size=32",
             "--config.data.synthetic_test_size=32", "--config.keep_full_checkpoints=true",
             CACHE_FLAG]
    _run(tmp_path / "one", processes=1, config="configs/smoke.py", extra=small, devices=2)
    _run(tmp_path / "two", processes=2, config="configs/smoke.py", extra=small)
    _assert_same_run(tmp_path / "two", tmp_path / "one", steps=(2, 4))


def test_grid_of_two_trials_in_two_processes_trains_each_once_with_one_report(tmp_path):
    workdir = tmp_path / "grid"
    err0, err1 = _run(workdir, config="configs/grid.py", extra=GRID)
    assert err0.count("Grid: 0 done, 0 failed; running tiny") == 1
    assert err0.count("running tiny") == 2 and "running tiny" not in err1
    trials = sorted(glob.glob(str(workdir / "trials/tiny/*")))
    assert len(trials) == 2
    for trial in trials:
        assert len(read_metrics(trial)) == 2
    events = glob.glob(str(workdir / "**/events.out.tfevents.*"), recursive=True)
    assert len({name.split(".")[-2] for name in events}) == 1  # one writer: process 0's pid
    with open(workdir / "results.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 3 and sum("completed" in r for r in rows) == 2


@pytest.mark.parametrize("extra,only,says", [
    (["--config.batch_size=33"], None, "batch_size"),  # wrong in every process
    ([], {1: ["--config.seed=1"]}, "processes 1 were started with other configs or flags"),
    # (so a config wrong in one process only is refused as different, also said once)
])
def test_a_start_up_error_is_said_once_and_stops_every_process(tmp_path, extra, only, says):
    codes, (err0, err1) = _finish(_start(tmp_path / "bad", extra=extra, only=only), timeout=120)
    assert codes == [2, 2]
    assert (err0 + err1).count("error: ") == 1 and says in err0 + err1
    assert "Traceback" not in err0 + err1


def test_a_process_that_never_joins_stops_the_other_within_the_stated_time(tmp_path):
    script = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
              "from cifar_jax import distributed\n"
              "distributed.INITIALIZATION_TIMEOUT_S = 5\n"
              f"distributed.initialize(distributed.Group('127.0.0.1:{_port()}', 2, 0))\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=_env(), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: process 0 of 2: not every process joined")
    assert time.time() - start < 15


# ----------------------------------------------------------------------------------------------
# Flags and SLURM (no processes started).


def test_group_from_flags_and_slurm(monkeypatch):
    from cifar_jax import distributed

    for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.group_from(None, None, None) is None
    assert distributed.group_from("h:1", 1, 0) is None  # one process: as today
    assert distributed.group_from("10.0.0.1:1234", 4, 3) == distributed.Group(
        "10.0.0.1:1234", 4, 3)
    for bad, says in [(("h:1", 2, None), "go together"), (("h:1", 2, 2), "process_id"),
                      (("h", 2, 0), "HOST:PORT"), (("h:0", 2, 0), "HOST:PORT")]:
        with pytest.raises(distributed.GroupError, match=says):
            distributed.group_from(*bad)
    # An srun step of four tasks; a SLURM array task (one task) stays a single process.
    monkeypatch.setenv("SLURM_JOB_ID", "4097")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[007-008],gpu011")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    group = distributed.group_from(None, None, None)
    assert group.num_processes == 4 and group.process_id == 2
    assert group.coordinator_address.startswith("gpu007:")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.group_from(None, None, None) is None
