"""WGSEF and group lasso on group-norm vectors (wgsef.functional) against independent references:
cvxpy + Clarabel on the theta-forms of docs/methods.md section 1, the sorted formula of the k-support norm,
closed forms, finite differences, and the two root searches against each other."""
import math
from functools import lru_cache, partial

import cvxpy as cp
import numpy as np
import pytest
import torch

import wgsef.functional as F
from wgsef import _select
from wgsef.functional import (group_lasso_prox, group_lasso_value, wgsef_grad_coeffs, wgsef_prox,
                              wgsef_value)

ALL_METHODS = ("auto", "linear", "vectorised")


@pytest.fixture
def stressed_linear(monkeypatch):
    """Make the linear-time search run many rounds on tiny inputs: tiny samples (so pivots often miss
    and the median-of-medians fallback runs), a tiny final sort and tiny chunks."""
    monkeypatch.setattr(F, "solve_linear", partial(_select.solve_linear, sample=3, small=2, chunk=5))


SIZES = (1, 2, 3, 5, 8, 13, 21, 34, 50)  # a few sizes, so each cvxpy problem is compiled once (DPP)


def random_instance(rng, sizes=SIZES):
    """Norms with zeros and ties at random scales, k from 1 to n, and sometimes weights."""
    n = int(rng.choice(sizes))
    a = rng.random(n) * 10.0 ** rng.uniform(-1, 1)
    if rng.random() < 0.4:  # ties
        a = np.round(a * 3) / 3
    a[rng.random(n) < 0.25] = 0.0
    k = int(rng.integers(1, n + 1))
    d = rng.uniform(0.2, 3.0, n) if rng.random() < 0.5 else None
    return a, k, d


def t64(x):
    return None if x is None else torch.tensor(x, dtype=torch.float64)


# --------------------------------------------------------------------------------------- references
@lru_cache(maxsize=None)
def value_problem(n):
    """1/2 min sum_i v_i^2 / t_i  s.t. 0 <= t <= 1, sum t <= k."""
    v, k, t = cp.Parameter(n), cp.Parameter(nonneg=True), cp.Variable(n)
    obj = 0.5 * cp.sum([cp.quad_over_lin(v[i], t[i]) for i in range(n)])
    return cp.Problem(cp.Minimize(obj), [t >= 0, t <= 1, cp.sum(t) <= k]), v, k


@lru_cache(maxsize=None)
def prox_problem(n):
    """argmin_x 1/2 ||x - a||^2 + 1/2 sum_i c_i x_i^2 / t_i over x and 0 <= t <= 1, sum t <= k."""
    a, c, k = cp.Parameter(n), cp.Parameter(n, nonneg=True), cp.Parameter(nonneg=True)
    x, t = cp.Variable(n), cp.Variable(n)
    pen = cp.sum([c[i] * cp.quad_over_lin(x[i], t[i]) for i in range(n)])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x - a) + 0.5 * pen), [t >= 0, t <= 1, cp.sum(t) <= k])
    return prob, a, c, k, x


def cvx_value(a, k, d=None):
    prob, v, kp = value_problem(len(a))
    v.value, kp.value = (a if d is None else np.sqrt(d) * a), k
    prob.solve(solver=cp.CLARABEL)
    return prob.value


def cvx_prox(a, k, mu, d=None):
    prob, ap, c, kp, x = prox_problem(len(a))
    ap.value, c.value, kp.value = a, mu * (np.ones(len(a)) if d is None else d), k
    prob.solve(solver=cp.CLARABEL)
    return x.value


def formula_value(v, k):
    """The k-support-norm formula of docs/methods.md (1-indexed z, z_0 = +inf, search r = 0..k-1), with a
    rounding tolerance on its two conditions."""
    z = [math.inf] + sorted(v.tolist(), reverse=True)
    if sum(x > 0 for x in z[1:]) <= k:
        return 0.5 * sum(x * x for x in z[1:])
    eps = 1e-12 * z[1]  # exact ties sit on the boundary of the conditions
    for r in range(k):
        tail = sum(z[k - r:])
        if z[k - r - 1] + eps > tail / (r + 1) >= z[k - r] - eps:
            return 0.5 * (sum(x * x for x in z[1:k - r]) + tail ** 2 / (r + 1))
    raise AssertionError("no r satisfies the k-support condition")


