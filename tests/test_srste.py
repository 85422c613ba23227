"""SR-STE N:M sparsity: masks against brute force, the gradient against an explicit surrogate loss,
layer fallbacks, one-shot masks, finalize, and a short digits training against dense."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.nm import nm_mask, nm_pattern_counts
from wgsef.regularizers.srste import SRSTE, NMConv2d, NMLinear, nm_pattern_report, to_semi_structured


def blocks_nonzeros(weight, m):
    """Independent count: nonzeros per block of m along the input axis (O,kh,kw,I view, zero-padded)."""
    w = weight.detach()
    w = w.permute(0, 2, 3, 1) if w.dim() == 4 else w
    w = w.reshape(-1, w.shape[-1])
    w = torch.cat([w, w.new_zeros(w.shape[0], -w.shape[1] % m)], dim=1)
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


def brute_force_mask(weight, n, m):
    w = weight.detach().numpy()
    conv = w.ndim == 4
    w4 = w if conv else w[:, :, None, None]
    keep = np.zeros(w4.shape, dtype=bool)
    for o, h, k in itertools.product(range(w4.shape[0]), range(w4.shape[2]), range(w4.shape[3])):
        for start in range(0, w4.shape[1], m):
            block = np.abs(w4[o, start:start + m, h, k])
            keep[o, start + np.argsort(-block)[:n], h, k] = True
    return torch.from_numpy(keep if conv else keep[:, :, 0, 0])


class SmallCNN(nn.Module):
    """conv(1->c) conv(c->2c) conv(2c->2c) fc fc, for 8x8 inputs; `mid` sets the middle conv's input."""

    def __init__(self, c=8, mid=None, groups=1, classes=10):
        super().__init__()
        mid = mid or c
        self.features = nn.Sequential(
            nn.Conv2d(1, mid, 3, padding=1), nn.ReLU(),
            nn.Conv2d(mid, 2 * c, 3, padding=1, groups=groups), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(8 * c, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.features(x).flatten(1))))


X8 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def layers(model, kind):
    return [mod for mod in model.modules() if isinstance(mod, kind)]


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 2), (4, 16)])
@pytest.mark.parametrize("shape", [(5, 16), (4, 8, 3, 3), (3, 10, 2, 1), (6, 7), (2, 3, 1, 1)])
def test_nm_mask_matches_brute_force(n, m, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(n * 100 + m))
    mask = nm_mask(weight, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, brute_force_mask(weight, n, m))
    assert (blocks_nonzeros(weight * mask, m) <= n).all()


@pytest.mark.parametrize("m", [4, 16])
def test_nm_mask_ties_go_to_the_earlier_weight(m):
    """Equal magnitudes: exactly n kept per block (the first ones on the comparison path, m <= 8)."""
    weight = torch.tensor([[1.0, -1.0] * m])  # two blocks of equal magnitudes
    mask = nm_mask(weight, 2, m)
    assert mask.view(2, m).sum(1).tolist() == [2, 2]
    if m <= 8:
        assert mask.view(2, m)[:, :2].all()


def test_nm_pattern_counts_by_hand():
    ok = torch.tensor([[1.0, 0, 0, 2, 0, 3, 0, 0]])       # 2 blocks, both 2:4
    bad = torch.tensor([[1.0, 1, 1, 0, 1, 0, 0, 0]])      # first block has 3 nonzeros
    short = torch.tensor([[1.0, 2.0]])                     # 2 inputs <= n: never counts
    out = nm_pattern_counts([ok, bad, short], 2, 4)
    assert out["nm_layer_fraction"] == pytest.approx(1 / 3)
    assert out["nm_weight_fraction"] == pytest.approx(12 / 18)
    assert out["weight_sparsity"] == pytest.approx(9 / 18)
    padded = torch.tensor([[0.0, 0, 0, 0, 5, 6, 7]])         # short last block 3 > 2 nonzeros
    assert nm_pattern_counts([padded], 2, 4)["nm_weight_fraction"] == pytest.approx(4 / 7)


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (2, 3), (2, 6), (2.0, 4)])
def test_invalid_nm_raises(n, m):
    with pytest.raises(ValueError, match="1 <= n < m"):
        SRSTE(n=n, m=m)
    with pytest.raises(ValueError, match="1 <= n < m"):
        nm_mask(torch.randn(4, 8), n, m)


