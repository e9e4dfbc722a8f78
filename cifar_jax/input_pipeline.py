"""CIFAR-10 acquisition: every source becomes uint8 NHWC arrays, split into train/val/test.

Sources (`config.data.source`):
  tfds             tensorflow-datasets 'cifar10' (downloads on first use where a network exists)
  cifar_dir:PATH   the python-pickle folder 'cifar-10-batches-py' that torchvision downloads
  folder:PATH      train/<class>/* and test/<class>/* images (PNG/JPEG), a directory or a
                   .tar/.tar.gz of one; class index = position of the folder name in sorted order
  synthetic        deterministic random images with a learnable class signal, any size

The whole split is small (150 MB for CIFAR-10) and is put on the device by the trainer;
shuffling and augmentation happen there (see `augment.py`).
"""

import dataclasses
import io
import os
import pickle
import tarfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SOURCE_KINDS = ("tfds", "cifar_dir:PATH", "folder:PATH", "synthetic")


class DataError(ValueError):
    """Input data is missing or malformed; the message says what is expected."""


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    labels: np.ndarray  # int32 [N]

    def __len__(self):
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Split
    val: Optional[Split]  # None when val_size == 0
    test: Split
    source: str


def parse_source(source: str) -> Tuple[str, Optional[str]]:
    """'folder:/a/b' -> ('folder', '/a/b'); 'tfds' -> ('tfds', None)."""
    kind, sep, path = source.partition(":")
    if kind in ("tfds", "synthetic") and not sep:
        return kind, None
    if kind in ("cifar_dir", "folder") and sep and path:
        return kind, os.path.expanduser(path)
    raise DataError(
        f"config.data.source={source!r} is not a valid data source. Expected one of: "
        f"{', '.join(SOURCE_KINDS)} (e.g. 'folder:/data/cifar10.tar.gz').")


# ----------------------------------------------------------------------------------------------
# Sources. Each returns (train, test) as full Splits.


def load_cifar_dir(path: str) -> Tuple[Split, Split]:
    """Reads the python-pickle CIFAR-10 folder (data_batch_1..5, test_batch)."""
    if not os.path.isdir(path):
        raise DataError(f"cifar_dir: {path!r} does not exist or is not a directory. Expected "
                        "the 'cifar-10-batches-py' folder with data_batch_1..5 and test_batch.")
    expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
    if missing:
        found = sorted(os.listdir(path))[:10]
        raise DataError(
            f"cifar_dir: {path!r} lacks {', '.join(missing)}. Found: {found or 'nothing'}. "
            f"Expected the 'cifar-10-batches-py' layout: {', '.join(expected)}.")

    def read(names):
        images, labels = [], []
        for name in names:
            file = os.path.join(path, name)
            try:
                with open(file, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], np.uint8)
                labels.append(np.asarray(batch[b"labels"], np.int32))
            except Exception as e:  # pickle errors come in many types
                raise DataError(f"cifar_dir: cannot read {file!r} as a CIFAR-10 batch: {e}") from e
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        return Split(np.concatenate(images), np.concatenate(labels))

    return read(expected[:5]), read(expected[5:])


