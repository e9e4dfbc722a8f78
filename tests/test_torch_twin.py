"""Parity of the PyTorch twin with the Flax models and training recipe (fp32, CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cifar_jax import engine, optim  # noqa: E402
from cifar_jax.models import get_model  # noqa: E402
from cifar_jax.torch_twin import convert, models as torch_models  # noqa: E402
from cifar_jax.torch_twin import train as torch_train  # noqa: E402

MODELS = ["resnet18", "alexnet", "mobilenetv2", "resnet50", "vit", "tiny"]


def _pair(name, seed=0):
    flax_model = get_model(name)
    variables = _jit(flax_model.init, train=False)(jax.random.PRNGKey(seed),
                                                   jnp.zeros((1, 32, 32, 3)))
    # Give BN non-trivial running statistics so that eval mode really uses them.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.1 * jax.random.uniform(jax.random.PRNGKey(len(p)), v.shape)
        if p[0].key == "batch_stats" else v, variables)
    torch_model = torch_models.get_model(name)
    torch_model.load_state_dict(convert.flax_to_torch(variables))
    return flax_model, variables, torch_model


def _jit(fn, **kwargs):
    """`fn` compiled (an eager MobileNetV2 init or apply runs op by op for 10-20 s)."""
    return jax.jit(functools.partial(fn, **kwargs))


def _inputs(n=4, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("name", MODELS)
def test_eval_logits_agree(name):
    flax_model, variables, torch_model = _pair(name)
    x, xt = _inputs()
    torch_model.eval()
    a = np.asarray(_jit(flax_model.apply, train=False)(variables, x))
    b = torch_model(xt).detach().numpy()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    # Both directions of conversion are exact.
    back = convert.torch_to_flax(torch_model.state_dict(), variables)
    for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "resnet50"])
def test_train_mode_forward_and_running_stats_agree(name):
    flax_model, variables, torch_model = _pair(name)
    x, xt = _inputs(8, seed=1)
    logits, updated = _jit(flax_model.apply, train=True, dropout_rate=0.0,
                           mutable=["batch_stats"],
                           rngs={"dropout": jax.random.PRNGKey(0)})(variables, x)
    torch_model.train()
    tl = torch_model(xt, dropout_rate=0.0).detach().numpy()
    np.testing.assert_allclose(logits, tl, atol=1e-4, rtol=1e-4)
    stats = convert.flax_to_torch({"batch_stats": updated["batch_stats"]})
    sd = torch_model.state_dict()
    for key, value in stats.items():
        if key.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(value.numpy(), sd[key].numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=key)


# Shorter forms of the slowest models for the float64 step comparisons: every kind of layer and
# block they have (MobileNetV2: an expansion-1 block, a strided expansion-6 block and a residual
# one; ResNet-18: one block per stage, projections included; the ViT: two encoder blocks;
# AlexNet: every layer, its classifier 256 wide instead of 4096), in a fraction of the float64
# compile and run time (their full forms: the float32 tests above).
SHORT = {"mobilenetv2": dict(setting=((1, 16, 1, 1), (6, 24, 2, 2))), "vit": dict(depth=2),
         "resnet18": dict(stage_sizes=(1, 1, 1, 1)), "alexnet": dict(hidden=256)}
# Image sides for those comparisons: the convolutional networks pool globally and take 16x16
# (a quarter of the float64 work); AlexNet's classifier and the ViT's positions need 32x32.
SIDE = {"mobilenetv2": 16, "resnet18": 16}


@functools.lru_cache(maxsize=None)
def _gradients(name):
    """Loss and gradients of one float64 batch from identical weights, in both frameworks
    (shared by the optimizer comparisons below)."""
    short = SHORT.get(name, {})
    with jax.enable_x64(True):
        flax_model = get_model(name, dtype=jnp.float64, **short)
        variables = _jit(flax_model.init, train=False)(jax.random.PRNGKey(3),
                                                       jnp.zeros((1, 32, 32, 3)))
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        side = SIDE.get(name, 32)
        x = np.random.default_rng(2).normal(size=(8, side, side, 3))
        labels = np.arange(8) % 10

        def loss_fn(params):
            logits, _ = flax_model.apply({**variables, "params": params}, x, train=True,
                                         dropout_rate=0.0, mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.PRNGKey(0)})
            return engine.cross_entropy_loss(logits, labels).mean()

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
        grads = jax.tree.map(np.asarray, grads)
    torch_model = torch_models.get_model(name, **short).double()
    torch_model.load_state_dict(convert.flax_to_torch(variables))
    torch_model.train()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    torch_loss = torch.nn.functional.cross_entropy(torch_model(xt, dropout_rate=0.0),
                                                   torch.as_tensor(labels))
    torch_loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    return variables, float(loss), grads, float(torch_loss.detach()), torch_grads


def _one_step(name, opt):
    """New parameters after one step from identical weights and gradients, in both."""
    from configs import default

    config = default.get_config()
    config.model, config.optimizer = name, opt
    # Values exactly representable in float32, the dtype of the injected hyperparameters.
    config.learning_rate, config.weight_decay = float(np.float32(0.01)), float(np.float32(5e-3))
    variables, loss, grads, torch_loss, torch_grads = _gradients(name)
    with jax.enable_x64(True):
        tx = optim.make_optimizer(100)
        opt_state = optim.with_hyperparams(tx.init(variables["params"]), opt,
                                           config.learning_rate, config.weight_decay)
        updates, _ = jax.jit(tx.update)(grads, opt_state, variables["params"])
        new_params = jax.tree.map(lambda p, u: np.asarray(p + u), variables["params"], updates)
    to_np = lambda d: {k: v.double().numpy() for k, v in d.items()}  # noqa: E731
    flax_grads = to_np(convert.flax_to_torch({"params": grads}))
    torch_model = torch_models.get_model(name, **SHORT.get(name, {})).double()
    torch_model.load_state_dict(convert.flax_to_torch(variables))
    optimizer = torch_train.make_optimizer(config, torch_model)
    # The optimizer is compared on identical gradients: Adam's first step is g / (|g| + eps),
    # which turns round-off in near-zero gradients into full-size differences.
    for k, p in torch_model.named_parameters():
        p.grad = torch.from_numpy(flax_grads[k].copy())
    optimizer.step()
    expected = to_np(convert.flax_to_torch({"params": new_params}))
    got = to_np(torch_model.state_dict())
    return loss, torch_loss, flax_grads, torch_grads, expected, got


# Compared in float64: deep BatchNorm networks at initialisation amplify float32 round-off in
# early-layer gradients by orders of magnitude (Flax's own BatchNorm shows the same between 1
# and 4 devices), and coupled-L2 Adam's first step, (g + wd p) / (|g + wd p| + eps), turns
# round-off in a near-cancelling sum into visible differences. float32 agreement of the
# forward pass is covered by the tests above.
# Each optimizer on the tiny CNN; each study model's gradients with one optimizer (the
# optimizers' semantics do not depend on the model, and the study's models are slow in float64
# on the CPU).
@pytest.mark.parametrize("name,opt", [("tiny", o) for o in ("sgd", "adam", "adamw")]
                         + [("alexnet", "adamw"), ("mobilenetv2", "sgd"), ("resnet18", "adam"),
                            ("vit", "adamw")])
def test_one_optimizer_step_agrees(name, opt):
    """Same loss, gradients, optimizer and weight-decay semantics in both frameworks."""
    loss, torch_loss, flax_grads, torch_grads, expected, got = _one_step(name, opt)
    assert abs(loss - torch_loss) <= 1e-5 * abs(loss)
    keys = sorted(flax_grads)
    assert keys == sorted(torch_grads)
    diff = np.sqrt(sum(np.sum((flax_grads[k] - torch_grads[k]) ** 2) for k in keys))
    norm = np.sqrt(sum(np.sum(flax_grads[k] ** 2) for k in keys))
    assert diff <= 1e-5 * norm, f"gradients differ: {diff / norm:.2e} relative"
    for key, a in expected.items():
        assert np.max(np.abs(a - got[key])) <= 1e-5 * np.max(np.abs(a)) + 1e-9, key


def test_twin_decays_kernels_only_as_jax_does():
    """decay_bn_and_bias=False: the twin's no-decay group is exactly the Flax mask's
    complement (norms, biases, the ViT's position embedding and class token)."""
    from configs import default

    config = default.get_config()
    config.decay_bn_and_bias = False
    model = torch_models.get_model("vit", depth=1)
    groups = torch_train.make_optimizer(config, model).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {n for n in names.values() if not n.endswith("weight")
                        or "norm" in n} and {"pos_embedding", "cls_token"} <= no_decay


def test_learning_rate_schedule_agrees_every_step():
    from configs import default

    config = default.get_config()
    config.model = "alexnet"
    model = torch_models.get_model("alexnet")
    for warmup in (0, 7):
        optimizer = torch_train.make_optimizer(config, model)
        scheduler = torch_train.make_scheduler(config, optimizer, 50, warmup)
        for step in range(50):
            expected = float(optim.learning_rate_at(step, config.learning_rate, 50, warmup))
            assert abs(optimizer.param_groups[0]["lr"] - expected) < 1e-9 + 1e-6 * expected, step
            optimizer.step()
            scheduler.step()


def test_twin_writes_the_same_result_format(tmp_path, tiny_config):
    tiny_config.num_epochs = 1
    result = torch_train.train_and_evaluate(tiny_config, str(tmp_path))
    jax_keys = {"status", "model", "optimizer", "learning_rate", "weight_decay", "augmentation",
                "test_accuracy", "best_val_accuracy", "images_per_sec", "num_params"}
    assert jax_keys <= set(result)
    assert result["num_params"] == 5_466  # the tiny CNN's
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 1


def test_twin_augmentations_match_jax_semantics():
    from cifar_jax import augment as jax_augment
    from cifar_jax.torch_twin import augment as torch_augment

    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    none_t = torch_augment.augment(x, "none", None).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(none_t, jax_augment.normalize(jnp.asarray(x)), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    crop = torch_augment.random_crop(torch.from_numpy(x).permute(0, 3, 1, 2).float(), g)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for c, p in zip(crop.permute(0, 2, 3, 1).numpy(), padded):
        assert any(np.array_equal(p[i:i + 32, j:j + 32], c) for i in range(9) for j in range(9))
    im = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    import dm_pix
    a = jax.vmap(lambda i: dm_pix.adjust_hue(i, 0.07))(jnp.asarray(im))
    b = torch_augment._shift_hue(torch.from_numpy(im.transpose(0, 3, 1, 2)), 0.07)
    np.testing.assert_allclose(b.numpy().transpose(0, 2, 3, 1), a, atol=1e-5)


def test_twin_resumes_by_the_same_rules_as_jax(tmp_path, tiny_config, monkeypatch):
    """Stored-config comparison, refusal, allow_config_change and result fields are shared."""
    import json

    from cifar_jax import config_checks

    real_epoch = torch_train._Run._train_epoch

    def interrupted_in_epoch_two(self, *args, **kwargs):
        if self.epoch == 1:
            raise KeyboardInterrupt  # the process dies: epoch 1's checkpoint stays
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(torch_train._Run, "_train_epoch", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        torch_train.train_and_evaluate(tiny_config, str(tmp_path))
    monkeypatch.setattr(torch_train._Run, "_train_epoch", real_epoch)
    checkpoint = (tmp_path / "torch_checkpoint.pt").read_bytes()
    (tmp_path / "torch_checkpoint.pt").write_bytes(checkpoint[:len(checkpoint) // 2])
    from cifar_jax.checkpointing import CheckpointError
    with pytest.raises(CheckpointError, match="torch_checkpoint.pt is unreadable .*Move it away"):
        torch_train.train_and_evaluate(tiny_config, str(tmp_path))
    (tmp_path / "torch_checkpoint.pt").write_bytes(checkpoint)
    stored = (tmp_path / "config.json").read_text()
    changed = tiny_config.copy_and_resolve_references()
    changed.optimizer, changed.learning_rate = "sgd", 0.01
    with pytest.raises(config_checks.ConfigError, match="optimizer: stored 'adam', now 'sgd'"):
        torch_train.train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == stored  # checked before anything is written
    changed.allow_config_change = True
    result = torch_train.train_and_evaluate(changed, str(tmp_path))  # no KeyError: 'momentum'
    assert result["status"] == "completed" and result["optimizer"] == "sgd"
    assert result["learning_rate"] == 0.01
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    # The resumed epoch ran on the new schedule (peak 0.01, cosine over 2 epochs); the logged
    # rate is its last step's, as on the JAX side.
    total = records[1]["step"]
    assert records[1]["learning_rate"] == pytest.approx(
        float(optim.learning_rate_at(total - 1, 0.01, total, 0)), rel=1e-5)
    assert 0 < records[1]["learning_rate"] < 1e-3
    assert json.load(open(tmp_path / "config.json"))["optimizer"] == "sgd"
    # `python -m cifar_jax.torch_twin` takes JAX configs: the workdir still says torch, so a
    # JAX run cannot take it over (nor the twin a JAX one).
    assert json.load(open(tmp_path / "config.json"))["framework"] == "torch"
    from cifar_jax import workdir as workdir_lib
    with pytest.raises(config_checks.ConfigError, match="framework: stored 'torch', now 'jax'"):
        workdir_lib.check_stored_config(tiny_config, str(tmp_path))


def test_twin_refuses_a_batch_larger_than_the_training_set(tmp_path, tiny_config):
    from cifar_jax import config_checks

    tiny_config.batch_size = 1000
    with pytest.raises(config_checks.ConfigError, match="batch_size=1000 is larger than the 260"):
        torch_train.train_and_evaluate(tiny_config, str(tmp_path))
    assert not (tmp_path / "config.json").exists()


def test_twin_resume_is_exact_and_divergence_is_recorded(tmp_path, tiny_config, monkeypatch):
    """SIGTERM stops the twin with status 'preempted'; dropout draws from torch's global
    generator, which is checkpointed, so the resumed run ends identical to a straight one. A
    non-finite loss ends 'diverged'."""
    import json
    import os
    import signal

    from cifar_jax import train as jax_train

    straight = torch_train.train_and_evaluate(tiny_config, str(tmp_path / "straight"))
    real_epoch = torch_train._Run._train_epoch

    def terminated_in_epoch_two(self, *args, **kwargs):
        if self.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM would
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(torch_train._Run, "_train_epoch", terminated_in_epoch_two)
    with pytest.raises(jax_train.Preempted, match="Stopped by SIGTERM in epoch 2"):
        torch_train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    assert json.load(open(tmp_path / "resumed" / "result.json"))["status"] == "preempted"
    monkeypatch.undo()
    resumed = torch_train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    drop = ("train_time_s", "images_per_sec")
    assert {k: v for k, v in resumed.items() if k not in drop} == \
           {k: v for k, v in straight.items() if k not in drop}
    tiny_config.optimizer, tiny_config.learning_rate = "sgd", 1e30
    with pytest.raises(jax_train.Diverged, match="Non-finite loss in epoch 1"):
        torch_train.train_and_evaluate(tiny_config, str(tmp_path / "diverged"))
    assert json.load(open(tmp_path / "diverged" / "result.json"))["status"] == "diverged"
