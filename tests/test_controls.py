"""Fair controls (issue 20): gradual magnitude pruning (method=gmp) and one ranking rule for the k kept groups."""
import math

import pytest
import torch

from tests.test_wgsef_penalty import CONFIGS, X, attached, filter_slices, per_layer_nonzero, slice_norms, small_net
from wgsef.functional import wgsef_prox
from wgsef.optim.hspg import HSPG
from wgsef.regularizers.wgsef import WGSEF, closing_mu


# ------------------------------------------------------------------------------- gradual magnitude pruning
def zhu_gupta_sparsity(t, t0, n, dt, s_i, s_f):
    """Zhu & Gupta (2017), eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3 for t in [t0, t0 + n dt]."""
    t = min(max(t, t0), t0 + n * dt)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("start, finish", [(0, 9), (2, 7)])
def test_gradual_schedule_is_the_cubic_closed_form(start, finish):
    """Per scope, the kept count at every epoch is n (1 - s_t) rounded, s_t the closed form with s_i = 0 and
    s_f = 1 - k / n, one pruning step per epoch (dt = 1, n_steps = finish - start); exactly k from finish on."""
    _, reg = attached(lam=0.0, k=0.25, finish="gradual", finish_epoch=finish, continuation_start=start)
    sizes = [4, 6, 5]
    assert reg.ks == [1, 2, 1]
    for epoch in range(12):
        for n, k, kept in zip(sizes, reg.ks, reg.gradual_ks(epoch)):
            s_t = zhu_gupta_sparsity(epoch, start, finish - start, 1, 0.0, 1 - k / n)
            assert abs(kept - n * (1 - s_t)) <= 0.5 + 1e-9
        if epoch <= start:
            assert reg.gradual_ks(epoch) == sizes
        if epoch >= finish:
            assert reg.gradual_ks(epoch) == reg.ks
    ks = [reg.gradual_ks(e) for e in range(12)]
    assert all(a >= b for prev, cur in zip(ks, ks[1:]) for a, b in zip(prev, cur))  # never grows back


def sgd_epoch(net, opt, reg, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(4, 3, 8, 8)).pow(2).sum().backward()
        opt.step()
        reg.after_step(0.1)


def test_gmp_prunes_by_schedule_holds_pruned_groups_at_zero_and_ends_at_exactly_k():
    from wgsef.optim import sgd

    torch.manual_seed(0)
    net, reg = attached(lam=0.0, k=0.25, finish="gradual", finish_epoch=5)
    opt = sgd(net, reg, lr=0.1, momentum=0.9, weight_decay=1e-2)
    pruned = torch.zeros(len(reg.groups), dtype=torch.bool)
    for epoch in range(8):
        before = torch.cat([slice_norms(layer) for layer in filter_slices(net)])
        reg.on_epoch_start(epoch, 8)
        after = torch.cat([slice_norms(layer) for layer in filter_slices(net)])
        zero = after == 0
        assert per_layer_nonzero(reg) == reg.gradual_ks(epoch)
        assert not (pruned & ~zero).any()  # a pruned group never comes back
        for lo, hi, kept in zip([0, 4, 10], [4, 10, 15], reg.gradual_ks(epoch)):  # the largest survivors, untouched
            alive = [j for j in range(lo, hi) if not pruned[j]]
            top = sorted(alive, key=lambda j: -float(before[j]))[:kept]
            assert set((~zero[lo:hi]).nonzero().flatten().add(lo).tolist()) == set(top)
            assert torch.equal(after[top], before[top])
        pruned |= zero
        sgd_epoch(net, opt, reg)  # momentum and weight decay would revive a zero group if it were not held
        norms = torch.cat([slice_norms(layer) for layer in filter_slices(net)])
        assert (norms[pruned] == 0).all()
    assert per_layer_nonzero(reg) == reg.ks and reg.all_held and reg.metrics()["nonzero_groups"] == sum(reg.ks)
    assert reg.metrics()["prox_zeroed_groups"] == 0  # the schedule pruned them all, not a prox


def test_gmp_resumes_mid_window():
    net, reg = attached(lam=0.0, k=0.25, finish="gradual", finish_epoch=5)
    for epoch in range(3):
        reg.on_epoch_start(epoch, 8)
    fresh = WGSEF(lam=0.0, k=0.25, finish="gradual", finish_epoch=5)
    fresh.attach(net, X)
    fresh.load_state_dict(reg.state_dict())
    fresh.on_epoch_start(3, 8)
    reg.on_epoch_start(3, 8)
    assert torch.equal(fresh.keep, reg.keep) and per_layer_nonzero(fresh) == fresh.gradual_ks(3)


