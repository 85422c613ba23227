"""Gaudi-GBLR (docs/methods.md section 5): mask, layers, prox step, FLOPs, inference path, training."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wgsef.penalties.gblr import GBLR
from wgsef.penalties.gblr_infer import plan_tiles, to_inference
from wgsef.penalties.gblr_layers import (GBLRConv2d, GBLRLinear, dense_flops, gaudi_mask,
                                         gblr_flops)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "regularizer" / "gblr.yaml"


def boxcar(n, w, l):
    """Reference: 1 on round(l n) + 0..round(w n)-1 (mod n), built by indexing."""
    out = np.zeros(n)
    start, length = round(l * n) % n, round(min(max(w, 0.0), 1.0) * n)
    out[(start + np.arange(length)) % n] = 1.0
    return out


# --- the mask --------------------------------------------------------------------------------
def test_infinite_sigma_mask_is_the_rounded_circular_boxcar():
    rng = np.random.default_rng(0)
    for n in [1, 2, 3, 4, 7, 8, 31, 64, 100, 257]:
        w = np.concatenate([rng.uniform(0, 1, 40), [0.0, 1.0, 1 / n, 1 - 1 / n]])
        l = np.concatenate([rng.uniform(0, 1, 40), [0.5, 0.999, 0.0, 0.7]])  # 0.999 wraps for n > 2
        got = gaudi_mask(n, torch.tensor(w), torch.tensor(l), math.inf).numpy()
        ref = np.stack([boxcar(n, wi, li) for wi, li in zip(w, l)])
        assert np.abs(got - ref).max() < 1e-9, n
    # float32 and a 2-D batch of components
    w32, l32 = torch.rand(3, 5), torch.rand(3, 5)
    got = gaudi_mask(50, w32, l32)
    assert got.shape == (3, 5, 50) and got.dtype == torch.float32
    ref = np.stack([boxcar(50, a, b) for a, b in zip(w32.double().flatten().tolist(), l32.double().flatten().tolist())])
    assert np.abs(got.reshape(15, 50).numpy() - ref).max() < 1e-5


def test_finite_sigma_is_smooth_and_approaches_the_boxcar():
    n, w, l = torch.tensor(64), torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    ref = torch.tensor(boxcar(64, 0.5, 0.3))
    jumps, dists = [], []
    for sigma in [1.0, 4.0, 16.0, 1e4]:
        mask = gaudi_mask(int(n), w, l, sigma)
        jumps.append(float((mask - mask.roll(1)).abs().max()))
        dists.append(float((mask - ref).norm()))
    assert jumps[0] < 0.1 < 0.9 < jumps[-1]  # the boxcar jumps by 1; sigma = 1 is a gentle bump
    assert all(a > b for a, b in zip(dists, dists[1:])) and dists[-1] < 1e-3


@pytest.mark.parametrize("n, sigma", [(7, 3.0), (16, 1.0), (16, math.inf)])
def test_mask_gradients_match_finite_differences(n, sigma):
    w = torch.tensor([0.13, 0.5, 0.77], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.05, 0.9, 0.41], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, l: gaudi_mask(n, w, l, sigma, ste=False), (w, l))


def test_straight_through_gradient_is_the_gradient_at_the_rounded_point():
    n, sigma = 16, 3.0
    w = torch.tensor([0.13, 0.52], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.31, 0.97], dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, n, dtype=torch.float64)
    g_ste = torch.autograd.grad((gaudi_mask(n, w, l, sigma) * probe).sum(), (w, l))
    wr = (torch.round(w.detach() * n) / n).requires_grad_()
    lr = (torch.round(l.detach() * n) / n).requires_grad_()
    g_ref = torch.autograd.grad((gaudi_mask(n, wr, lr, sigma, ste=False) * probe).sum(), (wr, lr))
    for a, b in zip(g_ste, g_ref):
        assert torch.allclose(a, b) and a.abs().min() > 0


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match="n must be"):
        gaudi_mask(0, torch.tensor(0.5), torch.tensor(0.0))
    with pytest.raises(ValueError, match="sigma"):
        gaudi_mask(8, torch.tensor(0.5), torch.tensor(0.0), 0.0)


# --- layers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_svd_init_reproduces_the_dense_layer(rank):
    lin, conv = nn.Linear(40, 30), nn.Conv2d(6, 10, 3, padding=1)
    g_lin, g_conv = GBLRLinear(lin, 1.0, rank), GBLRConv2d(conv, 1.0, rank)
    assert g_lin.n_components == 30 // rank
    assert (g_lin.materialize() - lin.weight).abs().max() < 1e-4
    assert (g_conv.materialize() - conv.weight.flatten(1)).abs().max() < 1e-4
    x, xc = torch.randn(4, 40), torch.randn(2, 6, 7, 7)
    assert torch.allclose(g_lin(x), lin(x), atol=1e-4) and torch.allclose(g_conv(xc), conv(xc), atol=1e-4)


def test_truncated_svd_init_is_the_eckart_young_optimum():
    lin = nn.Linear(40, 30)
    g = GBLRLinear(lin, 0.4, 2)  # K = 6 components of rank 2 -> rank 12
    s = torch.linalg.svdvals(lin.weight.detach().double())
    err = (g.materialize().double() - lin.weight.double()).norm().detach()
    assert abs(float(err) - float(s[12:].norm())) < 1e-4


def test_scratch_init_matches_the_default_linear_variance():
    g = GBLRLinear(nn.Linear(256, 256), 1.0, init="scratch")
    assert abs(float(g.materialize().detach().std()) * math.sqrt(3 * 256) - 1) < 0.1


def test_bad_layer_arguments_raise():
    with pytest.raises(ValueError, match="ratio"):
        GBLRLinear(nn.Linear(8, 8), 1.5)
    with pytest.raises(ValueError, match="no component"):
        GBLRLinear(nn.Linear(8, 4), 0.1)
    with pytest.raises(ValueError, match="groups=1"):
        GBLRConv2d(nn.Conv2d(4, 4, 3, groups=4), 1.0)
    with pytest.raises(ValueError, match="GBLRLinear or GBLRConv2d"):
        to_inference(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="batch_hint"):
        to_inference(GBLRLinear(nn.Linear(8, 8), 1.0), batch_hint=0)


def randomize_structure(layer, seed=0):
    """Random widths with zero-width, tiny, full and wrapping intervals."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.widths.copy_(torch.rand(layer.widths.shape, generator=gen))
        layer.locations.copy_(torch.rand(layer.locations.shape, generator=gen))
        layer.widths[0, 0] = 0.0                      # dead: zero output width
        layer.widths[1, 1] = 0.2 / layer.n            # dead: rounds to zero
        layer.widths[:, 2] = 1.0                      # full
        layer.locations[:, 3], layer.widths[:, 3] = 0.95, 0.6  # wraps on both axes
        layer.set_sigma(math.inf)


