"""Data acquisition: every source becomes uint8 NHWC arrays, split into train/val/test.

The data set (`config.data.dataset`: CIFAR-10 or CIFAR-100, see `datasets.py`) says what to
expect; the source (`config.data.source`) where to read it:
  tfds             tensorflow-datasets 'cifar10' / 'cifar100' (downloads on first use where a
                   network exists)
  cifar_dir:PATH   the python-pickle folder its authors distribute ('cifar-10-batches-py' /
                   'cifar-100-python', as torchvision downloads it; CIFAR-100: fine labels)
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
import socket
import tarfile
import threading
import zlib
from typing import Dict, List, Optional, Tuple

import numpy as np
from absl import logging

from cifar_jax import datasets
from cifar_jax.datasets import DatasetInfo

IMAGE_SHAPE = (32, 32, 3)
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
    info: DatasetInfo = datasets.CIFAR10  # which data set it is
    classes: Tuple[str, ...] = datasets.CIFAR10.classes  # class names, by label (a folder's own)

    @property
    def largest_eval(self) -> int:
        """The size of the largest evaluation split (validation or test)."""
        return max(len(self.test), len(self.val) if self.val else 0)


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


class _CifarUnpickler(pickle.Unpickler):
    """Unpickling runs code named by the file; this admits only what CIFAR batches hold
    (dicts, lists, bytes, numbers, numpy arrays and numpy integer scalars, as
    `pickle.dump(list(labels))` writes labels)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}
    SCALARS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.SCALARS:
            return _integer_scalar
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch "
                                         "holds only arrays, lists, bytes and integers")
        return super().find_class(module, name)


