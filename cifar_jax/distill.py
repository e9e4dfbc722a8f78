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
    return Teacher(trained.config.model, variables, {
        "workdir": trained.workdir, "model": trained.config.model,
        "description": trained.description,
        "test_accuracy": trained.result.get("test_accuracy")})

