"""Pure tensor math on vectors of group norms: WGSEF (docs/methods.md section 1) and group lasso (section 2).

Every function takes a = (||theta_G_1||, ..., ||theta_G_n||), a 1-D float tensor of nonnegative norms
on any device, and optional positive group weights d; results have a's dtype and device. A prox returns
the new group norms: scaling each group by new / old gives the prox of the full parameter vector.

WGSEF_{k,d}(theta) = 1/2 (k-support norm of v)^2 with v_j = sqrt(d_j) a_j
                   = 1/2 min { sum_j v_j^2 / t_j : 0 <= t_j <= 1, sum_j t_j <= k }.
The minimiser is t_j = min(1, v_j / T) for a threshold T (the tail mean; T = 0 when at most k groups are
nonzero), so WGSEF = 1/2 sum_j v_j max(v_j, T). T and the prox both come from one root search
(wgsef._select): S(gamma) = sum_j clip(gamma s_j - b_j, 0, 1) = k, with b = 0, T = 1 / gamma for the
value and s = v, b = mu d for the prox. method="linear" is the O(n) breakpoint search, "vectorised"
sorts the 2n breakpoints, "auto" (the default) is the linear one (see _gamma).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from wgsef._select import solve_linear, solve_sorted

METHODS = ("auto", "linear", "vectorised")


# ----------------------------------------------------------------------------------------- input checks
def _check_norms(a) -> None:
    if not isinstance(a, Tensor):
        raise ValueError(f"group norms must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 1:
        raise ValueError(f"group norms must be a 1-D tensor, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"group norms must be a floating-point tensor, got {a.dtype}")
    if a.numel():
        lo, hi = torch.aminmax(a.detach())
        if not (lo >= 0 and hi < math.inf):  # also catches NaN
            raise ValueError(f"group norms must be finite and >= 0, got values in [{lo.item()}, {hi.item()}]")


def _check_weights(a: Tensor, weights) -> Tensor | None:
    if weights is None:
        return None
    d = torch.as_tensor(weights, dtype=a.dtype, device=a.device)
    if d.shape != a.shape:
        raise ValueError(f"weights must have the shape of the group norms {tuple(a.shape)}, got {tuple(d.shape)}")
    if d.numel():
        lo, hi = torch.aminmax(d.detach())
        if not (lo > 0 and hi < math.inf):
            raise ValueError(f"weights must be finite and > 0, got values in [{lo.item()}, {hi.item()}]")
    return d


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > max(n, 1):
        raise ValueError(f"k={k} is larger than the number of groups ({n}); k = {n} already keeps every group")
    return int(k)


def _check_mu(mu) -> float:
    try:
        value = float(mu)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}") from None
    if not (0 <= value < math.inf):
        raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
    return value


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# ---------------------------------------------------------------------------------------------- WGSEF
def _scaled(a: Tensor, d: Tensor | None) -> Tensor:
    """v = sqrt(d) * a."""
    return a if d is None else a * d.sqrt()


def _gamma(s: Tensor, b: Tensor, k: int, method: str) -> float:
    """Root of sum_j clip(gamma s_j - b_j, 0, 1) = k for k < #{s_j > 0} (b_j > 0 where s_j = 0).

    "auto" is the linear search: up to _select.SMALL groups it is the sort itself, and from 1e4 groups
    on it is the faster one (CPU, results/prox_scaling.csv: 1.4 vs 1.8 ms at 1e4, 0.2 vs 4.4 s at 1e7).
    """
    return (solve_sorted if method == "vectorised" else solve_linear)(s, b, k)


@torch.no_grad()
def _tail_mean(v: Tensor, k: int, method: str) -> float:
    """The threshold T of the value formula for v > 0: sum_j min(1, v_j / T) = k; 0 if len(v) <= k."""
    if v.numel() <= k:
        return 0.0
    return 1.0 / _gamma(v, v.new_zeros(()), k, method)


def wgsef_value(a: Tensor, k: int, weights=None, method: str = "auto") -> Tensor:
    """1/2 (k-support norm of v)^2, v_j = sqrt(d_j) a_j, as a 0-dim tensor.

    Differentiable in a (and in weights): d value / d v_j = max(v_j, T), by the envelope theorem.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    k = _check_k(k, a.numel())
    _check_method(method)
    v = _scaled(a, d)
    v = v[v > 0]
    m = torch.clamp(v.detach(), min=_tail_mean(v.detach(), k, method))  # max(v, T) = v / t
    # sum (v - v/2) m = 1/2 sum v max(v, T) is the value; holding m fixed, autograd gives m = max(v, T)
    return ((v - 0.5 * v.detach()) * m).sum(dtype=torch.float64).to(a.dtype)


@torch.no_grad()
def wgsef_grad_coeffs(a: Tensor, k: int, weights=None, method: str = "auto") -> Tensor:
    """c with d WGSEF / d theta_g = c_g theta_g on nonzero groups (0 on zero groups).

    c_j = sqrt(d_j) max(v_j, T) / a_j: d_j on head groups (v_j >= T), sqrt(d_j) T / a_j on tail groups.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    k = _check_k(k, a.numel())
    _check_method(method)
    v = _scaled(a, d)
    T = v.new_tensor(_tail_mean(v[v > 0], k, method))
    c = torch.div(T, v).clamp_(min=1)  # T / v, not v.reciprocal() * T: 0 * inf would be nan
    if d is not None:
        c *= d
    return torch.where(a > 0, c, 0)


@torch.no_grad()
def wgsef_prox(a: Tensor, k: int, mu: float, weights=None, method: str = "auto") -> Tensor:
    """New group norms after the prox of mu * WGSEF_{k,d} (docs/methods.md section 1).

    theta_j = clip(gamma s_j - mu d_j, 0, 1) with s_j = sqrt(d_j) a_j and gamma chosen so that
    sum_j theta_j = k; then a_j <- a_j theta_j / (theta_j + mu d_j). With at most k nonzero groups
    every group is shrunk by 1 / (1 + mu d_j). At least min(k, #nonzero) groups stay nonzero.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    k = _check_k(k, a.numel())
    mu = _check_mu(mu)
    _check_method(method)
    b = a.new_tensor(mu) if d is None else mu * d
    if mu == 0 or b.dim() == 0 and b == 0:  # (mu may underflow in float32)
        return a.clone()
    nonzero = int(torch.count_nonzero(a))
    if nonzero <= k:
        return a / (1 + b)
    s = _scaled(a, d)
    gamma = _gamma(s, b, k, method)  # zero groups (s = 0 < b) stay at theta = 0 in the search
    gamma = min(gamma, torch.finfo(a.dtype).max)  # finite even for subnormal norms, so 0 * gamma = 0
    theta = torch.mul(s, gamma).sub_(b).clamp_(0, 1)
    return (a * theta).div_(theta.add_(b))


# ----------------------------------------------------------------------------------------- group lasso
def group_lasso_value(a: Tensor, weights=None) -> Tensor:
    """sum_j w_j a_j (norms not squared), as a 0-dim tensor."""
    _check_norms(a)
    w = _check_weights(a, weights)
    wa = a if w is None else w * a
    return wa.sum(dtype=torch.float64).to(a.dtype)


@torch.no_grad()
def group_lasso_prox(a: Tensor, mu: float, weights=None) -> Tensor:
    """Block soft-threshold on the norms: max(0, a_j - mu w_j)."""
    _check_norms(a)
    w = _check_weights(a, weights)
    mu = _check_mu(mu)
    return (a - (mu if w is None else mu * w)).clamp_(min=0)
