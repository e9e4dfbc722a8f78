"""The study's setting for ResNet-18: Adam, lr 0.001, wd 1e-4, basic augmentation, 10 epochs.

Every knob of a run lives here. Override any field on the command line, e.g.
  python -m cifar_jax.main --config configs/default.py --workdir runs/x \
      --config.model=alexnet --config.optimizer=sgd --config.learning_rate=0.01
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model: 'resnet18', 'alexnet' or 'mobilenetv2'.
    config.model = "resnet18"
    # Dropout rate for models that have dropout (AlexNet, MobileNetV2); None = model default
    # (AlexNet 0.5, MobileNetV2 0.2). Passed to the step as data: no recompile per value.
    config.dropout_rate = ml_collections.FieldReference(None, field_type=float)
    # Computation dtype: 'float32' or 'bfloat16' (parameters and optimizer state stay float32).
    config.dtype = "float32"

    # Optimizer: 'sgd' (momentum, coupled L2 like torch.optim.SGD), 'adam' (coupled L2 like
    # torch.optim.Adam(weight_decay=...)) or 'adamw' (decoupled weight decay).
    config.optimizer = "adam"
    config.learning_rate = 0.001  # peak learning rate of the cosine schedule
    config.weight_decay = 1e-4
    config.momentum = 0.9  # SGD momentum
    config.nesterov = False  # SGD only
    config.decay_bn_and_bias = True  # False: no weight decay on BatchNorm and bias parameters
    config.warmup_epochs = 0.0  # linear warm-up before the per-step cosine decay to 0
    config.label_smoothing = 0.0

    config.num_epochs = 10
    config.batch_size = 128  # global batch, split over all local devices
    config.eval_batch_size = 1000  # padded and masked: every example is evaluated exactly once

    # 'jax', or 'torch' to run the PyTorch twin (cifar_jax.torch_twin) with the same recipe.
    config.framework = "jax"

    config.seed = 0  # every random choice of a run (init, data order, augmentation, dropout)

    config.data = ml_collections.ConfigDict()
    # 'tfds' | 'cifar_dir:PATH' (cifar-10-batches-py) | 'folder:PATH' (train/<class>/*,
    # test/<class>/*; a directory or a .tar/.tar.gz of one) | 'synthetic'.
    config.data.source = "tfds"
    config.data.tfds_data_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.val_size = 5000  # taken from the training set, stratified; 0 disables validation
    config.data.split_seed = 0  # fixed validation split, independent of config.seed
    # 'none' | 'basic' (pad-4 random crop + horizontal flip) | 'advanced' (basic + colour jitter)
    config.data.augmentation = "basic"
    # Sizes of the synthetic data set (source 'synthetic' only).
    config.data.synthetic_train_size = 2000
    config.data.synthetic_test_size = 500

    config.evaluate_test = True  # evaluate the test split at the end (the grid: selected only)

    config.log_every_steps = 50  # train metrics to TensorBoard and the non-finite-loss check
    config.checkpoint_max_to_keep = 2  # latest checkpoints kept (the best one is kept apart)
    # Resume in a workdir whose stored config differs in a result-changing field.
    config.allow_config_change = False
    return config