@pytest.mark.parametrize("overhead", [0.0, 300.0, 1e9])
@pytest.mark.parametrize("rank", [1, 3])
def test_inference_path_equals_the_materialised_weight(overhead, rank):
    lin = GBLRLinear(nn.Linear(37, 29), 1.0, rank, init="scratch")
    conv = GBLRConv2d(nn.Conv2d(5, 12, 3, stride=2, padding=1, dilation=1), 1.0, rank, init="scratch")
    conv2 = GBLRConv2d(nn.Conv2d(4, 12, (3, 2), stride=(1, 2), padding=(2, 0), dilation=2, bias=False), 1.0, rank)
    x, xc, xc2 = torch.randn(3, 6, 37), torch.randn(2, 5, 11, 9), torch.randn(2, 4, 10, 9)
    for layer, inp in [(lin, x), (conv, xc), (conv2, xc2)]:
        randomize_structure(layer)
        fast = to_inference(layer, tile_overhead=overhead)
        assert any(b > layer.n for *_, b in fast.right.tiles) and any(b > layer.m for *_, b in fast.left.tiles)
        with torch.no_grad():
            assert torch.allclose(fast(inp), layer(inp), atol=1e-4)


def test_inference_with_no_live_component_returns_the_bias():
    lin = GBLRLinear(nn.Linear(10, 6), 1.0)
    with torch.no_grad():
        lin.widths.zero_()
    assert torch.allclose(to_inference(lin)(torch.randn(4, 10)), lin.bias.expand(4, 6))


