import json
import os
import signal
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import config_checks, engine, input_pipeline, metric_writing, optim, train
from conftest import CACHE_FLAG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_short_run_learns_and_writes_outputs(tiny_config, tmp_path):
    """The tiny CNN (42% test accuracy here); a study model learning end to end is
    test_deploy's fixture (AlexNet, configs/smoke.py, above 90%)."""
    tiny_config.num_epochs = 3
    result = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert result["status"] == "completed"
    assert result["test_accuracy"] >= 0.25  # chance is 0.1
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert json.load(open(tmp_path / "result.json"))["test_accuracy"] == result["test_accuracy"]
    # A completed run keeps its best weights only: no optimizer state, no full checkpoints.
    assert os.path.isdir(tmp_path / "best_weights") and not os.listdir(tmp_path / "checkpoints")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["model"] == "tiny"
    assert not os.path.exists(tmp_path / "run.lock")  # released
    # The kept weights evaluate to the best epoch's validation accuracy.
    ds = input_pipeline.load_dataset(tiny_config.data)
    best = train.evaluate_checkpoint(tiny_config, str(tmp_path), ds.val)
    assert best["accuracy"] == pytest.approx(result["best_val_accuracy"], abs=1e-6)

    # A finished run, rerun, only returns its result.
    again = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert again == result
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 3

    # A result-changing config change is refused, naming the field; one the checkpoints cannot
    # follow is refused even with allow_config_change.
    tiny_config.learning_rate = 0.01
    with pytest.raises(config_checks.ConfigError, match="learning_rate: stored 0.001, now 0.01"):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    tiny_config.allow_config_change = True
    tiny_config.batch_size = 16
    with pytest.raises(config_checks.ConfigError, match=r"(?s)do not fit this config:\n  "
                                                        r"batch_size: stored 32, now 16.*new "
                                                        r"--workdir"):
        train.train_and_evaluate(tiny_config, str(tmp_path))


def _numpy_reference(name, p, g, lr, wd, steps):
    """PyTorch's update rules, written out (torch.optim.SGD / Adam / AdamW docs)."""
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, steps + 1):
        grad = g.copy()
        if name in ("sgd", "adam"):
            grad = grad + wd * p
        if name == "sgd":
            m = 0.9 * m + grad if t > 1 else grad
            p = p - lr * m
            continue
        if name == "adamw":
            p = p * (1 - lr * wd)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + 1e-8)
    return p


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_matches_pytorch_weight_decay_semantics(name):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5, 3)).astype(np.float32)
    g = rng.normal(size=(5, 3)).astype(np.float32)
    lr, wd = 0.1, 0.05
    # A long schedule keeps the multiplier at ~1 for these few steps.
    tx = optim.make_optimizer(total_steps=10**9)
    state = optim.with_hyperparams(tx.init(jnp.asarray(p0)), name, lr, wd)
    p = jnp.asarray(p0)
    for _ in range(3):
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = p + updates
    np.testing.assert_allclose(p, _numpy_reference(name, p0, g, lr, wd, 3), rtol=1e-5, atol=1e-5)


def test_decay_mask_skips_norms_biases_and_embeddings():
    """decay_bn_and_bias=False decays kernels only: on a one-block ViT, not the LayerNorms,
    the biases, the position embedding or the class token."""
    from cifar_jax.models import get_model

    tx = optim.make_optimizer(10**9, decay_bn_and_bias=False)
    params = jax.jit(get_model("vit", depth=1).init)(jax.random.key(0),
                                                      jnp.zeros((1, 32, 32, 3)))["params"]
    state = optim.with_hyperparams(tx.init(params), "sgd", 1.0, 0.5)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    flat = traverse_util.flatten_dict(updates, sep="/")
    decayed = {k for k, u in flat.items() if np.any(u != 0)}
    assert decayed == {k for k in flat if k.endswith("kernel")}
    assert {"pos_embedding", "cls_token", "block0/norm1/scale", "head/bias"} <= set(flat) - decayed
    np.testing.assert_allclose(flat["head/kernel"], -0.5 * params["head"]["kernel"])


def test_cosine_schedule_per_step():
    total = 20
    lrs = [float(optim.learning_rate_at(t, 0.1, total)) for t in range(total + 1)]
    expected = [0.1 * 0.5 * (1 + np.cos(np.pi * t / total)) for t in range(total + 1)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)
    warm = [float(optim.learning_rate_at(t, 0.1, total, warmup_steps=5)) for t in range(6)]
    np.testing.assert_allclose(warm, [0, 0.02, 0.04, 0.06, 0.08, 0.1], atol=1e-7)


