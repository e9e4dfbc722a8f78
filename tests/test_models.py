import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax.models import get_model

PARAM_COUNTS = {"resnet18": 11_173_962, "alexnet": 23_272_266, "mobilenetv2": 2_236_682,
                "resnet50": 23_520_842, "vit": 3_722_250}


# Compiled, not op by op: an eager MobileNetV2 init takes about 19 s on a 2-core CPU, compiled 2.
def _init(model, batch=2):
    return jax.jit(functools.partial(model.init, train=False))(
        jax.random.PRNGKey(0), jnp.zeros((batch, 32, 32, 3)))


def _apply(model, variables, x, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, x)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    variables = jax.eval_shape(lambda: _init(get_model(name)))
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    assert count == PARAM_COUNTS[name]


# Shapes and dtypes by abstract evaluation (nothing computed: the parity tests compare values).
@pytest.mark.parametrize("name", ["alexnet", "mobilenetv2", "resnet18", "resnet50", "vit"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logits_are_float32_per_class_and_parameters_stay_float32(name, dtype):
    for classes in (10, 100):
        model = get_model(name, dtype=dtype, num_classes=classes)
        variables = jax.eval_shape(lambda: _init(model))
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
        logits = jax.eval_shape(lambda v: model.apply(v, jnp.ones((3, 32, 32, 3)), train=False),
                                variables)
        assert logits.shape == (3, classes) and logits.dtype == jnp.float32


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="alexnet, mobilenetv2, mobilenetv2_imagenet, "
                                         "resnet18"):
        get_model("vgg16")


# Short forms for the mode tests (their behaviour is per layer): MobileNetV2 with an
# expansion-1, a strided and a residual block; ResNet-18 with one block per stage; the ViT with
# one encoder block; AlexNet with a 256-wide classifier. The same layers, wired the same way,
# in a fraction of the compile time.
SHORT = {"mobilenetv2": dict(setting=((1, 16, 1, 1), (6, 24, 2, 2))),
         "resnet18": dict(stage_sizes=(1, 1, 1, 1)), "vit": dict(depth=1),
         "alexnet": dict(hidden=256)}


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_batch_norm_stats_update_only_in_train_mode(name):
    model = get_model(name, **SHORT.get(name, {}))
    variables = _init(model)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3)) * 2 + 1
    # Eval mode: running statistics are used and are not a mutable output.
    out_eval = _apply(model, variables, x, train=False)
    _, updated = _apply(model, variables, x, train=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.PRNGKey(0)})
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updated["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # Train mode normalises with batch statistics: differs from eval mode on this input.
    out_train, _ = _apply(model, variables, x, train=True, mutable=["batch_stats"],
                          rngs={"dropout": jax.random.PRNGKey(0)}, dropout_rate=0.0)
    assert not np.allclose(out_eval, out_train, atol=1e-3)


def test_batch_norm_running_var_is_unbiased_like_pytorch():
    from cifar_jax.models.layers import BatchNorm

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 2, 2, 3)) * 3
    bn = BatchNorm()
    v = bn.init(jax.random.PRNGKey(0), x)
    _, upd = bn.apply(v, x, mutable=["batch_stats"])
    n = 8
    unbiased = np.var(np.asarray(x).reshape(n, 3), axis=0, ddof=1)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"],
                               0.1 * np.asarray(x).reshape(n, 3).mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["alexnet", "mobilenetv2", "resnet18", "vit"])
def test_dropout_only_in_train_mode(name):
    """Every model has dropout before its classifier (ResNets: rate 0 unless configured)."""
    model = get_model(name, dropout_rate=0.5, **SHORT.get(name, {}))
    variables = _init(model)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
    evaluate = jax.jit(functools.partial(model.apply, train=False))
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
    # One compiled train-mode forward; the key and the rate (data, as in the step) vary.
    train = jax.jit(lambda key, rate: model.apply(variables, x, train=True, dropout_rate=rate,
                                                  mutable=["batch_stats"],
                                                  rngs={"dropout": key})[0])
    key = jax.random.PRNGKey
    assert not np.allclose(train(key(1), 0.5), train(key(2), 0.5))  # different dropout masks
    np.testing.assert_allclose(train(key(1), 0.0), train(key(2), 0.0), rtol=1e-6)  # rate 0


def test_resnet50_is_the_cifar_bottleneck_variant():
    variables = jax.eval_shape(lambda: _init(get_model("resnet50")))
    params = variables["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 64)  # 3x3 stride-1 stem
    assert params["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)  # expansion 4
    assert [sum(k.startswith(f"layer{s}_") for k in params) for s in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert params["fc"]["kernel"].shape == (2048, 10)


@pytest.mark.parametrize("strides", [1, 2])
def test_depthwise_shifts_equal_the_grouped_convolution(strides):
    """The CPU's depthwise form (shifted multiply-adds) against XLA's grouped convolution:
    forward and both gradients within float32 rounding, odd and even sizes."""
    from cifar_jax.models.layers import DepthwiseConv

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 8, 12))
    outputs, grads = {}, {}
    for impl in ("shifts", "grouped"):
        layer = DepthwiseConv(3, strides, impl)
        variables = layer.init(jax.random.PRNGKey(1), x)
        assert variables["params"]["kernel"].shape == (3, 3, 1, 12)
        loss = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
        outputs[impl] = layer.apply(variables, x)
        grads[impl] = jax.grad(loss, argnums=(0, 1))(variables, x)
    assert outputs["shifts"].shape == (2, 9 // strides + 9 % strides, 8 // strides, 12)
    np.testing.assert_allclose(outputs["shifts"], outputs["grouped"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["shifts"]), jax.tree.leaves(grads["grouped"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_mobilenetv2_depthwise_forms_share_parameters_and_outputs():
    """Either depthwise form initialises the same parameters (same names, shapes, values: the
    same checkpoints) and computes the same logits. On a short form with each kind of block
    (expansion 1; expansion 6, strided; expansion 6, residual): the full network repeats
    the same blocks."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    short = dict(setting=((1, 16, 1, 1), (6, 24, 2, 2)))
    forms = {impl: get_model("mobilenetv2", depthwise=impl, **short)
             for impl in ("shifts", "grouped")}
    variables = {impl: _init(m) for impl, m in forms.items()}
    assert jax.tree.structure(variables["shifts"]) == jax.tree.structure(variables["grouped"])
    for a, b in zip(jax.tree.leaves(variables["shifts"]), jax.tree.leaves(variables["grouped"])):
        np.testing.assert_array_equal(a, b)
    logits = {impl: _apply(m, variables["grouped"], x, train=False) for impl, m in forms.items()}
    np.testing.assert_allclose(logits["shifts"], logits["grouped"], rtol=1e-5, atol=1e-5)
