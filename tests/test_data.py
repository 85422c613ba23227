"""Datasets load from tiny files written in the real on-disk formats (both loaders); missing, incomplete
or corrupt ones give a clear one-line error; the device loader augments exactly as torchvision does."""
import pickle

import numpy as np
import pytest
import torch
import torchvision

from wgsef.data import PAD, VISION, DatasetNotFound, DeviceLoader, build_loaders


def write_idx(path, array: np.ndarray):
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_fashion(root, n_train=40, n_test=20, folder="FashionMNIST"):
    """Random images in torchvision's MNIST-family layout (folder="MNIST" for MNIST)."""
    raw = root / folder / "raw"
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


def whole(loader):
    """(all images, all labels) of a loader's batches, in order."""
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture
def no_checksum(monkeypatch):
    # the fixture files are in the real format but are not the real files: skip the md5 check only
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("name,shape,n_train", [("fashion_mnist", (1, 28, 28), 40), ("cifar10", (3, 32, 32), 100),
                                                 ("cifar100", (3, 32, 32), 20)])
def test_torchvision_formats(tmp_path, no_checksum, name, shape, n_train, loader):
    make_fashion(tmp_path) if name == "fashion_mnist" else make_cifar(tmp_path, name)
    loaders = build_loaders(name, root=tmp_path, batch_size=8, val_fraction=0.25, download=False, loader=loader,
                            generator=torch.Generator().manual_seed(0))
    assert (loaders.spec.in_channels, loaders.spec.image_size, loaders.spec.image_size) == shape
    n_val = round(n_train * 0.25)
    batches = list(loaders.train)
    assert len(batches) == len(loaders.train) and sum(len(y) for _, y in batches) == n_train - n_val
    assert sum(len(y) for _, y in loaders.val) == n_val
    x, y = batches[0]
    assert x.shape == (8, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = next(iter(loaders.test))
    # normalised: uniform random pixels in [0, 1] map to roughly zero mean, well inside (-3, 3)
    assert xt.abs().max() < 3.5 and abs(float(xt.mean())) < 1.0
    if loader == "dataloader":  # train and validation are disjoint subsets of the training file
        assert not set(loaders.train.dataset.indices) & set(loaders.val.dataset.indices)


def test_loaders_agree_on_evaluation_data(tmp_path, no_checksum):
    """Validation and test batches (no augmentation) are the same through both loaders."""
    make_cifar(tmp_path, "cifar10")
    a, b = (build_loaders("cifar10", root=tmp_path, batch_size=8, val_fraction=0.25, download=False, loader=loader)
            for loader in ("device", "dataloader"))
    for split in ("val", "test"):
        (xa, ya), (xb, yb) = (whole(getattr(d, split)) for d in (a, b))
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5)


def reference_augment(image_u8, top, left, flip, mean, std):
    """torchvision's functional ops on one uint8 image: pad with zeros, crop, flip, scale, normalise."""
    from torchvision.transforms import functional as TF

    size = image_u8.shape[-1]
    x = TF.crop(TF.pad(image_u8, [PAD]), top, left, size, size)
    x = TF.hflip(x) if flip else x
    return TF.normalize(x.float() / 255, mean, std)


def test_device_augmentation_matches_torchvision_functional():
    v = VISION["cifar10"]
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.arange(300), 64, mean=v.mean, std=v.std, pad=PAD, flip=True, shuffle=True,
                          generator=g)
    order, offsets, flips = loader._order()
    assert sorted(order.tolist()) == list(range(300))
    assert set(offsets.flatten().tolist()) == set(range(2 * PAD + 1)) and 0 < int(flips.sum()) < 300
    x = loader._batch(order, offsets, flips)
    for i in range(300):
        ref = reference_augment(images[order[i]], *offsets[i].tolist(), bool(flips[i]), v.mean, v.std)
        torch.testing.assert_close(x[i], ref, atol=1e-5, rtol=1e-5)


