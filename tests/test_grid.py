import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cifar_jax import (config_checks, engine, evaluation, grid, report, train, trials,
                       workdir as workdir_lib)
from conftest import CACHE_FLAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_epochs=2", "--config.batch_size=32", "--config.eval_batch_size=100",
        "--config.data.source=synthetic", "--config.data.synthetic_train_size=420",
        "--config.data.val_size=100", "--config.data.synthetic_test_size=100",
        "--config.log_every_steps=5", CACHE_FLAG]


def _grid_config(**grid_fields):
    from configs import grid as grid_config

    c = grid_config.get_config()
    c.num_epochs, c.batch_size, c.eval_batch_size = 1, 32, 50
    c.log_every_steps = 2
    c.data.source = "synthetic"
    c.data.synthetic_train_size, c.data.val_size, c.data.synthetic_test_size = 164, 100, 50
    c.grid.optimizer, c.grid.weight_decay, c.grid.augmentation = "adam", "1e-4", "basic"
    c.grid.dropout_rate = "0.5"
    c.grid.dropout_models = "alexnet,tiny"  # the tiny CNN's trials are named as AlexNet's
    c.grid.pack_size = 1
    for k, v in grid_fields.items():
        c.grid[k] = v
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "results.csv")) as f:
        return list(csv.DictReader(f))


def _cli_grid(workdir, *extra):
    return [sys.executable, "-m", "cifar_jax.main", "--config", "configs/grid.py",
            "--workdir", str(workdir), "--config.grid.models=alexnet",
            "--config.grid.optimizer=adam", "--config.grid.weight_decay=1e-4",
            "--config.grid.augmentation=basic", "--config.grid.dropout_rate=0.5",
            "--config.grid.pack_size=1", *TINY, *extra]


def test_dry_run_lists_the_default_grid():
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.main", "--config", "configs/grid.py",
                           "--workdir", "/nonexistent/never/written", "--dry_run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("64 trials")
    assert proc.stdout.count(" alexnet ") == 32 and proc.stdout.count(" resnet18 ") == 16
    assert "adam_lr0.001_wd1e-4_basic_do0.3" in proc.stdout
    assert not os.path.exists("/nonexistent/never/written")
    # Per-model values from the command line; a dry run validates every trial.
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.main", "--config", "configs/grid.py",
                           "--workdir", "/nonexistent/never/written", "--dry_run",
                           "--config.grid.per_model.alexnet.learning_rate=0.1",
                           "--config.grid.per_model.resnet18.weight_decay=nan"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config.weight_decay=nan" in proc.stderr
    assert "(8 of 40 trials: sgd_lr0.001_wdnan_basic" in proc.stderr


def test_trial_names_and_overrides():
    c = _grid_config(models="alexnet", learning_rate="0.001,0.01", seeds="0,1")
    expanded = trials.expand(c)
    assert [t.name for t in expanded][:2] == ["adam_lr0.001_wd1e-4_basic_do0.5",
                                              "adam_lr0.001_wd1e-4_basic_do0.5_seed1"]
    assert expanded[0].config_name == expanded[1].config_name  # seeds of one configuration
    tc = trials.trial_config(c, expanded[3])
    assert (tc.model, tc.learning_rate, tc.seed, tc.dropout_rate) == ("alexnet", 0.01, 1, 0.5)
    assert "grid" not in tc
    # Per-model sweep values and optional axes (label smoothing) enter the names.
    c.grid.per_model.alexnet.learning_rate = "0.05"
    c.grid.models = "alexnet,resnet18"
    names = {(t.model, t.name) for t in trials.expand(c)}
    assert ("alexnet", "adam_lr0.05_wd1e-4_basic_do0.5") in names
    assert ("resnet18", "adam_lr0.01_wd1e-4_basic_seed1") in names


def test_paired_axes_step_together():
    c = _grid_config(models="alexnet,resnet18", optimizer="sgd,adam",
                     learning_rate="0.01,0.001", augmentation="basic,advanced",
                     paired_axes="optimizer,learning_rate")
    names = [t.name for t in trials.expand(c) if t.model == "resnet18"]
    assert names == ["sgd_lr0.01_wd1e-4_basic", "sgd_lr0.01_wd1e-4_advanced",
                     "adam_lr0.001_wd1e-4_basic", "adam_lr0.001_wd1e-4_advanced"]
    c.grid.learning_rate = "0.01,0.001,0.1"
    with pytest.raises(config_checks.ConfigError, match="same number of values"):
        trials.expand(c)
    c.grid.learning_rate, c.grid.paired_axes = "0.01,0.001", "optimizer,dropout_rate"
    c.grid.dropout_rate = "0.3,0.5"  # alexnet pairs them; resnet18 sweeps no dropout
    with pytest.raises(config_checks.ConfigError, match="resnet18 has no dropout_rate axis"):
        trials.expand(c)
    c.grid.paired_axes = "optimizer,lr"
    with pytest.raises(config_checks.ConfigError, match="no axis 'lr'"):
        trials.expand(c)


