"""WGSEF penalty on a model: the grouped prox/value/gradient against the functional on explicit slices."""
from pathlib import Path

import pytest
import torch
from torch import nn

from wgsef.functional import wgsef_grad_coeffs, wgsef_prox, wgsef_value
from wgsef.optim.prox_sgd import prox_sgd
from wgsef.regularizers.wgsef import WGSEF, closing_mu

X = torch.randn(2, 3, 8, 8)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small_net():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(96, 5), nn.ReLU(), nn.Linear(5, 3))
    for bn in (net[1], net[4]):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return net


def filter_slices(net):
    """Per layer, per filter group: the explicit tensor slices (views) that make up the group."""
    conv0, bn1, conv3, bn4, fc7 = net[0], net[1], net[3], net[4], net[7]
    return [[[conv0.weight[o], conv0.bias[o], bn1.weight[o], bn1.bias[o]] for o in range(4)],
            [[conv3.weight[o], bn4.weight[o], bn4.bias[o]] for o in range(6)],
            [[fc7.weight[o], fc7.bias[o]] for o in range(5)]]


def slice_norms(layer):
    return torch.stack([sum(t.detach().pow(2).sum() for t in group).sqrt() for group in layer])


SIZES = [30.0] * 4 + [38.0] * 6 + [97.0] * 5  # 27+1+2, 36+2, 96+1


def hand_weights(kind):
    d = torch.tensor(SIZES)
    return torch.ones(15) if kind == "ones" else d / d.mean()


def attached(**kw):
    net = small_net()
    reg = WGSEF(**{"lam": 0.5, "k": 2, **kw})
    reg.attach(net, X)
    return net, reg


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("weights", ["ones", "size"])
def test_prox_is_functional_prox_on_slices(scope, weights):
    net, reg = attached(scope=scope, weights=weights, k=2 if scope == "layer" else 5)
    layers = filter_slices(net)
    a = [slice_norms(layer) for layer in layers]
    d = hand_weights(weights).split([4, 6, 5])
    lr, lam = 0.3, reg.lam
    if scope == "layer":
        new = [wgsef_prox(ai, 2, lr * lam, weights=di) for ai, di in zip(a, d)]
    else:
        new = torch.cat(a).detach()
        new = wgsef_prox(new, 5, lr * lam, weights=torch.cat(d)).split([4, 6, 5])
    expected = [[[t.detach() * (nw / old) for t in group] for group, old, nw in zip(layer, ai, ni)]
                for layer, ai, ni in zip(layers, a, new)]
    reg.prox_(lr)
    for layer, exp_layer in zip(layers, expected):
        for group, exp_group in zip(layer, exp_layer):
            for t, e in zip(group, exp_group):
                assert torch.allclose(t.detach(), e, rtol=1e-5, atol=1e-7)
    factors = torch.cat(new) / torch.cat(a)
    assert factors.max() - factors.min() > 0.05  # not a uniform shrink: the test can tell groups apart


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_value_and_grad_coeffs_are_functional_per_scope(scope):
    net, reg = attached(scope=scope, weights="size", k=2)
    a = [slice_norms(layer) for layer in filter_slices(net)]
    d = hand_weights("size").split([4, 6, 5])
    if scope == "layer":
        value = sum(wgsef_value(ai, 2, weights=di) for ai, di in zip(a, d))
        coeffs = torch.cat([wgsef_grad_coeffs(ai, 2, weights=di) for ai, di in zip(a, d)])
    else:
        value = wgsef_value(torch.cat(a), 2, weights=torch.cat(d))
        coeffs = wgsef_grad_coeffs(torch.cat(a), 2, weights=torch.cat(d))
    assert torch.allclose(reg.value(), value)
    assert torch.allclose(reg.grad_coeffs(reg.groups.norms()), coeffs)


def test_k_as_fraction_and_count():
    assert attached(k=0.5)[1].ks == [2, 3, 3]  # round half up of 2, 3, 2.5
    assert attached(k=0.3)[1].ks == [1, 2, 2]
    assert attached(k=0.3, scope="global")[1].ks == [5]  # 4.5 -> 5
    assert attached(k=0.01)[1].ks == [1, 1, 1]
    assert attached(k=5)[1].ks == [4, 5, 5]  # a count is capped at the layer's groups
    assert attached(k=7, scope="global")[1].metrics()["k_groups"] == 7


