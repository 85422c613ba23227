"""Gaudi-GBLR (docs/methods.md section 5): mask, layers, prox step, FLOPs, inference path, training."""
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wgsef.regularizers.gblr import GBLR, StructuralAdam
from wgsef.regularizers.gblr.deploy import (candidate_forms, circular_support, plan_tiles, to_dense,
                                        to_inference, to_lowrank)
from wgsef.regularizers.gblr.layers import (GBLRConv2d, GBLRLinear, MaskPlan, dense_flops, gaudi_mask,
                                         gblr_flops, init_widths)

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
        layer.eval()  # deployment reproduces the eval-mode layer
        fast = to_inference(layer, tile_overhead=overhead)
        assert any(b > layer.n for *_, b in fast.right.tiles) and any(b > layer.m for *_, b in fast.left.tiles)
        with torch.no_grad():
            ref = layer(inp)
            assert torch.allclose(fast(inp), ref, atol=1e-4)
            for form in (to_dense(layer), to_lowrank(layer)):
                assert torch.allclose(form(inp), ref, atol=1e-4)


def test_inference_with_no_live_component_returns_the_bias():
    lin = GBLRLinear(nn.Linear(10, 6), 1.0)
    with torch.no_grad():
        lin.widths.zero_()
    assert torch.allclose(to_inference(lin)(torch.randn(4, 10)), lin.bias.expand(4, 6))
    assert to_lowrank(lin) is None and set(candidate_forms(lin, 16)) == {"dense", "tiled"}


