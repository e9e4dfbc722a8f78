import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from cifar_jax.bench import count_macs
from cifar_jax.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mac_count_matches_hand_count_for_alexnet():
    model = get_model("alexnet")
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    hand = (16 * 16 * 64 * 27 + 8 * 8 * 192 * 576 + 4 * 4 * 384 * 1728 + 4 * 4 * 256 * 3456 +
            4 * 4 * 256 * 2304 + 1024 * 4096 + 4096 * 4096 + 4096 * 10)
    assert count_macs(lambda v, x: model.apply(v, x, train=False), v,
                      jnp.zeros((1, 32, 32, 3))) == hand


def test_bench_smoke_output_format(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_jax.bench", "--models", "alexnet", "--frameworks",
         "jax,torch", "--batch_size", "8", "--eval_batch_size", "16", "--window_steps", "1",
         "--windows", "2", "--warmup_steps", "0", "--efficiency", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| alexnet | jax |" in proc.stdout and "| alexnet | torch |" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["framework"]: r for r in data["rows"]}
    assert set(rows) == {"jax", "torch"}
    for r in rows.values():
        assert r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
        assert r["params"] == 23_272_266
    assert rows["jax"]["macs_per_image"] > 6e7
    assert "x |" in data["table"]  # the JAX/PyTorch ratio column is filled
    (eff,) = data["efficiency"]
    assert 40 < eff["checkpoint_mb"] < 100  # 23.3M float32 parameters (88.8 MB raw, compressed)
    assert eff["latency_batch1_ms"] > 0 and eff["throughput_batch1024"] > 0
    assert "latency at batch 1" in proc.stdout
