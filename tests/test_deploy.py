"""Using a trained model: loading it (run, grid, twin), predict, evaluate, export (StableHLO,
ONNX, int8, torch), and the refusals."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cifar_jax import datasets, evaluation, inference, input_pipeline, train
from cifar_jax import workdir as workdir_lib
from cifar_jax.workdir import WorkdirError
from conftest import CACHE_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("deploy")  # one worker trains the shared run once


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke run (configs/smoke.py: AlexNet, 3 epochs on synthetic data) on 1,000 training
    images instead of 2,500 (100% test accuracy here), with flip TTA: shared by every test
    here."""
    from configs import smoke

    c = smoke.get_config()
    c.tta_flip, c.log_every_steps, c.compilation_cache_dir = True, 100, CACHE_DIR
    c.data.synthetic_train_size = 1500
    workdir = str(tmp_path_factory.mktemp("run"))
    result = train.train_and_evaluate(c, workdir)
    return c, workdir, result, input_pipeline.load_dataset(c.data)


def test_the_served_weights_are_the_ones_the_run_reported(trained):
    """Best epoch's weights with the run's TTA: the run's own test accuracy, and the
    evaluation files (summary, per-class table, figures checked as objects)."""
    c, workdir, result, data = trained
    model = inference.load(workdir)
    assert model.tta_flip and model.classes == datasets.CIFAR10.classes
    e = evaluation.evaluate_split(model, data.test, "test", inference.Predictor(model))
    assert e.accuracy == result["test_accuracy"] > 0.9
    assert e.nll == pytest.approx(result["test_loss"], rel=1e-4)
    out = os.path.join(workdir, "evaluation", "test")
    assert sorted(os.listdir(out)) == ["confusion_matrix.png", "mistakes.png", "per_class.csv",
                                       "reliability.png", "summary.md"]
    summary = open(os.path.join(out, "summary.md")).read()
    assert f"accuracy: {100 * e.accuracy:.2f}% (500 images)" in summary
    assert "expected calibration error (15 equal-width confidence bins)" in summary
    assert "with flip test-time augmentation" in summary
    assert len(open(os.path.join(out, "per_class.csv")).readlines()) == 11
    confusion = evaluation.confusion_figure(e)
    assert len(confusion.axes) == 2
    for ax in confusion.axes:
        assert [t.get_text() for t in ax.get_yticklabels()] == list(model.classes)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(model.classes)
    assert int(np.sum(e.confusion())) == 500
    assert f"ECE {100 * e.ece():.2f}%" in evaluation.reliability_figure(e).axes[0].get_title()
    mistakes = evaluation.mistakes_figure(e, data.test.images)
    titled = [ax.get_title() for ax in mistakes.axes if ax.get_title()]
    assert len(titled) == min(36, int(np.sum(e.predicted != e.labels)))
    assert all(t.startswith("true ") and "\npred " in t for t in titled)


def test_calibration_against_a_hand_computation():
    e = evaluation.from_logits(np.log([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]]), np.array([0, 1, 1]),
                               ("a", "b"))
    # Confidences 0.9 (right), 0.6 (wrong), 0.7 (right), in three of 15 bins.
    assert e.ece() == pytest.approx((0.1 + 0.6 + 0.3) / 3)
    assert e.nll == pytest.approx(-(np.log(0.9) + np.log(0.4) + np.log(0.7)) / 3)
    assert e.per_class()["precision"].tolist() == [0.5, 1.0]  # a predicted twice, once right
    assert e.per_class()["recall"].tolist() == [1.0, 0.5]
    # Logits that overflowed (BatchNorm statistics gone to inf) are refused, not binned.
    with pytest.raises(ValueError, match="not finite for 1 of 2 images"):
        evaluation.from_logits(np.array([[0.0, 1.0], [np.nan, 0.0]]), np.array([0, 1]), "ab")