def brute_force_tiles(s, e, overhead):
    order = np.argsort(s, kind="stable")
    s, e, k = s[order], e[order], len(s)
    best = math.inf
    for cuts in itertools.product([0, 1], repeat=k - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [k]
        cost = sum((j - i) * (e[i:j].max() - s[i]) + overhead for i, j in zip(bounds, bounds[1:]))
        best = min(best, cost)
    return best


def test_tile_plan_covers_every_interval_and_is_optimal():
    rng = np.random.default_rng(1)
    for _ in range(20):
        k, n = rng.integers(1, 9), 50
        start, length = rng.integers(0, n, k), rng.integers(1, n + 1, k)
        overhead = float(rng.choice([0, 10, 100]))
        order, tiles = plan_tiles(start, length, overhead)
        assert [t[0] for t in tiles] == [0] + [t[1] for t in tiles[:-1]] and tiles[-1][1] == k
        s, e = start[order], start[order] + length[order]
        cost = 0.0
        for i, j, a, b in tiles:
            assert (s[i:j] >= a).all() and (e[i:j] <= b).all()
            cost += (j - i) * (b - a) + overhead
        assert cost == brute_force_tiles(start, start + length, overhead)


# --- FLOPs -----------------------------------------------------------------------------------
def test_flops_equal_a_hand_count():
    lin = GBLRLinear(nn.Linear(6, 8), 1.0, rank=2)  # K = 3, m = 8, n = 6
    with torch.no_grad():
        lin.widths.copy_(torch.tensor([[0.5, 1.0, 0.125], [0.5, 1.0, 0.07]]))
    # c0: m' = 4, n' = 3 -> min(2*7, 12) = 12; c1: min(2*14, 48) = 28; c2: n' = round(0.42) = 0, dead
    assert gblr_flops(lin) == 40 and dense_flops(lin) == 48
    with torch.no_grad():
        lin.widths[1, 2] = 0.09  # n' = round(0.54) = 1 -> live: min(2*(1+1), 1) = 1
    assert gblr_flops(lin) == 41
    conv = GBLRConv2d(nn.Conv2d(2, 8, 3), 1.0, rank=2)  # m = 8, n = 18, K = 4
    with torch.no_grad():
        conv.widths.copy_(torch.tensor([[0.5, 1.0, 0.0, 0.25], [0.5, 1.0, 1.0, 1 / 18]]))
    # c0: 4 x 9 -> min(26, 36) = 26; c1: 8 x 18 -> 52; c2 dead; c3: 2 x 1 -> min(6, 2) = 2
    assert gblr_flops(conv, (5, 4)) == 80 * 20 and dense_flops(conv, (5, 4)) == 144 * 20
    with pytest.raises(ValueError, match="out_hw"):
        gblr_flops(conv)
    conv(torch.randn(1, 2, 6, 7))  # records out_hw = (4, 5)
    assert gblr_flops(conv) == 80 * 20


# --- the regularizer -------------------------------------------------------------------------
def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2),
                         nn.ReLU(), nn.Conv2d(12, 12, 3, groups=3), nn.Flatten(), nn.Linear(12 * 9, 20),
                         nn.ReLU(), nn.Linear(20, 10))


def test_attach_swaps_all_but_first_and_last_and_keeps_the_function():
    model, x = small_cnn(), torch.randn(3, 1, 12, 12)
    ref = model(x)
    reg = GBLR(lam=0.1, ratio=1.0)
    reg.attach(model, x)
    kinds = [type(m).__name__ for m in model]
    assert kinds[0] == "Conv2d" and kinds[2] == "GBLRConv2d" and kinds[4] == "Conv2d"
    assert kinds[6] == "GBLRLinear" and kinds[8] == "Linear"
    assert torch.allclose(model(x), ref, atol=1e-4)
    groups = reg.param_groups(model)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["lr"] == reg.structural_lr
    assert {id(p) for p in groups[0]["params"]} == {id(p) for l in reg.layers for p in (l.widths, l.locations)}
    m = reg.metrics()  # at full widths and K = min(m, n) each component costs m + n
    gblr, dense = 12 * (12 + 72) * 25 + 20 * (20 + 108), 12 * 72 * 25 + 20 * 108
    rest = 8 * 9 * 144 + 12 * (4 * 9) * 9 + 10 * 20  # first conv, grouped conv (I/groups = 4), classifier
    assert m["mean_width"] == 1.0 and m["flops_ratio"] == pytest.approx(gblr / dense)
    assert m["model_flops_ratio"] == pytest.approx((gblr + rest) / (dense + rest))


def test_sigma_schedule():
    reg = GBLR(lam=0.1, ratio=1.0, warmup_epochs=5)
    assert [reg.sigma_at(e, 20) for e in (0, 4, 5)] == [1.0, 1.0, 1.0]
    assert reg.sigma_at(12, 20) == pytest.approx(1 + 99 * 7 / 14) and reg.sigma_at(19, 20) == 100.0
    assert reg.sigma_at(3, 4) == 1.0 and GBLR(lam=0.1, ratio=1.0, warmup_epochs=0).sigma_at(0, 1) == 100.0
    assert GBLR(lam=0.1, ratio=1.0, gaussian=False).sigma_at(7, 20) == math.inf
    model = small_cnn()
    reg.attach(model, torch.randn(1, 1, 12, 12))
    reg.on_epoch_start(12, 20)
    assert all(float(l.sigma) == pytest.approx(reg.sigma_at(12, 20)) for l in reg.layers)


