"""Knowledge distillation, the study's example: MobileNetV2 (2.2M parameters) learns from the
study grid's selected ResNet-18 (11.2M) as well as from the labels, 10 epochs, batch 128.

  python -m cifar_jax.main --config configs/grid.py --workdir runs/grid   # the teacher first
  python -m cifar_jax.main --config configs/distill.py --workdir runs/distill

T = 4 and alpha = 0.9 are the common choice in the distillation literature: Hinton, Vinyals and
Dean (2015) introduce the temperature and the T^2 scaling; the widely used CIFAR baseline of
Tian, Krishnan and Isola ("Contrastive Representation Distillation", ICLR 2020, and its
RepDistiller code) trains its KD students with T = 4, weight 0.9 on the teacher's term and 0.1
on the labels' cross-entropy. Compare the result with MobileNetV2's own selected trial in the
grid, or with this config and --config.distill.alpha=0 (the same run without the teacher).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = "mobilenetv2"
    # MobileNetV2's selected configuration in the study's grid is the fair comparison; these
    # are the study's defaults (Adam, lr 0.001, wd 1e-4, basic augmentation).
    config.distill.teacher_workdir = "runs/grid"  # a grid: its selected ResNet-18 teaches
    config.distill.teacher_model = "resnet18"
    config.distill.temperature = 4.0
    config.distill.alpha = 0.9
    return config
