"""A run that survives: resume exactness, pre-emption, kill during save, corruption, NaN,
determinism across processes, several devices, awkward workdirs."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cifar_jax import checkpointing, engine, input_pipeline, train
from cifar_jax.checkpointing import CheckpointError, Checkpoints
from conftest import CACHE_FLAG, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny AlexNet run for subprocess tests: 6 steps/epoch, 2 epochs, a progress line (and a stop
# check) after every step.
CLI_OVERRIDES = ["--config.num_epochs=2", "--config.batch_size=32", "--config.eval_batch_size=100",
                 "--config.data.synthetic_train_size=292", "--config.data.val_size=100",
                 "--config.data.synthetic_test_size=100", "--config.log_every_steps=1",
                 CACHE_FLAG]


def _cli(workdir, *extra):
    return [sys.executable, "-m", "cifar_jax.main", "--config", "configs/smoke.py",
            "--workdir", str(workdir), *CLI_OVERRIDES, *extra]


def _env(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _run_cli(workdir, *extra, env=None):
    return subprocess.run(_cli(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env or _env())


def _result(workdir):
    with open(os.path.join(workdir, "result.json")) as f:
        r = json.load(f)
    return {k: v for k, v in r.items() if k not in ("train_time_s", "images_per_sec")}


def _final_arrays(config, workdir):
    """The latest checkpoint's params, batch stats and optimizer state as numpy arrays."""
    ds = input_pipeline.load_dataset(config.data)
    programs = engine.Engine().programs(engine.static_spec(config, len(ds.train)))
    abstract = jax.eval_shape(lambda: programs.init_state(config))
    template = checkpointing.restore_template(abstract)
    ckpts = Checkpoints(workdir)
    step, restored, meta = ckpts.restore_latest(template)
    ckpts.close()
    return step, jax.tree.leaves(restored["train_state"])


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted CLI run, shared by the comparisons below."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run_cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.xdist_group("reference_run")  # one worker runs the reference once
@pytest.mark.parametrize("sig,times", [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_signal_saves_mid_epoch_and_resume_matches(reference_run, tmp_path, sig, times):
    """SIGTERM, or Ctrl-C twice (the second while the run stops and saves): one checkpoint
    at the current step, one line per signal, no traceback; after the two Ctrl-Cs, an exact
    resume (the resumed metrics equal the reference run's exactly: the same seed gives the
    same run in another process, too). Both signals stop the run by the same path, so one
    resume, of the harder case, covers both."""
    workdir = tmp_path / "dir with spaces"
    proc = subprocess.Popen(_cli(workdir), cwd=ROOT, stderr=subprocess.PIPE, text=True, env=_env())
    lines = []
    for line in proc.stderr:  # training is under way: the stop comes at step 2 to 5
        lines.append(line)
        if "step 1/12" in line:
            for _ in range(times):
                proc.send_signal(sig)
                time.sleep(0.2)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 143, "".join(lines[-20:]) + rest[-2000:]
    name = signal.Signals(sig).name
    assert rest.count(f"Stopped by {name} at step") == 1
    assert rest.count(f"{name} again: already stopping") == times - 1
    assert "Traceback" not in rest
    assert _result(workdir)["status"] == "preempted"
    assert not glob.glob(str(workdir / "checkpoints" / "*tmp*"))
    ckpts = Checkpoints(str(workdir))
    step = ckpts.latest_step()
    ckpts.close()
    assert 0 < step < 6, f"expected a mid-epoch checkpoint, got step {step}"
    if times == 1:
        return
    resumed = _run_cli(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed {workdir} from checkpoint {step} " in resumed.stderr
    assert read_metrics(workdir) == read_metrics(reference_run)
    assert _result(workdir) == _result(reference_run)


@pytest.mark.xdist_group("reference_run")  # one worker runs the reference once
def test_kill_during_save_keeps_previous_checkpoint(reference_run, tmp_path):
    proc = subprocess.Popen(_cli(tmp_path), cwd=ROOT, stderr=subprocess.DEVNULL, env=_env())
    killed_during_save = False
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # orbax writes a step into a temporary directory and renames it when complete.
        tmp = glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))
        done = [d for d in glob.glob(str(tmp_path / "checkpoints" / "*")) if d.split("/")[-1].isdigit()]
        if tmp and done:  # the second epoch's save is in flight, the first is complete
            proc.send_signal(signal.SIGKILL)
            killed_during_save = True
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert killed_during_save, "the save was never caught in flight"

    resumed = _run_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed {tmp_path} from checkpoint 6 " in resumed.stderr
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))  # cleaned up
    assert read_metrics(tmp_path) == read_metrics(reference_run)
    assert _result(tmp_path) == _result(reference_run)