class _TreeReader:
    """Lists and reads files of an image tree in a directory or a tar archive."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise DataError(f"folder: {path!r} does not exist. Expected a directory or a .tar / "
                            ".tar.gz archive holding train/<class>/* and test/<class>/*.")
        self.path = path
        self._tar = None
        if os.path.isdir(path):
            self.files = []
            for root, _, names in os.walk(path):
                rel = os.path.relpath(root, path)
                self.files += [os.path.normpath(os.path.join(rel, n)) for n in names]
        elif tarfile.is_tarfile(path):
            self._tar = tarfile.open(path, "r:*")
            self._members = {os.path.normpath(m.name): m for m in self._tar.getmembers()
                             if m.isfile()}
            self.files = list(self._members)
        else:
            raise DataError(f"folder: {path!r} is neither a directory nor a tar archive.")
        # Tolerate one wrapping top-level folder (e.g. cifar10/train/...).
        self.prefix = ""
        tops = {f.split(os.sep)[0] for f in self.files}
        if "train" not in tops and len(tops) == 1:
            self.prefix = tops.pop() + os.sep

    def tree(self) -> Dict[str, Dict[str, List[str]]]:
        """{split: {class: [relative file names, sorted]}} for image files under the prefix."""
        out: Dict[str, Dict[str, List[str]]] = {}
        for f in self.files:
            if not f.startswith(self.prefix):
                continue
            parts = f[len(self.prefix):].split(os.sep)
            if len(parts) == 3 and parts[2].lower().endswith(_IMAGE_SUFFIXES):
                out.setdefault(parts[0], {}).setdefault(parts[1], []).append(f)
        for classes in out.values():
            for names in classes.values():
                names.sort()
        return out

    def read(self, name: str) -> bytes:
        if self._tar is not None:
            return self._tar.extractfile(self._members[name]).read()
        with open(os.path.join(self.path, name), "rb") as f:
            return f.read()

    def describe(self) -> str:
        tops = sorted({f.split(os.sep)[0] for f in self.files})
        return f"top-level entries {tops[:10]}" if tops else "no files"


def load_folder(path: str) -> Tuple[Split, Split]:
    """Reads train/<class>/* and test/<class>/* from a directory or tar archive."""
    from PIL import Image  # pillow: only this source decodes images

    reader = _TreeReader(path)
    tree = reader.tree()
    if "train" not in tree or "test" not in tree:
        raise DataError(
            f"folder: {path!r} has the wrong layout: found {reader.describe()}, image splits "
            f"{sorted(tree) or 'none'}. Expected train/<class>/*.png|jpg and "
            "test/<class>/*.png|jpg (optionally inside one top-level folder).")
    classes = sorted(tree["train"])
    if len(classes) != NUM_CLASSES or sorted(tree["test"]) != classes:
        raise DataError(
            f"folder: {path!r} must have the same {NUM_CLASSES} class folders in train/ and "
            f"test/; found {len(classes)} in train ({classes}) and {len(tree['test'])} in test "
            f"({sorted(tree['test'])}).")

    def read(split):
        images, labels = [], []
        for label, cls in enumerate(classes):
            for name in tree[split][cls]:
                try:
                    with Image.open(io.BytesIO(reader.read(name))) as im:
                        array = np.asarray(im.convert("RGB"), np.uint8)
                except Exception as e:
                    raise DataError(f"folder: cannot decode image {name!r} in {path!r}: {e}") from e
                if array.shape != IMAGE_SHAPE:
                    raise DataError(f"folder: image {name!r} has shape {array.shape}; every "
                                    f"image must be {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} RGB.")
                images.append(array)
                labels.append(label)
        return Split(np.stack(images), np.asarray(labels, np.int32))

    logging.info("Decoding images from %s (classes: %s)", path, ", ".join(classes))
    return read("train"), read("test")


def load_tfds(data_dir: Optional[str]) -> Tuple[Split, Split]:
    """tensorflow-datasets 'cifar10', downloaded to `data_dir` on first use."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "data source 'tfds' needs tensorflow-datasets, which is not installed here. "
            "Install it, or use config.data.source='cifar_dir:/path/to/cifar-10-batches-py' "
            "or 'folder:/path/to/tree_or_archive'.") from e
    from cifar_jax import tf_runtime
    tf_runtime.hide_gpus_from_tensorflow()
    try:
        splits = tfds.load("cifar10", split=["train", "test"], as_supervised=True,
                           data_dir=data_dir)
    except Exception as e:
        raise DataError(
            f"CIFAR-10 could not be loaded or downloaded by tensorflow-datasets "
            f"(data_dir={data_dir!r}): {type(e).__name__}: {e}\nOffline, point the run at a "
            "copy you already have: --config.data.source=cifar_dir:/path/to/cifar-10-batches-py "
            "or --config.data.source=folder:/path/to/cifar10_images(.tar.gz).") from e

    def to_split(ds):
        # Batched iteration rather than batch_size=-1, which aborts inside TF on some builds.
        images, labels = zip(*tfds.as_numpy(ds.batch(10_000)))
        return Split(np.concatenate(images).astype(np.uint8),
                     np.concatenate(labels).astype(np.int32))

    return to_split(splits[0]), to_split(splits[1])


def make_synthetic(num_train: int, num_test: int, seed: int = 1234) -> Tuple[Split, Split]:
    """Noise images with a class-dependent colour tint and stripe pattern: learnable quickly."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-60, 60, size=(NUM_CLASSES, 1, 1, 3))
    freqs = np.arange(1, NUM_CLASSES + 1)
    ys, xs = np.mgrid[0:32, 0:32]

    def make(n):
        labels = np.arange(n) % NUM_CLASSES
        rng.shuffle(labels)
        angle = (labels[:, None, None] * np.pi / NUM_CLASSES)
        phase = np.cos(freqs[labels][:, None, None] * 0.2 *
                       (xs * np.cos(angle) + ys * np.sin(angle)))
        images = 128 + rng.normal(0, 40, size=(n, 32, 32, 3)) + tints[labels]
        images += 40 * phase[..., None]
        return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32))

    return make(num_train), make(num_test)


# ----------------------------------------------------------------------------------------------


def stratified_val_indices(labels: np.ndarray, val_size: int, split_seed: int) -> np.ndarray:
    """Indices of a class-balanced validation subset, fixed by `split_seed` alone."""
    classes = np.unique(labels)
    rng = np.random.default_rng(split_seed)
    per_class = [val_size // len(classes) + (i < val_size % len(classes))
                 for i in range(len(classes))]
    picked = []
    for cls, k in zip(classes, per_class):
        members = np.flatnonzero(labels == cls)
        if k > len(members):
            raise DataError(f"val_size={val_size} needs {k} images of class {cls}, "
                            f"but the training set has only {len(members)}.")
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked))


def _check_split(split: Split, name: str, source: str):
    if split.images.dtype != np.uint8 or split.images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{source}: {name} images are {split.images.dtype} "
                        f"{split.images.shape}; expected uint8 [N, 32, 32, 3].")
    found = np.unique(split.labels)
    if len(found) != NUM_CLASSES or found.min() != 0 or found.max() != NUM_CLASSES - 1:
        raise DataError(f"{source}: the {name} split has {len(found)} classes ({found.tolist()}); "
                        f"CIFAR-10 needs exactly {NUM_CLASSES} (labels 0..9).")


def load_dataset(data_config) -> Dataset:
    """Loads `data_config.source` and splits off the stratified validation set."""
    kind, path = parse_source(data_config.source)
    if kind == "tfds":
        train, test = load_tfds(data_config.get("tfds_data_dir"))
    elif kind == "cifar_dir":
        train, test = load_cifar_dir(path)
    elif kind == "folder":
        train, test = load_folder(path)
    else:
        train, test = make_synthetic(data_config.synthetic_train_size,
                                     data_config.synthetic_test_size)
    _check_split(train, "train", data_config.source)
    _check_split(test, "test", data_config.source)

    val_size = data_config.val_size
    if not 0 <= val_size < len(train):
        raise DataError(f"config.data.val_size={val_size} must be >= 0 and smaller than the "
                        f"{len(train)} training images of {data_config.source!r}.")
    val = None
    if val_size:
        val_idx = stratified_val_indices(train.labels, val_size, data_config.split_seed)
        keep = np.ones(len(train), bool)
        keep[val_idx] = False
        val = Split(train.images[val_idx], train.labels[val_idx])
        train = Split(train.images[keep], train.labels[keep])
    return Dataset(train=train, val=val, test=test, source=data_config.source)