def test_evaluation_counts_every_example_once(tiny_config):
    ds = input_pipeline.load_dataset(tiny_config.data)
    tiny_config.eval_batch_size = 32
    programs = engine.Engine().programs(engine.static_spec(tiny_config, len(ds.train)))
    state = jax.device_get(programs.init_state(tiny_config))
    split = input_pipeline.Split(ds.test.images[:70], ds.test.labels[:70])
    other = input_pipeline.Split(ds.test.images[70:], ds.test.labels[70:])
    data = engine.put_eval_splits({"other": other, "split": split}, 32, programs)
    assert data.splits["split"] == (1, 3, 70)  # after other's one padded batch
    states = programs.to_device(engine.stack([state]))
    total = jax.device_get(programs.evaluate(states, data.images, data.labels, data.mask, 1, 3))
    assert int(total.accuracy.count[0]) == 70
    logits = programs.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                               input_pipeline_normalize(split.images))
    expected = np.mean(np.argmax(logits, -1) == split.labels)
    got = engine.evaluate(programs, states, data, "split")[0]["accuracy"]
    assert abs(got - expected) < 1e-6


def input_pipeline_normalize(images):
    from cifar_jax import augment
    return augment.normalize(jnp.asarray(images))


@pytest.mark.parametrize("field,value,message", [
    ("model", "vgg16", "config.model='vgg16' is not valid; choose one of: alexnet, mobilenetv2"),
    ("optimizer", "rmsprop", "config.optimizer='rmsprop'.*sgd, adam, adamw"),
    ("learning_rate", -0.1, r"config.learning_rate=-0.1 .*finite number > 0"),
    ("learning_rate", float("nan"), r"config.learning_rate=nan .*finite number > 0"),
    ("weight_decay", float("inf"), r"config.weight_decay=inf .*finite number >= 0"),
    ("learning_rate", 1e308, r"config.learning_rate=1e\+308 .*float32 holds"),  # inf there
    ("warmup_epochs", 1e-300, r"config.warmup_epochs=1e-300 .*float32 holds"),  # 0 there
    ("label_smoothing", 1.0, r"config.label_smoothing=1.0 .*>= 0 and < 1"),
    ("warmup_epochs", float("nan"), r"config.warmup_epochs=nan"),
    ("warmup_epochs", 2.0, r"warm-up must end before training does \(num_epochs=2\)"),
    ("ema_decay", 1.0, r"config.ema_decay=1.0 .*< 1"),
    ("num_epochs", 0, r"config.num_epochs=0 .*integer >= 1"),
    ("batch_size", 0, "config.batch_size=0"),
    ("seed", 2**31, r"config.seed=2147483648 .*<= 2147483647"),
    ("seed", -1, r"config.seed=-1 .*>= 0"),
    ("dropout_rate", 1.0, r"config.dropout_rate=1.0 .*< 1"),
    ("nesterov", True, r"config.nesterov=True has no effect with optimizer 'adam'"),
    ("precision", "fp8", r"config.precision='fp8' .*default, tf32, highest"),
    ("backbone_lr_scale", -1.0, r"config.backbone_lr_scale=-1.0 .*>= 0"),
    ("freeze_backbone_epochs", 2.0, r"backbone must move before training ends"),
])
def test_invalid_config_names_field_value_and_choices(tiny_config, field, value, message):
    tiny_config[field] = value
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate_config(tiny_config, num_devices=1)


def test_setting_without_effect_is_refused(tiny_config):
    tiny_config.data.tfds_data_dir = "/data/tfds"
    with pytest.raises(config_checks.ConfigError, match="tfds_data_dir.*no effect.*'synthetic'"):
        config_checks.validate_config(tiny_config, num_devices=1)
    tiny_config.data.tfds_data_dir = None
    tiny_config.framework, tiny_config.dtype, tiny_config.ema_decay = "torch", "bfloat16", 0.9
    with pytest.raises(config_checks.ConfigError, match=r"ema_decay > 0 is not implemented by "
                       r"the PyTorch twin(.|\n)*dtype='bfloat16' is not implemented"):
        config_checks.validate_config(tiny_config, num_devices=1)


