import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from cifar_jax.bench import count_macs
from cifar_jax.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mac_count_matches_hand_count_for_alexnet():
    model = get_model("alexnet")
    v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                          train=False))  # the jaxpr needs shapes only
    hand = (16 * 16 * 64 * 27 + 8 * 8 * 192 * 576 + 4 * 4 * 384 * 1728 + 4 * 4 * 256 * 3456 +
            4 * 4 * 256 * 2304 + 1024 * 4096 + 4096 * 4096 + 4096 * 10)
    assert count_macs(lambda v, x: model.apply(v, x, train=False), v,
                      jnp.zeros((1, 32, 32, 3))) == hand


def test_bench_smoke_output_format(tmp_path):
    """The table and JSON; evaluation is timed on full batches of real images and counts them,
    even when the timed training images (8 x 2) are fewer than one evaluation batch (32).
    Nothing is written but --out (the working directory stays empty)."""
    out, cwd = tmp_path / "bench.json", tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_jax.bench", "--models", "tiny", "--frameworks",
         "jax,torch", "--batch_size", "8", "--eval_batch_size", "32", "--chunk_steps", "2",
         "--windows", "2", "--jax_variants", "steps", "--pack_sizes", "2",
         "--torch_variants", "eager", "--precision", "highest", "--efficiency",
         "--out", str(out)], cwd=cwd, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(cwd) == []
    assert "| tiny | 5,466 | 1.6M | jax | steps | 2 | highest |" in proc.stdout
    assert "| torch | eager | 1 |" in proc.stdout
    data = json.loads(out.read_text())
    rows = {(r["framework"], r["variant"], r["pack_size"]): r for r in data["rows"]}
    assert set(rows) == {("jax", "steps", 2), ("torch", "eager", 1)}
    for r in rows.values():
        assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
        assert r["precision"] == "highest"
    assert rows[("jax", "steps", 2)]["eval_images"] == 2 * 32  # two full batches, no padding
    assert rows[("torch", "eager", 1)]["eval_images"] == 32
    assert data["table"].startswith("Settings: training batch 8 (per trial), timed in chunks "
                                    "of 2 steps, median of 2 chunks; evaluation batch 32")
    cold, warm = rows[("jax", "steps", 2)]["first_step_cold_s"], rows[("jax", "steps", 2)][
        "first_step_warm_s"]
    assert warm < cold  # the second compile came from the persistent cache
    assert data["models"]["tiny"]["params"] == 5_466
    assert data["models"]["tiny"]["macs_per_image"] == 16 * 27 * 32 * 32 + 32 * 144 * 16 * 16 + 320
    jax_line = next(line for line in data["table"].splitlines() if "| jax | steps |" in line)
    assert len(re.findall(r"\| \d+\.\d\dx \|", jax_line)) == 2  # train and eval ratios
    # Evaluation in GFLOP/s (eval img/s x 2 x MACs), beside JAX's matmul rate.
    gflops = rows[("jax", "steps", 2)]["eval_images_per_s"] * 2 * data["models"]["tiny"][
        "macs_per_image"] / 1e9
    assert f"| {gflops:,.0f} |" in jax_line
    assert f"one large float32 matmul in JAX runs at {data['matmul_gflops']:,.0f} GFLOP/s " in (
        data["table"]) and data["matmul_gflops"] > 0
    assert " min |" in data["table"]  # projected grid share
    (eff,) = data["efficiency"]
    assert 0.01 < eff["checkpoint_mb"] < 0.1  # 5,466 float32 parameters and BN statistics
    assert eff["latency_batch1_ms"] > 0 and eff["throughput_batch1024"] > 0


def test_bench_writes_nothing_unless_asked(tmp_path):
    """Without --out nothing is written (here with nothing to time, the cheapest full run)."""
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.bench", "--models="], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []


def test_bad_flags_and_an_unwritable_out_are_refused_before_any_timing(tmp_path):
    """Checks that cost nothing come before minutes of timing (on a rented GPU the measurement
    would be lost): one line each, exit 2, no JAX started."""
    cases = {("--out", str(tmp_path / "missing" / "b.json")): "the directory",
             ("--out", str(tmp_path)): "is a directory; give a file name",
             ("--windows", "0"): "--windows=0: expected a positive integer",
             ("--batch_size", "0"): "--batch_size=0: expected a positive integer",
             ("--chunk_steps", "0"): "--chunk_steps=0: expected a positive integer"}
    for args, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "cifar_jax.bench", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
        assert message in proc.stderr and "Timing" not in proc.stderr


def test_sitting_plan_continues_an_earlier_sitting_and_fits_the_time_left(tmp_path):
    """scripts/sitting_plan.py on the H200 sitting's bench and grid records: AlexNet's share is
    done (kept, not run again); ResNet-18 runs only when its projection (471 s, checkpoints and
    repeat seeds included) fits; MobileNetV2 (707 s) does not fit after it, and is said so."""
    h200 = os.path.join(ROOT, "results", "2026-11-30-h200")
    subprocess.run(["tar", "xzf", os.path.join(h200, "grid_records.tar.gz"), "-C",
                    str(tmp_path)], check=True)

    def plan(seconds_left):
        proc = subprocess.run(
            [sys.executable, "scripts/sitting_plan.py", "--bench_json",
             os.path.join(h200, "bench.json"), "--seconds_left", str(seconds_left),
             "--grid_workdir", str(tmp_path / "grid"), "--config", "configs/grid.py",
             "--config.grid.repeat_selected_seeds=1,2",
             "--config.data.source=folder:.device/data/cifar10-jpeg.tar.gz"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split("\n"), proc.stderr

    lines, err = plan(500)
    assert lines[0] == "done alexnet" and lines[1].startswith("run resnet18 1 ")
    assert "mobilenetv2: projected" in err and len([x for x in lines if x]) == 2
    lines, err = plan(400)
    assert lines[0] == "done alexnet" and not any(line.startswith("run") for line in lines)
    assert "resnet18: projected" in err and "not run" in err