def _immutable(path, on: bool) -> bool:
    """chattr +i / -i: a directory nobody, root included, can write in (a stand-in for a file
    system that turns read-only or a permission that is taken away mid-run)."""
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)],
                          capture_output=True).returncode == 0


def test_a_workdir_turned_unwritable_mid_run_ends_at_once_with_the_real_cause(tmp_path):
    """The checkpoint directory stops taking writes while epoch 1's save is in flight: one
    error line with the OS error as it is and advice that fits it, no traceback (orbax logs
    one per thread), no word about the lock, exit 2 within seconds."""
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _immutable(probe, True):
        pytest.skip("chattr +i is not available here (needs root on ext4 or similar)")
    _immutable(probe, False)
    proc = subprocess.Popen(_cli(tmp_path), cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=_env())
    lines, since = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            if since is None and "] epoch 1/2" in line:  # epoch 1 saves in the background
                assert _immutable(tmp_path / "checkpoints", True)
                since = time.time()
        assert proc.wait(timeout=120) == 2, "".join(lines[-20:])
        elapsed = time.time() - since
    finally:
        _immutable(tmp_path / "checkpoints", False)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "".join(lines), "".join(lines[-30:])
    assert errors[0].startswith(f"error: Cannot save a checkpoint in {tmp_path}/checkpoints: "
                                "Operation not permitted")
    assert "make it writable" in errors[0] and "run.lock" not in errors[0]
    assert elapsed < 30


# ----------------------------------------------------------------------------------------------
# In-process tests on the tiny config (8 steps per epoch).


# The state a resume must restore beyond parameters and optimizer: dropout's keys and BatchNorm's
# statistics, which the tiny CNN has both of (the study's models add nothing of their own).
def test_resume_at_boundaries_is_bit_exact(tiny_config, tmp_path):
    tiny_config.keep_full_checkpoints = True  # to compare the final optimizer states
    spe = (tiny_config.data.synthetic_train_size - tiny_config.data.val_size) // 32
    shared = engine.Engine()  # the runs below reuse its compiled programs
    straight = train.train_and_evaluate(tiny_config, str(tmp_path / "straight"), engine=shared)

    stepped = str(tmp_path / "stepped")
    tiny_config.log_every_steps = 1  # chunks of one step: stops anywhere; results unchanged
    for stop_at in (1, spe):  # mid-epoch, then an epoch boundary
        with pytest.raises(train.Preempted):
            train.train_and_evaluate(tiny_config, stepped, engine=shared,
                                     stop_requested=lambda s, k=stop_at: s == k)
    resumed = train.train_and_evaluate(tiny_config, stepped, engine=shared)

    assert {k: v for k, v in resumed.items() if k not in ("train_time_s", "images_per_sec")} == \
           {k: v for k, v in straight.items() if k not in ("train_time_s", "images_per_sec")}
    assert read_metrics(stepped) == read_metrics(tmp_path / "straight")
    step_a, a = _final_arrays(tiny_config, str(tmp_path / "straight"))
    step_b, b = _final_arrays(tiny_config, stepped)
    assert step_a == step_b == 2 * spe
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_corrupt_latest_checkpoint_falls_back(tiny_config, tmp_path, caplog):
    caplog.set_level("INFO")
    workdir = str(tmp_path / "run")
    tiny_config.keep_full_checkpoints = True
    done = train.train_and_evaluate(tiny_config, workdir)
    os.remove(os.path.join(workdir, "result.json"))
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", "16", "state", "**"),
                                  recursive=True) if os.path.isfile(f) and os.path.getsize(f) > 1000]
    for f in files:  # truncate the data files of the latest step
        with open(f, "r+b") as fh:
            fh.truncate(100)
    again = train.train_and_evaluate(tiny_config, workdir)
    assert "checkpoints/16 is unreadable" in caplog.text
    assert "from checkpoint 8 " in caplog.text
    assert again["test_loss"] == done["test_loss"]  # epoch 2 retrained to the same result

    # Nothing readable: stop, never start from scratch over existing checkpoints.
    os.remove(os.path.join(workdir, "result.json"))
    for step_dir in glob.glob(os.path.join(workdir, "checkpoints", "*")):
        for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True):
            if os.path.isfile(f):
                os.remove(f)
    with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
        train.train_and_evaluate(tiny_config, workdir)