def test_trial_names_are_lossless_and_duplicates_merge(caplog):
    values = [1e-4, 1.2e-4, 0.00012000001, 5e-4, 0.001, 0.0015, 0.01, 0.3, 1e4, 2.5e-7, 0.1 + 0.2]
    names = [trials.format_number(v) for v in values]
    assert len(set(names)) == len(values)
    assert [float(n) for n in names] == values  # the name determines the value
    assert names[:2] == ["1e-4", "1.2e-4"]
    c = _grid_config(models="alexnet", weight_decay="1e-4,1.2e-4", learning_rate="0.001,1e-3")
    expanded = trials.expand(c)
    assert [t.name for t in expanded] == ["adam_lr0.001_wd1e-4_basic_do0.5",
                                          "adam_lr0.001_wd1.2e-4_basic_do0.5"]
    assert "lists the same value more than once" in caplog.text
    for t in expanded:
        parsed = trials.parse_name(t.name)
        assert all(parsed[k] == v for k, v in t.values)


def test_shards_partition_the_trials():
    from configs import grid as grid_config

    expanded = trials.expand(grid_config.get_config())
    for n in (1, 3, 7):
        shards = [trials.shard_of(expanded, i, n) for i in range(n)]
        names = [t.relpath for s in shards for t in s]
        assert sorted(names) == sorted(t.relpath for t in expanded)  # union = all, no overlap
        assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="shard_index"):
        trials.shard_of(expanded, 3, 3)


def test_two_model_grid_compiles_once_per_model_and_reports(tmp_path):
    """Both optimizers and both augmentations are data: one train-step compile per model (the
    tiny CNN's four trials); AlexNet (one trial here) brings the study's published figure."""
    c = _grid_config(models="alexnet,tiny", optimizer="sgd,adam",
                     augmentation="basic,advanced", learning_rate="0.001")
    c.grid.per_model.alexnet.optimizer, c.grid.per_model.alexnet.augmentation = "adam", "basic"
    c.data.synthetic_train_size, c.data.val_size = 84, 20
    c.eval_batch_size = 20
    shared = engine.Engine()
    # Shards only order the work: shard 0 runs its own trials first, then the rest.
    assert grid.run_grid(c, str(tmp_path), shard_index=0, num_shards=2, engine=shared)
    assert grid.run_grid(c, str(tmp_path), shard_index=1, num_shards=2, engine=shared)
    assert shared.compiles("train") == {"alexnet": 1, "tiny": 1}
    rows = _rows(tmp_path)
    assert len(rows) == 5 and all(r["status"] == "completed" for r in rows)
    assert {(r["optimizer"], r["augmentation"]) for r in rows if r["model"] == "tiny"} == {
        ("sgd", "basic"), ("sgd", "advanced"), ("adam", "basic"), ("adam", "advanced")}
    selected = [r for r in rows if r["selected"] == "True"]
    assert sorted(r["model"] for r in selected) == ["alexnet", "tiny"]
    assert all(r["test_accuracy"] for r in selected)  # test evaluated for the selected only
    assert not any(r["test_accuracy"] for r in rows if r["selected"] != "True")
    summary = (tmp_path / "summary.md").read_text()
    assert "| alexnet | " in summary and "74.00%" in summary
    assert "trained for **1 epochs**" in summary and "not comparable" in summary
    plots = sorted(os.listdir(tmp_path / "plots"))
    assert plots == ["alexnet_default_vs_best.png", "alexnet_val_curves.png",
                     "model_comparison.png", "tiny_default_vs_best.png",
                     "tiny_val_curves.png"]
    # A finished grid, rerun, only rewrites the report (and evaluates nothing again).
    name = next(r["name"] for r in rows if r["model"] == "alexnet")
    mtime = os.path.getmtime(tmp_path / "trials" / "alexnet" / name / "metrics.jsonl")
    assert grid.run_grid(c, str(tmp_path), engine=shared)
    assert os.path.getmtime(tmp_path / "trials" / "alexnet" / name / "metrics.jsonl") == mtime