def test_data_dependent_checks_write_nothing(tiny_config, tmp_path, caplog):
    """A run refused for a data-dependent reason leaves nothing behind that blocks the fix. An
    evaluation batch larger than every split only costs speed: it adapts, with an info line."""
    caplog.set_level("INFO")
    tiny_config.batch_size = 512  # more than the 260 training images
    with pytest.raises(config_checks.ConfigError, match="batch_size=512 is larger than the 260"):
        train.train_and_evaluate(tiny_config, str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    assert not os.path.exists(tmp_path / "checkpoints")
    tiny_config.batch_size = 32
    tiny_config.num_epochs = 1
    tiny_config.eval_batch_size = 10**8  # would pad the evaluation arrays to 10^8 images
    result = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert result["status"] == "completed"
    assert ("config.eval_batch_size=100000000 is larger than the largest evaluation split (100 "
            "images): evaluating in batches of 100 instead") in caplog.text
    tiny_config.eval_batch_size = 30  # four batches, the last one padded: the same figures
    again = train.evaluate_checkpoint(tiny_config, str(tmp_path),
                                      input_pipeline.load_dataset(tiny_config.data).test)
    assert again["accuracy"] == result["test_accuracy"]
    assert again["loss"] == pytest.approx(result["test_loss"], rel=1e-5)


def test_a_synthetic_cifar100_run_trains_and_serves_100_classes(tiny_config, tmp_path):
    """config.data.dataset=cifar100: 100-way classifier, the data set's classes in the result
    and the served logits; its statistics normalise; an unknown data set is refused by name."""
    from cifar_jax import datasets, inference

    tiny_config.data.dataset, tiny_config.num_epochs = "cifar100", 1
    result = train.train_and_evaluate(tiny_config, str(tmp_path))
    assert result["status"] == "completed" and result["classes"] == list(
        datasets.CIFAR100.classes)
    model = inference.load(str(tmp_path))
    assert model.info == datasets.CIFAR100 and model.variables["params"]["fc"]["kernel"].shape \
        == (32, 100)
    images = np.full((2, 32, 32, 3), 255, np.uint8)
    assert inference.Predictor(model, batch_size=2)(images).shape == (2, 100)
    white = (1 - np.array(datasets.CIFAR100.mean)) / np.array(datasets.CIFAR100.std)
    np.testing.assert_allclose(augment_normalize(images, datasets.CIFAR100)[0, 0, 0], white,
                               rtol=1e-6)
    tiny_config.data.dataset = "imagenet"
    with pytest.raises(config_checks.ConfigError, match="data.dataset='imagenet'.*cifar10, "
                                                        "cifar100"):
        config_checks.validate_config(tiny_config, num_devices=1)
    tiny_config.data.dataset, tiny_config.model, tiny_config.data.image_size = "cifar100", \
        "alexnet", 64  # and an image size that AlexNet's layers cannot take
    with pytest.raises(config_checks.ConfigError, match="image_size=64 does not fit alexnet"):
        config_checks.validate_config(tiny_config, num_devices=1)


def augment_normalize(images, info):
    from cifar_jax import augment

    return np.asarray(augment.normalize(jnp.asarray(images), jnp.float32, info))


def test_invalid_augmentation_and_device_divisibility(tiny_config):
    tiny_config.data.augmentation = "strong"
    tiny_config.batch_size = 30
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate_config(tiny_config, num_devices=4)
    assert "config.data.augmentation='strong'" in str(e.value)
    assert "none, basic, advanced" in str(e.value)
    assert "batch_size=30 is not divisible by the 4 devices" in str(e.value)


def test_val_size_must_be_smaller_than_train(tiny_config):
    tiny_config.data.val_size = 360
    with pytest.raises(config_checks.ConfigError, match="val_size=360"):
        config_checks.validate_config(tiny_config, num_devices=1)


def test_unwritable_workdir_fails_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(train.workdir_lib.WorkdirError,
                       match=r"Cannot write in .*/file/run: Not a directory\. .*: a part of "
                             r"the path is a file, not a directory"):
        train.train_and_evaluate(tiny_config, str(blocker / "run"))


def test_tensorboard_events_without_tensorflow(tmp_path, monkeypatch):
    """Event files come from TensorBoard's own writer: no TensorFlow import (GPU boxes with
    only JAX get events too); without TensorBoard, scalars.jsonl."""
    writer = metric_writing.create_writer(str(tmp_path / "tb"))
    writer.write_hparams({"model": "alexnet", "learning_rate": 0.1})
    writer.write_scalars(3, {"train/loss": 1.5})
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(3, 1.5)]
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.record_writer", None)
    writer = metric_writing.create_writer(str(tmp_path))
    writer.write_scalars(3, {"train/loss": 1.5})
    writer.close()
    assert _read_jsonl(tmp_path / "scalars.jsonl") == [{"step": 3, "train/loss": 1.5}]


def test_cli_rejects_bad_config_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_jax.main", "--config", "configs/smoke.py",
         "--workdir", str(tmp_path / "w"), "--config.model=vgg16",
         "--config.learning_rate=0", CACHE_FLAG], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2
    assert "config.model='vgg16'" in proc.stderr
    assert "alexnet, mobilenetv2, mobilenetv2_imagenet" in proc.stderr
    assert "config.learning_rate=0" in proc.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_signal_too_late_to_stop_training_stops_the_process_once_results_are_written():
    with train.SignalFlag() as signals:
        signals.finishing = True  # as while _finish writes the results
        os.kill(os.getpid(), signal.SIGTERM)  # handled here: logged, remembered, not raised
        assert signals.received == signal.SIGTERM
    with pytest.raises(train.Preempted, match="once training had finished"):
        signals.stop_if_received()  # so that a grid does not claim its next trial


def test_switching_the_optimizer_on_resume_starts_its_moments_afresh(tiny_config, tmp_path,
                                                                     caplog):
    tiny_config.optimizer, tiny_config.learning_rate = "sgd", 0.05
    with pytest.raises(train.Preempted):
        train.train_and_evaluate(tiny_config, str(tmp_path), stop_requested=lambda s: True)
    tiny_config.optimizer, tiny_config.learning_rate = "adam", 0.001
    tiny_config.allow_config_change = True
    result = train.train_and_evaluate(tiny_config, str(tmp_path))
    # SGD's momentum buffer read as Adam's first moment (with an empty second moment) made
    # steps of size ~1/eps: losses of 1e10. Fresh moments train normally.
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert result["status"] == "completed" and records[-1]["train_loss"] < 5
    assert "optimizer changes from sgd to adam" in caplog.text