def _integer_scalar(dtype, data):
    """numpy's scalar reconstructor, for integer scalars only (as safe as Python ints)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype}: a CIFAR "
                                     "batch holds only integer scalars")
    return np.frombuffer(data, dtype, count=1)[0]


def _read_cifar_batch(file: str, info: DatasetInfo) -> Split:
    """One pickled batch of `info`'s data set, checked field by field."""
    key = info.pickle_labels
    try:
        with open(file, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle errors come in many types
        raise DataError(f"cifar_dir: cannot read {file!r} as a {info.title} batch: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or key not in batch:
        raise DataError(f"cifar_dir: {file!r} is not a {info.title} batch (expected a dict with "
                        f"b'data' and {key!r}).")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[key])
    if data.size == 0:
        raise DataError(f"cifar_dir: {file!r} holds no images.")
    problems = []
    if data.dtype != np.uint8:
        problems.append(f"data has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != 3072:
        problems.append(f"data has shape {data.shape}, expected (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        problems.append(f"labels of shape {labels.shape} for {len(data)} images (expected "
                        f"({len(data)},))")
    elif (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0
          or labels.max() >= info.num_classes):
        problems.append(f"labels outside 0..{info.num_classes - 1} (dtype {labels.dtype}, "
                        f"range {labels.min()}..{labels.max()})")
    if problems:
        raise DataError(f"cifar_dir: {file!r} is malformed: {'; '.join(problems)}.")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32))


def load_cifar_dir(path: str, info: DatasetInfo = datasets.CIFAR10) -> Tuple[Split, Split]:
    """Reads `info`'s python-pickle folder (CIFAR-10: data_batch_1..5 and test_batch;
    CIFAR-100: train and test)."""
    expected = list(info.pickle_train) + [info.pickle_test]
    layout = f"the {info.pickle_folder!r} folder with {', '.join(expected)}"
    if not os.path.isdir(path):
        raise DataError(f"cifar_dir: {path!r} does not exist or is not a directory. Expected "
                        f"{layout} ({info.title}; config.data.dataset={info.name!r}).")
    missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
    if missing:
        found = sorted(os.listdir(path))[:10]
        raise DataError(
            f"cifar_dir: {path!r} lacks {', '.join(missing)}. Found: {found or 'nothing'}. "
            f"Expected {layout} ({info.title}; config.data.dataset={info.name!r}).")

    def read(names):
        parts = [_read_cifar_batch(os.path.join(path, n), info) for n in names]
        return Split(np.concatenate([p.images for p in parts]),
                     np.concatenate([p.labels for p in parts]))

    return read(expected[:-1]), read(expected[-1:])


def is_junk(name: str) -> bool:
    """Entries that archivers and file browsers add beside the data (__MACOSX, .DS_Store)."""
    return name.startswith(".") or name == "__MACOSX"


class _TreeReader:
    """Lists and reads files of an image tree in a directory or a tar archive."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise DataError(f"folder: {path!r} does not exist. Expected a directory or a .tar / "
                            ".tar.gz archive holding train/<class>/* and test/<class>/*.")
        self.path = path
        self._tar = None
        if os.path.isdir(path):
            self.files, self.dirs = [], []
            for root, dirs, names in os.walk(path, followlinks=True):  # class folders may be links
                rel = os.path.relpath(root, path)
                self.files += [os.path.normpath(os.path.join(rel, n)) for n in names]
                self.dirs += [os.path.normpath(os.path.join(rel, d)) for d in dirs]
        else:
            self._open_tar(path)
        keep = lambda f: not any(is_junk(p) for p in f.split(os.sep))  # noqa: E731
        self.files = [f for f in self.files if keep(f)]
        self.dirs = [d for d in self.dirs if keep(d)]
        # Tolerate one wrapping top-level folder (e.g. cifar10/train/...).
        self.prefix = ""
        tops = {f.split(os.sep)[0] for f in self.files}
        if "train" not in tops and len(tops) == 1:
            self.prefix = tops.pop() + os.sep

    def _open_tar(self, path: str) -> None:
        try:
            self._tar = tarfile.open(path, "r:*")
            members = self._tar.getmembers()
            self._members = {os.path.normpath(m.name): m for m in members if m.isfile()}
            self.dirs = [os.path.normpath(m.name) for m in members if m.isdir()]
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"folder: {path!r} is neither a directory nor a readable tar "
                            f"archive ({type(e).__name__}: {e}). If it is a truncated download, "
                            "fetch it again.") from e
        self.files = list(self._members)

    def tree(self) -> Dict[str, Dict[str, List[str]]]:
        """{split: {class: [relative file names, sorted]}} for image files under the prefix;
        a class folder without images has an empty list."""
        out: Dict[str, Dict[str, List[str]]] = {}
        for d in self.dirs + [os.path.dirname(f) for f in self.files]:
            parts = d[len(self.prefix):].split(os.sep) if d.startswith(self.prefix) else []
            if len(parts) == 2:
                out.setdefault(parts[0], {}).setdefault(parts[1], [])
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
        try:
            if self._tar is not None:
                return self._tar.extractfile(self._members[name]).read()
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"folder: cannot read {name!r} from {self.path!r} "
                            f"({type(e).__name__}: {e}); the archive may be truncated.") from e

    def describe(self) -> str:
        tops = sorted({f.split(os.sep)[0] for f in self.files})
        return f"top-level entries {tops[:10]}" if tops else "no files"


# PIL modes that convert to 8-bit RGB without losing or inventing anything.
_FAITHFUL_MODES = {"RGB", "L", "P", "1"}


def _to_rgb8(image, name: str) -> np.ndarray:
    """The 8-bit RGB pixels an image file holds, or DataError when a conversion would change
    them (more than 8 bits per channel, transparency, CMYK, floating point)."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        mode = "PA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() == 255:  # fully opaque: dropping the alpha channel loses nothing
            return np.asarray(image.convert("RGB"), np.uint8)
        raise DataError(f"image {name!r} has transparent pixels (mode {image.mode}); "
                        "CIFAR-10 images are opaque 8-bit RGB. Flatten it first.")
    if mode not in _FAITHFUL_MODES:
        raise DataError(f"image {name!r} has mode {image.mode!r}, which does not "
                        "convert to 8-bit RGB faithfully (e.g. 16-bit, float or CMYK). Save it "
                        "as 8-bit RGB (or greyscale / palette) first.")
    return np.asarray(image.convert("RGB"), np.uint8)


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes -> the 8-bit RGB pixels it holds [H, W, 3]; DataError naming
    `name` when it is no image, or its pixels do not convert faithfully (see `_to_rgb8`)."""
    from PIL import Image, UnidentifiedImageError  # pillow: only image files need it

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _to_rgb8(im, name)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{name!r} is not an image file (PNG, JPEG, BMP, ...)") from None
    except Exception as e:
        raise DataError(f"cannot decode image {name!r}: {e}") from e


def load_folder(path: str, info: DatasetInfo = datasets.CIFAR10) -> Tuple[Split, Split]:
    """Reads train/<class>/* and test/<class>/* from a directory or tar archive."""
    return read_folder(path, info)[:2]


def read_folder(path: str, info: DatasetInfo = datasets.CIFAR10
                ) -> Tuple[Split, Split, Tuple[str, ...]]:
    """`load_folder`, and the class names (the sorted folder names, by label), which must be
    as many as `info`'s classes."""
    num_classes = info.num_classes
    reader = _TreeReader(path)
    tree = reader.tree()
    if "train" not in tree or "test" not in tree:
        raise DataError(
            f"folder: {path!r} has the wrong layout: found {reader.describe()}, image splits "
            f"{sorted(tree) or 'none'}. Expected train/<class>/*.png|jpg and "
            "test/<class>/*.png|jpg (optionally inside one top-level folder).")
    empty = [f"{split}/{c}" for split in ("train", "test") for c, names in
             sorted(tree[split].items()) if not names]
    full = {split: {c: names for c, names in tree[split].items() if names}
            for split in ("train", "test")}
    if empty and (len(full["train"]) != num_classes or sorted(full["test"]) != sorted(
            full["train"])):  # else folders without images beside the classes are passed over
        raise DataError(f"folder: {path!r}: the class folder{'s' if len(empty) > 1 else ''} "
                        f"{', '.join(empty)} hold{'' if len(empty) > 1 else 's'} no images "
                        f"({'/'.join(s.lstrip('.').upper() for s in _IMAGE_SUFFIXES)} files). "
                        "Every class needs images in train/ and in test/.")
    tree = full
    classes = sorted(tree["train"])
    if len(classes) != num_classes or sorted(tree["test"]) != classes:
        raise DataError(
            f"folder: {path!r} must have the same {num_classes} class folders in train/ and "
            f"test/ ({info.title}; config.data.dataset={info.name!r}); found {len(classes)} in "
            f"train ({classes[:12]}{' ...' if len(classes) > 12 else ''}) and "
            f"{len(tree['test'])} in test.{_other_dataset_hint(len(classes), info)}")

    def decode(name: str) -> np.ndarray:
        try:
            array = decode_image(reader.read(name), name)
        except DataError as e:
            raise DataError(f"folder: {e} (in {path!r})") from e
        if array.shape != IMAGE_SHAPE:
            raise DataError(f"folder: image {name!r} has shape {array.shape}; every "
                            f"image must be {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} RGB.")
        return array

    def read(split):
        names = [(label, n) for label, cls in enumerate(classes) for n in tree[split][cls]]
        return Split(np.stack([decode(n) for _, n in names]),
                     np.asarray([label for label, _ in names], np.int32))

    logging.info("Decoding %s images from %s (classes: %s)", info.title, path,
                 ", ".join(classes) if len(classes) <= 10 else f"{len(classes)} folders")
    return read("train"), read("test"), tuple(classes)


def _other_dataset_hint(found: int, info: DatasetInfo) -> str:
    """' If these are CIFAR-100 images, set --config.data.dataset=cifar100.' where `found`
    classes fit another data set."""
    fits = [d for d in datasets.DATASETS.values() if d.num_classes == found and d != info]
    return (f" If these are {fits[0].title} images, set --config.data.dataset={fits[0].name}."
            if fits else "")


def _offline_sources(info: DatasetInfo) -> str:
    return ("Offline, point the run at a copy you already have: "
            f"--config.data.source=cifar_dir:/path/to/{info.pickle_folder} or "
            f"--config.data.source=folder:/path/to/{info.name}_images(.tar.gz).")


def download_reachable(host: str = datasets.CIFAR10.download_host, timeout: float = 5.0) -> bool:
    """Whether `host` accepts a connection within `timeout` seconds (name lookup included)."""
    answer = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def load_tfds(data_dir: Optional[str], info: DatasetInfo = datasets.CIFAR10
              ) -> Tuple[Split, Split]:
    """tensorflow-datasets' builder of `info` ('cifar10', 'cifar100': fine labels), downloaded
    and prepared in `data_dir` on first use."""
    from cifar_jax import native

    native.hide_gpus_from_tensorflow()  # imports TensorFlow quietly, before tfds does
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            f"data source 'tfds' needs tensorflow-datasets, which does not import here "
            f"({e}). Install it (pip install -e . does), or use "
            "config.data.source='cifar_dir:...' or 'folder:...'.") from e
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            if not download_reachable(info.download_host):
                raise DataError(
                    f"{info.title} is not in the tensorflow-datasets directory "
                    f"({builder.data_dir}) and its download host {info.download_host} cannot be "
                    f"reached (no network?). {_offline_sources(info)}")
            logging.info("Downloading and preparing %s into %s ...", info.title, builder.data_dir)
            builder.download_and_prepare()
        splits = builder.as_dataset(split=["train", "test"], as_supervised=True)
    except DataError:
        raise
    except ModuleNotFoundError as e:
        raise DataError(f"tensorflow-datasets needs the Python module {e.name!r}, which is not "
                        f"installed: pip install {e.name} (pip install -e . installs it). "
                        f"{_offline_sources(info)}") from e
    except Exception as e:
        raise DataError(
            f"{info.title} could not be loaded or downloaded by tensorflow-datasets "
            f"(data_dir={data_dir!r}): {type(e).__name__}: {e}\n{_offline_sources(info)}") from e

    def to_split(ds):
        # Batched iteration rather than batch_size=-1, which aborts inside TF on some builds.
        images, labels = zip(*tfds.as_numpy(ds.batch(10_000)))
        return Split(np.concatenate(images).astype(np.uint8),
                     np.concatenate(labels).astype(np.int32))

    return to_split(splits[0]), to_split(splits[1])


def make_synthetic(num_train: int, num_test: int, seed: int = 1234,
                   num_classes: int = 10) -> Tuple[Split, Split]:
    """Noise images with a class-dependent colour tint and stripe pattern: learnable quickly."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-60, 60, size=(num_classes, 1, 1, 3))
    freqs = np.arange(num_classes) % 10 + 1  # beyond 10 classes, tint and angle tell them apart
    ys, xs = np.mgrid[0:32, 0:32]

    def make(n):
        labels = np.arange(n) % num_classes
        rng.shuffle(labels)
        angle = (labels[:, None, None] * np.pi / num_classes)
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


def _check_split(split: Split, name: str, source: str, info: DatasetInfo):
    if split.images.dtype != np.uint8 or split.images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{source}: {name} images are {split.images.dtype} "
                        f"{split.images.shape}; expected uint8 [N, 32, 32, 3].")
    found, k = np.unique(split.labels), info.num_classes
    if len(found) != k or found.min() != 0 or found.max() != k - 1:
        hint = (f" Give synthetic data at least {k} images per split "
                f"(config.data.synthetic_{name}_size)." if source == "synthetic" else "")
        raise DataError(f"{source}: the {name} split has {len(found)} classes "
                        f"({found.tolist()[:12]}{' ...' if len(found) > 12 else ''}); "
                        f"{info.title} needs exactly {k} (labels 0..{k - 1}).{hint}")


def load_dataset(data_config) -> Dataset:
    """Loads `data_config.source` as `data_config.dataset` and splits off the stratified
    validation set."""
    info = datasets.get(data_config.get("dataset", "cifar10"))  # .get: configs stored before it
    kind, path = parse_source(data_config.source)
    classes = info.classes
    if kind == "tfds":
        train, test = load_tfds(data_config.get("tfds_data_dir"), info)
    elif kind == "cifar_dir":
        train, test = load_cifar_dir(path, info)
    elif kind == "folder":
        train, test, classes = read_folder(path, info)
    else:
        train, test = make_synthetic(data_config.synthetic_train_size,
                                     data_config.synthetic_test_size,
                                     num_classes=info.num_classes)
    _check_split(train, "train", data_config.source, info)
    _check_split(test, "test", data_config.source, info)

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
    return Dataset(train=train, val=val, test=test, source=data_config.source, info=info,
                   classes=classes)