def test_pack_runs_trials_together_and_splits_on_out_of_memory(tmp_path, monkeypatch, caplog):
    c = _grid_config(models="tiny", learning_rate="0.001,0.002,0.003")
    c.grid.pack_size = 3
    sizes = []
    real = train.train_pack

    def pack_with_small_memory(configs, workdirs, *args, **kwargs):
        sizes.append(len(configs))
        if len(configs) > 1 and len(sizes) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(configs, workdirs, *args, **kwargs)

    monkeypatch.setattr(train, "train_pack", pack_with_small_memory)
    assert grid.run_grid(c, str(tmp_path))
    assert sizes == [3, 1, 2]  # the pack of 3 ran out of memory: packs of 1 and 2
    assert "ran out of device memory; retrying as packs of 1 and 2" in caplog.text
    assert [r["status"] for r in _rows(tmp_path)] == ["completed"] * 3


def test_grid_refuses_to_test_every_trial_and_bad_repeat_seeds():
    c = _grid_config(models="alexnet")
    c.evaluate_test = True
    with pytest.raises(config_checks.ConfigError, match="evaluate_test=True in a grid"):
        grid.validate(c, trials.expand(c))
    c.evaluate_test, c.grid.repeat_selected_seeds = False, "1,4294967296"
    with pytest.raises(config_checks.ConfigError, match="seeds must lie in 0..2147483647"):
        grid.validate(c, trials.expand(c))
    with pytest.raises(ValueError, match="'adam_lr0.01_bogus_extra_parts_x' is not a trial"):
        trials.parse_name("adam_lr0.01_bogus_extra_parts_x")
    c.grid.repeat_selected_seeds, c.grid.default_trial = "", "nonsense"
    with pytest.raises(config_checks.ConfigError, match="default_trial: 'nonsense' is not a"):
        grid.validate(c, trials.expand(c))
    for field in ("models", "dropout_models"):  # a misspelt model never drops an axis silently
        c = _grid_config(**{field: "alexnt"})
        with pytest.raises(config_checks.ConfigError, match=f"grid.{field}='alexnt': no model"):
            trials.expand(c)


def test_failed_pack_is_retried_trial_by_trial_and_a_failed_write_stops_the_grid(
        tmp_path, monkeypatch):
    c = _grid_config(models="alexnet", learning_rate="0.001,0.002,0.003")
    c.grid.pack_size = 3
    sizes = []

    def pack_with_one_damaged_trial(configs, workdirs, *args, **kwargs):  # trains nothing
        sizes.append(len(configs))
        if any(w.endswith("lr0.002_wd1e-4_basic_do0.5") for w in workdirs):
            raise ValueError("damaged metrics.jsonl")
        return [{"status": "completed"} for _ in configs]

    monkeypatch.setattr(train, "train_pack", pack_with_one_damaged_trial)
    assert grid.run_grid(c, str(tmp_path)) is False
    assert sizes == [3, 1, 1, 1]  # the pack failed: each trial alone, only one fails
    statuses = {r["name"].split("_")[1]: r["status"] for r in _rows(tmp_path)}
    assert statuses["lr0.002"] == "failed"
    assert "pending" == statuses["lr0.001"] == statuses["lr0.003"]  # the fake wrote no result

    def pack_on_a_full_disk(configs, workdirs, *args, **kwargs):
        sizes.append(len(configs))
        raise workdir_lib.write_error(workdirs[0], OSError(28, "No space left on device"))

    sizes.clear()
    monkeypatch.setattr(train, "train_pack", pack_on_a_full_disk)
    with pytest.raises(workdir_lib.WriteError, match="No space left on device"):
        grid.run_grid(c, str(tmp_path / "full"))
    assert sizes == [3]  # stopped at once: not retried, no trial marked failed
    assert not glob.glob(str(tmp_path / "full" / "trials" / "*" / "*" / "result.json"))


def test_diverging_trial_is_recorded_and_the_rest_finish(tmp_path):
    c = _grid_config(models="tiny", optimizer="sgd", learning_rate="1e30,0.01")
    c.grid.weight_decay = "5e-4"
    c.num_epochs = 4  # SGD at lr 1e30 blows up within a few steps (BatchNorm delays it)
    assert grid.run_grid(c, str(tmp_path)) is False
    rows = {float(r["learning_rate"]): r for r in _rows(tmp_path)}
    assert rows[1e30]["status"] == "diverged" and "Non-finite" in rows[1e30]["error"]
    assert rows[0.01]["status"] == "completed" and rows[0.01]["selected"] == "True"
    assert grid.run_grid(c, str(tmp_path)) is False  # a rerun still says not all completed
    # fail_fast stops at the first failure.
    c.grid.fail_fast = True
    c.grid.learning_rate = "2e30,0.02"
    assert grid.run_grid(c, str(tmp_path / "ff")) is False
    assert {float(r["learning_rate"]): r["status"] for r in _rows(tmp_path / "ff")} == {
        2e30: "diverged", 0.02: "pending"}


