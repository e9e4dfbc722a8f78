"""Fine-tuning torchvision's ImageNet ResNet-18 on CIFAR (transfer learning):

  python -m cifar_jax.main --config configs/transfer.py --workdir runs/transfer \
      --config.init_from=~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth

The weights are torchvision's `state_dict` file, which you download yourself (nothing is
downloaded at run time): https://download.pytorch.org/models/resnet18-f37072fd.pth (torchvision
keeps its downloads in ~/.cache/torch/hub/checkpoints/); ResNet-50 and MobileNetV2 work the same
way (--config.model=resnet50_imagenet / mobilenetv2_imagenet; cifar_jax/transfer.py lists their
files). The classifier starts afresh for the data set's classes.

The recipe, as fine-tuning commonly goes: images upsampled on the device to 128x128 (the
ImageNet models downsample 32x before their last stage; 224 is closer to their training and
(224/128)^2 = 3.1x the work), SGD with Nesterov momentum at 0.01 for the new classifier and a tenth of
it for the pretrained backbone (optax.multi_transform), the backbone frozen for the first epoch
while the classifier settles, 5 epochs, light weight decay. The BatchNorm statistics start from
ImageNet's and are re-estimated on CIFAR as training goes (running averages, momentum 0.1).
Normalisation keeps the data set's statistics. On a CPU, use 64 (not measured at 128 there).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model = "resnet18_imagenet"
    config.init_from = "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth"
    config.data.image_size = 128
    config.num_epochs = 5
    config.optimizer = "sgd"
    config.nesterov = True
    config.learning_rate = 0.01  # the classifier's; the backbone's is backbone_lr_scale of it
    config.backbone_lr_scale = 0.1
    config.freeze_backbone_epochs = 1.0
    config.weight_decay = 5e-5
    config.warmup_epochs = 0.0
    return config