@pytest.mark.parametrize("kwargs", [{"mode": "prune"}, {"incompatible": "skip"}, {"decay": -1.0}])
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError):
        SRSTE(**kwargs)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_scratch_training_keeps_nm_pattern(n, m):
    torch.manual_seed(0)
    reg = SRSTE(n=n, m=m)
    model = reg.attach(SmallCNN(c=8), X8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    y = torch.randint(0, 10, (16,))
    masks_before = [mod.current_mask() for mod in layers(model, (NMConv2d, NMLinear))]
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(X8), y).backward()
        opt.step()
        reg.after_step(0.1)
    sparse = layers(model, (NMConv2d, NMLinear))
    assert len(sparse) == 3  # middle convs and fc1; stem conv and classifier stay dense
    for mod in sparse:
        eff = mod.effective_weight().detach()
        assert (blocks_nonzeros(eff, m) <= n).all()
        assert torch.equal(eff, mod.weight.detach() * brute_force_mask(mod.weight, n, m))  # mask of current W
        assert (mod.weight != 0).float().mean() > 0.99  # dense weights are kept, not pruned
    # SR-STE lets masks move: with lr 0.1 and 10 steps at least some entries flip
    assert any(not torch.equal(a, mod.current_mask()) for a, mod in zip(masks_before, sparse))
    out = reg.metrics()
    assert out["nm_sparse_layers"] == 3 and out["nm_dense_layers"] == 2
    assert out["nm_layer_fraction"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("decay", [0.0, 2e-4, 0.3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradient_is_straight_through_plus_decay(decay, kind):
    torch.manual_seed(1)
    plain = nn.Linear(12, 5) if kind == "linear" else nn.Conv2d(8, 4, 3, padding=1)
    x = torch.randn(3, 12) if kind == "linear" else torch.randn(2, 8, 5, 5)
    target = torch.randn_like(plain(x))
    w0 = plain.weight.detach().clone()
    reg = SRSTE(n=2, m=4, decay=decay, skip_last=False)
    wrapped = reg.attach(plain, x)
    assert isinstance(wrapped, (NMLinear, NMConv2d))
    F.mse_loss(wrapped(x), target).backward()

    # reference: a surrogate loss whose autograd gradient is the SR-STE formula
    w = w0.clone().requires_grad_()
    mask = brute_force_mask(w0, 2, 4)
    pruned = (w * ~mask).detach()
    w_ste = w - pruned  # value W * mask, gradient identity
    fwd = F.linear(x, w_ste, plain.bias) if kind == "linear" else F.conv2d(x, w_ste, plain.bias, padding=1)
    (F.mse_loss(fwd, target) + decay / 2 * (w * ~mask).pow(2).sum()).backward()
    torch.testing.assert_close(wrapped.weight.grad, w.grad, rtol=1e-6, atol=1e-7)

    # and the formula spelled out: grad of the masked weights + decay * (1 - mask) * W
    wm = (w0 * mask).requires_grad_()
    fwd = F.linear(x, wm, plain.bias) if kind == "linear" else F.conv2d(x, wm, plain.bias, padding=1)
    (g,) = torch.autograd.grad(F.mse_loss(fwd, target), wm)
    torch.testing.assert_close(wrapped.weight.grad, g + decay * (~mask) * w0, rtol=1e-6, atol=1e-7)


def test_pad_and_dense_fallbacks():
    torch.manual_seed(0)
    # middle conv: 6 input channels (not a multiple of 4); grouped conv 12 -> 2 groups of 6 likewise
    pad = SRSTE(incompatible="pad")
    model = pad.attach(SmallCNN(c=8, mid=6), X8)
    assert isinstance(model.features[2], NMConv2d)
    assert pad.report()["padded"] == ["features.2"]
    nnz = blocks_nonzeros(model.features[2].effective_weight(), 4)
    assert (nnz <= 2).all() and nnz.shape[1] == 2  # 6 inputs -> a full block and a padded one of 2
    assert nm_pattern_report(model, 2, 4)["nm_layer_fraction"] == pytest.approx(3 / 5)

    dense = SRSTE(incompatible="dense")
    model = dense.attach(SmallCNN(c=8, mid=12, groups=2), X8)
    assert type(model.features[2]) is nn.Conv2d
    assert dense.report()["dense"]["features.2"] == "6 inputs per group not a multiple of m=4"
    assert dense.report()["padded"] == []
    assert dense.metrics()["nm_dense_layers"] == 3


def test_depthwise_and_first_last_by_run_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 4)  # registered first, runs last
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.stem = nn.Conv2d(3, 8, 1)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.head(self.pw(self.dw(self.stem(x))).mean((2, 3)))

    # default = the official recipe (aojunzz/NM-sparsity ResNet: stem SparseConv, classifier nn.Linear):
    # the stem, the first layer to run although registered third, is sparse; the head, registered
    # first but run last, stays dense
    reg = SRSTE()
    model = reg.attach(Net(), torch.randn(2, 3, 4, 4))
    assert reg.report()["dense"] == {"head": "last layer", "dw": "depthwise (1 input channel per group)"}
    assert reg.report()["sparse"] == ["stem", "pw"] and reg.report()["padded"] == ["stem"]
    assert isinstance(model.stem, NMConv2d) and type(model.head) is nn.Linear
    reg = SRSTE(first_layer="dense")
    model = reg.attach(Net(), torch.randn(2, 3, 4, 4))
    assert reg.report()["dense"] == {"head": "last layer", "dw": "depthwise (1 input channel per group)",
                                     "stem": "first layer"}
    assert reg.report()["sparse"] == ["pw"] and isinstance(model.pw, NMConv2d)
    reg = SRSTE(skip_last=False)
    model = reg.attach(Net(), torch.randn(2, 3, 4, 4))
    assert reg.report()["sparse"] == ["head", "stem", "pw"] and reg.report()["padded"] == ["stem"]
    with pytest.raises(ValueError, match="first_layer"):
        SRSTE(first_layer="skip")


def test_layer_selection_matches_the_official_resnet_recipe(make_cfg):
    """Reference, written from aojunzz/NM-sparsity classification/models/resnet.py: every conv of the
    ResNet is a SparseConv (stem and 1x1 downsample included), only the final nn.Linear is dense."""
    from hydra.utils import instantiate

    from wgsef.models import build

    model = build("resnet18", num_classes=10, in_channels=3, image_size=32)
    reference = {name: isinstance(mod, nn.Conv2d) for name, mod in model.named_modules()
                 if isinstance(mod, (nn.Conv2d, nn.Linear))}
    reg = instantiate(make_cfg("method=srste").regularizer)  # the shipped config's defaults
    model = reg.attach(model, torch.randn(2, 3, 32, 32))
    got = {name: isinstance(mod, NMConv2d) for name, mod in model.named_modules()
           if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert got == reference and sum(reference.values()) == 20 and reference["fc"] is False


def test_finalize_gives_plain_modules_with_same_outputs():
    torch.manual_seed(0)
    base = SmallCNN(c=8)
    keys = list(base.state_dict())
    reg = SRSTE()
    model = reg.attach(base, X8)
    assert list(model.state_dict()) == keys  # scratch mode keeps the state-dict keys
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(X8).square().mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(X8)
    final = reg.finalize(model)
    assert not layers(final, (NMConv2d, NMLinear))
    assert all(type(mod) in (nn.Conv2d, nn.Linear) for mod in layers(final, (nn.Conv2d, nn.Linear)))
    assert list(final.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(final(X8), expected)
    for name in reg.report()["sparse"]:
        assert (blocks_nonzeros(final.get_submodule(name).weight, 4) <= 2).all()
    assert reg.metrics()["nm_layer_fraction"] == pytest.approx(3 / 5)


def test_oneshot_mask_is_fixed_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    base = SmallCNN(c=8)
    names = ("features.2", "features.6", "fc1")
    loaded = {name: base.get_submodule(name).weight.detach().clone() for name in names}
    masks = {name: brute_force_mask(w, 2, 4) for name, w in loaded.items()}
    reg = SRSTE(mode="oneshot", decay=0.5)  # decay is ignored in one-shot mode
    model = reg.attach(base, X8)
    assert "fc1.nm_mask" in model.state_dict()
    for name, mask in masks.items():  # pruned once, in place, by magnitude
        assert torch.equal(model.get_submodule(name).weight.detach(), loaded[name] * mask)
    start = {name: model.get_submodule(name).weight.detach().clone() for name in masks}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    y = torch.randint(0, 10, (16,))
    for _ in range(8):
        opt.zero_grad()
        F.cross_entropy(model(X8), y).backward()
        for name, mask in masks.items():
            assert (model.get_submodule(name).weight.grad[~mask] == 0).all()  # masked gradient, no decay
        opt.step()
        reg.after_step(0.1)
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        assert torch.equal(mod.current_mask(), mask)
        assert (mod.weight[~mask] == 0).all()
        assert not torch.equal(mod.weight[mask], start[name][mask])  # the kept weights do train
    resumed = SRSTE(mode="oneshot").attach(SmallCNN(c=8), X8)  # a checkpoint restores the fixed masks
    resumed.load_state_dict(model.state_dict())
    assert all(torch.equal(resumed.get_submodule(name).current_mask(), mask) for name, mask in masks.items())
    final = reg.finalize(model)
    assert "fc1.nm_mask" not in final.state_dict()
    assert nm_pattern_report(final, 2, 4)["nm_layer_fraction"] == pytest.approx(3 / 5)


def test_to_semi_structured_without_cuda_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="need a CUDA GPU with sparse tensor cores"):
        to_semi_structured(nn.Linear(64, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured 2:4 kernels need CUDA")
def test_to_semi_structured_on_cuda_matches_dense():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    reg = SRSTE()
    model = reg.finalize(reg.attach(model, torch.randn(2, 128))).half().cuda().eval()
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    with torch.no_grad():
        expected = model(x)
        report = to_semi_structured(model)
        assert report["converted"] == ["2"]  # the stem layer 0 and the classifier stay dense
        assert set(report["skipped"]) == {"0", "4"}
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def digits_accuracy(reg, epochs=12, seed=0):
    """Plain training loop: small CNN on sklearn digits (8x8), returns test accuracy in percent."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    torch.manual_seed(seed)
    model = reg.attach(SmallCNN(c=12), xtr[:4])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            reg.after_step(sched.get_last_lr()[0])
        sched.step()
    model = reg.finalize(model).eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean()), model


def test_digits_2to4_close_to_dense(capsys):
    """Accuracy differs across CPUs and thread counts (one short trajectory each), so the claim is
    about means over two seeds, with a 4-point margin; the pattern itself is an invariant."""
    dense, sparse = [], []
    for seed in (0, 1):
        dense.append(digits_accuracy(Regularizer(), seed=seed)[0])
        reg = SRSTE(n=2, m=4)
        acc, model = digits_accuracy(reg, seed=seed)
        sparse.append(acc)
        assert reg.metrics()["nm_layer_fraction"] == pytest.approx(3 / 5)
        assert all((blocks_nonzeros(model.get_submodule(n).weight, 4) <= 2).all() for n in reg.report()["sparse"])
    dense_acc, sparse_acc = sum(dense) / 2, sum(sparse) / 2
    with capsys.disabled():
        print(f"\ndigits test accuracy (mean of 2 seeds): dense {dense_acc:.2f}%, SR-STE 2:4 {sparse_acc:.2f}%")
    assert dense_acc > 90
    assert sparse_acc >= dense_acc - 4
