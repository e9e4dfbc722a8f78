"""The study's setting for ResNet-18: Adam, lr 0.001, wd 1e-4, basic augmentation, 10 epochs.

Every knob of a run lives here. Override any field on the command line, e.g.
  python -m cifar_jax.main --config configs/default.py --workdir runs/x \
      --config.model=alexnet --config.optimizer=sgd --config.learning_rate=0.01
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: 'resnet18', 'alexnet', 'mobilenetv2', 'resnet50' or 'vit' (configs/vit.py).
    config.model = "resnet18"
    # Dropout before the classifier (AlexNet: before both hidden layers); None = the model's
    # default (AlexNet 0.5, MobileNetV2 0.2, ResNets 0). Data in the step: no recompile.
    config.dropout_rate = ml_collections.FieldReference(None, field_type=float)
    # Computation dtype: 'float32' or 'bfloat16' (parameters, BatchNorm statistics, loss and
    # optimizer state stay float32).
    config.dtype = "float32"
    # Matmul/convolution precision for float32: 'default' (each backend's choice on NVIDIA GPUs
    # since Ampere: XLA uses TF32 for both, PyTorch for convolutions only), 'tf32', or
    # 'highest' (true float32); set one of the last two to compare frameworks. In result.json.
    config.precision = "default"
    # How depthwise convolutions (MobileNetV2) are computed: 'shifts' (k*k shifted
    # multiply-adds), 'grouped' (XLA's grouped convolution) or 'auto' (shifts on the CPU, where
    # XLA has no fast grouped convolution; grouped elsewhere). Equal up to float rounding.
    config.depthwise = "auto"

    # Optimizer: 'sgd' (momentum, coupled L2 like torch.optim.SGD), 'adam' (coupled L2 like
    # torch.optim.Adam(weight_decay=...)) or 'adamw' (decoupled weight decay).
    config.optimizer = "adam"
    config.learning_rate = 0.001  # peak learning rate of the cosine schedule
    config.weight_decay = 1e-4
    config.momentum = 0.9  # SGD momentum (sgd only)
    config.nesterov = False  # Nesterov momentum (sgd only)
    # False: weight decay on convolution and dense kernels only (not on norm scales, biases,
    # nor the ViT's position embedding and class token).
    config.decay_bn_and_bias = True
    config.warmup_epochs = 0.0  # linear warm-up before the per-step cosine decay to 0
    config.label_smoothing = 0.0  # in [0, 1): weight of the uniform target in the loss
    # Exponential moving average of the weights (and BatchNorm statistics), evaluated instead
    # of the raw weights: 0 = off, else the per-step decay (e.g. 0.999).
    config.ema_decay = 0.0
    config.tta_flip = False  # evaluate on each image and its mirror image, logits averaged

    config.num_epochs = 10
    config.batch_size = 128  # global batch, split over all local devices
    config.eval_batch_size = 1000  # padded and masked: every example is evaluated exactly once

    # 'jax', or 'torch' to run the PyTorch twin (cifar_jax.torch_twin) with the same recipe.
    config.framework = "jax"

    # Transfer learning (configs/transfer.py; JAX only): start from a torchvision ImageNet
    # state dict (.pth, downloaded by you; the model must be an ImageNet form such as
    # 'resnet18_imagenet'); the classifier starts afresh for the data set's classes.
    config.init_from = ""  # '' = random initialisation
    config.backbone_lr_scale = 1.0  # learning-rate factor for all but the classifier
    config.freeze_backbone_epochs = 0.0  # all but the classifier stay still this long

    # Knowledge distillation (configs/distill.py; JAX only): a trained teacher's predictions
    # softened by `temperature` join the loss, (1 - alpha) * cross-entropy
    # + alpha * T^2 * KL(teacher_T || student_T); the teacher runs in inference mode on the
    # student's augmented batch and is never updated.
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher_workdir = ""  # a finished run's or grid's workdir; '' = none
    config.distill.teacher_model = ""  # with a grid's workdir: whose selected trial teaches
    config.distill.temperature = 4.0
    config.distill.alpha = 0.9  # weight of the teacher's term; 0 = ordinary training

    config.seed = 0  # every random choice of a run (init, data order, augmentation, dropout)

    config.data = ml_collections.ConfigDict()
    # Which data set: 'cifar10' or 'cifar100' (its 100 fine labels); cifar_jax/datasets.py
    # holds each one's classes, normalisation statistics and file layouts.
    config.data.dataset = "cifar10"
    # 'tfds' | 'cifar_dir:PATH' (cifar-10-batches-py) | 'folder:PATH' (train/<class>/*,
    # test/<class>/*; a directory or a .tar/.tar.gz of one) | 'synthetic'.
    config.data.source = "tfds"
    # Where tensorflow-datasets keeps CIFAR-10 (source 'tfds' only); None = its default.
    config.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.val_size = 5000  # taken from the training set, stratified; 0 disables validation
    config.data.split_seed = 0  # fixed validation split, independent of config.seed
    # 'none' | 'basic' (pad-4 random crop + horizontal flip) | 'advanced' (basic + colour jitter)
    config.data.augmentation = "basic"
    # The side images are resized to on the device before augmentation (bilinear,
    # antialiased): 32 = as stored; larger for ImageNet-pretrained models (configs/transfer.py).
    config.data.image_size = 32
    # Sizes of the synthetic data set (source 'synthetic' only).
    config.data.synthetic_train_size = 2000
    config.data.synthetic_test_size = 500

    # Evaluate the test split at the end, on the best epoch's weights (the ones kept).
    # configs/grid.py sets False: the grid's report evaluates the selected trials only.
    config.evaluate_test = True

    # Steps per chunk (one dispatch with step_loop 'device'): the host syncs, logs one progress
    # line, checks for a non-finite loss and honours SIGTERM every this many steps (and at
    # every epoch end).
    config.log_every_steps = 50
    # How a chunk of steps runs: 'device' (one on-device loop, one dispatch), 'host' (one
    # dispatch per step, no sync between them) or 'auto' (device, except on the CPU, where
    # XLA's convolutions run several times slower inside a loop).
    config.step_loop = "auto"
    config.checkpoint_max_to_keep = 2  # latest checkpoints kept (plus the best one)
    # Keep the full checkpoints (with optimizer state) of a completed run; by default only its
    # best weights and batch statistics stay (best_weights/), enough to evaluate it.
    config.keep_full_checkpoints = False
    # JAX's persistent compilation cache: a rerun, a resume or another shard on this machine
    # loads compiled programs instead of compiling again. '' disables it.
    config.compilation_cache_dir = "~/.cache/cifar_jax/xla"
    # Resume in a workdir whose stored config differs in a result-changing field.
    config.allow_config_change = False
    return config