def test_prox_step_shrinks_clamps_and_wraps():
    model = small_cnn()
    reg = GBLR(lam=0.5, ratio=1.0)
    reg.attach(model, torch.randn(1, 1, 12, 12))
    layer = reg.layers[1]  # the Linear: K = 20
    with torch.no_grad():
        layer.widths.copy_(torch.linspace(-0.2, 1.3, 40).view(2, 20))
        layer.locations.copy_(torch.linspace(-1.6, 2.4, 40).view(2, 20))
    before_w, before_l = layer.widths.clone(), layer.locations.clone()
    reg.after_step(lr=0.02)  # threshold 0.01
    ref = (before_w.abs() - 0.01).clamp(min=0) * before_w.sign()
    assert torch.equal(layer.widths, ref.clamp(0, 1))
    assert (layer.widths[before_w <= 0.01] == 0).all() and layer.widths.min() >= 0 and layer.widths.max() <= 1
    assert torch.allclose(layer.locations, before_l - before_l.floor()) and (layer.locations < 1).all()
    # with a target width the shrinkage pauses once the mean width is at or below it
    paused = GBLR(lam=0.5, ratio=1.0, target_width=0.9)
    paused.attach(small_cnn(), torch.randn(1, 1, 12, 12))
    with torch.no_grad():
        for l in paused.layers:
            l.widths.fill_(0.5)
    paused.after_step(lr=0.02)
    assert all((l.widths == 0.5).all() for l in paused.layers)


def test_finalize_keeps_the_sigma_inf_function():
    model, x = small_cnn(), torch.randn(3, 1, 12, 12)
    reg = GBLR(lam=0.1, ratio=1.0, gaussian=False)
    reg.attach(model, x)
    for i, layer in enumerate(reg.layers):
        randomize_structure(layer, seed=i)
    with torch.no_grad():
        ref = model(x)
        reg.finalize(model)
        assert torch.allclose(model(x), ref, atol=1e-4)
    assert "Inference" in type(model[2]).__name__ and "Inference" in type(model[6]).__name__


def test_bad_regularizer_arguments_and_config():
    with pytest.raises(ValueError, match="lam"):
        GBLR(lam=-1.0, ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        GBLR(lam=0.1, ratio=2.0)
    with pytest.raises(ValueError, match="no Linear/Conv2d"):
        GBLR(lam=0.1, ratio=1.0).attach(nn.Sequential(nn.Linear(4, 4)), torch.randn(1, 4))
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    reg = instantiate(OmegaConf.load(CONFIG))
    assert isinstance(reg, GBLR) and reg.ratio == 1.0 and reg.rank == 1


# --- a short training run --------------------------------------------------------------------
def test_short_training_on_digits_cuts_flops_at_dense_accuracy(capsys):
    from sklearn.datasets import load_digits
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]

    def accuracy(model):
        with torch.no_grad():
            return float((model(xte).argmax(1) == yte).float().mean())

    def fit(model, epochs, lr, reg=None):
        special = reg.param_groups(model) if reg else []
        ids = {id(p) for g in special for p in g["params"]}
        rest = [p for p in model.parameters() if id(p) not in ids]
        opt = torch.optim.SGD([{"params": rest}] + special, lr=lr, momentum=0.9)
        for epoch in range(epochs):
            if reg:
                reg.on_epoch_start(epoch, epochs)
            order = torch.randperm(len(xtr))
            for b in range(0, len(xtr), 32):
                i = order[b:b + 32]
                loss = nn.functional.cross_entropy(model(xtr[i]), ytr[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if reg:
                    reg.after_step(lr)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(model, 15, 0.05)
    dense_acc = accuracy(model)
    reg = GBLR(lam=0.5, ratio=1.0, warmup_epochs=1, target_width=0.25)
    reg.attach(model, xtr[:2])
    fit(model, 8, 0.01, reg)
    metrics = reg.metrics()
    reg.finalize(model)
    gblr_acc = accuracy(model)
    with capsys.disabled():
        print(f"\n[gblr digits] dense acc {dense_acc:.4f} | GBLR acc (finalized) {gblr_acc:.4f} | "
              f"mean width {metrics['mean_width']:.3f} | FLOPs ratio GBLR layers {metrics['flops_ratio']:.3f}"
              f" | whole model {metrics['model_flops_ratio']:.3f}")
    assert metrics["flops_ratio"] < 0.6 and metrics["model_flops_ratio"] < 0.7
    assert gblr_acc >= dense_acc - 0.03