def test_mismatched_result_is_reported_not_trusted(tmp_path):
    c = _grid_config(models="alexnet", learning_rate="0.001")
    (t,) = trials.expand(c)
    directory = tmp_path / t.relpath
    directory.mkdir(parents=True)
    workdir_lib.write_result(str(directory), {"status": "completed", "model": "alexnet",
                                              "learning_rate": 0.0012, "best_val_accuracy": 0.9})
    assert trials.trial_status(str(tmp_path), t) == "mismatched"
    assert grid.run_grid(c, str(tmp_path)) is False  # not rerun over it, not selected
    (row,) = _rows(tmp_path)
    assert row["status"] == "mismatched" and "learning_rate=0.0012" in row["error"]
    assert row["selected"] == "False"


def test_report_evaluates_each_selected_trial_once(tmp_path, monkeypatch):
    c = _grid_config(models="tiny", learning_rate="0.001,0.01")
    c.grid.repeat_selected_seeds = "1"
    assert grid.run_grid(c, str(tmp_path))
    rows = _rows(tmp_path)
    # The selected configuration was repeated with seed 1: both seeds are test-evaluated.
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == 2 and {r["seed"] for r in selected} == {"0", "1"}
    summary = (tmp_path / "summary.md").read_text()
    assert "± " in summary
    # Each selected trial's evaluation in depth, from the same pass, linked from summary.md.
    for r in selected:
        path = f"trials/tiny/{r['name']}/evaluation/test/summary.md"
        assert f"]({path})" in summary
        assert f"accuracy: {100 * float(r['test_accuracy']):.2f}%" in (tmp_path / path).read_text()
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_split", lambda *a, **k: calls.append(a))
    report.write_report(str(tmp_path), c)  # a second process finishing: nothing re-evaluated
    assert calls == []
    selected_events = glob.glob(str(tmp_path / "trials" / "tiny" / selected[0]["name"] /
                                    "events.out.tfevents*"))
    assert len(selected_events) >= 2  # training's, and the report's test metrics


def test_killed_grid_resumes_interrupted_trial_and_skips_finished(tmp_path):
    # The tiny CNN for 20 epochs: its second trial is still running when its first checkpoint
    # appears (each epoch takes a few tenths of a second after it).
    args = _cli_grid(tmp_path, "--config.grid.learning_rate=0.001,0.01",
                     "--config.grid.models=tiny", "--config.grid.dropout_models=tiny",
                     "--config.num_epochs=20")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL, env=env)
    second = tmp_path / "trials" / "tiny" / "adam_lr0.01_wd1e-4_basic_do0.5" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if [d for d in glob.glob(str(second / "*")) if os.path.basename(d).isdigit()]:
            proc.send_signal(signal.SIGKILL)  # mid-trial: after its first epoch's checkpoint
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 already finished, 1 to run" in rerun.stderr
    assert re.search(rf"Resumed {re.escape(str(second.parent))} from checkpoint \d*0 ",
                     rerun.stderr), rerun.stderr[-3000:]
    assert "Taking over" in rerun.stderr  # the killed process's lock, from the same host
    assert all(r["status"] == "completed" for r in _rows(tmp_path))


def test_two_processes_share_one_grid_workdir(tmp_path):
    """Started together without shards, they claim trials: each runs a disjoint share, and
    together with the report every trial appears exactly once."""
    args = _cli_grid(tmp_path, "--config.grid.learning_rate=0.001,0.002,0.003,0.004",
                     "--config.num_epochs=1", "--config.grid.models=tiny",
                     "--config.grid.dropout_models=tiny")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    ran = [set(re.findall(r"running tiny: (\S+)", log)) for log in logs]
    assert ran[0].isdisjoint(ran[1])
    assert len(ran[0] | ran[1]) == 4
    rows = _rows(tmp_path)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    for r in rows:  # one training per trial: one line per epoch
        with open(tmp_path / "trials" / "tiny" / r["name"] / "metrics.jsonl") as f:
            assert len(f.readlines()) == 1