@pytest.mark.parametrize("kind", ["size", "flops"])
def test_weights_positive_mean_one(kind):
    _, reg = attached(weights=kind)
    raw = reg.groups.sizes if kind == "size" else reg.groups.flops
    assert (reg.d > 0).all() and torch.isclose(reg.d.mean(), torch.tensor(1.0))
    assert torch.allclose(reg.d, raw / raw.mean())
    assert len(set(reg.d.tolist())) == 3  # three layers, three group sizes / FLOPs


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prox_keeps_at_least_k_groups(scope):
    net, reg = attached(scope=scope, lam=50.0, k=3, weights="flops")
    for _ in range(5):
        reg.prox_(1.0)
        nonzero = [int((n > 0).sum()) for n in reg.groups.split(reg.groups.norms())]
        assert (sum(nonzero) >= 3) if scope == "global" else all(nz >= 3 for nz in nonzero)
    assert reg.metrics()["group_sparsity"] > 0  # a strong penalty does remove groups


def test_finish_keeps_exactly_k_and_freezes():
    net, reg = attached(k=2, finish_epoch=1, lam=1e-3)
    reg.on_epoch_start(0, 5)
    assert reg.keep is None and reg.metrics()["nonzero_groups"] == 15
    top = [n.topk(2).indices for n in reg.groups.split(reg.groups.norms())]
    reg.on_epoch_start(1, 5)
    for block_norms, idx in zip(reg.groups.split(reg.groups.norms()), top):
        assert set((block_norms > 0).nonzero().flatten().tolist()) == set(idx.tolist())
    m = reg.metrics()
    assert m["nonzero_groups"] == 6 and m["group_sparsity_before_finish"] == 0
    assert m["group_sparsity_after_finish"] == pytest.approx(9 / 15)
    kept_before = reg.groups.norms()
    opt = prox_sgd(net, reg, lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
        opt.step()
        reg.after_step(0.1)
        reg.on_epoch_start(2, 5)
        norms = reg.groups.norms()
        assert ((norms > 0) == reg.keep).all()
    assert not torch.allclose(norms[reg.keep], kept_before[reg.keep])  # the kept groups are fine-tuned
    assert (reg.grad_coeffs(norms) == 0).all()


def test_prox_is_off_after_finish():
    net, reg = attached(k=2, finish_epoch=0, lam=10.0)
    reg.on_epoch_start(0, 1)
    before = reg.groups.norms()
    reg.prox_(1.0)
    assert torch.equal(reg.groups.norms(), before)


def test_state_dict_resumes_the_finish():
    net, reg = attached(k=2, finish_epoch=0)
    reg.on_epoch_start(0, 3)
    fresh = WGSEF(lam=0.5, k=2, finish_epoch=0)
    fresh.attach(net, X)
    fresh.load_state_dict(reg.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    fresh.on_epoch_start(1, 3)  # no second projection: the loaded support stays
    fresh.after_step(0.1)
    assert torch.equal(fresh.groups.norms() > 0, reg.keep)
    assert {k: v for k, v in fresh.metrics().items() if "finish" in k} == \
        {k: v for k, v in reg.metrics().items() if "finish" in k}


def test_metrics_count_from_weights():
    net, reg = attached(k=2)
    with torch.no_grad():
        net[3].weight[:2] = 0
        net[4].weight[:2] = 0
        net[4].bias[:2] = 0
        net[0].weight[0, 0] = 0
    m = reg.metrics()
    numel = sum(p.numel() for p in reg.groups.params())
    assert m["nonzero_groups"] == 13 and m["group_sparsity"] == pytest.approx(2 / 15)
    assert m["param_sparsity"] == pytest.approx((2 * 36 + 4 + 9) / numel)
    assert m["k_groups"] == 6 and m["penalty"] == pytest.approx(float(reg.value()))


@pytest.mark.parametrize("kw, match", [
    ({"k": 0}, "k must"), ({"k": 1.5}, "k must"), ({"k": True}, "k must"), ({"k": 1.0}, "k must"),
    ({"scope": "block"}, "unknown scope"), ({"weights": "params"}, "unknown weights"),
    ({"scheme": "rows"}, "unknown scheme"), ({"finish_epoch": -1}, "finish_epoch"), ({"lam": -1}, "lam"),
    ({"finish": "prox"}, "unknown finish"), ({"finish": "continuation"}, "needs lam > 0 and a finish_epoch"),
    ({"finish": "continuation", "finish_epoch": 3, "lam": 0}, "lam > 0"), ({"finish": "continuation", "finish_epoch": 3, "lam_final": 1e-4}, "lam_final"),
    ({"continuation_start": -1}, "continuation_start"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        WGSEF(**{"lam": 1e-3, "k": 2, **kw})


# ----------------------------------------------------------------------- lambda continuation and magnitude
def per_layer_nonzero(reg):
    return [int((n > 0).sum()) for n in reg.groups.split(reg.groups.norms())]


def brute_top_k(norms, k):
    values = norms.tolist()
    return set(sorted(range(len(values)), key=lambda j: -values[j])[:k])


@pytest.mark.parametrize("weighted", [False, True])
def test_closing_mu_is_the_smallest_mu_whose_prox_leaves_k(weighted):
    g = torch.Generator().manual_seed(3)
    checked = 0
    for _ in range(150):
        n = int(torch.randint(2, 40, (1,), generator=g))
        k = int(torch.randint(1, n, (1,), generator=g))
        a = torch.rand(n, generator=g, dtype=torch.float64) * 10 ** float(torch.randn(1, generator=g))
        a[torch.rand(n, generator=g) < 0.2] = 0
        if int((a > 0).sum()) <= k:
            continue
        d = torch.rand(n, generator=g, dtype=torch.float64) + 0.2 if weighted else None
        dd = torch.ones_like(a) if d is None else d
        mu, keep = closing_mu(a, k, d)
        tol = 1e-9 * float(a.max())
        for f in (1.0, 1.5, 10.0):  # from mu on: exactly the k kept groups, each ridge-shrunk
            new = wgsef_prox(a, k, mu * f, weights=d)
            assert torch.allclose(new, torch.where(keep, a / (1 + mu * f * dd), 0.0), rtol=1e-6, atol=tol)
        assert int((wgsef_prox(a, k, mu * (1 - 1e-3), weights=d) > tol).sum()) > k  # just below: more than k
        assert set(keep.nonzero().flatten().tolist()) == brute_top_k(a / dd.sqrt(), k)
        checked += 1
    assert checked > 50


def test_closing_mu_on_a_tie_keeps_k_by_index():
    mu, keep = closing_mu(torch.tensor([1.0, 1.0, 0.5]), 1)
    assert mu == 0.0 and int(keep.sum()) == 1


def test_continuation_lambda_grows_geometrically_to_lam_final():
    _, reg = attached(lam=1e-3, finish="continuation", finish_epoch=5, continuation_start=1, lam_final=10.0)
    lams = []
    for epoch in range(5):
        reg.on_epoch_start(epoch, 8)
        lams.append(reg.metrics()["lam_eff"])
    assert lams == pytest.approx([1e-3, 1e-3, 1e-2, 1e-1, 1.0])


def test_continuation_holds_a_scope_on_the_step_its_prox_leaves_k():
    net, reg = attached(k=2, lam=1.0, finish="continuation", finish_epoch=5)
    with torch.no_grad():  # the first layer already has only k = 2 nonzero filters
        for t in (net[0].weight, net[0].bias, net[1].weight, net[1].bias):
            t[2:] = 0
    reg.on_epoch_start(0, 8)
    layers = filter_slices(net)
    before = [slice_norms(layer) for layer in layers]
    reg.prox_(1e-3)
    assert reg.held.tolist() == [True] * 4 + [False] * 11
    after = [slice_norms(layer) for layer in layers]
    assert torch.allclose(after[0], before[0])  # a held scope: the prox is off
    assert not torch.allclose(after[1], before[1])  # the others: prox
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)  # a gradient step regrows every group
    reg.after_step(1e-3)
    assert per_layer_nonzero(reg) == [2, 6, 5]  # the held zero groups are back at zero
    m = reg.metrics()
    assert m["prox_zeroed_groups"] == 2 and m["k_groups"] == 6 and m["lam_eff"] == 1.0


@pytest.mark.parametrize("weights", ["ones", "size"])
def test_continuation_prox_reaching_k_keeps_the_kept_groups_scale(weights):
    """Once mu passes closing_mu the prox leaves k groups per scope; the rescale gives each scope its
    largest norm back, so with weights ones the kept groups are untouched."""
    net, reg = attached(k=2, lam=1.0, finish="continuation", finish_epoch=5, weights=weights)
    reg.on_epoch_start(0, 8)
    a = reg.groups.norms()
    mus = [closing_mu(a[s].double(), k, None if d is None else d.double())[0] for s, k, d in reg._scopes(a)]
    reg.prox_(2 * max(mus))
    assert reg.held.all() and per_layer_nonzero(reg) == [2, 2, 2]
    new = reg.groups.norms()
    for s, k, d in reg._scopes(a):
        dd = torch.ones(s.stop - s.start) if d is None else d
        assert (new[s] > 0).nonzero().flatten().tolist() == sorted(brute_top_k(a[s] / dd.sqrt(), k))
        assert torch.isclose(new[s].max(), a[s].max())
        if weights == "ones":
            assert torch.allclose(new[s][new[s] > 0], a[s][new[s] > 0])
    reg.on_epoch_start(1, 8)
    assert reg.all_held and reg.metrics()["lam_eff"] == 0.0 and "closing_mu" not in reg.metrics()


@pytest.mark.parametrize("weights", ["ones", "size"])
def test_continuation_closing_step_is_the_prox_at_closing_mu(weights):
    net, reg = attached(k=2, lam=1e-3, finish="continuation", finish_epoch=1, weights=weights)
    reg.on_epoch_start(0, 3)
    reg.prox_(0.1)  # a tiny mu: no scope reached
    a = reg.groups.norms().double()
    expected = []
    for s, k, d in reg._scopes(a):
        mu, _ = closing_mu(a[s], k, d)
        new = wgsef_prox(a[s], k, mu * (1 + 1e-9), weights=d)  # the prox itself, then the scope's rescale
        expected.append(new * a[s].max() / new.max())
    reg.on_epoch_start(1, 3)
    assert torch.allclose(reg.groups.norms().double(), torch.cat(expected), rtol=1e-5, atol=1e-7)
    m = reg.metrics()
    assert per_layer_nonzero(reg) == [2, 2, 2] and m["nonzero_groups"] == m["k_groups"] == 6
    assert m["prox_zeroed_groups"] == 9 and m["closing_mu"] > 0 and m["lam_eff"] == 0.0
    state = reg.state_dict()
    fresh = WGSEF(lam=1e-3, k=2, finish="continuation", finish_epoch=1, weights=weights)
    fresh.attach(net, X)
    fresh.load_state_dict(state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    fresh.on_epoch_start(2, 3)  # no second closing step: the loaded support is held
    fresh.after_step(0.1)
    assert torch.equal(fresh.groups.norms() > 0, reg.keep) and fresh.metrics()["prox_zeroed_groups"] == 9


def test_magnitude_keeps_exactly_the_k_largest_norm_groups():
    """lam = 0 and the top-k finish: dense SGD (weight decay on every parameter), then the k largest-norm
    groups of each layer, checked against a brute-force top-k of explicit slice norms."""
    from wgsef.optim import sgd

    net, reg = attached(lam=0.0, k=3, finish_epoch=1)
    assert reg.param_groups(net) == []  # no penalty: the grouped parameters keep the optimizer's weight decay
    opt = sgd(net, reg, lr=0.1, weight_decay=1e-2)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-2
    reg.on_epoch_start(0, 3)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
        opt.step()
        reg.after_step(0.1)
    assert per_layer_nonzero(reg) == [4, 6, 5] and reg.metrics()["lam_eff"] == 0.0
    before = [slice_norms(layer) for layer in filter_slices(net)]
    reg.on_epoch_start(1, 3)
    after = [slice_norms(layer) for layer in filter_slices(net)]
    for b, a in zip(before, after):
        kept = brute_top_k(b, 3)
        assert set((a > 0).nonzero().flatten().tolist()) == kept
        assert torch.allclose(a[sorted(kept)], b[sorted(kept)])  # kept groups are not shrunk
    m = reg.metrics()
    assert m["nonzero_groups"] == m["k_groups"] == 9 and m["prox_zeroed_groups"] == 0


def test_magnitude_preset_and_tables(make_cfg):
    from omegaconf import OmegaConf

    cfg = make_cfg("method=magnitude", "trainer.epochs=20")
    assert cfg.label == "magnitude" and cfg.regularizer.lam == 0 and cfg.regularizer.finish == "top_k"
    assert cfg.regularizer.finish_epoch == 15 and cfg.optimizer._target_ == "wgsef.optim.sgd"
    wgsef = make_cfg("method=wgsef", "trainer.epochs=20")
    assert wgsef.regularizer.k == cfg.regularizer.k and wgsef.regularizer.finish_epoch == 15
    for table in ("table_fmnist", "table_cifar10", "table_cifar100"):
        spec = OmegaConf.load(CONFIGS / "experiment" / f"{table}.yaml").hydra.sweeper.params.method.split(",")
        assert "magnitude" in spec and "wgsef" in spec, table


# ------------------------------------------------------------------------------- a tiny real training run
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = nn.functional.interpolate(torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, size=16,
                                  mode="bilinear")
    x, y = (x - x.mean()) / x.std(), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def fit(arch, reg, make_opt, epochs, data):
    from wgsef.models import build

    (x, y), (x_test, y_test) = data
    torch.manual_seed(0)
    model = reg.attach(build(arch, 10, 1, 16, **({} if arch == "lenet5" else {"width": 0.25})), x[:8])
    opt = make_opt(model, reg, lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        reg.on_epoch_start(epoch, epochs)
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            reg.after_step(opt.param_groups[0]["lr"])
        sched.step()
    model.eval()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean()), reg.metrics()


@pytest.mark.parametrize("arch, k, epochs", [
    ("lenet5", 0.5, 10), pytest.param("vgg16", 0.3, 8, marks=pytest.mark.slow)])
def test_digits_training_reaches_group_sparsity_at_small_accuracy_loss(arch, k, epochs):
    from wgsef.optim import sgd
    from wgsef.regularizers.base import Regularizer

    data = digits()
    dense, _ = fit(arch, Regularizer(), sgd, epochs, data)
    acc, m = fit(arch, WGSEF(lam=1e-2, k=k, finish_epoch=epochs // 2), prox_sgd, epochs, data)
    print(f"{arch}: dense {dense:.3f}, WGSEF {acc:.3f}, group sparsity {m['group_sparsity']:.3f}, "
          f"param sparsity {m['param_sparsity']:.3f}")
    assert m["group_sparsity"] >= 1 - k - 0.02 and m["nonzero_groups"] == m["k_groups"]
    assert acc >= dense - 0.035 and dense > 0.9


@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "mobilenetv1"])
def test_finished_model_compacts_without_changing_its_outputs(arch):
    """Zero filter groups are removable: wgsef.compress drops them and the outputs stay the same."""
    from wgsef.compress import compact
    from wgsef.models import build

    net = build(arch, 10, 3, 16, width=0.25)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # nonzero statistics and shifts, so a half-removed channel would show
            m.running_mean.normal_()
            m.bias.data.normal_()
    x = torch.randn(4, 3, 16, 16)
    reg = WGSEF(lam=1e-3, k=0.4, finish_epoch=0)
    reg.attach(net, x)
    reg.on_epoch_start(0, 1)
    net.eval()
    small = compact(net, x)
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())
    assert torch.allclose(small(x), net(x), atol=1e-5)


@pytest.mark.parametrize("arch, epochs", [("lenet5", 10), pytest.param("vgg16", 12, marks=pytest.mark.slow)])
def test_digits_continuation_reaches_k_per_scope_without_a_top_k(arch, epochs):
    """Guaranteed by the schedule: a scope is held once its prox leaves k groups, and at finish_epoch the
    closing prox step (closing_mu) makes every scope still open reach k; no zero comes from a top-k."""
    reg = WGSEF(lam=1e-3, k=0.5, finish="continuation", finish_epoch=epochs * 3 // 4, lam_final=100.0)
    acc, m = fit(arch, reg, prox_sgd, epochs, digits())
    print(f"{arch}: continuation {acc:.3f}, reached k by the ramp alone: {'closing_mu' not in m}, "
          f"closing mu {m.get('closing_mu', 0):.3g}")
    assert per_layer_nonzero(reg) == reg.ks and reg.all_held
    assert m["nonzero_groups"] == m["k_groups"] and m["prox_zeroed_groups"] == len(reg.groups) - m["k_groups"]
    assert acc > 0.85  # the rescaled steps keep the network's scale: no collapse (dense: ~0.96)
