import dataclasses
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from cifar_jax import datasets, input_pipeline as ip
from cifar_jax.input_pipeline import DataError


def _data_config(source, val_size=20, split_seed=0):
    from configs import default

    c = default.get_config().data
    c.source = source
    c.val_size = val_size
    c.split_seed = split_seed
    c.synthetic_train_size = 200
    c.synthetic_test_size = 50
    return c


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def cifar_pickle_dir(tmp_path):
    """A tiny cifar-10-batches-py folder: 5 train batches of 20 and a test batch of 20."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    expected = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = _images(20, i)
        labels = [j % 10 for j in range(20)]
        data = images.transpose(0, 3, 1, 2).reshape(20, -1)  # CIFAR's row-major CHW rows
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        expected[name] = (images, np.array(labels))
    return str(d), expected


def _write_tree(root, per_class=(4, 2), classes=datasets.CIFAR10.classes, fmt="PNG"):
    written = {}
    for split, n in zip(("train", "test"), per_class):
        for ci, cls in enumerate(classes):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for k in range(n):
                img = _images(1, hash((split, ci, k)) % 2**32)[0]
                path = os.path.join(root, split, cls, f"{k:04d}.{fmt.lower()}")
                Image.fromarray(img).save(path, format=fmt)
                written[(split, cls, k)] = img
    return written


def test_cifar_dir_reads_pickles_exactly(cifar_pickle_dir):
    path, expected = cifar_pickle_dir
    train, test = ip.load_cifar_dir(path)
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images[:20], expected["data_batch_1"][0])
    np.testing.assert_array_equal(test.images, expected["test_batch"][0])
    np.testing.assert_array_equal(test.labels, expected["test_batch"][1])


def test_cifar_dir_full_dataset_split(cifar_pickle_dir):
    path, _ = cifar_pickle_dir
    ds = ip.load_dataset(_data_config(f"cifar_dir:{path}", val_size=20))
    assert len(ds.train) == 80 and len(ds.val) == 20 and len(ds.test) == 20
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [2] * 10


def test_folder_directory_and_archive_agree(tmp_path):
    tree = tmp_path / "tree"
    written = _write_tree(str(tree))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10")  # one wrapping top-level folder is accepted
    from_dir = ip.load_folder(str(tree))
    from_tar = ip.load_folder(str(archive))
    for a, b in zip(from_dir, from_tar):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    train, test = from_dir
    assert len(train) == 40 and len(test) == 20
    # Class index = position of the sorted folder name; PNG is lossless.
    idx = datasets.CIFAR10.classes.index("cat")
    np.testing.assert_array_equal(train.images[train.labels == idx][1], written[("train", "cat", 1)])


def test_folder_jpeg(tmp_path):
    _write_tree(str(tmp_path), per_class=(1, 1), fmt="JPEG")
    train, test = ip.load_folder(str(tmp_path))
    assert train.images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(train.labels, np.arange(10))


def test_missing_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ip.load_dataset(_data_config(f"folder:{tmp_path}/nope"))
    with pytest.raises(DataError, match="does not exist"):
        ip.load_dataset(_data_config(f"cifar_dir:{tmp_path}/nope"))


def test_wrong_layout_says_what_was_found(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(_images(1, 0)[0]).save(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match=r"wrong layout.*images.*Expected train/<class>"):
        ip.load_folder(str(tmp_path))
    with pytest.raises(DataError, match="lacks data_batch_1"):
        ip.load_cifar_dir(str(tmp_path))


def test_wrong_number_of_classes(tmp_path):
    _write_tree(str(tmp_path), per_class=(1, 1), classes=datasets.CIFAR10.classes[:9])
    with pytest.raises(DataError, match="10 class folders.*found 9"):
        ip.load_folder(str(tmp_path))


@pytest.mark.parametrize("archive", [False, True])
def test_empty_class_folder_is_named_as_empty(tmp_path, archive):
    """A class folder that exists but holds no images is named as such (not 'found 9')."""
    root = tmp_path / "data"
    _write_tree(str(root), per_class=(1, 1))
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    (root / "train" / "cat" / "notes.txt").write_text("no images here")
    source = str(root)
    if archive:
        source = str(tmp_path / "data.tar")
        with tarfile.open(source, "w") as tar:
            tar.add(root, arcname="data")
    with pytest.raises(DataError, match=r"the class folder train/cat holds no images \(PNG/JPG/"):
        ip.load_folder(source)
    if not archive:  # beside ten classes with images, a folder without any is passed over
        _write_tree(str(root), per_class=(1, 1))
        (root / "train" / "_meta").mkdir()
        (root / "train" / "_meta" / "labels.csv").write_text("x")
        assert len(ip.load_folder(source)[0]) == 10


def test_unreadable_image_is_named(tmp_path):
    _write_tree(str(tmp_path), per_class=(1, 1))
    bad = tmp_path / "train" / "dog" / "0000.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"train/dog/0000.png"):
        ip.load_folder(str(tmp_path))


def test_invalid_source_string():
    with pytest.raises(DataError, match="cifar_dir:PATH"):
        ip.parse_source("imagenet")


# The binary archives as the CIFAR site serves them: rows of label bytes (CIFAR-100: coarse,
# then fine) and 3072 channel-major pixel bytes.
_BINARY = {"cifar10": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)],
                       "test_batch.bin", {"batches.meta.txt": datasets.CIFAR10.classes}),
           "cifar100": ("cifar-100-binary", ["train.bin"], "test.bin",
                        {"fine_label_names.txt": datasets.CIFAR100.classes,
                         "coarse_label_names.txt": [f"super{i}" for i in range(20)]})}


def _write_cifar_binary(root, name, per_file=100):
    """`name`'s binary folder holding `per_file` images per file; returns the first one."""
    folder, train_files, test_file, label_files = _BINARY[name]
    d = os.path.join(root, folder)
    os.makedirs(d)
    rng = np.random.default_rng(0)
    k = datasets.get(name).num_classes
    first = None
    for file in train_files + [test_file]:
        n = per_file // len(train_files) if file != test_file else per_file // 5
        fine = (np.arange(n) % k).astype(np.uint8)[:, None]
        labels = fine if name == "cifar10" else np.concatenate([fine // 5, fine], 1)
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        np.concatenate([labels, pixels], 1).tofile(os.path.join(d, file))
        first = pixels[0] if first is None else first
    for file, names in label_files.items():
        with open(os.path.join(d, file), "w") as f:
            f.write("\n".join(names) + "\n")
    return first.reshape(3, 32, 32).transpose(1, 2, 0)


@pytest.mark.parametrize("name,per_file", [("cifar10", 100), ("cifar100", 200)])
def test_tfds_builder_downloads_and_prepares_offline(tmp_path, monkeypatch, name, per_file):
    """The real tfds builder ('cifar10', 'cifar100'), with only its download step replaced by
    a local archive: a missing dependency or a changed tfds API fails here, not for users."""
    import tensorflow_datasets as tfds

    info = datasets.get(name)
    first_image = _write_cifar_binary(str(tmp_path / "download"), name, per_file)
    urls = []

    def download_and_extract(self, url):
        urls.append(url)
        return str(tmp_path / "download")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                        download_and_extract)
    monkeypatch.setattr(ip, "download_reachable", lambda *a, **k: True)
    train, test = ip.load_tfds(str(tmp_path / "tfds"), info)
    assert urls == [f"https://www.cs.toronto.edu/~kriz/{name.replace('cifar', 'cifar-')}"
                    "-binary.tar.gz"]
    assert len(train) == per_file and len(test) == per_file // 5
    # The fine labels, all of them, each as often.
    assert np.bincount(train.labels).tolist() == [per_file // info.num_classes] * info.num_classes
    assert any(np.array_equal(img, first_image) for img in train.images)
    # Prepared once: a second load neither downloads nor probes the network.
    monkeypatch.setattr(ip, "download_reachable", lambda *a, **k: 1 / 0)
    assert len(ip.load_tfds(str(tmp_path / "tfds"), info)[0]) == per_file and len(urls) == 1


def test_tfds_offline_fails_fast_and_shows_alternatives(tmp_path, monkeypatch):
    import time

    unreachable = dataclasses.replace(datasets.CIFAR10, download_host="cifar10.invalid")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"(?s)cannot be reached.*cifar_dir:.*folder:"):
        ip.load_tfds(str(tmp_path), unreachable)
    assert time.perf_counter() - t0 < 20


def test_tfds_missing_module_is_named(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'importlib_resources'",
                                  name="importlib_resources")

    monkeypatch.setattr(tfds, "builder", missing)
    with pytest.raises(DataError, match="module 'importlib_resources'.*pip install "
                                        "importlib_resources"):
        ip.load_tfds(str(tmp_path))


def test_tfds_source_with_mock_data(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(ip, "download_reachable", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=200):
        ds = ip.load_dataset(_data_config("tfds", val_size=10))
    assert ds.train.images.dtype == np.uint8 and ds.train.images.shape[1:] == (32, 32, 3)
    assert len(ds.train) + len(ds.val) == 200 and len(ds.val) == 10


def test_synthetic_is_deterministic_and_any_size():
    a = ip.load_dataset(_data_config("synthetic"))
    b = ip.load_dataset(_data_config("synthetic"))
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert len(a.train) == 180 and len(a.val) == 20 and len(a.test) == 50


def test_val_split_is_stratified_fixed_and_disjoint():
    labels = np.repeat(np.arange(10), 50)  # class by class, like a folder listing
    idx = ip.stratified_val_indices(labels, 100, split_seed=0)
    assert np.bincount(labels[idx]).tolist() == [10] * 10
    np.testing.assert_array_equal(idx, ip.stratified_val_indices(labels, 100, split_seed=0))
    assert not np.array_equal(idx, ip.stratified_val_indices(labels, 100, split_seed=1))
    # Not "the last N in file order".
    assert idx.min() < 50


def test_val_size_zero_and_too_large():
    ds = ip.load_dataset(_data_config("synthetic", val_size=0))
    assert ds.val is None and len(ds.train) == 200
    with pytest.raises(DataError, match="val_size=200"):
        ip.load_dataset(_data_config("synthetic", val_size=200))


# ----------------------------------------------------------------------------------------------
# Exactly what is on disk, or a clear refusal.


def test_cifar_dir_refuses_malformed_batches(cifar_pickle_dir):
    path, _ = cifar_pickle_dir
    cases = {
        "row length": {b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20},
        "label count": {b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 19},
        "label range": {b"data": np.zeros((20, 3072), np.uint8), b"labels": [10] * 20},
        "dtype": {b"data": np.zeros((20, 3072), np.float32), b"labels": [0] * 20},
    }
    messages = {"row length": r"shape \(20, 3000\), expected \(N, 3072\)",
                "label count": r"labels of shape \(19,\) for 20 images", "label range": "labels outside 0..9",
                "dtype": "dtype float32, expected uint8"}
    for case, batch in cases.items():
        with open(os.path.join(path, "data_batch_3"), "wb") as f:
            pickle.dump(batch, f)
        with pytest.raises(DataError, match=f"data_batch_3.*{messages[case]}"):
            ip.load_cifar_dir(path)


def test_cifar_dir_reads_labels_pickled_as_numpy_integers(cifar_pickle_dir):
    """`pickle.dump(list(np.arange(n)))` writes numpy integer scalars: read exactly; a numpy
    scalar of another kind is still refused."""
    path, expected = cifar_pickle_dir
    images, labels = expected["data_batch_2"]
    data = images.transpose(0, 3, 1, 2).reshape(20, -1)
    with open(os.path.join(path, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": data, b"labels": list(labels.astype(np.int64))}, f)
    train, _ = ip.load_cifar_dir(path)
    np.testing.assert_array_equal(train.labels[20:40], labels)
    with open(os.path.join(path, "data_batch_2"), "wb") as f:
        pickle.dump({b"data": data, b"labels": [np.float64(1.0)] * 20}, f)
    with pytest.raises(DataError, match="data_batch_2.*numpy scalar of dtype float64"):
        ip.load_cifar_dir(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_dir_unpickler_runs_no_code(cifar_pickle_dir):
    path, _ = cifar_pickle_dir
    with open(os.path.join(path, "test_batch"), "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match=r"test_batch.*refusing to load (posix|os)\.system"):
        ip.load_cifar_dir(path)


def test_cifar100_pickle_folder_fine_labels_and_refusals(tmp_path):
    """cifar-100-python (train, test; fine and coarse labels) through the same checks: the fine
    labels are read, a CIFAR-10 folder is refused by what it lacks, a label out of range by
    file; 100 folder: classes need config.data.dataset=cifar100, and say so."""
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for i, name in enumerate(["train", "test"]):
        images, fine = _images(200, i), np.arange(200) % 100
        with open(d / name, "wb") as f:
            pickle.dump({b"data": images.transpose(0, 3, 1, 2).reshape(200, -1),
                         b"fine_labels": list(fine), b"coarse_labels": list(fine // 5),
                         b"filenames": [b"x.png"] * 200, b"batch_label": name.encode()}, f)
    train, test = ip.load_cifar_dir(str(d), datasets.CIFAR100)
    np.testing.assert_array_equal(train.labels, np.arange(200) % 100)
    np.testing.assert_array_equal(test.images, _images(200, 1))
    config = _data_config(f"cifar_dir:{d}", val_size=100)
    config.dataset = "cifar100"
    data = ip.load_dataset(config)
    assert data.info.num_classes == 100 and data.classes[:2] == ("apple", "aquarium_fish")
    assert sorted(np.bincount(data.val.labels).tolist()) == [1] * 100
    with pytest.raises(DataError, match="lacks data_batch_1.*'cifar-10-batches-py'"):
        ip.load_cifar_dir(str(d))  # CIFAR-10 expected
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, f)
    with pytest.raises(DataError, match=r"'.*test' is malformed: labels outside 0\.\.99"):
        ip.load_cifar_dir(str(d), datasets.CIFAR100)
    _write_tree(str(tmp_path / "tree"), per_class=(1, 1), classes=datasets.CIFAR100.classes)
    with pytest.raises(DataError, match="same 10 class folders.*found 100.*dataset=cifar100"):
        ip.load_folder(str(tmp_path / "tree"))
    assert len(ip.load_folder(str(tmp_path / "tree"), datasets.CIFAR100)[0]) == 100


def test_image_modes_are_decoded_faithfully_or_refused(tmp_path):
    _write_tree(str(tmp_path), per_class=(1, 1))
    target = tmp_path / "train" / "cat" / "0000.png"
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    Image.fromarray(grey, mode="L").save(target)
    train, _ = ip.load_folder(str(tmp_path))
    cat = train.images[train.labels == datasets.CIFAR10.classes.index("cat")][0]
    np.testing.assert_array_equal(cat, np.repeat(grey[..., None], 3, -1))  # grey -> RGB exactly
    opaque = np.dstack([_images(1, 1)[0], np.full((32, 32), 255, np.uint8)])
    Image.fromarray(opaque, mode="RGBA").save(target)
    train, _ = ip.load_folder(str(tmp_path))
    assert train.images.shape == (10, 32, 32, 3)  # an opaque alpha channel loses nothing
    refused = {"I;16": Image.fromarray(np.full((32, 32), 40000, np.uint16)),
               "RGBA": Image.fromarray(np.dstack([_images(1, 1)[0],
                                                  np.full((32, 32), 7, np.uint8)]), mode="RGBA"),
               "CMYK": Image.new("CMYK", (32, 32))}
    for mode, image in refused.items():
        path = target.with_suffix(".tiff" if mode == "CMYK" else ".png")
        for old in target.parent.iterdir():
            old.unlink()
        image.save(path)
        if path.suffix == ".tiff":  # not an image suffix the loader reads: use .png names
            path.rename(target)
        with pytest.raises(DataError, match=r"train/cat/0000\.png"):
            ip.load_folder(str(tmp_path))


def test_truncated_archive_is_refused_by_name(tmp_path):
    _write_tree(str(tmp_path / "tree"), per_class=(2, 1))
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="cifar10")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cifar\.tar\.gz.*(truncated|readable)"):
        ip.load_folder(str(archive))


def test_wrapping_folder_beside_macos_junk_and_linked_class_folders(tmp_path):
    root = tmp_path / "download"
    tree = root / "cifar10"
    _write_tree(str(tree), per_class=(1, 1))
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._cifar10").write_bytes(b"x")
    (root / ".DS_Store").write_bytes(b"x")
    moved = tmp_path / "elsewhere_cat"
    os.rename(tree / "train" / "cat", moved)
    os.symlink(moved, tree / "train" / "cat")
    train, test = ip.load_folder(str(root))
    assert len(train) == 10 and len(test) == 10