def test_survivors_take_over_an_abandoned_trial_or_exit_1(tmp_path, monkeypatch, caplog):
    """Another process holds a trial when this one comes to it, then dies mid-trial (its lock
    is free, the trial interrupted): this process takes the trial over before it finishes.
    Where it cannot (the lock is still taken, yet nobody is running the trial), the grid
    says not every trial completed and returns False (exit 1), never True."""
    c = _grid_config(models="tiny", learning_rate="0.001,0.01")
    held = trials.expand(c)[0]
    held_dir = tmp_path / held.relpath
    held_dir.mkdir(parents=True)
    workdir_lib.store_config(trials.trial_config(c, held), str(held_dir))  # started
    other = workdir_lib.RunLock(str(held_dir)).acquire()  # "another process" holds it
    real_train_pack = train.train_pack

    def other_dies(*args, **kwargs):
        other.release()  # the other process dies while this one trains the second trial
        return real_train_pack(*args, **kwargs)

    monkeypatch.setattr(train, "train_pack", other_dies)
    assert grid.run_grid(c, str(tmp_path))
    assert "taking over 1 trials that another process started and left unfinished" in caplog.text
    assert [r["status"] for r in _rows(tmp_path)] == ["completed", "completed"]

    monkeypatch.undo()
    c.grid.learning_rate = "0.001,0.01,0.1"
    third = trials.expand(c)[2]
    (tmp_path / third.relpath).mkdir(parents=True)
    workdir_lib.store_config(trials.trial_config(c, third), str(tmp_path / third.relpath))
    with workdir_lib.RunLock(str(tmp_path / third.relpath)):  # not a live process's run
        assert not grid.run_grid(c, str(tmp_path))
    assert "Grid: not every trial completed: 1 did not: tiny/adam_lr0.1_wd1e-4_basic_do0.5 " \
           "(interrupted)" in caplog.text


def test_a_data_dependent_refusal_is_said_once_before_any_trial(tmp_path):
    c = _grid_config(models="tiny", learning_rate="0.001,0.01")
    c.batch_size = 128  # more than the 64 training images
    with pytest.raises(config_checks.ConfigError) as e:
        grid.run_grid(c, str(tmp_path))
    assert str(e.value).count("batch_size=128 is larger than the 64 training images") == 1
    assert "(2 of 2 trials: adam_lr0.001_wd1e-4_basic_do0.5, adam_lr0.01" in str(e.value)
    assert not (tmp_path / "trials").exists()  # before the first trial


def test_report_cli_aggregates_a_workdir(tmp_path):
    c = _grid_config(models="tiny", learning_rate="0.001")
    assert grid.run_grid(c, str(tmp_path))
    os.remove(tmp_path / "results.csv")
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.report", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary of best hyperparameters" in proc.stdout
    assert len(_rows(tmp_path)) == 1
    assert json.load(open(tmp_path / "grid_config.json"))["grid"]["models"] == "tiny"


def test_grid_runs_the_pytorch_twin_per_trial(tmp_path):
    pytest.importorskip("torch")
    c = _grid_config(models="tiny", learning_rate="0.001,0.01")
    c.framework = "torch"
    assert grid.run_grid(c, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["framework"] for r in rows] == ["torch", "torch"]
    assert all(r["status"] == "completed" for r in rows)
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == 1 and selected[0]["test_accuracy"]
    assert not any(r["test_accuracy"] for r in rows if r["selected"] != "True")


def test_finished_trials_of_another_config_are_refused(tmp_path):
    c = _grid_config(models="tiny", learning_rate="0.001")
    assert grid.run_grid(c, str(tmp_path))
    c.num_epochs = 2  # the same grid, longer: the finished trial would be reported as 2 epochs
    with pytest.raises(ValueError, match=r"holds 1 finished trials run with a different "
                                         r"config:\n  trials/tiny/.*num_epochs: stored 1, now 2"):
        grid.run_grid(c, str(tmp_path))
    c.allow_config_change = True  # keep the finished result as it is
    assert grid.run_grid(c, str(tmp_path))
    assert "trained for **1 epochs**" in (tmp_path / "summary.md").read_text()


def test_a_failure_never_overwrites_a_completed_trial(tmp_path):
    (t,) = trials.expand(_grid_config(models="tiny", learning_rate="0.001"))
    directory = tmp_path / t.relpath
    directory.mkdir(parents=True)
    done = {"status": "completed", **t.hyperparameters(), "best_val_accuracy": 0.5}
    workdir_lib.write_result(str(directory), done)
    grid._record_failure(str(directory), t, "OSError: a pack-mate failed")
    assert workdir_lib.read_result(str(directory)) == done
