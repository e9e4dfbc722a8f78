"""Knowledge distillation (`config.distill`, configs/distill.py): the teacher a run learns from,
loaded and checked before anything is compiled (the loss is `engine.distillation_loss`).

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015): the student
matches the teacher's predictions softened by a temperature T as well as the labels,

    loss = (1 - alpha) * cross-entropy(student, labels)
           + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

the T^2 keeping the soft term's gradients at the scale of the hard one's. The teacher runs in
inference mode on the student's own augmented batch inside the compiled step (engine.py), its
weights passed in as an argument and never updated.
"""

import dataclasses
import os
from typing import Any, Dict, Optional

import jax

from cifar_jax import checkpointing, config_checks, datasets, inference
from cifar_jax.workdir import WorkdirError


class TeacherError(config_checks.ConfigError):
    """config.distill names no usable teacher; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    model: str  # the teacher's architecture (models.MODELS)
    variables: Dict[str, Any]  # its evaluated weights: {'params', 'batch_stats'}
    record: Dict[str, Any]  # what the student's result.json says of it


def load_teacher(config) -> Optional[Teacher]:
    """The teacher of `config`'s run, or None without distillation. TeacherError (one line)
    for a teacher that is missing, unfinished, unreadable, or trained on another data set."""
    d = config.get("distill")
    if d is None or not d.teacher_workdir:
        return None
    where = (f"config.distill.teacher_workdir={d.teacher_workdir!r}"
             + (f" (teacher_model={d.teacher_model!r})" if d.teacher_model else ""))
    path = os.path.expanduser(d.teacher_workdir)
    grid = os.path.isfile(os.path.join(path, "grid_config.json"))
    if os.path.exists(path) and not os.path.isdir(path):
        raise TeacherError(f"{where} is a file, not a run's or a grid's workdir.")
    if grid and not d.teacher_model:
        raise TeacherError(f"{where} is a grid: set config.distill.teacher_model to the model "
                           "whose selected trial teaches.")
    if os.path.isdir(path) and not grid and d.teacher_model:
        raise TeacherError(f"{where} is a single run, not a grid: leave "
                           "config.distill.teacher_model empty.")
    try:
        trained = inference.load(d.teacher_workdir, d.teacher_model or None)
        variables = jax.device_get(trained.variables)
    except (WorkdirError, checkpointing.CheckpointError) as e:
        raise TeacherError(f"{where} is no usable teacher: {e}") from None
    student = datasets.of_config(config)
    if trained.info != student:
        raise TeacherError(
            f"{where} was trained on {trained.info.title}, this run trains on {student.title}: "
            "a teacher must know the student's classes. Give a teacher of the same data set.")
    size = int(config.data.get("image_size", 32))
    if trained.image_size != size:  # the teacher sees the student's batch as it is
        raise TeacherError(
            f"{where} was trained on {trained.image_size}x{trained.image_size} images, this "
            f"run feeds {size}x{size} ones (config.data.image_size): give a teacher of the "
            "student's image size.")
    return Teacher(trained.config.model, variables, {
        "workdir": trained.workdir, "model": trained.config.model,
        "description": trained.description,
        "test_accuracy": trained.result.get("test_accuracy")})