def test_predict_files_and_folders(trained, tmp_path, capsys):
    from PIL import Image

    from cifar_jax import predict

    _, workdir, _, data = trained
    model = inference.load(workdir)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "__MACOSX").mkdir()
    Image.fromarray(data.test.images[0]).save(tmp_path / "in" / "a.png")
    big = np.asarray(Image.fromarray(data.test.images[1]).resize((64, 48)))
    Image.fromarray(big).save(tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".DS_Store").write_text("junk")
    (tmp_path / "in" / "__MACOSX" / "a.png").write_text("junk")
    rows, skipped = predict.predict(model, [str(tmp_path / "in"), str(tmp_path / "nope")], k=2)
    assert [os.path.relpath(r["path"], tmp_path) for r in rows] == ["in/a.png", "in/sub/b.png"]
    expected = inference.Predictor(model)(data.test.images[:1]).argmax(1)[0]
    assert rows[0]["top"][0][0] == model.classes[expected] and len(rows[0]["top"]) == 2
    assert rows[1]["note"] == "resized from 64x48"
    assert [os.path.relpath(p, tmp_path) for p, _ in skipped] == ["nope", "in/notes.txt"]
    assert "is not an image file" in skipped[1][1]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{tmp_path}/in/a.png: {rows[0]['top'][0][0]} ")
    about = {"model": model.description, "workdir": workdir, "tta_flip": True}
    predict.write_out(str(tmp_path / "p.json"), rows, skipped, about)
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["tta_flip"] is True and len(written["predictions"]) == 2
    assert set(written["predictions"][0]["top"][0]) == {"class", "probability"}
    predict.write_out(str(tmp_path / "p.csv"), rows, skipped, about)
    header = (tmp_path / "p.csv").read_text().splitlines()[0]
    assert header == "path,class_1,prob_1,class_2,prob_2,note,tta_flip,model"