def test_device_loader_is_driven_by_the_generator():
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    make = lambda g: DeviceLoader(images, torch.arange(50), 16, mean=(0.5,) * 3, std=(0.2,) * 3, pad=2, flip=True,
                                  shuffle=True, generator=g)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    first, second = list(make(g)), list(make(g))  # two epochs: different orders and augmentations
    g.set_state(state)
    again = list(make(g))  # a resumed run: the same epoch again
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][1], second[0][1])


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3)])
def test_device_loader_ddp_shards(n, world):
    """Every rank draws the same order from its own same-seeded generator and takes every world-th index:
    disjoint up to DistributedSampler's wrap-around padding, equal lengths, together the whole set."""
    labels = torch.arange(n)
    shards = [torch.cat([y for _, y in DeviceLoader(torch.zeros(n, 1, 2, 2), labels, 4, shuffle=True,
                                                    generator=torch.Generator().manual_seed(5), shard=(r, world))])
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    together = torch.cat(shards)
    assert set(together.tolist()) == set(range(n)) and len(together) - len(set(together.tolist())) == len(together) - n


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_dataset_message(tmp_path, name, folder):
    with pytest.raises(DatasetNotFound) as err:
        build_loaders(name, root=tmp_path, download=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / folder) in msg and "dataset.root" in msg


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_digits_split_and_normalisation(loader):
    loaders = build_loaders("digits", batch_size=32, image_size=16, loader=loader)
    data = lambda split: whole(getattr(loaders, split))
    sizes = [len(data(split)[1]) for split in ("train", "val", "test")]
    assert sum(sizes) == 1797 and sizes == [1077, 360, 360]
    x = data("train")[0]
    assert x.shape[1:] == (1, 16, 16)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3
    labels = data("test")[1]
    assert torch.bincount(labels).min() >= 34  # stratified: every class present in proportion
    # fixed split: a second call yields the same test set
    again = build_loaders("digits", batch_size=32, image_size=16, loader=loader)
    assert torch.equal(whole(again.test)[0], data("test")[0])


@pytest.mark.parametrize("loader", ["device", "dataloader"])
@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_limit_keeps_the_first_examples(tmp_path, no_checksum, loader, name):
    if name == "cifar10":
        make_cifar(tmp_path, name)
    loaders = build_loaders(name, root=tmp_path, batch_size=4, download=False, loader=loader, limit=7)
    assert [len(whole(getattr(loaders, split))[1]) for split in ("train", "val", "test")] == [7, 7, 7]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        build_loaders("svhn")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_loaders("digits", batch_size=0)
    with pytest.raises(ValueError, match="dataset.loader must be one of device, dataloader"):
        build_loaders("digits", loader="gpu")


def _files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100"])
@pytest.mark.parametrize("checksum", ["real", "skipped"])
def test_corrupt_files_named(tmp_path, monkeypatch, name, checksum):
    """Random bytes under the right names: one line naming a file and what to put there; nothing downloaded
    or overwritten (download=true)."""
    make_fashion(tmp_path) if name == "fashion_mnist" else make_cifar(tmp_path, name)
    v = VISION[name]
    bad = tmp_path / v.folder / {"fashion_mnist": "t10k-labels-idx1-ubyte", "cifar10": "data_batch_1", "cifar100": "train"}[name]
    bad.write_bytes(np.random.default_rng(0).bytes(500))
    if checksum == "skipped":
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    before = _files(tmp_path)
    with pytest.raises(DatasetNotFound) as err:
        build_loaders(name, root=tmp_path, download=True)
    msg = str(err.value)
    assert "\n" not in msg and "not found" not in msg and "dataset.root" in msg
    assert f"{bad} is not a valid {name} file" in msg
    assert _files(tmp_path) == before


def test_fashion_mnist_from_gz_files(tmp_path):
    """The .gz files as downloaded, put there by hand: decompressed beside them, read, nothing else touched."""
    import gzip

    make_fashion(tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    for f in list(raw.iterdir()):
        (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    loaders = build_loaders("fashion_mnist", root=tmp_path, batch_size=8, download=False)
    assert sum(len(y) for _, y in loaders.train) == 36
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetNotFound, match="t10k-labels-idx1-ubyte.gz is not a valid fashion_mnist file: it cannot"):
        build_loaders("fashion_mnist", root=tmp_path, download=True)
    assert sorted(p.name for p in raw.iterdir() if not p.name.endswith(".gz")) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"])


def test_incomplete_folder_named(tmp_path):
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetNotFound, match="incomplete: test_batch missing"):
        build_loaders("cifar10", root=tmp_path, download=True)


def test_root_is_a_file(tmp_path):
    root = tmp_path / "notes.txt"
    root.write_text("mine")
    with pytest.raises(DatasetNotFound, match=f"dataset.root={root} is a file, not a folder"):
        build_loaders("cifar10", root=root, download=True)
    assert root.read_text() == "mine"


@pytest.mark.parametrize("case", ["root_is_file", "corrupt_cifar", "random_fashion"])
def test_dataset_errors_on_the_command_line(tmp_path, monkeypatch, capsys, case):
    """Through `experiments.train`: one line naming what is wrong with which file, exit 2, no run directory."""
    import sys

    from experiments.train import cli

    if case == "root_is_file":
        root, name = tmp_path / "notes.txt", "cifar10"
        root.write_text("mine")
        expected = f"dataset.root={root} is a file"
    elif case == "corrupt_cifar":
        root, name = tmp_path / "data", "cifar10"
        make_cifar(root, name)
        (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
        expected = f"{root / 'cifar-10-batches-py'}/"  # a file in the folder, named
    else:
        root, name = tmp_path / "data", "fashion_mnist"
        make_fashion(root)
        for f in (root / "FashionMNIST" / "raw").iterdir():
            f.write_bytes(np.random.default_rng(1).bytes(1000))
        expected = f"{root / 'FashionMNIST' / 'raw'}/train-images-idx3-ubyte is not a valid fashion_mnist file"
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train", f"dataset={name}", f"dataset.root={root}", "trainer.progress=false",
                                      f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as exit_:
        cli()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "not found" not in lines[0] and "URLError" not in lines[0]
    assert not run_dir.exists()