# ------------------------------------------------------------------------------------ against cvxpy
def test_value_matches_cvxpy_and_formula(stressed_linear):
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, k, d = random_instance(rng)
        ref = cvx_value(a, k, d)
        v = a if d is None else np.sqrt(d) * a
        assert formula_value(v, k) == pytest.approx(ref, rel=1e-5, abs=1e-6)
        for method in ALL_METHODS:
            got = wgsef_value(t64(a), k, t64(d), method=method).item()
            assert got == pytest.approx(ref, rel=1e-5, abs=1e-6), (a, k, d, method)


def test_prox_matches_cvxpy(stressed_linear):
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, k, d = random_instance(rng)
        mu = float(rng.choice([1e-3, 0.1, 1.0, 5.0])) * rng.uniform(0.5, 2)
        ref = cvx_prox(a, k, mu, d)
        for method in ALL_METHODS:
            got = wgsef_prox(t64(a), k, mu, t64(d), method=method).numpy()
            np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, a.max()), err_msg=f"{a} {k} {mu} {d} {method}")


def test_prox_of_whole_groups_is_the_norm_prox_rescaled():
    """The prox on parameter vectors (cvxpy over the groups' entries) equals scaling each group by
    new norm / old norm."""
    rng = np.random.default_rng(2)
    for _ in range(5):
        sizes = rng.integers(1, 5, size=int(rng.integers(3, 9)))
        groups = [rng.standard_normal(m) for m in sizes]
        groups[0][:] = 0.0
        d = rng.uniform(0.5, 2.0, len(groups))
        k, mu = int(rng.integers(1, len(groups))), float(rng.uniform(0.1, 2.0))
        xs, t = [cp.Variable(m) for m in sizes], cp.Variable(len(groups))
        pen = cp.sum([cp.quad_over_lin(np.sqrt(d[j]) * xs[j], t[j]) for j in range(len(groups))])
        fit = cp.sum([cp.sum_squares(xs[j] - groups[j]) for j in range(len(groups))])
        cp.Problem(cp.Minimize(0.5 * fit + 0.5 * mu * pen), [t >= 0, t <= 1, cp.sum(t) <= k]).solve(solver=cp.CLARABEL)
        a = t64([np.linalg.norm(g) for g in groups])
        new = wgsef_prox(a, k, mu, t64(d))
        factor = torch.where(a > 0, new / a.clamp_min(1e-300), 0).numpy()
        for j, g in enumerate(groups):
            np.testing.assert_allclose(factor[j] * g, xs[j].value, atol=1e-4)