def test_predict_command_names_what_it_skips_and_exits_1(trained, tmp_path):
    _, workdir, _, _ = trained
    (tmp_path / "notes.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "cifar_jax.predict", "--workdir", workdir,
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: 1 skipped (not images, or not found): {tmp_path}/notes.txt")
    assert "Traceback" not in proc.stderr


def test_refusals_name_what_to_run(trained, tmp_path):
    _, workdir, _, _ = trained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(workdir, unfinished)
    result = workdir_lib.read_result(str(unfinished))
    workdir_lib.write_result(str(unfinished), dict(result, status="preempted"))
    with pytest.raises(WorkdirError, match="has not finished \\(status: preempted\\): run the "
                                           "command that started it again"):
        inference.load(str(unfinished))
    with pytest.raises(WorkdirError, match="holds no run"):
        inference.load(str(tmp_path))
    with pytest.raises(WorkdirError, match="is a single run, not a grid"):
        inference.load(workdir, model="alexnet")
    from cifar_jax import cli, export

    with pytest.raises(cli.UsageError, match=r"needs no_such_module .*pip install -e "
                                             r"'\.\[deploy\]'"):
        export._need("no_such_module")


def test_a_grid_serves_its_selected_trial_and_the_twin_its_converted_weights(trained, tmp_path):
    """The grid's report picks the trial (and evaluates it once, in depth); --model chooses the
    model, --seed the seed; a twin run is served through torch_twin.convert."""
    torch = pytest.importorskip("torch")
    from cifar_jax import report, trials
    from cifar_jax.torch_twin import convert
    from configs import grid as grid_config

    c, workdir, result, data = trained
    g = grid_config.get_config()
    g.update_from_flattened_dict({k: v for k, v in _flat(c).items() if not k.startswith("grid")})
    g.grid.models, g.grid.optimizer, g.grid.learning_rate = "alexnet", "adam", "3e-4"
    g.grid.weight_decay, g.grid.augmentation, g.grid.dropout_models = "5e-4", "none", ""
    g.evaluate_test = False
    (trial,) = trials.expand(g)
    shutil.copytree(workdir, tmp_path / trial.relpath)
    workdir_lib.write_json_atomic(str(tmp_path / "grid_config.json"), g.to_dict())
    report.write_report(str(tmp_path), g, dataset=data)
    served = inference.load(str(tmp_path), model="alexnet")
    assert served.workdir == str(tmp_path / trial.relpath)
    assert served.description.startswith(f"the selected configuration of alexnet in {tmp_path}, "
                                         "adam_lr3e-4_wd5e-4_none, seed 0")
    assert os.path.exists(tmp_path / trial.relpath / "evaluation" / "test" / "summary.md")
    with pytest.raises(WorkdirError, match="is a grid: pass --model NAME .*\\(alexnet\\)"):
        inference.load(str(tmp_path))
    with pytest.raises(WorkdirError, match="no selected configuration of 'resnet18'"):
        inference.load(str(tmp_path), model="resnet18")
    with pytest.raises(WorkdirError, match="no trial with seed 3"):
        inference.load(str(tmp_path), model="alexnet", seed=3)
    result = workdir_lib.read_result(served.workdir)
    workdir_lib.write_result(served.workdir, dict(result, selected=False))
    unselected = inference.load(served.workdir)  # a trial's directory, as a run
    with pytest.raises(WorkdirError, match="that its report did not select; the grid keeps "
                                           "the test split"):
        inference.load_split(unselected, "test")
    assert len(inference.load_split(unselected, "val")) == 500
    workdir_lib.write_result(served.workdir, result)

    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(os.path.join(workdir, "config.json"), twin / "config.json")
    workdir_lib.write_result(str(twin), dict(result, framework="torch"))
    torch.save(convert.flax_to_torch(served.variables), twin / "torch_best.pt")
    served_twin = inference.load(str(twin))
    assert served_twin.description.endswith("(PyTorch twin)")
    images = data.test.images[:8]  # the twin's own forward pass, within the parity bound
    np.testing.assert_allclose(inference.Predictor(served_twin)(images),
                               inference.Predictor(served)(images), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(served_twin.variables), jax.tree.leaves(served.variables)):
        np.testing.assert_array_equal(a, b)  # converted back to Flax exactly


def _flat(config):
    from cifar_jax import config_checks

    return config_checks.flatten(config)


def test_stablehlo_round_trip_in_a_process_without_cifar_jax(trained, tmp_path):
    from cifar_jax import export

    _, workdir, _, data = trained
    model = inference.load(workdir)
    path = str(tmp_path / "model.stablehlo")
    export.export(model, "stablehlo", path)
    assert json.loads(open(path + ".classes.json").read()) == list(model.classes)
    images = data.test.images[:5]
    np.save(tmp_path / "images.npy", images)
    script = ("import sys, jax, numpy as np\n"
              f"exp = jax.export.deserialize(open({path!r}, 'rb').read())\n"
              f"x = np.load({str(tmp_path / 'images.npy')!r})\n"
              f"np.save({str(tmp_path / 'out5.npy')!r}, np.asarray(exp.call(x)))\n"
              f"np.save({str(tmp_path / 'out3.npy')!r}, np.asarray(exp.call(x[:3])))\n"
              "assert not any(m.startswith('cifar_jax') for m in sys.modules), 'imported'\n"
              "print(exp.platforms)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'cpu', 'cuda'" in proc.stdout
    expected = inference.Predictor(model)(images)
    np.testing.assert_allclose(np.load(tmp_path / "out5.npy"), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out3.npy"), expected[:3], atol=1e-5,
                               rtol=1e-5)


def test_onnx_int8_and_torch_exports(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    from cifar_jax import export
    from cifar_jax.torch_twin import models as twin_models

    _, workdir, _, data = trained
    model = inference.load(workdir)
    expected = inference.Predictor(model)(data.test.images)
    onnx_path = str(tmp_path / "model.onnx")
    export.export(model, "onnx", onnx_path)
    np.testing.assert_allclose(export.onnx_logits(onnx_path, data.test.images), expected,
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(export.onnx_logits(onnx_path, data.test.images[:3]),
                               expected[:3], atol=1e-4, rtol=1e-4)  # any batch size
    int8_path = str(tmp_path / "model.int8.onnx")
    info = export.export(model, "onnx", int8_path, quantize="int8", calibration=256)["int8"]
    assert info["calibration_images"] == 256 and info["test_images"] == 500
    assert os.path.getsize(int8_path) < 0.3 * os.path.getsize(onnx_path)
    int8 = export.onnx_logits(int8_path, data.test.images).argmax(1)
    # A broken quantization agrees by chance (~10%); with full-range (8-bit) weights, which
    # saturate on x86 CPUs without VNNI, the smoke model (at learning rate 1e-3, 2026-11-30)
    # agreed on 86.6%; with 7-bit, 99.8%.
    assert np.mean(int8 == expected.argmax(1)) >= 0.95
    assert info["agreement_with_float32"] == pytest.approx(np.mean(int8 == expected.argmax(1)))
    assert json.loads(open(int8_path + ".int8.json").read())["int8_bytes"] == os.path.getsize(
        int8_path)

    pt_path = str(tmp_path / "model.pt")
    export.export(model, "torch", pt_path)
    saved = torch.load(pt_path, weights_only=True)
    net = twin_models.get_model(saved["model"])
    net.load_state_dict(saved["state_dict"])
    net.eval()
    x = torch.from_numpy(data.test.images[:4]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(saved["mean"]).view(1, 3, 1, 1)) / torch.tensor(saved["std"]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        logits = 0.5 * (net(x) + net(x.flip(3))) if saved["tta_flip"] else net(x)
    np.testing.assert_allclose(logits.numpy(), expected[:4], atol=1e-4, rtol=1e-4)
