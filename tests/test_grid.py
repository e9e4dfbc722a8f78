import csv
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from cifar_jax import grid, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.num_epochs=2", "--config.batch_size=32", "--config.eval_batch_size=100",
        "--config.data.source=synthetic", "--config.data.synthetic_train_size=1060",
        "--config.data.val_size=100", "--config.data.synthetic_test_size=100",
        "--config.log_every_steps=5"]


def _grid_config(**grid_fields):
    from configs import grid as grid_config

    c = grid_config.get_config()
    c.num_epochs, c.batch_size, c.eval_batch_size = 1, 32, 50
    c.log_every_steps = 2
    c.data.source = "synthetic"
    c.data.synthetic_train_size, c.data.val_size, c.data.synthetic_test_size = 164, 100, 50
    c.grid.optimizer, c.grid.weight_decay, c.grid.augmentation = "adam", "1e-4", "basic"
    c.grid.dropout_rate = "0.5"
    for k, v in grid_fields.items():
        c.grid[k] = v
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "results.csv")) as f:
        return list(csv.DictReader(f))


def test_dry_run_lists_the_default_grid():
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.main", "--config", "configs/grid.py",
                           "--workdir", "/nonexistent/never/written", "--dry_run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("64 trials")
    assert proc.stdout.count(" alexnet ") == 32 and proc.stdout.count(" resnet18 ") == 16
    assert "adam_lr0.001_wd1e-4_basic_do0.3" in proc.stdout
    assert not os.path.exists("/nonexistent/never/written")


def test_trial_names_and_overrides():
    c = _grid_config(models="alexnet", learning_rate="0.001,0.01", seeds="0,1")
    trials = grid.expand(c)
    assert [t.name for t in trials][:2] == ["adam_lr0.001_wd1e-4_basic_do0.5_seed0",
                                            "adam_lr0.001_wd1e-4_basic_do0.5_seed1"]
    tc = grid.trial_config(c, trials[3])
    assert (tc.model, tc.learning_rate, tc.seed, tc.dropout_rate) == ("alexnet", 0.01, 1, 0.5)
    assert "grid" not in tc


def test_shards_partition_the_trials():
    from configs import grid as grid_config

    trials = grid.expand(grid_config.get_config())
    for n in (1, 3, 7):
        shards = [grid.shard_of(trials, i, n) for i in range(n)]
        names = [t.relpath for s in shards for t in s]
        assert sorted(names) == sorted(t.relpath for t in trials)  # union = all, no overlap
        assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="shard_index"):
        grid.shard_of(trials, 3, 3)


def test_two_model_grid_in_two_shards_reports_once_without_recompiling(tmp_path):
    c = _grid_config(models="alexnet,mobilenetv2", learning_rate="0.001,0.01")
    c.data.synthetic_train_size, c.data.val_size = 84, 20  # MobileNetV2 is slow on the CPU
    c.eval_batch_size = 20
    before = train.count_compilations()
    assert grid.run_grid(c, str(tmp_path), shard_index=0, num_shards=2)
    assert grid.run_grid(c, str(tmp_path), shard_index=1, num_shards=2)
    # One train-step compilation per model: learning rate and weight decay are data.
    assert train.count_compilations() - before == 2
    rows = _rows(tmp_path)
    assert [(r["model"], r["learning_rate"]) for r in rows] == [
        ("alexnet", "0.001"), ("alexnet", "0.01"), ("mobilenetv2", "0.001"), ("mobilenetv2", "0.01")]
    assert all(r["status"] == "completed" for r in rows)
    selected = [r for r in rows if r["selected"] == "True"]
    assert sorted(r["model"] for r in selected) == ["alexnet", "mobilenetv2"]
    assert all(r["test_accuracy"] for r in selected)  # test evaluated for the selected only
    assert not any(r["test_accuracy"] for r in rows if r["selected"] != "True")
    summary = (tmp_path / "summary.md").read_text()
    assert "| alexnet | adam |" in summary and "74.00%" in summary
    plots = sorted(os.listdir(tmp_path / "plots"))
    assert plots == ["alexnet_default_vs_best.png", "alexnet_val_curves.png",
                     "mobilenetv2_default_vs_best.png", "mobilenetv2_val_curves.png",
                     "model_comparison.png"]
    # A finished grid, rerun, only rewrites the report.
    mtime = os.path.getmtime(tmp_path / "trials" / "alexnet" / rows[0]["name"] / "metrics.jsonl")
    assert grid.run_grid(c, str(tmp_path))
    assert os.path.getmtime(
        tmp_path / "trials" / "alexnet" / rows[0]["name"] / "metrics.jsonl") == mtime


def test_diverging_trial_is_recorded_and_the_rest_finish(tmp_path):
    c = _grid_config(models="alexnet", optimizer="sgd", learning_rate="1e4,0.01")
    c.num_epochs = 4  # SGD at lr 1e4 blows up within a few steps
    assert grid.run_grid(c, str(tmp_path)) is False
    rows = {r["name"].split("_")[1]: r for r in _rows(tmp_path)}
    assert rows["lr10000"]["status"] == "diverged" and "Non-finite" in rows["lr10000"]["error"]
    assert rows["lr0.01"]["status"] == "completed" and rows["lr0.01"]["selected"] == "True"
    # fail_fast stops at the first failure.
    c.grid.fail_fast = True
    c.grid.learning_rate = "2e4,0.02"
    assert grid.run_grid(c, str(tmp_path / "ff")) is False
    assert {r["name"].split("_")[1]: r["status"] for r in _rows(tmp_path / "ff")} == {
        "lr20000": "diverged", "lr0.02": "pending"}


def test_killed_grid_resumes_interrupted_trial_and_skips_finished(tmp_path):
    args = [sys.executable, "-m", "cifar_jax.main", "--config", "configs/grid.py",
            "--workdir", str(tmp_path), "--config.grid.models=alexnet",
            "--config.grid.optimizer=adam", "--config.grid.learning_rate=0.001,0.01",
            "--config.grid.weight_decay=1e-4", "--config.grid.augmentation=basic",
            "--config.grid.dropout_rate=0.5", *TINY]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL, env=env)
    second = tmp_path / "trials" / "alexnet" / "adam_lr0.01_wd1e-4_basic_do0.5" / "checkpoints"
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
    assert f"Resumed from {second}/30" in rerun.stderr
    assert all(r["status"] == "completed" for r in _rows(tmp_path))


def test_report_cli_aggregates_a_workdir(tmp_path):
    c = _grid_config(models="alexnet", learning_rate="0.001")
    assert grid.run_grid(c, str(tmp_path))
    os.remove(tmp_path / "results.csv")
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.report", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Summary of best hyperparameters" in proc.stdout
    assert len(_rows(tmp_path)) == 1


def test_grid_runs_the_pytorch_twin_per_trial(tmp_path):
    pytest.importorskip("torch")
    c = _grid_config(models="alexnet", learning_rate="0.001,0.01")
    c.framework = "torch"
    assert grid.run_grid(c, str(tmp_path))
    rows = _rows(tmp_path)
    assert [r["framework"] for r in rows] == ["torch", "torch"]
    assert all(r["status"] == "completed" for r in rows)
    selected = [r for r in rows if r["selected"] == "True"]
    assert len(selected) == 1 and selected[0]["test_accuracy"]
    assert not any(r["test_accuracy"] for r in rows if r["selected"] != "True")
