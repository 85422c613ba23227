"""WGSEF penalty on a model: the grouped prox/value/gradient against the functional on explicit slices."""
import pytest
import torch
from torch import nn

from wgsef.functional import wgsef_grad_coeffs, wgsef_prox, wgsef_value
from wgsef.optim.prox_sgd import prox_sgd
from wgsef.penalties.wgsef import WGSEF

X = torch.randn(2, 3, 8, 8)


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
    assert attached(k=7, scope="global")[1].metrics()["k"] == 7


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
    assert m["k"] == 6 and m["penalty"] == pytest.approx(float(reg.value()))


@pytest.mark.parametrize("kw, match", [
    ({"k": 0}, "k must"), ({"k": 1.5}, "k must"), ({"k": True}, "k must"), ({"k": 1.0}, "k must"),
    ({"scope": "block"}, "unknown scope"), ({"weights": "params"}, "unknown weights"),
    ({"scheme": "rows"}, "unknown scheme"), ({"finish_epoch": -1}, "finish_epoch"), ({"lam": -1}, "lam"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        WGSEF(**{"lam": 1e-3, "k": 2, **kw})


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
    from wgsef.penalties.base import Regularizer

    data = digits()
    dense, _ = fit(arch, Regularizer(), sgd, epochs, data)
    acc, m = fit(arch, WGSEF(lam=1e-2, k=k, finish_epoch=epochs // 2), prox_sgd, epochs, data)
    print(f"{arch}: dense {dense:.3f}, WGSEF {acc:.3f}, group sparsity {m['group_sparsity']:.3f}, "
          f"param sparsity {m['param_sparsity']:.3f}")
    assert m["group_sparsity"] >= 1 - k - 0.02 and m["nonzero_groups"] == m["k"]
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