def test_circular_support_is_the_shortest_covering_interval():
    rng = np.random.default_rng(3)
    rows = torch.tensor(rng.random((200, 11)) < rng.random((200, 1)) * 0.5, dtype=torch.float64)
    rows[0], rows[1, 5] = 0.0, 1.0
    start, length = circular_support(rows)
    for row, s0, l0 in zip(rows, start.tolist(), length.tolist()):
        nz = set(row.nonzero()[:, 0].tolist())
        best = min([(l, s) for s in range(11) for l in range(12) if nz <= {(s + i) % 11 for i in range(l)}])
        assert l0 == best[0] and nz <= {(s0 + i) % 11 for i in range(l0)}


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
    reg = GBLR(lam=0.1, ratio=1.0, width_init="ones", structural_optimizer="sgd")
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
    # the official default: widths and locations by GBLR's own Adam, kept out of the main optimizer
    from wgsef.optim import sgd
    adam = GBLR(lam=0.1, ratio=1.0)
    model = adam.attach(small_cnn(), x)
    opt = sgd(model, adam, lr=0.05)
    structural = {id(p) for p in adam.structural_params()}
    assert not structural & {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt.param_groups[-1]["lr"] == 0.05 and isinstance(adam.optimizer, StructuralAdam)


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


def reference_shrink(widths, locations, lam, lr, target=None):
    """The official TargetedSoftshrink step (changwoolee/Gaudi-GBLR src/callbacks/shrink.py), written
    out with the weights' lr and the plain mean width: widths <- clamp(softshrink(widths, lam lr), 0, 1)
    unless the mean is at or below target; locations <- locations - floor(locations)."""
    allw = np.concatenate([w.ravel() for w in widths])
    t = 0.0 if target is not None and allw.mean() <= target else lam * lr
    soft = [np.sign(w) * np.maximum(np.abs(w) - t, 0) for w in widths]
    return [np.clip(w, 0, 1) for w in soft], [l - np.floor(l) for l in locations]


@pytest.mark.parametrize("target", [None, 0.3, 0.9])
def test_prox_step_is_the_official_shrink_with_the_weights_lr(target):
    model = small_cnn()
    reg = GBLR(lam=0.5, ratio=1.0, target_width=target, structural_lr=0.005)
    reg.attach(model, torch.randn(1, 1, 12, 12))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in reg.layers:
            layer.widths.copy_(torch.rand(layer.widths.shape, generator=gen) * 1.5 - 0.2)
            layer.locations.copy_(torch.rand(layer.locations.shape, generator=gen) * 4 - 1.6)
        reg.layers[1].widths[0, :3] = torch.tensor([0.01, -0.01, 1.01])  # at the threshold, below 0, above 1
    before_w = [l.widths.detach().double().numpy().copy() for l in reg.layers]
    before_l = [l.locations.detach().double().numpy().copy() for l in reg.layers]
    reg.after_step(lr=0.02)  # the weights' lr: threshold 0.01 (the structural lr 0.005 would give 0.0025)
    ref_w, ref_l = reference_shrink(before_w, before_l, 0.5, 0.02, target)
    for layer, w, l in zip(reg.layers, ref_w, ref_l):
        assert np.abs(layer.widths.detach().numpy() - w).max() < 1e-6
        assert np.abs(layer.locations.detach().numpy() - l).max() < 1e-6
    for layer in reg.layers:  # clamped after every step, also while paused
        assert layer.widths.min() >= 0 and layer.widths.max() <= 1 and (layer.locations < 1).all()


def test_trainer_passes_and_logs_the_weights_lr(make_cfg, tmp_path, monkeypatch):
    """train.py hands GBLR the weights' lr (the main optimizer's last group), under both structural
    optimizers, and logs it; the structural group's 0.005 never reaches the shrink."""
    import pandas as pd

    from wgsef.run import run
    seen = []
    original = GBLR.after_step
    monkeypatch.setattr(GBLR, "after_step", lambda self, lr: (seen.append(lr), original(self, lr))[1])
    for mode in ("adam", "sgd"):
        seen.clear()
        cfg = make_cfg("method=gblr", "model=lenet5", "trainer.epochs=2", "trainer.progress=false",
                       "optimizer.lr=0.04", "scheduler=none", "measure.enabled=false",
                       f"regularizer.structural_optimizer={mode}")
        run(cfg, tmp_path / mode)
        assert seen and all(lr == 0.04 for lr in seen)
        assert (pd.read_csv(tmp_path / mode / "metrics.csv")["lr"] == 0.04).all()


def test_structural_adam_matches_torch_adam():
    params = [nn.Parameter(torch.randn(2, 5, dtype=torch.float64)) for _ in range(3)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    for betas in [(0.0, 0.999), (0.9, 0.99)]:
        mine = StructuralAdam(params, 0.005, betas)
        ref = torch.optim.Adam(twins, lr=0.005, betas=betas)
        for step in range(5):
            grads = [torch.randn_like(p) for p in params]
            for p, q, g in zip(params, twins, grads):
                p.grad, q.grad = g.clone(), g.clone()
            mine.step()
            ref.step()
            assert all(p.grad is None for p in params)
            assert all(torch.allclose(p, q, atol=1e-12) for p, q in zip(params, twins))


@pytest.mark.parametrize("deploy", ["fastest", "dense", "tiled"])
def test_finalize_keeps_the_eval_mode_function(deploy):
    model, x = small_cnn(), torch.randn(3, 1, 12, 12)
    reg = GBLR(lam=0.1, ratio=1.0, gaussian=False, deploy=deploy, deploy_repeats=1, deploy_min_run_time=0.01)
    reg.attach(model, x)
    for i, layer in enumerate(reg.layers):
        randomize_structure(layer, seed=i)
    with torch.no_grad():
        ref = model.eval()(x)
        reg.finalize(model)
        assert torch.allclose(model(x), ref, atol=1e-4)
    assert set(reg.deployment) == {"2", "6"} and all(f in ("dense", "lowrank", "tiled") for f in reg.deployment.values())
    if deploy != "fastest":
        assert set(reg.deployment.values()) == {deploy}
    assert not any(isinstance(m, (GBLRConv2d, GBLRLinear)) for m in model.modules())
    assert not any(p.requires_grad for p in model[2].parameters())


def test_deployed_form_is_chosen_on_the_device_threads_and_clock_of_the_reported_latency(monkeypatch, make_cfg):
    """Every timing of `fastest` runs on deploy_device with deploy_threads and deploy_clock (the config passes
    measure.threads and measure.clock; CPU whatever the training device), never on the inputs' device."""
    import wgsef.measure

    calls = []
    monkeypatch.setattr(wgsef.measure, "latency_ms", lambda form, x, device, **kw: calls.append((device, kw)) or 1.0)
    model, x = small_cnn(), torch.randn(3, 1, 12, 12)
    reg = GBLR(lam=0.1, ratio=1.0, gaussian=False, deploy_repeats=1, deploy_threads=3, deploy_clock="wall")
    reg.attach(model, x)
    for i, layer in enumerate(reg.layers):
        randomize_structure(layer, seed=i)  # narrow widths: low-rank and tiled forms are candidates
    reg.finalize(model)
    assert calls and {(d, kw["threads"], kw["clock"]) for d, kw in calls} == {("cpu", 3, "wall")}
    cfg = make_cfg("method=gblr", "measure.threads=2", "measure.clock=wall", "trainer.device=cuda")
    assert (cfg.regularizer.deploy_device, cfg.regularizer.deploy_threads, cfg.regularizer.deploy_clock) == \
        ("cpu", 2, "wall")
    with pytest.raises(ValueError, match="deploy_threads"):
        GBLR(lam=0.1, ratio=1.0, deploy_threads=2, deploy_clock="cpu")  # the CPU clock times one thread


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


# --- official eval mode, initialisations, per-kernel convs, layer choice -----------------------------
def reference_eval_mask(n, w, l, sigma):
    """Eval-mode mask written from the official GaudiGBLR.get_mask (changwoolee/Gaudi-GBLR,
    src/models/layers/gblr.py): w rounded to the 1/n grid then hard-shrunk at 1/n, l rounded, the
    spectrum w sinc(w f) / sinc(f/n) exp(-f^2/(2 sigma^2)) exp(-2 pi i f l + i pi f (1/n - w)) inverted
    by an explicit inverse real DFT (no FFT), entries below 1e-3 in magnitude set to 0."""
    w = round(min(max(w, 0.0), 1.0) * n) / n
    w = w if abs(w) > 1.0 / n else 0.0
    l = round(l * n) / n
    f = np.arange(n // 2 + 1)
    gauss = np.exp(-f ** 2 / (2 * sigma ** 2)) if math.isfinite(sigma) else np.ones(len(f))
    spec = w * np.sinc(w * f) / np.sinc(f / n) * gauss * np.exp(-2j * np.pi * f * l + 1j * np.pi * f * (1 / n - w))
    coef = np.full(len(f), 2.0)
    coef[0] = 1.0
    if n % 2 == 0:
        coef[-1] = 1.0
    j = np.arange(n)
    mask = (coef[:, None] * (spec[:, None] * np.exp(2j * np.pi * f[:, None] * j[None] / n)).real).sum(0)
    mask[np.abs(mask) < 1e-3] = 0.0
    return mask


@pytest.mark.parametrize("sigma", [3.0, 100.0, math.inf])
def test_eval_mode_masks_match_the_official_computation(sigma):
    lin = GBLRLinear(nn.Linear(13, 16, dtype=torch.float64), 1.0, init="scratch")  # m = 16 (even), n = 13 (odd)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        lin.widths.copy_(torch.rand(lin.widths.shape, generator=gen, dtype=torch.float64))
        lin.locations.copy_(torch.rand(lin.locations.shape, generator=gen, dtype=torch.float64))
        lin.widths[0, :4] = torch.tensor([1 / 16, 1.4 / 16, 1.6 / 16, 0.0])  # rounds to one entry: dropped; two: kept
        lin.widths[1, :3] = torch.tensor([1 / 13, 2 / 13, 1.0])
    lin.set_sigma(sigma)
    lin.eval()
    mask_out, mask_in = lin.masks()
    for axis, n, got in ((0, 16, mask_out), (1, 13, mask_in)):
        for c in range(lin.n_components):
            ref = reference_eval_mask(n, float(lin.widths[axis, c].detach()), float(lin.locations[axis, c].detach()), sigma)
            assert np.abs(got[c].detach().numpy() - ref).max() < 1e-9, (axis, c)
    assert (mask_out[0] == 0).all() and (mask_out[1] == 0).all() and (mask_out[2] != 0).sum() >= 2
    lin.train()  # training mode keeps one-entry widths
    assert abs(float(lin.masks()[0][0].detach().sum()) - 1.0) < 1e-9  # a one-entry interval: total mass w n = 1


def test_batched_masks_equal_each_layers_own():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 9), nn.Linear(9, 16), nn.Linear(16, 7))
    reg = GBLR(lam=0.1, ratio=1.0, skip_first=False, skip_last=False, location_init="random")
    reg.attach(model, torch.randn(2, 16))
    for i, layer in enumerate(reg.layers):
        randomize_structure(layer, seed=i)
        layer.set_sigma(5.0)
    reg.sigma = 5.0
    for train in (True, False):
        model.train(train)
        plan = MaskPlan(reg.layers)
        assert len(plan.spec) == 3  # lengths 16, 9, 7: one FFT each for 8 masks
        for layer, (out, inn) in zip(reg.layers, plan.masks(reg.layers, 5.0, not train)):
            own = layer.masks()
            assert torch.equal(out, own[0]) and torch.equal(inn, own[1])
    # gradients flow through the batched build to every layer's widths and locations
    model.train()
    model(torch.randn(4, 16)).square().sum().backward()
    assert all(l.widths.grad.abs().sum() > 0 and l.locations.grad is not None for l in reg.layers)


def test_width_initialisations_follow_the_official_formulas():
    # splr with ratio r: int(K r / 2) full components, the rest at (r/2) / (1 - r/2) on both axes
    w = init_widths("splr", 0.5, 10, 20, 30, saving=2.0)
    assert (w[:, :2] == 1).all() and torch.allclose(w[:, 2:], torch.full((2, 8), 0.25 / 0.75, dtype=torch.float64))
    # splr without a ratio uses 1 / saving
    assert torch.equal(init_widths("splr", None, 10, 20, 30, 2.0), w)
    # lr0.35: int(0.35 K) full, the rest dead: input width 1/n at even rest positions, output 1/m at odd
    w = init_widths("lr", 0.35, 10, 20, 30, saving=1.0)
    assert (w[:, :3] == 1).all()
    assert torch.equal(w[1, 3:], torch.tensor([1 / 30, 0, 1 / 30, 0, 1 / 30, 0, 1 / 30], dtype=torch.float64))
    assert torch.equal(w[0, 3:], torch.tensor([0, 1 / 20, 0, 1 / 20, 0, 1 / 20, 0], dtype=torch.float64))
    layer = GBLRLinear(nn.Linear(30, 20), 0.5, width_init="lr0.35", location_init="linspace")
    assert torch.allclose(layer.locations, (torch.arange(10) / 10.0).expand(2, 10))
    assert (GBLRLinear(nn.Linear(30, 20), 0.5, location_init="zero").locations == 0).all()
    with pytest.raises(ValueError, match="width_init"):
        GBLRLinear(nn.Linear(30, 20), 0.5, width_init="lr1.5")


@pytest.mark.parametrize("rank", [1, 2])
def test_per_kernel_conv_is_one_matrix_per_tap(rank):
    conv = nn.Conv2d(6, 8, (3, 2), padding=1)
    layer = GBLRConv2d(conv, 1.0, rank, per_kernel=True)
    assert layer.taps == 6 and (layer.m, layer.n) == (8, 6) and layer.widths.shape == (2, 6 * (6 // rank))
    assert (layer.kernel() - conv.weight).abs().max() < 1e-4  # full-rank SVD per tap: the conv itself
    x = torch.randn(2, 6, 7, 7)
    assert torch.allclose(layer(x), conv(x), atol=1e-4)
    with torch.no_grad():  # tap t's matrix is W[:, :, t // kw, t % kw]
        layer.widths[:, :6 // rank] = 0.0  # kill tap 0
    assert (layer.kernel()[:, :, 0, 0] == 0).all() and (layer.kernel()[:, :, 0, 1] != 0).any()
    assert dense_flops(layer, (5, 5)) == 8 * 36 * 25
    assert gblr_flops(layer, (5, 5)) == 5 * (6 // rank) * min(rank * 14, 48) * 25
    layer.eval()
    assert set(candidate_forms(layer, 16)) == {"dense"}  # per-kernel layers deploy dense


def test_layer_choice_follows_the_official_resnet_recipe():
    from wgsef.models import build
    x = torch.randn(2, 3, 16, 16)
    model = build("resnet18", num_classes=10, in_channels=3, image_size=16, width=0.25)
    reg = GBLR(lam=0.1, ratio=1.0)  # layers=auto: ResNet -> residual stages only, shortcuts excluded
    reg.attach(model, x)
    assert reg.names == [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in range(2) for c in (1, 2)]
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert type(model.layer2[0].shortcut[0]) is nn.Conv2d
    vgg = GBLR(lam=0.1, ratio=1.0)
    vgg.attach(build("vgg16", num_classes=10, in_channels=3, image_size=16, width=0.25), x)
    everything = GBLR(lam=0.1, ratio=1.0, layers="all")
    everything.attach(build("resnet18", num_classes=10, in_channels=3, image_size=16, width=0.25), x)
    assert len(vgg.names) == 13 + 2 - 2 and len(everything.names) == 21 - 2  # all but first and last
    with pytest.raises(ValueError, match="layers"):
        GBLR(lam=0.1, ratio=1.0, layers="some")


# --- training reaches its width budget; deployment -------------------------------------------------
def digits_split():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def fit(model, xtr, ytr, epochs, lr, reg=None):
    from wgsef.optim import sgd
    opt = sgd(model, reg or GBLR.__mro__[1](), lr=lr, weight_decay=0.0)
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
                reg.after_step(opt.param_groups[-1]["lr"])


@pytest.mark.parametrize("seed", [0, 1])
def test_short_training_reaches_the_width_target(seed):
    """An invariant of the schedule, not of one trajectory: the total shrink (lam * sum of the weights'
    lr = 1.05 here) exceeds the way down from the initial mean width (0.75), and once at the target the
    shrink pauses, so the mean ends within the shrink per step plus the structural Adam's drift of the
    target. Accuracy only has to stay far above chance (0.1), not near a trajectory-dependent value."""
    xtr, ytr, xte, yte = digits_split()
    xtr, xte = xtr.flatten(1), xte.flatten(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    fit(model, xtr, ytr, 5, 0.05)
    reg = GBLR(lam=0.3, ratio=0.5, target_width=0.25, warmup_epochs=1)
    reg.attach(model, xtr[:2])
    assert reg.mean_width() == 1.0  # splr at ratio 0.5: every component full
    fit(model, xtr, ytr, 4, 0.02, reg)
    metrics = reg.metrics()
    assert abs(metrics["mean_width"] - 0.25) <= 0.05
    # FLOPs follow from the widths: a live component costs at most m' + n' = (w_out + w_in) 128 (+1 from
    # rounding), so over 2 x 64 components of two 128 x 128 layers the ratio is at most the mean width
    gblr, dense = reg.flops()
    assert metrics["flops_ratio"] == gblr / dense <= metrics["mean_width"] + 128 / (2 * 128 * 128)
    reg.finalize(model)
    with torch.no_grad():
        acc = float((model.eval()(xte).argmax(1) == yte).float().mean())
    assert acc > 0.7


def test_default_digits_run_compacts_and_deploys_no_slower_than_dense(make_cfg, tmp_path):
    """`method=gblr` with default settings on digits: the finalized model compacts, has no more
    parameters or FLOPs than dense, and is never slower than dense at batch 64 (1 thread, CPU clock).
    Like with like: a layer deployed dense is the dense model's layer (same type and shape), so it
    costs the same by construction; a layer deployed otherwise must beat the dense layer on its own
    input (medians of alternating timings). Two identical models measured side by side differ by up
    to ~10% on a loaded machine, so the whole-model comparison is only made when some layer differs
    from dense, with that noise allowed for (5%)."""
    from wgsef.distributed import Dist
    from wgsef.measure import latency_ms, measure_model
    from wgsef.run import build, instantiate, measure_run

    cfg = make_cfg("method=gblr", "trainer.progress=false", "measure.min_run_time=0.1", "measure.repeats=5",
                   "measure.batches=[64]")
    trainer = build(cfg, tmp_path, Dist(), torch.device("cpu"))
    tmp_path.mkdir(exist_ok=True)
    trainer.fit()
    reg, spec = trainer.regularizer, trainer.loaders.spec
    inputs = reg._layer_inputs(trainer.model, 64)
    model = reg.finalize(trainer.model)
    summary = measure_run(model, cfg, spec, tmp_path)
    assert summary["compaction"] == "done"
    assert summary["params_compact"] <= summary["params_dense"] and summary["flops_compact"] <= summary["flops_dense"]
    dense = instantiate(cfg.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                        image_size=spec.image_size).eval()
    for name, layer in zip(reg.names, reg.layers):
        deployed, reference = model.get_submodule(name), dense.get_submodule(name)
        if reg.deployment[name] == "dense":
            assert type(deployed) is type(reference) and deployed.weight.shape == reference.weight.shape
        else:
            x = inputs[id(layer)]
            t = {k: sorted(latency_ms(m, x, "cpu", 1, 0.1, clock="cpu") for _ in range(5))[2]
                 for k, m in (("deployed", deployed), ("dense", reference))}
            assert t["deployed"] <= t["dense"], name
    if any(form != "dense" for form in reg.deployment.values()):
        shape = (spec.in_channels, spec.image_size, spec.image_size)
        out = measure_model(dense, model, shape, batches=(64,), threads=1, min_run_time=0.1, repeats=5, clock="cpu")
        assert out["latency_ms_cpu_b64_compact"] <= 1.05 * out["latency_ms_cpu_b64_dense"]


def test_resume_matches_uninterrupted(full_and_resumed):
    """The structural Adam's state and the lr scale travel in the checkpoint: a GBLR run killed after
    epoch 1 and resumed ends exactly like an uninterrupted one (same metrics, same weights)."""
    import pandas as pd

    full_dir, cut_dir = full_and_resumed("method=gblr", "trainer.progress=false", "measure.enabled=false",
                                         "trainer.epochs=3", "regularizer.lam=0.05", "regularizer.warmup_epochs=1")
    full, cut = (pd.read_csv(d / "metrics.csv").drop(columns="time_s") for d in (full_dir, cut_dir))
    pd.testing.assert_frame_equal(full, cut)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False) for d in (full_dir, cut_dir))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["regularizer"]["optimizer"]["steps"] == b["regularizer"]["optimizer"]["steps"] > 0