# ----------------------------------------------------------------------------- the two root searches
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_and_vectorised_agree_on_large_inputs(weighted):
    g = torch.Generator().manual_seed(3)
    n = 100_000
    a = torch.rand(n, generator=g, dtype=torch.float64)
    a[: n // 4] = torch.round(a[: n // 4] * 50) / 50  # many ties
    a[torch.rand(n, generator=g) < 0.1] = 0
    d = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    for k, mu in [(1, 0.05), (5000, 1e-4), (5000, 3.0), (50_000, 0.05), (89_000, 3.0)]:
        lin = wgsef_prox(a, k, mu, d, method="linear")
        vec = wgsef_prox(a, k, mu, d, method="vectorised")
        torch.testing.assert_close(lin, vec, rtol=1e-6, atol=1e-6 * a.max().item())
        lin, vec = (wgsef_value(a, k, d, method=m) for m in ("linear", "vectorised"))
        torch.testing.assert_close(lin, vec, rtol=1e-9, atol=0)


def test_linear_search_float32_large():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(200_000, generator=g)
    a[::7] = 0
    k, mu = 20_000, 0.01
    lin = wgsef_prox(a, k, mu, method="linear")
    ref = wgsef_prox(a.double(), k, mu, method="vectorised")
    assert lin.dtype == torch.float32
    torch.testing.assert_close(lin.double(), ref, rtol=1e-4, atol=1e-6)
    assert wgsef_value(a, k, method="linear").item() == pytest.approx(wgsef_value(a.double(), k).item(), rel=1e-5)


def test_median_of_medians_selection():
    g = torch.Generator().manual_seed(5)
    for n in (1, 4, 26, 999, 5000):
        x = torch.randint(0, max(n // 3, 1), (n,), generator=g).float()  # ties
        ordered = torch.sort(x).values
        for kth in {0, n // 2, n - 1}:
            assert _select.mom_select(x, kth) == ordered[kth].item()
        if n >= 26:
            y = torch.rand(n, generator=g)
            p = _select.mom_pivot(y)
            assert (y < p).sum() <= 0.7 * n + 5 and (y > p).sum() <= 0.7 * n + 5


def test_bad_sample_pivots_fall_back_to_median_of_medians(monkeypatch):
    calls = []
    pivot = _select.mom_pivot
    monkeypatch.setattr(_select, "mom_pivot", lambda x: calls.append(x.numel()) or pivot(x))
    g = torch.Generator().manual_seed(6)
    s, b = torch.rand(3000, generator=g, dtype=torch.float64) + 0.1, torch.tensor(0.2, dtype=torch.float64)
    gamma = _select.solve_linear(s, b, 700, sample=1, small=8)
    assert calls, "a one-element sample never brackets the root well; the fallback must run"
    assert (gamma * s - b).clamp(0, 1).sum().item() == pytest.approx(700, abs=1e-9)


# --------------------------------------------------------------------------------- special cases
@pytest.mark.parametrize("method", ALL_METHODS)
def test_closed_forms(method, stressed_linear):
    a = t64([3.0, 0.0, 1.0, 2.0, 0.5])
    d = t64([1.0, 2.0, 0.5, 4.0, 1.5])
    v = a * d.sqrt()
    mu = 0.7
    # at most k nonzero groups: ridge shrink, value 1/2 sum v^2
    for k in (4, 5):
        torch.testing.assert_close(wgsef_prox(a, k, mu, d, method=method), a / (1 + mu * d))
        torch.testing.assert_close(wgsef_value(a, k, d, method=method), 0.5 * v.square().sum())
    # k = 1: 1/2 (sum v)^2
    torch.testing.assert_close(wgsef_value(a, 1, d, method=method), 0.5 * v.sum() ** 2)
    # mu = 0: identity
    assert torch.equal(wgsef_prox(a, 2, 0.0, d, method=method), a)
    # all zero, and n = 1
    zeros = torch.zeros(6, dtype=torch.float64)
    assert torch.equal(wgsef_prox(zeros, 2, mu, method=method), zeros)
    assert wgsef_value(zeros, 2, method=method).item() == 0.0
    one, w = t64([2.0]), t64([3.0])
    torch.testing.assert_close(wgsef_prox(one, 1, mu, w, method=method), one / (1 + mu * 3))
    torch.testing.assert_close(wgsef_value(one, 1, w, method=method), torch.tensor(6.0, dtype=torch.float64))
    # n equal groups, k < n: by symmetry t = k / n and a <- a t / (t + mu); value 1/2 (n a)^2 / k
    n, k, c = 10, 3, 1.5
    tied = torch.full((n,), c, dtype=torch.float64)
    torch.testing.assert_close(wgsef_prox(tied, k, mu, method=method), tied * (k / n) / (k / n + mu))
    torch.testing.assert_close(wgsef_value(tied, k, method=method), torch.tensor(0.5 * (n * c) ** 2 / k, dtype=torch.float64))
    # the weighted value is the unweighted value of v
    torch.testing.assert_close(wgsef_value(a, 2, d, method=method), wgsef_value(v, 2, method=method))


def test_flat_piece_exactly_k_saturated(stressed_linear):
    """S(gamma) = k on a whole interval (k groups saturate before the next one leaves 0)."""
    a = t64([10.0, 10.0, 1.0])
    for method in ALL_METHODS:
        torch.testing.assert_close(wgsef_prox(a, 2, 1.0, method=method), t64([5.0, 5.0, 0.0]))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_subnormal_norms_give_no_nan(method, stressed_linear):
    a = torch.tensor([1.0, 1e-45, 1e-45, 0.0])  # float32: 1 / 1e-45 overflows
    assert torch.isfinite(wgsef_prox(a, 2, 0.5, method=method)).all()
    assert wgsef_value(a, 2, method=method).item() == pytest.approx(0.5)
    assert torch.isfinite(wgsef_grad_coeffs(a, 2, method=method)).all()


def test_prox_support_size(stressed_linear):
    rng = np.random.default_rng(7)
    for _ in range(100):
        a, k, d = random_instance(rng, sizes=(1, 7, 60, 200))
        a, d = t64(a), t64(d)
        mu = float(10 ** rng.uniform(-3, 2))
        new = wgsef_prox(a, k, mu, d)
        nonzero = int((a > 0).sum())
        assert min(k, nonzero) <= int((new > 0).sum()) <= nonzero
        assert bool((new <= a).all()) and bool((new >= 0).all())


# --------------------------------------------------------------------------------------- gradient
def test_grad_coeffs_match_autograd_and_finite_differences():
    rng = np.random.default_rng(8)
    for trial in range(30):
        sizes = rng.integers(1, 4, size=int(rng.integers(2, 12)))
        theta = [torch.tensor(rng.standard_normal(m), dtype=torch.float64, requires_grad=True) for m in sizes]
        d = t64(rng.uniform(0.3, 3.0, len(sizes))) if trial % 2 else None
        k = int(rng.integers(1, len(sizes) + 1))
        a = torch.stack([t.norm() for t in theta])
        grads = torch.autograd.grad(wgsef_value(a, k, d), theta)
        c = wgsef_grad_coeffs(a.detach(), k, d)
        for j, t in enumerate(theta):
            torch.testing.assert_close(grads[j], c[j] * t.detach())
        # central differences of the value in the group norms: d value / d a_j = c_j a_j
        a0, h = a.detach(), 1e-6
        for j in range(len(sizes)):
            e = torch.zeros_like(a0)
            e[j] = h
            fd = (wgsef_value(a0 + e, k, d) - wgsef_value(a0 - e, k, d)).item() / (2 * h)
            assert fd == pytest.approx((c[j] * a0[j]).item(), rel=1e-5, abs=1e-7)


def test_grad_coeffs_head_tail_and_zero_groups():
    a = t64([4.0, 1.0, 1.0, 0.0])  # k = 2: head {4}, tail {1, 1} with T = 2 / 1
    c = wgsef_grad_coeffs(a, 2)
    torch.testing.assert_close(c, t64([1.0, 2.0, 2.0, 0.0]))
    d = t64([2.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(wgsef_grad_coeffs(a, 4, d), t64([2.0, 1.0, 1.0, 0.0]))  # ridge: c = d


# ------------------------------------------------------------------------------------- group lasso
def test_group_lasso():
    a, w = t64([3.0, 0.5, 0.0, 2.0]), t64([1.0, 2.0, 1.0, 0.5])
    torch.testing.assert_close(group_lasso_prox(a, 0.4, w), t64([2.6, 0.0, 0.0, 1.8]))
    torch.testing.assert_close(group_lasso_prox(a, 0.4), t64([2.6, 0.1, 0.0, 1.6]))
    torch.testing.assert_close(group_lasso_value(a, w), torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(group_lasso_value(a), torch.tensor(5.5, dtype=torch.float64))


def test_group_lasso_prox_of_whole_groups_matches_cvxpy():
    rng = np.random.default_rng(9)
    groups = [rng.standard_normal(m) for m in (3, 1, 4, 2)]
    w, mu = np.sqrt([3, 1, 4, 2]), 0.8
    xs = [cp.Variable(len(g)) for g in groups]
    cp.Problem(cp.Minimize(sum(0.5 * cp.sum_squares(x - g) + mu * wj * cp.norm(x, 2)
                               for x, g, wj in zip(xs, groups, w)))).solve(solver=cp.CLARABEL)
    a = t64([np.linalg.norm(g) for g in groups])
    factor = (group_lasso_prox(a, mu, t64(w)) / a).numpy()
    for f, g, x in zip(factor, groups, xs):
        np.testing.assert_allclose(f * g, x.value, atol=1e-6)


# ---------------------------------------------------------------------------------- input checking
GOOD = t64([1.0, 2.0, 0.0])


@pytest.mark.parametrize("call, match", [
    (lambda: wgsef_prox(GOOD, 0, 0.1), "k must be an int >= 1"),
    (lambda: wgsef_prox(GOOD, 1.5, 0.1), "k must be an int >= 1"),
    (lambda: wgsef_value(GOOD, True), "k must be an int >= 1"),
    (lambda: wgsef_prox(GOOD, 1, -0.1), "mu must be a finite number >= 0"),
    (lambda: wgsef_prox(GOOD, 1, math.nan), "mu must be a finite number >= 0"),
    (lambda: group_lasso_prox(GOOD, -1.0), "mu must be a finite number >= 0"),
    (lambda: wgsef_prox(t64([1.0, -2.0]), 1, 0.1), "group norms must be finite and >= 0"),
    (lambda: wgsef_value(t64([1.0, math.inf]), 1), "group norms must be finite and >= 0"),
    (lambda: wgsef_grad_coeffs(t64([math.nan, 1.0]), 1), "group norms must be finite and >= 0"),
    (lambda: group_lasso_value(t64([-1.0])), "group norms must be finite and >= 0"),
    (lambda: wgsef_value(GOOD, 1, t64([1.0, 0.0, 1.0])), "weights must be finite and > 0"),
    (lambda: wgsef_prox(GOOD, 1, 0.1, t64([1.0, -1.0, 1.0])), "weights must be finite and > 0"),
    (lambda: group_lasso_prox(GOOD, 0.1, t64([1.0, 1.0])), "weights must have the shape"),
    (lambda: wgsef_value(GOOD.view(1, 3), 1), "1-D tensor"),
    (lambda: wgsef_value(torch.tensor([1, 2]), 1), "floating-point"),
    (lambda: wgsef_prox([1.0, 2.0], 1, 0.1), "torch.Tensor"),
    (lambda: wgsef_prox(GOOD, 1, 0.1, method="fast"), "method must be one of"),
    (lambda: wgsef_prox(GOOD, 4, 0.1), r"k=4 is larger than the number of groups \(3\)"),
    (lambda: wgsef_value(GOOD, 10), r"k=10 is larger than the number of groups \(3\)"),
    (lambda: wgsef_grad_coeffs(GOOD, 4), "larger than the number of groups"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_k_equal_to_n_is_the_ridge_shrink():
    torch.testing.assert_close(wgsef_prox(GOOD, len(GOOD), 0.5), GOOD / 1.5)


# ---------------------------------------------------------------------------------- dtypes, devices
def test_float32_follows_input():
    rng = np.random.default_rng(10)
    a, k, d = random_instance(rng, sizes=(500,))
    a32, d32 = torch.tensor(a, dtype=torch.float32), None if d is None else torch.tensor(d, dtype=torch.float32)
    for method in ALL_METHODS:
        out = wgsef_prox(a32, k, 0.3, d32, method=method)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), wgsef_prox(t64(a), k, 0.3, t64(d)), rtol=1e-4, atol=1e-5)
        assert wgsef_value(a32, k, d32, method=method).dtype == torch.float32
    assert wgsef_grad_coeffs(a32, k, d32).dtype == torch.float32
    assert group_lasso_prox(a32, 0.1).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(11)
    a = torch.rand(300_000, generator=g)
    a[::5] = 0
    d = torch.rand(300_000, generator=g) + 0.5
    for method in ALL_METHODS:
        for w in (None, d):
            out = wgsef_prox(a.cuda(), 30_000, 0.05, None if w is None else w.cuda(), method=method)
            assert out.is_cuda
            torch.testing.assert_close(out.cpu(), wgsef_prox(a, 30_000, 0.05, w), rtol=1e-4, atol=1e-6)
            val = wgsef_value(a.cuda(), 30_000, None if w is None else w.cuda(), method=method)
            assert val.is_cuda and val.item() == pytest.approx(wgsef_value(a, 30_000, w).item(), rel=1e-5)
    assert group_lasso_prox(a.cuda(), 0.1).is_cuda


# ------------------------------------------------------------------------------ many scopes at once
def scoped_instance(rng, sizes):
    """Norms over consecutive scopes of the given sizes (zeros, ties, an all-zero scope now and then),
    a k per scope from 0 to n, and sometimes weights."""
    a = np.concatenate([rng.random(n) * 10.0 ** rng.uniform(-1, 1) for n in sizes])
    if rng.random() < 0.5:
        a = np.round(a * 3) / 3  # ties
    a[rng.random(a.size) < 0.2] = 0.0
    if rng.random() < 0.3:
        a[: sizes[0]] = 0.0
    ks = [int(rng.integers(0, n + 1)) for n in sizes]
    d = rng.uniform(0.2, 3.0, a.size) if rng.random() < 0.5 else None
    return t64(a), ks, t64(d)


def per_scope(fn, a, sizes, ks, d):
    bounds = np.cumsum([0, *sizes])
    return [fn(a[lo:hi], k, None if d is None else d[lo:hi]) for lo, hi, k in zip(bounds[:-1], bounds[1:], ks)]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_batched_scopes_match_the_functional_per_scope(method):
    """One call over many scopes (padded rows, and on the CPU the linear search for a scope above SMALL
    groups) against the public functions called scope by scope with both root searches; a scope with
    k = 0 (refused by the public functions) must come out zero."""
    rng = np.random.default_rng(12)
    shapes = [[1], [5], [1, 1, 1], [3, 1, 7, 2], [50, 1, 300, 4, 4], [2, _select.SMALL + 5000, 1, 40]]
    for trial in range(40):
        sizes = shapes[trial % len(shapes)]
        a, ks, d = scoped_instance(rng, sizes)
        scopes = F.Scopes(sizes, ks, method)
        mu = float(10 ** rng.uniform(-3, 1))
        for ref_method in ("vectorised", "linear"):
            def prox(ai, k, di):
                return torch.zeros_like(ai) if k == 0 else wgsef_prox(ai, k, mu, di, method=ref_method)

            def coeffs(ai, k, di):
                return wgsef_grad_coeffs(ai, k, di, method=ref_method)

            got, ref = F._prox(a, mu, d, scopes), torch.cat(per_scope(prox, a, sizes, ks, d))
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12 * max(1.0, a.max().item()))
            if 0 in ks:
                continue
            value = sum(per_scope(lambda ai, k, di: wgsef_value(ai, k, di, method=ref_method), a, sizes, ks, d))
            torch.testing.assert_close(F._value(a, d, scopes), value, rtol=1e-9, atol=0)
            torch.testing.assert_close(F._grad_coeffs(a, d, scopes), torch.cat(per_scope(coeffs, a, sizes, ks, d)),
                                       rtol=1e-9, atol=0)


def test_batched_scopes_k_zero_and_k_n():
    """k = 0 keeps no group (the prox of the indicator of zero); k = n is the ridge shrink."""
    a = t64([3.0, 0.0, 1.0, 2.0, 0.5, 4.0])
    scopes = F.Scopes([2, 4], [0, 4], "vectorised")
    assert torch.equal(F._prox(a, 0.5, None, scopes), torch.cat([torch.zeros(2, dtype=torch.float64), a[2:] / 1.5]))
    assert torch.equal(F._prox(a, 0.5, None, F.Scopes([6], [6], "auto")), a / 1.5)


def test_sorted_scopes_take_a_fixed_number_of_ops_and_no_host_sync():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def ops(sizes):
        g = torch.Generator().manual_seed(len(sizes))
        a, d = torch.rand(sum(sizes), generator=g), torch.rand(sum(sizes), generator=g) + 0.5
        scopes = F.Scopes(sizes, [max(1, n // 3) for n in sizes])
        F._prox(a, 0.1, d, scopes)  # first use builds the index tensors
        with Count() as c:
            F._prox(a, 0.1, d, scopes)
            F._grad_coeffs(a, d, scopes)
            F._value(a, d, scopes)
        return c.ops

    few, many = ops([64, 128, 3]), ops([64, 128, 3, 512, 7] * 8)
    assert len(few) == len(many) < 300
    assert not {"_local_scalar_dense", "nonzero", "is_nonzero", "equal"} & set(many)
