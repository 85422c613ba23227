"""Datasets: Fashion-MNIST, CIFAR-10, CIFAR-100 through torchvision, and scikit-learn's digits offline.

Every dataset yields train / validation / test loaders. The validation split is carved from the training
set with a fixed `split_seed` (independent of the training seed) and uses the test-time transform, so model
selection never looks at the test set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset


class DatasetNotFound(RuntimeError):
    """A dataset is not on disk and could not be downloaded."""


@dataclass(frozen=True)
class DataSpec:
    num_classes: int
    in_channels: int
    image_size: int


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
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


VISION = {
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


def _transforms(v: _Vision, train: bool):
    from torchvision import transforms as T

    aug = [T.RandomCrop(v.spec.image_size, padding=4), T.RandomHorizontalFlip()] if train and v.augment else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(v.mean, v.std)])


def _torchvision(name: str, root: str | Path, download: bool) -> tuple[Dataset, Dataset, Dataset]:
    """(train with augmentation, train without, test) for a torchvision dataset."""
    import torchvision

    v = VISION[name]
    cls = getattr(torchvision.datasets, v.cls_name)

    def make(train: bool, augment: bool):
        try:
            return cls(str(root), train=train, transform=_transforms(v, augment), download=download)
        except (RuntimeError, OSError) as e:  # missing/corrupt (RuntimeError) or no network (URLError)
            raise DatasetNotFound(
                f"{name} not found in {Path(root, v.folder).resolve()} and could not be downloaded "
                f"({type(e).__name__}); put {v.files} there, or set dataset.root=<dir holding {v.folder}>"
            ) from None

    return make(True, True), make(True, False), make(False, False)


def _digits(image_size: int) -> tuple[Dataset, Dataset, Dataset]:
    """scikit-learn's 8x8 digits (1797 images), bilinearly resized, fixed stratified 60/20/20 split."""
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
    return tuple(TensorDataset(images[i], labels[i]) for i in (train, val, test))


def _split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]


def build_loaders(name: str, root: str | Path = "data", batch_size: int = 128, eval_batch_size: int = 512,
                  val_fraction: float = 0.1, split_seed: int = 0, num_workers: int = 0, image_size: int = 16,
                  download: bool = True, generator: torch.Generator | None = None,
                  limit: int | None = None, distributed: tuple[int, int] | None = None) -> Loaders:
    """Train/val/test loaders for `name`.

    image_size only applies to digits (the others have their native size). `generator` drives the
    training shuffle so a resumed run sees the same batches. `limit` keeps only the first `limit` examples
    of each split (for smoke tests). `distributed=(rank, world_size)` gives each rank its shard of the
    training set (batch_size is per rank); validation and test sets are evaluated whole on every rank.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if name == "digits":
        train, val, test = _digits(image_size)
        spec = DataSpec(10, 1, image_size)
    else:
        train_aug, train_plain, test = _torchvision(name, root, download)
        tr_idx, val_idx = _split(len(train_aug), val_fraction, split_seed)
        train, val, spec = Subset(train_aug, tr_idx), Subset(train_plain, val_idx), VISION[name].spec
    if limit:
        train, val, test = (Subset(d, range(min(limit, len(d)))) for d in (train, val, test))
    common = dict(num_workers=num_workers, persistent_workers=False)
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
