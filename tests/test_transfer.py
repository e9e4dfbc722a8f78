"""Transfer learning: torchvision's own ImageNet models (not the twin) into the Flax ImageNet
forms, the refusals, the fine-tuning optimizer, and a fine-tune that runs and resumes."""

import functools
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import optim, train, transfer
from cifar_jax.models import get_model

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.xdist_group("transfer")  # one worker builds the torchvision models


@pytest.fixture(scope="module")
def torchvision_models():
    """torchvision.models.resnet and .mobilenetv2, loaded without torchvision/__init__.py: on
    this machine's CPU build of torch its compiled operators fail to register at `import
    torchvision`, while the model modules are plain PyTorch. The stand-in packages leave
    sys.modules afterwards (torch's ONNX exporter looks torchvision up by name)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision is not installed (pip install torchvision==0.28.0)")
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torchvision"}
    for package, path in (("torchvision", root), ("torchvision.models", f"{root}/models")):
        module = types.ModuleType(package)
        module.__path__ = [path]
        sys.modules[package] = module
    loaded = {}
    for name in ("resnet", "mobilenetv2"):
        full = f"torchvision.models.{name}"
        module_spec = importlib.util.spec_from_file_location(full, f"{root}/models/{name}.py")
        loaded[name] = importlib.util.module_from_spec(module_spec)
        sys.modules[full] = loaded[name]
        module_spec.loader.exec_module(loaded[name])
    yield loaded
    for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
        del sys.modules[k]
    sys.modules.update(saved)


def _torchvision_file(torchvision_models, model: str, path, seed=0):
    """A real torchvision model (its own initialisation, BatchNorm statistics made non-trivial)
    saved as torchvision saves weights; returns the module, in eval mode."""
    torch.manual_seed(seed)
    if model.startswith("resnet"):
        net = getattr(torchvision_models["resnet"], model.split("_")[0])()
    else:
        net = torchvision_models["mobilenetv2"].mobilenet_v2()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return net.eval()


def _template(model, num_classes=10):
    shapes = jax.eval_shape(lambda: get_model(model, num_classes=num_classes).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}


@pytest.mark.parametrize("model,side", [("resnet18_imagenet", 224), ("resnet18_imagenet", 64),
                                        ("resnet50_imagenet", 64),
                                        ("mobilenetv2_imagenet", 64)])
def test_torchvision_weights_give_torchvision_logits(torchvision_models, model, side, tmp_path):
    from cifar_jax.torch_twin import convert

    net = _torchvision_file(torchvision_models, model, tmp_path / "w.pth")
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    variables = convert.from_torchvision(state, model, _template(model, 1000),
                                         with_classifier=True)
    x = np.random.default_rng(0).normal(size=(2, side, side, 3)).astype(np.float32)
    flax_model = get_model(model, num_classes=1000)
    ours = jax.jit(functools.partial(flax_model.apply, train=False))(variables, x)
    with torch.no_grad():
        theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_a_wrong_or_partial_file_is_refused_by_name(torchvision_models, tmp_path):
    from configs import default

    config = default.get_config()
    config.model, config.init_from = "resnet18_imagenet", str(tmp_path / "missing.pth")
    template = _template("resnet18_imagenet")
    with pytest.raises(transfer.InitError, match="no such file.*resnet18-f37072fd.pth"):
        transfer.pretrained_variables(config, template)
    _torchvision_file(torchvision_models, "resnet18_imagenet", tmp_path / "r18.pth")
    state = torch.load(tmp_path / "r18.pth", weights_only=True)
    cases = {
        "partial": ({k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"},
                    r"not a whole torchvision .*'layer4_1\.bn2\.running_var'"),
        "foreign": ({**state, "layer5.0.conv1.weight": torch.zeros(1)},
                    r"1 tensors of the file have no place in resnet18_imagenet: "
                    r"layer5\.0\.conv1\.weight"),
        "reshaped": ({**state, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)},
                     r"layer1_0\.conv1\.weight: shape \(1, 1, 64, 64\) does not fit"),
        "not a state dict": ([1, 2, 3], "holds no state dict"),
    }
    for case, (content, message) in cases.items():
        config.init_from = str(tmp_path / f"{case}.pth")
        torch.save(content, config.init_from)
        with pytest.raises(transfer.InitError, match=message):
            transfer.pretrained_variables(config, template)
    config.model, config.init_from = "mobilenetv2_imagenet", str(tmp_path / "r18.pth")
    with pytest.raises(transfer.InitError, match=r"tensors of the file have no place in "
                                                 r"mobilenetv2_imagenet: .*Is it torchvision's"):
        transfer.pretrained_variables(config, _template("mobilenetv2_imagenet"))
    config.model = "resnet18"
    with pytest.raises(transfer.InitError, match="needs a model with torchvision's ImageNet"):
        transfer.pretrained_variables(config, template)
    # Fine-tuning's optimizer state exists only with a backbone factor or a freeze: switching
    # it on or off on resume is a change no checkpoint can take (named as such).
    from cifar_jax import config_checks

    stored = config.to_dict()
    config.backbone_lr_scale = 0.5
    assert "fine-tuning optimizer" in " ".join(config_checks.fixed_field_changes(stored, config))


def test_the_backbone_waits_then_learns_at_its_scale():
    """optax.multi_transform: the classifier at the full rate from the start; the rest still
    for `freeze_steps` updates, then at `backbone_lr_scale` of the rate."""
    tx = optim.make_optimizer(10**9, head="fc", backbone_lr_scale=0.1, freeze_steps=2)
    params = {"fc": jnp.ones(3), "conv1": jnp.ones(3)}
    state = optim.with_hyperparams(tx.init(params), "sgd", 1.0, 0.0)
    grads = jax.tree.map(jnp.ones_like, params)
    steps = []
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        steps.append({k: float(v[0]) for k, v in updates.items()})
    assert [s["conv1"] for s in steps[:2]] == [0.0, 0.0] and steps[0]["fc"] == -1.0
    assert steps[2]["conv1"] == pytest.approx(0.1 * steps[2]["fc"])


def test_a_fine_tune_at_image_size_64_runs_and_resumes(torchvision_models, tmp_path,
                                                       tiny_config):
    """One epoch: torchvision weights in, the classifier new, images resized to 64x64 on the
    device, the backbone still for the first step; stopped after that step, then resumed to
    the end (one engine: one compile)."""
    from cifar_jax import engine, inference

    _torchvision_file(torchvision_models, "resnet18_imagenet", tmp_path / "r18.pth")
    c = tiny_config
    c.model, c.init_from, c.data.image_size = "resnet18_imagenet", str(tmp_path / "r18.pth"), 64
    c.num_epochs, c.backbone_lr_scale, c.freeze_backbone_epochs = 1, 0.1, 0.5
    c.data.synthetic_train_size, c.data.val_size, c.data.synthetic_test_size = 84, 20, 20
    c.eval_batch_size, c.log_every_steps = 20, 1
    shared, workdir = engine.Engine(), str(tmp_path / "run")
    with pytest.raises(train.Preempted):
        train.train_and_evaluate(c, workdir, engine=shared, stop_requested=lambda s: s == 1)
    result = train.train_and_evaluate(c, workdir, engine=shared)
    assert result["status"] == "completed" and result["step"] == 2
    assert result["num_params"] == 11_181_642  # torchvision's ResNet-18, a 10-way classifier
    file = torch.load(tmp_path / "r18.pth", weights_only=True)
    params = inference.load(workdir).variables["params"]
    moved = params["conv1"]["kernel"] - file["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    assert 0 < np.abs(moved).max() < 1e-2  # from the file, then a step at a tenth of the rate
