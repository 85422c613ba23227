"""Group lasso (docs/methods.md section 2): value, prox and gradient against independent references."""
import cvxpy as cp
import numpy as np
import pytest
import torch

from wgsef.groups.base import GroupBlock, GroupSet, Member
from wgsef.models.lenet import LeNet5
from wgsef.regularizers.group_lasso import GroupLasso


def two_layer_groups(seed=0):
    """Filter-like groups (rows of W plus the bias entry) and shape-like groups (columns of V)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    groups = GroupSet([GroupBlock("conv", [Member(w, (5, 12), (0,)), Member(b, (5,), (0,))]),
                       GroupBlock("fc", [Member(v, (4, 6), (1,))])])
    return groups, (w, b, v)


def group_vectors(w, b, v):
    """Each group's entries as one vector, sliced by hand (the independent reference)."""
    return [torch.cat([w[o].flatten(), b[o:o + 1]]) for o in range(5)] + [v[:, c] for c in range(6)]


def penalty(groups, lam=1.0, weights="sqrt_size"):
    pen = GroupLasso(lam, weights=weights)
    pen.groups = groups
    return pen


@pytest.mark.parametrize("weights", ["sqrt_size", "ones"])
def test_value_is_weighted_sum_of_plain_norms(weights):
    groups, params = two_layer_groups()
    vecs = group_vectors(*params)
    w = [len(x) ** 0.5 if weights == "sqrt_size" else 1.0 for x in vecs]
    expected = sum(wj * x.norm() for wj, x in zip(w, vecs))
    squared = sum(wj * x.norm() ** 2 for wj, x in zip(w, vecs))
    value = penalty(groups, weights=weights).value()
    assert torch.allclose(value, expected)
    assert not torch.allclose(value, squared, rtol=1e-2)  # the squared-norm trap


def closed_form_prox(vecs, mu, w):
    return [max(0.0, 1 - mu * wj / float(x.norm())) * x for x, wj in zip(vecs, w)]


@pytest.mark.parametrize("mu", [0.0, 0.05, 0.3, 1.0, 10.0])
def test_prox_matches_block_soft_threshold(mu):
    groups, params = two_layer_groups(seed=1)
    before = group_vectors(*params)
    w = [len(x) ** 0.5 for x in before]
    expected = closed_form_prox(before, mu, w)
    penalty(groups, lam=2.0).prox_(lr=mu / 2.0)  # mu = lr * lam
    for x, y in zip(group_vectors(*params), expected):
        assert torch.allclose(x, y, atol=1e-12)


def test_prox_matches_cvxpy():
    groups, params = two_layer_groups(seed=2)
    vecs = [x.numpy().copy() for x in group_vectors(*params)]
    w = [len(x) ** 0.5 for x in vecs]
    mu = 0.4
    z = [cp.Variable(len(x)) for x in vecs]
    objective = sum(0.5 * cp.sum_squares(zj - x) + mu * wj * cp.norm(zj, 2) for zj, x, wj in zip(z, vecs, w))
    cp.Problem(cp.Minimize(objective)).solve(solver=cp.CLARABEL)
    penalty(groups).prox_(lr=mu)
    for x, zj in zip(group_vectors(*params), z):
        assert np.allclose(x.numpy(), zj.value, atol=1e-6)


def test_prox_zeroes_exactly_small_groups_and_never_flips_signs():
    groups, params = two_layer_groups(seed=3)
    before = [x.clone() for x in group_vectors(*params)]
    w = torch.tensor([len(x) ** 0.5 for x in before], dtype=torch.float64)
    norms = torch.stack([x.norm() for x in before])
    ratios = (norms / w).sort().values  # mu halfway between two ratios: about half the groups fall below
    mu = float(ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2  # and none sits at the threshold
    penalty(groups).prox_(lr=mu)
    after = group_vectors(*params)
    small = norms <= mu * w
    assert 0 < int(small.sum()) < len(before)
    for x, y, s in zip(before, after, small):
        if s:
            assert torch.count_nonzero(y) == 0  # a squared norm (ridge) would never give an exact zero
        else:
            assert (torch.sign(y) == torch.sign(x)).all() and y.norm() < x.norm()


def test_norm_exactly_at_the_threshold_is_zeroed():
    x = torch.tensor([[2.0, 0.0], [0.0, -2.5]])
    pen = penalty(GroupSet([GroupBlock("b", [Member(x, (2, 2), (0,))])]), weights="ones")
    pen.prox_(lr=2.0)  # mu w = 2 = ||x_0||
    assert torch.equal(x, torch.tensor([[0.0, 0.0], [0.0, -0.5]]))


def test_zero_group_stays_zero_and_zero_step_is_identity():
    groups, (w, b, v) = two_layer_groups(seed=4)
    w[2].zero_()
    b[2] = 0.0
    snapshot = [x.clone() for x in group_vectors(w, b, v)]
    penalty(groups).prox_(lr=0.0)
    assert all(torch.equal(x, y) for x, y in zip(group_vectors(w, b, v), snapshot))
    penalty(groups).prox_(lr=0.01)
    assert torch.count_nonzero(group_vectors(w, b, v)[2]) == 0
    assert not torch.isnan(torch.cat(group_vectors(w, b, v))).any()


def test_grad_coeffs_match_autograd_and_vanish_on_zero_groups():
    groups, (w, b, v) = two_layer_groups(seed=5)
    v[:, 4] = 0.0  # group 5 + 4 = 9 is zero
    pen = penalty(groups)
    a = groups.norms()
    c = pen.grad_coeffs(a)
    assert c[9] == 0 and torch.isfinite(c).all()
    for j, x in enumerate(group_vectors(w, b, v)):
        if j == 9:
            continue
        x = x.clone().requires_grad_(True)
        (len(x) ** 0.5 * x.norm()).backward()
        assert torch.allclose(c[j] * x.detach(), x.grad)
    assert not torch.allclose(c, 2 * pen.group_weights(a))  # the gradient of a squared norm would be 2 w theta


def test_attach_builds_filter_groups_and_reports_metrics():
    model = LeNet5(num_classes=10, in_channels=1, image_size=16)
    pen = GroupLasso(1e-3, scheme="filter")
    pen.attach(model, torch.zeros(2, 1, 16, 16))
    assert len(pen.groups) > 0
    m = pen.metrics()
    assert m["group_sparsity"] == 0.0 and m["nonzero_groups"] == len(pen.groups) and m["penalty"] > 0
    assert pen.param_groups(model) == []  # the optimizer's weight decay on every parameter (one rule)
    pen.weight_decay = 0.0  # regularizer.weight_decay=0: the penalty alone on the grouped parameters
    assert pen.param_groups(model)[0]["weight_decay"] == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        GroupLasso(1e-3, weights="sqrt")
    with pytest.raises(ValueError, match="lam"):
        GroupLasso(-1.0)