def test_gradual_needs_a_finish_epoch_and_without_a_window_prunes_at_once():
    with pytest.raises(ValueError, match="finish=gradual needs a finish_epoch"):
        WGSEF(lam=0.0, k=0.5, finish="gradual")
    _, reg = attached(lam=0.0, k=0.25, finish="gradual", finish_epoch=0)  # a 1-epoch run: finish_epoch 0
    assert reg.gradual_ks(0) == reg.ks
    reg.on_epoch_start(0, 1)
    assert per_layer_nonzero(reg) == reg.ks


def test_gmp_preset_shares_wgsef_conts_window_and_finish(make_cfg):
    cfg = make_cfg("method=gmp", "trainer.epochs=12")
    cont = make_cfg("method=wgsef_cont", "trainer.epochs=12")
    assert cfg.label == "gmp" and cfg.regularizer.lam == 0 and cfg.regularizer.finish == "gradual"
    assert cfg.optimizer._target_ == "wgsef.optim.sgd"
    assert (cfg.regularizer.finish_epoch, cfg.regularizer.continuation_start) == \
        (cont.regularizer.finish_epoch, cont.regularizer.continuation_start) == (9, 0)
    from omegaconf import OmegaConf

    for table in ("table_fmnist", "table_cifar10", "table_cifar100"):  # every paper table runs the control
        spec = OmegaConf.load(CONFIGS / "experiment" / f"{table}.yaml").hydra.sweeper.params.method.split(",")
        assert {"gmp", "magnitude", "wgsef"} <= set(spec), table


# -------------------------------------------------------------------------- one ranking of the kept groups
def brute_ranked(a, d, k):
    """The k groups with the largest a_j / sqrt(d_j), by explicit sorting (ties: lower index)."""
    r = [float(x) / math.sqrt(float(w)) for x, w in zip(a, d)]
    return set(sorted(range(len(r)), key=lambda j: (-r[j], j))[:k])


def scaled_net(seed):
    """small_net with its filter groups rescaled so that a / sqrt(d) and a rank differently."""
    torch.manual_seed(seed)
    net = small_net()
    with torch.no_grad():
        for layer in filter_slices(net):
            for group in layer:
                scale = float(torch.empty(()).uniform_(0.2, 3.0))
                for t in group:
                    t.mul_(scale)
    return net


@pytest.mark.parametrize("seed", range(4))
def test_every_step_that_keeps_k_groups_keeps_the_same_k(seed):
    """Global scope, flops weights: the top-k finish, gradual pruning's last step, HSPG's protected set,
    closing_mu and the prox at closing_mu all keep the top k by a / sqrt(d) (the prox's own order)."""
    k = 5
    net = scaled_net(seed)
    make = lambda **kw: WGSEF(lam=1e-3, k=k, scope="global", weights="flops", finish_epoch=1, **kw)  # noqa: E731
    reg = make()
    reg.attach(net, X)
    a, d = reg.groups.norms().double(), reg.d.double()
    assert d.std() > 0.1  # unequal weights
    want = brute_ranked(a, d, k)
    by_norm = set(a.topk(k).indices.tolist())
    nonzero = lambda mask: set(mask.nonzero().flatten().tolist())  # noqa: E731

    mu, keep = closing_mu(a, k, d)
    assert nonzero(keep) == want
    assert nonzero(wgsef_prox(a, k, mu * (1 + 1e-9), d) > 0) == want  # the prox itself leaves exactly these
    assert nonzero(reg.keep_rank(a) < k) == want
    hspg = HSPG(list(net.parameters()), reg, lr=0.1, n_p=0)
    outside, _ = hspg._candidates(reg.groups.norms())
    assert nonzero(~outside) == want  # HSPG protects the same k

    for other in (make(), WGSEF(lam=0.0, k=k, scope="global", weights="flops", finish="gradual", finish_epoch=1)):
        other.attach(scaled_net(seed), X)
        other.on_epoch_start(1, 3)  # the top-k finish / gradual pruning's last step
        assert nonzero(other.groups.norms() > 0) == want, other.finish_mode
    if seed == 0:
        assert by_norm != want  # the test tells the rankings apart
