"""The data sets this project trains on, as data (`config.data.dataset`): one record each,
with what every other module needs to know about it (classes, normalisation statistics, where
tfds and the python-pickle folder keep it). A new data set of 32x32 RGB images is a new record
here, not a new code path.
"""

import dataclasses
from typing import Dict, Tuple

_CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str  # config.data.dataset
    title: str  # how reports name it
    classes: Tuple[str, ...]  # class names, by label
    mean: Tuple[float, float, float]  # per-channel statistics of the training images in [0, 1]
    std: Tuple[float, float, float]
    tfds_name: str  # the tensorflow-datasets builder
    pickle_folder: str  # the python-pickle folder its authors distribute (cifar_dir:)
    pickle_train: Tuple[str, ...]  # files of that folder holding the training images
    pickle_test: str  # the file holding the test images
    pickle_labels: bytes  # the key of the labels in each file
    download_host: str = "www.cs.toronto.edu"  # where tfds downloads it from

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CIFAR10 = DatasetInfo(
    name="cifar10", title="CIFAR-10",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"),
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    tfds_name="cifar10", pickle_folder="cifar-10-batches-py",
    pickle_train=tuple(f"data_batch_{i}" for i in range(1, 6)), pickle_test="test_batch",
    pickle_labels=b"labels")

CIFAR100 = DatasetInfo(
    name="cifar100", title="CIFAR-100", classes=_CIFAR100_CLASSES,  # the 100 fine labels
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    tfds_name="cifar100", pickle_folder="cifar-100-python", pickle_train=("train",),
    pickle_test="test", pickle_labels=b"fine_labels")

DATASETS: Dict[str, DatasetInfo] = {d.name: d for d in (CIFAR10, CIFAR100)}


def get(name: str) -> DatasetInfo:
    """The record of data set `name`; ValueError naming the valid ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; valid: {', '.join(DATASETS)}.")
    return DATASETS[name]


def of_config(config) -> DatasetInfo:
    """The data set a run's config trains on (configs stored before the field: CIFAR-10)."""
    return get(config.data.get("dataset", "cifar10"))