def test_nan_stops_run_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    workdir = str(tmp_path)
    tiny_config.optimizer = "sgd"
    tiny_config.learning_rate = 0.01
    with pytest.raises(train.Preempted):
        train.train_and_evaluate(tiny_config, workdir, stop_requested=lambda s: s == 8)
    tiny_config.learning_rate = 1e30  # diverges within a few steps
    tiny_config.allow_config_change = True
    with pytest.raises(train.Diverged, match=r"Non-finite loss .* at step 1[0-6]\. The last good "
                                             r"checkpoint is .*checkpoints/8 "):
        train.train_and_evaluate(tiny_config, workdir)
    result = json.load(open(os.path.join(workdir, "result.json")))
    assert result["status"] == "diverged" and "Non-finite" in result["error"]
    ckpts = Checkpoints(workdir)
    assert list(ckpts.manager.all_steps()) == [8]
    ckpts.close()
    step, leaves = _final_arrays(tiny_config, workdir)
    assert step == 8 and all(np.all(np.isfinite(x)) for x in leaves)


def test_checkpoint_retention_keeps_latest_and_best(tiny_config, tmp_path, monkeypatch):
    tiny_config.num_epochs = 3
    tiny_config.checkpoint_max_to_keep = 2
    tiny_config.keep_full_checkpoints = True
    real_evaluate, epochs = engine.evaluate, []

    def worse_every_epoch(programs, states, data, split):  # makes epoch 1 the best
        results = real_evaluate(programs, states, data, split)
        if split == "val":
            epochs.append(None)
            results = [dict(r, accuracy=0.9 - 0.1 * len(epochs)) for r in results]
        return results

    monkeypatch.setattr(engine, "evaluate", worse_every_epoch)
    result = train.train_and_evaluate(tiny_config, str(tmp_path))
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    best_step = 8 * result["best_epoch"]
    assert best_step == 8
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == sorted({16, 24, best_step})  # latest two, plus the best (one orbax manager)
    ckpts = Checkpoints(str(tmp_path))
    assert ckpts.best_step() == best_step
    assert ckpts.manager.metrics(best_step)["selection"] == result["best_val_accuracy"]
    ckpts.close()
    assert os.path.isdir(tmp_path / "best_weights")

    # A damaged best checkpoint: named, with the way out (exit 2), no traceback.
    os.remove(tmp_path / "result.json")
    for f in glob.glob(str(tmp_path / "checkpoints" / str(best_step) / "state" / "**"),
                       recursive=True):
        if os.path.isfile(f) and os.path.getsize(f) > 1000:
            with open(f, "r+b") as fh:
                fh.truncate(100)
    with pytest.raises(CheckpointError, match=f"The best checkpoint, .*checkpoints/{best_step}, "
                                              "is unreadable .*Move it out"):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    os.rename(tmp_path / "checkpoints" / str(best_step), tmp_path / "damaged")
    again = train.train_and_evaluate(tiny_config, str(tmp_path))  # keeps the best one left
    records = {r["epoch"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    assert again["status"] == "completed"
    assert again["best_val_accuracy"] == records[again["best_epoch"]]["val_accuracy"]


# ----------------------------------------------------------------------------------------------
# Several devices (a subprocess with 4 CPU devices).

def _global_batch_norm():
    """On this process's devices: BatchNorm's loss, statistics and gradients under the
    data-parallel mesh (those of the global batch)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from cifar_jax.models.layers import BatchNorm

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(BatchNorm()(nn.Conv(8, (3, 3))(x)))
            return jnp.mean(x ** 2)

    x = jax.random.normal(jax.random.PRNGKey(0), (32, 8, 8, 3)) * jnp.arange(32)[:, None, None,
                                                                               None] / 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    v = ConvBN().init(jax.random.PRNGKey(1), x)

    def loss(p):
        xs = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data")))
        return ConvBN().apply({**v, "params": p}, xs, mutable=["batch_stats"])

    (l, upd), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    return {"loss": float(l), "stats": [np.asarray(a).tolist() for a in jax.tree.leaves(upd)],
            "grads": [np.asarray(a).ravel().tolist() for a in jax.tree.leaves(g)]}


def _tiny_runs(runs):
    """The tiny CNN's runs (workdir, stop step or 0) on this process's devices, sharing their
    compiled programs."""
    from configs import default

    c = default.get_config()
    c.model, c.num_epochs, c.batch_size, c.eval_batch_size = "tiny", 2, 32, 20
    c.log_every_steps, c.data.source, c.data.synthetic_train_size = 1, "synthetic", 180
    c.data.val_size = c.data.synthetic_test_size = 20
    shared = engine.Engine()
    for workdir, stop in runs:
        try:
            train.train_and_evaluate(c, str(workdir), engine=shared,
                                     stop_requested=(lambda s, k=stop: s == k) if stop else None)
        except train.Preempted:
            pass


# A process with 4 CPU devices (the device count is fixed when JAX starts).
_FOUR_DEVICES = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
from cifar_jax import main
main.enable_compilation_cache({cache!r})
import jax
from test_reliability import _global_batch_norm, _tiny_runs
bn = _global_batch_norm()
_tiny_runs({runs!r})
print("RESULT", json.dumps({{"devices": jax.device_count(), "bn": bn}}))
"""


def _on_four_devices(runs):
    from conftest import CACHE_DIR

    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    script = _FOUR_DEVICES.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                  runs=[(str(w), stop) for w, stop in runs], cache=CACHE_DIR)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert out["devices"] == 4
    return out["bn"]


def test_one_and_four_devices_agree_and_checkpoints_move_between_them(tmp_path):
    # 1 device (this process): the reference run, and one stopped at an epoch boundary
    # (step 5) ...
    assert jax.device_count() == 1
    bn_one = _global_batch_norm()
    _tiny_runs([(tmp_path / "one", 0), (tmp_path / "one_then_four", 5)])
    # ... 4 devices: that one resumed, and another stopped mid-epoch (step 3) ...
    bn_four = _on_four_devices([(tmp_path / "one_then_four", 0), (tmp_path / "four_then_one", 3)])
    _tiny_runs([(tmp_path / "four_then_one", 0)])  # ... resumed on 1.

    # BatchNorm statistics and gradients are those of the global batch on 4 devices.
    np.testing.assert_allclose(bn_four["loss"], bn_one["loss"], rtol=1e-5)
    for a, b in zip(bn_one["stats"] + bn_one["grads"], bn_four["stats"] + bn_four["grads"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    # (Per-device statistics would differ: the batch's scale varies along the batch.)

    one = read_metrics(tmp_path / "one")
    assert len(one) == 2
    for other in ("four_then_one", "one_then_four"):
        records = read_metrics(tmp_path / other)
        assert [r["step"] for r in records] == [r["step"] for r in one]
        for a, b in zip(one, records):
            for key in ("train_loss", "val_loss", "train_accuracy"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5)
