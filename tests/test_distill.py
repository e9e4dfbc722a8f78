"""Knowledge distillation: the loss, the teacher's checks, and a student that learns from it."""

import json
import os

import jax
import numpy as np
import pytest

from cifar_jax import config_checks, distill, engine, inference, train

pytestmark = pytest.mark.xdist_group("distill")  # one worker trains the shared teacher once


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A finished tiny-CNN run on the synthetic data (6 epochs)."""
    from conftest import make_tiny_config

    config = make_tiny_config()
    config.num_epochs = 6
    workdir = str(tmp_path_factory.mktemp("teacher"))
    return workdir, train.train_and_evaluate(config, workdir)


def _student(tiny_config, teacher_workdir, alpha, seed=1):
    tiny_config.seed = seed
    tiny_config.distill.teacher_workdir, tiny_config.distill.alpha = teacher_workdir, alpha
    return tiny_config


def test_loss_matches_a_hand_computation_and_the_twin():
    torch = pytest.importorskip("torch")
    from cifar_jax.torch_twin import train as twin_train

    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 10)).astype(np.float32) * 3
    y = np.arange(5) % 10
    T, alpha = 4.0, 0.9
    got = np.asarray(engine.distillation_loss(s, t, y, T, alpha))

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ce = -np.log(softmax(s)[np.arange(5), y])
    p, q = softmax(t / T), softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    np.testing.assert_allclose(got, (1 - alpha) * ce + alpha * T ** 2 * kl, rtol=1e-5)
    twin = twin_train.distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T,
                                        alpha)
    np.testing.assert_allclose(got.mean(), float(twin), rtol=1e-5)


def test_alpha_zero_is_ordinary_training_bit_for_bit(teacher, tiny_config, tmp_path):
    tiny_config.num_epochs = 1
    plain = train.train_and_evaluate(tiny_config, str(tmp_path / "plain"))
    taught = train.train_and_evaluate(_student(tiny_config, teacher[0], 0.0, seed=0),
                                      str(tmp_path / "taught"))
    assert taught["teacher"]["workdir"] == teacher[0] and "teacher" not in plain
    for a, b in zip(*(jax.tree.leaves(inference.load(str(tmp_path / run)).variables)
                      for run in ("plain", "taught"))):
        np.testing.assert_array_equal(a, b)


def test_a_student_learns_from_the_teacher_alone(teacher, tiny_config, tmp_path):
    """alpha = 1: no labels in the loss, only the teacher's softened predictions; the student
    still learns the classes (and its result names its teacher)."""
    workdir, taught_by = teacher
    result = train.train_and_evaluate(_student(tiny_config, workdir, 1.0), str(tmp_path))
    assert result["teacher"] == {"workdir": workdir, "model": "tiny",
                                 "description": f"the run in {workdir}",
                                 "test_accuracy": taught_by["test_accuracy"]}
    # Measured: teacher 50%, student 40% after 2 epochs; chance is 10%.
    assert taught_by["test_accuracy"] >= 0.4 and result["test_accuracy"] >= 0.3
    # The teacher is part of the stored config: another one is a result-changing difference,
    # which a resume refuses (without allow_config_change), as for any other field.
    with open(os.path.join(tmp_path, "config.json")) as f:
        stored = json.load(f)
    tiny_config.distill.teacher_workdir = workdir + "_other"
    assert [d.split(":")[0] for d in config_checks.result_changing_differences(
        stored, tiny_config)] == ["distill.teacher_workdir"]


def test_an_unusable_teacher_is_refused_before_anything_runs(teacher, tiny_config, tmp_path):
    cases = {"missing": str(tmp_path / "nowhere"), "unfinished": str(tmp_path / "unfinished")}
    os.makedirs(cases["unfinished"])
    with open(os.path.join(cases["unfinished"], "config.json"), "w") as f:
        json.dump(tiny_config.to_dict(), f)
    messages = {"missing": "does not exist", "unfinished": "has not finished"}
    for case, path in cases.items():
        with pytest.raises(distill.TeacherError, match=f"teacher_workdir=.*{messages[case]}"):
            train.train_and_evaluate(_student(tiny_config, path, 0.9), str(tmp_path / "student"))
        assert not os.path.exists(tmp_path / "student" / "config.json")
    tiny_config.data.image_size = 64  # the teacher would see images of a size it never saw
    with pytest.raises(distill.TeacherError, match="trained on 32x32 images, this run feeds "
                                                   "64x64"):
        train.train_and_evaluate(_student(tiny_config, teacher[0], 0.9), str(tmp_path / "i64"))
    tiny_config.data.image_size = 32
    tiny_config.distill.teacher_model = "tiny"  # a single run has no models to choose from
    with pytest.raises(distill.TeacherError, match="is a single run, not a grid"):
        train.train_and_evaluate(_student(tiny_config, teacher[0], 0.9), str(tmp_path / "one"))
    tiny_config.distill.teacher_model = ""
    tiny_config.data.dataset = "cifar100"
    with pytest.raises(distill.TeacherError, match="trained on CIFAR-10, this run trains on "
                                                   "CIFAR-100"):
        train.train_and_evaluate(_student(tiny_config, teacher[0], 0.9), str(tmp_path / "c100"))
    # Distillation's settings without a teacher would do nothing: refused.
    tiny_config.data.dataset, tiny_config.distill.teacher_workdir = "cifar10", ""
    tiny_config.distill.alpha = 0.5
    with pytest.raises(config_checks.ConfigError, match="no effect without config.distill"):
        config_checks.validate_config(tiny_config, num_devices=1)
