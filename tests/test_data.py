"""Datasets load from tiny files written in the real on-disk formats; missing ones give a clear error."""
import pickle

import numpy as np
import pytest
import torch
import torchvision

from wgsef.data import DatasetNotFound, build_loaders


def write_idx(path, array: np.ndarray):
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion(root, n_train=40, n_test=20):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))


def make_cifar(root, name, n=20):
    folder, key, meta, meta_key, files = {
        "cifar10": ("cifar-10-batches-py", "labels", "batches.meta", "label_names",
                    [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
        "cifar100": ("cifar-100-python", "fine_labels", "meta", "fine_label_names", ["train", "test"]),
    }[name]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    for f in files:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        (d / f).write_bytes(pickle.dumps(batch))
    (d / meta).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


@pytest.fixture
def no_checksum(monkeypatch):
    # the fixture files are in the real format but are not the real files: skip the md5 check only
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name,shape,n_train", [("fashion_mnist", (1, 28, 28), 40), ("cifar10", (3, 32, 32), 100),
                                                 ("cifar100", (3, 32, 32), 20)])
def test_torchvision_formats(tmp_path, no_checksum, name, shape, n_train):
    make_fashion(tmp_path) if name == "fashion_mnist" else make_cifar(tmp_path, name)
    loaders = build_loaders(name, root=tmp_path, batch_size=8, val_fraction=0.25, download=False)
    assert (loaders.spec.in_channels, loaders.spec.image_size, loaders.spec.image_size) == shape
    n_val = round(n_train * 0.25)
    assert len(loaders.train.dataset) == n_train - n_val and len(loaders.val.dataset) == n_val
    x, y = next(iter(loaders.train))
    assert x.shape == (8, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = next(iter(loaders.test))
    # normalised: uniform random pixels in [0, 1] map to roughly zero mean, well inside (-3, 3)
    assert xt.abs().max() < 3.5 and abs(float(xt.mean())) < 1.0
    # train and validation are disjoint subsets of the training file
    assert not set(loaders.train.dataset.indices) & set(loaders.val.dataset.indices)


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_dataset_message(tmp_path, name, folder):
    with pytest.raises(DatasetNotFound) as err:
        build_loaders(name, root=tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / folder) in msg and "dataset.root" in msg


def test_digits_split_and_normalisation():
    loaders = build_loaders("digits", batch_size=32, image_size=16)
    sizes = [len(d.dataset) for d in (loaders.train, loaders.val, loaders.test)]
    assert sum(sizes) == 1797 and sizes == [1077, 360, 360]
    x = loaders.train.dataset.tensors[0]
    assert x.shape[1:] == (1, 16, 16)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    labels = loaders.test.dataset.tensors[1]
    assert torch.bincount(labels).min() >= 34  # stratified: every class present in proportion
    # fixed split: a second call yields the same test set
    again = build_loaders("digits", batch_size=32, image_size=16)
    assert torch.equal(again.test.dataset.tensors[0], loaders.test.dataset.tensors[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_loaders("mnist")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_loaders("digits", batch_size=0)
