"""ProxSGD / ProxAdamW = the base optimizer's step on the loss gradient, then the penalty's prox at the
current learning rate (one `Proximal` wrapper)."""
import copy

import pytest
import torch
from torch import nn

from wgsef.functional import wgsef_prox
from wgsef.optim import param_groups
from wgsef.optim.prox_adamw import prox_adamw
from wgsef.optim.prox_sgd import ProxSGD, prox_sgd
from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.wgsef import WGSEF

X = torch.randn(2, 3, 8, 8)


def setup(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(96, 5), nn.ReLU(), nn.Linear(5, 3))
    reg = WGSEF(lam=2.0, k=2)
    reg.attach(net, X)
    return net, reg


def batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def train(net, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)


@pytest.mark.parametrize("scheduler", [None, step_lr])
@pytest.mark.parametrize("nesterov", [False, True])
def test_step_is_sgd_then_prox_at_current_lr(scheduler, nesterov):
    net, reg = setup()
    ref_net = copy.deepcopy(net)
    ref_reg = WGSEF(lam=2.0, k=2)
    ref_reg.attach(ref_net, X)
    opt = prox_sgd(net, reg, lr=0.2, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    ref = torch.optim.SGD(param_groups(ref_net, ref_reg, 1e-2), lr=0.2, momentum=0.9, nesterov=nesterov)
    sched, ref_sched = (scheduler(opt), scheduler(ref)) if scheduler else (None, None)
    for x, y in batches(4):
        for n, o in ((ref_net, ref), (net, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(n(x), y).backward()
        opt.step()
        ref.step()
        ref_reg.prox_(ref.param_groups[0]["lr"])  # the grouped params' group comes first
        for s in (sched, ref_sched):
            if s is not None:
                s.step()
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_momentum_sees_only_the_loss_gradient():
    net, reg = setup()
    reg.weight_decay = 0.0  # the grouped parameters' own weight decay (regularizer.weight_decay=0)
    opt = prox_sgd(net, reg, lr=0.1, momentum=0.9, weight_decay=0.1)
    grouped = {id(p) for p in reg.groups.params()}
    train(net, opt, batches(1))
    for p in net.parameters():
        buf = opt.state[p]["momentum_buffer"]
        if id(p) in grouped:
            assert torch.equal(buf, p.grad)  # no weight decay, no penalty term
        else:
            assert not torch.equal(buf, p.grad)  # the classifier gets weight decay
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert {id(p) for p in opt.param_groups[0]["params"]} == grouped


@pytest.mark.parametrize("factory", [prox_sgd, prox_adamw])
def test_one_weight_decay_rule_grouped_params_get_the_optimizers(factory):
    """By default the penalty is added to weight decay, never substituted: every parameter, grouped or not,
    gets the optimizer's weight decay (the same rule as magnitude, gmp and dense)."""
    net, reg = setup()
    opt = factory(net, reg, lr=0.1, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1]
    assert len(opt.param_groups[0]["params"]) == len(list(net.parameters()))
    assert {id(p) for p in reg.groups.params()} <= {id(p) for p in opt.param_groups[0]["params"]}


def test_state_dict_round_trip_gives_identical_steps():
    data = batches(4)
    net, reg = setup()
    opt = prox_sgd(net, reg, lr=0.1, momentum=0.9)
    sched = step_lr(opt)
    train(net, opt, data[:2], sched)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), sched.state_dict(), reg.state_dict()))
    train(net, opt, data[2:], sched)

    net2, reg2 = setup(seed=5)
    net2.load_state_dict(saved[0])
    reg2.load_state_dict(saved[3])
    opt2 = prox_sgd(net2, reg2, lr=0.1, momentum=0.9)
    sched2 = step_lr(opt2)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    train(net2, opt2, data[2:], sched2)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_needs_an_attached_group_penalty():
    net, _ = setup()
    with pytest.raises(ValueError, match="needs a group penalty"):
        prox_sgd(net, Regularizer(), lr=0.1)
    with pytest.raises(ValueError, match="attach the regularizer"):
        prox_sgd(net, WGSEF(lam=1e-3, k=2), lr=0.1)


def test_grouped_params_must_share_one_param_group():
    net, reg = setup()
    halves = reg.groups.params()
    with pytest.raises(ValueError, match="one param group"):
        ProxSGD([{"params": halves[:1]}, {"params": halves[1:]}], reg, lr=0.1)


def group_slices(net):
    """Per layer, per filter group: the explicit tensor slices (views) of `setup`'s network."""
    conv0, bn1, conv3, fc6 = net[0], net[1], net[3], net[6]
    return [[[conv0.weight[o], conv0.bias[o], bn1.weight[o], bn1.bias[o]] for o in range(4)],
            [[conv3.weight[o], conv3.bias[o]] for o in range(6)],
            [[fc6.weight[o], fc6.bias[o]] for o in range(5)]]


@torch.no_grad()
def functional_prox_(net, k, mu):
    """The prox of mu * WGSEF_k per layer, applied with wgsef.functional on explicit slices; the smallest
    factor it scaled a group by."""
    smallest = 1.0
    for layer in group_slices(net):
        a = torch.stack([sum(t.pow(2).sum() for t in group).sqrt() for group in layer])
        factors = wgsef_prox(a, k, mu) / a
        smallest = min(smallest, float(factors.min()))
        for group, f in zip(layer, factors):
            for t in group:
                t.mul_(f)
    return smallest


@pytest.mark.parametrize("factory, base, kw", [
    (prox_sgd, torch.optim.SGD, {"momentum": 0.9}),
    (prox_adamw, torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-6}),
])
def test_step_is_the_base_step_then_the_functional_prox(factory, base, kw):
    net, reg = setup()
    ref_net = copy.deepcopy(net)
    slices = group_slices(net)
    assert torch.allclose(torch.stack([sum(t.pow(2).sum() for t in g).sqrt() for layer in slices for g in layer]),
                          reg.groups.norms())  # the slices are the penalty's groups
    reg.weight_decay = 0.0
    opt = factory(net, reg, lr=0.05, weight_decay=1e-2, **kw)
    grouped = [p for i in (0, 1, 3, 6) for p in ref_net[i].parameters()]
    rest = list(ref_net[8].parameters())
    ref = base([{"params": grouped, "weight_decay": 0.0}, {"params": rest, "weight_decay": 1e-2}], lr=0.05, **kw)
    sched, ref_sched = step_lr(opt), step_lr(ref)
    shrink = []
    for x, y in batches(3):
        for n, o in ((net, opt), (ref_net, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(n(x), y).backward()
        opt.step()
        ref.step()
        shrink.append(functional_prox_(ref_net, 2, ref.param_groups[0]["lr"] * 2.0))
        sched.step()
        ref_sched.step()
        with torch.no_grad():  # each step from the same parameters: Adam would amplify last-bit differences
            for p, q in zip(net.parameters(), ref_net.parameters()):
                assert torch.allclose(p, q, atol=1e-6)
                q.copy_(p)
    assert min(shrink) < 0.95  # the prox did shrink groups: the test can tell a missing prox


def test_prox_adamw_grouped_params_take_the_penalty_s_own_weight_decay():
    net, reg = setup()
    reg.weight_decay = 0.0
    opt = prox_adamw(net, reg, lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in reg.groups.params()}
