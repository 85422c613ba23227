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
sorts the 2n breakpoints, "auto" (the default) sorts small scopes and CUDA scopes up to millions of
groups, and runs the linear search on the others (see sort_max).

The public functions check their input (which makes the host wait for the device); the training path
calls the unchecked versions (_value, _grad_coeffs, _prox, _group_lasso_*) on many scopes at once
(`Scopes`): a penalty with one scope per layer solves all of them together, in a fixed number of ops.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from wgsef._select import SMALL, solve_linear, solve_sorted

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


# ---------------------------------------------------------------------------------------------- scopes
class Scopes:
    """Consecutive scopes of a group vector: scope i is a[bounds[i]:bounds[i + 1]], with its own k_i.

    Scopes solved by sorting ("vectorised", and "auto" for scopes up to `sort_max(device)` groups) are
    padded into one (scopes, largest scope) matrix and solved together in a fixed number of ops without a
    host sync; the others run the linear-time search one by one (the host waits for each: fine on the CPU,
    where it is the fast path for large unstructured scopes). Index tensors are built once per device.
    """

    def __init__(self, sizes: list[int], ks: list[int], method: str = "auto"):
        self.sizes, self.ks, self.method = [int(n) for n in sizes], [int(k) for k in ks], method
        self.bounds = [0]
        for n in self.sizes:
            self.bounds.append(self.bounds[-1] + n)
        self._layouts: dict[torch.device, _Padded] = {}

    def __len__(self) -> int:
        return self.bounds[-1]

    def sorts(self, i: int, device: torch.device) -> bool:
        return self.method == "vectorised" or self.method == "auto" and self.sizes[i] <= sort_max(device)

    def padded(self, device: torch.device) -> "_Padded":
        if device not in self._layouts:
            self._layouts[device] = _Padded(self, [i for i in range(len(self.sizes)) if self.sorts(i, device)],
                                            device)
        return self._layouts[device]


def sort_max(device: torch.device) -> int:
    """Largest scope that "auto" solves by sorting. CPU: up to _select.SMALL groups the linear search is a
    sort itself, beyond it the faster one (results/prox_scaling.csv). CUDA: the sort makes the host wait
    for nothing, while the linear search waits a few times per round; a GPU sort of 2 x 2^20 breakpoints
    takes a fraction of a millisecond, so up to CUDA_SORT_MAX groups the sort is the choice, and above it
    (large unstructured scopes) the O(n) search, whose waits then cost little next to its work. The bound
    is a reasoned default, not yet measured: `bench_prox.py --device cuda` times both paths."""
    return CUDA_SORT_MAX if device.type == "cuda" else SMALL


CUDA_SORT_MAX = 1 << 20


class _Padded:
    """The sorted scopes of a Scopes as rows of a zero-padded (rows, m) matrix, on one device."""

    def __init__(self, scopes: Scopes, rows: list[int], device: torch.device):
        self.rows = rows
        sizes = [scopes.sizes[i] for i in rows]
        self.m = max(sizes, default=0)
        ks = [scopes.ks[i] for i in rows]
        self.k = float(ks[0]) if len(rows) == 1 else torch.tensor(ks, dtype=torch.float64, device=device)
        ranges = [torch.arange(scopes.bounds[i], scopes.bounds[i + 1]) for i in rows]
        everything = len(rows) == len(scopes.sizes)
        self.select = None if everything or not rows else torch.cat(ranges).to(device)
        row = torch.cat([torch.full((n,), r) for r, n in enumerate(sizes)]) if rows else torch.zeros(0, dtype=torch.long)
        self.row = None if len(rows) <= 1 else row.to(device)
        col = torch.cat([torch.arange(n) for n in sizes]) if rows else row
        self.place = None if all(n == self.m for n in sizes) else (row * self.m + col).to(device)

    def pad(self, x: Tensor) -> Tensor:
        """The groups of the sorted scopes as a (rows, m) matrix, zero-padded."""
        if self.select is not None:
            x = x.index_select(0, self.select)
        if self.place is None:
            return x.view(len(self.rows), self.m)
        return x.new_zeros(len(self.rows) * self.m).index_copy_(0, self.place, x).view(len(self.rows), self.m)

    def per_group(self, per_row: Tensor) -> Tensor:
        """A value per row spread over the row's groups (in the order of `select`)."""
        return per_row.expand(self.m) if self.row is None else per_row.index_select(0, self.row)


# ---------------------------------------------------------------------------------------------- WGSEF
def _scaled(a: Tensor, d: Tensor | None) -> Tensor:
    """v = sqrt(d) * a."""
    return a if d is None else a * d.sqrt()


def keep_score(a: Tensor, d: Tensor | None) -> Tensor:
    """r_j = a_j / sqrt(d_j): the order in which WGSEF's prox keeps groups, and the one ranking by which every
    step that picks k groups (the top-k finish, gradual pruning, HSPG's protected set, closing_mu) picks them.

    The prox gives theta_j = clip(gamma s_j - mu d_j, 0, 1) with s_j = sqrt(d_j) a_j, so group j survives iff
    gamma s_j > mu d_j, i.e. iff r_j > mu / gamma: its support is always a top set by r, and the smallest mu
    that leaves k groups keeps the top k by r. (The value's head/tail split sorts v = sqrt(d) a instead; the
    two orders agree when d is constant in a scope.)"""
    return a if d is None else a / d.sqrt()


def rank_in_scope(v: Tensor, scope: Tensor, start: Tensor) -> Tensor:
    """0-based rank of every v_j within its scope, largest first (ties: lower index first), without a host
    sync: sort by v, then stably by scope; `start` is the position of each group's scope in that order."""
    order = v.argsort(descending=True, stable=True)
    order = order[scope[order].argsort(stable=True)]
    position = torch.empty_like(order)
    position[order] = torch.arange(len(v), device=v.device)
    return position - start


def _per_scope(s: Tensor, b: Tensor | None, scopes: Scopes, finish) -> Tensor:
    """finish(gamma) of every scope, spread over its groups (for a single scope, a 1-element tensor that
    broadcasts). gamma (float64, one per scope) solves sum_j clip(gamma s_j - b_j, 0, 1) = k (b_j > 0 where
    s_j = 0, or b = None for b = 0), and is +inf where the scope has at most k groups with s_j > 0."""
    lay = scopes.padded(s.device)
    drop_zeros = b is None  # with b = 0 a zero group's breakpoints are 0 / 0: leave such groups out
    b = s.new_zeros(()) if b is None else b
    if lay.rows:
        sp = lay.pad(s)
        gamma = solve_sorted(sp, b if b.dim() == 0 else lay.pad(b), lay.k)
        rows = finish(gamma.masked_fill_((sp > 0).sum(-1) <= lay.k, math.inf))
        if len(lay.rows) == len(scopes.sizes):
            return rows if len(lay.rows) == 1 else lay.per_group(rows)
    linear = []  # the other scopes: the linear search, host-driven, one by one
    for i, (lo, hi, k) in enumerate(zip(scopes.bounds[:-1], scopes.bounds[1:], scopes.ks)):
        if i in lay.rows:
            continue
        si, bi = s[lo:hi], (b if b.dim() == 0 else b[lo:hi])
        nonzero = int(torch.count_nonzero(si))
        if drop_zeros and nonzero < si.numel():
            keep = si > 0
            si, bi = si[keep], (bi if bi.dim() == 0 else bi[keep])
        linear.append(math.inf if nonzero <= k else 0.0 if k == 0 else solve_linear(si, bi, k))
    linear = finish(s.new_tensor(linear, dtype=torch.float64))
    if len(scopes.sizes) == 1:
        return linear
    out = linear.new_empty(len(scopes))
    if lay.rows:
        out.index_copy_(0, lay.select, lay.per_group(rows))
    for value, i in zip(linear, (i for i in range(len(scopes.sizes)) if i not in lay.rows)):
        out[scopes.bounds[i]:scopes.bounds[i + 1]] = value
    return out


def _tail_means(v: Tensor, scopes: Scopes) -> Tensor:
    """Per group, the threshold T of its scope's value formula: sum_j min(1, v_j / T) = k over v_j > 0;
    0 if the scope has at most k nonzero groups (T = 1 / gamma)."""
    return _per_scope(v, None, scopes, lambda gamma: gamma.reciprocal().to(v.dtype))


def _value(a: Tensor, d: Tensor | None, scopes: Scopes) -> Tensor:
    """Sum over scopes of WGSEF (no input checks): 1/2 sum_j v_j max(v_j, T_j), differentiable in a and d."""
    v = _scaled(a, d)
    with torch.no_grad():
        m = torch.maximum(v.detach(), _tail_means(v.detach(), scopes))  # max(v, T) = v / t
    # sum (v - v/2) m = 1/2 sum v max(v, T) is the value; holding m fixed, autograd gives m = max(v, T)
    return ((v - 0.5 * v.detach()) * m).sum(dtype=torch.float64).to(a.dtype)


@torch.no_grad()
def _grad_coeffs(a: Tensor, d: Tensor | None, scopes: Scopes) -> Tensor:
    """c_j = sqrt(d_j) max(v_j, T) / a_j on nonzero groups, 0 on zero groups (no input checks)."""
    v = _scaled(a, d)
    c = torch.div(_tail_means(v, scopes), v).clamp_(min=1)  # T / v, not v.reciprocal() * T: 0 * inf is nan
    if d is not None:
        c *= d
    return torch.where(a > 0, c.clamp_(max=torch.finfo(c.dtype).max), 0)  # finite for subnormal norms


def _prox_gamma(gamma: Tensor, dtype: torch.dtype) -> Tensor:
    """gamma in the norms' dtype: finite (for subnormal norms, so that 0 * gamma = 0), except +inf, which
    marks a scope with at most k nonzero groups (theta = 1 on them: the ridge shrink by 1 / (1 + b))."""
    finite = gamma.clamp(max=torch.finfo(dtype).max)
    return torch.where(gamma == math.inf, gamma, finite).to(dtype)


@torch.no_grad()
def _prox(a: Tensor, mu: float, d: Tensor | None, scopes: Scopes) -> Tensor:
    """New group norms after the prox of mu * WGSEF on every scope (no input checks, no host sync on the
    sorted path)."""
    if mu == 0:
        return a.clone()
    b = torch.full((), mu, dtype=a.dtype, device=a.device) if d is None else mu * d
    s = _scaled(a, d)
    gamma = _per_scope(s, b, scopes, lambda g: _prox_gamma(g, a.dtype))  # zero groups stay at theta = 0
    theta = torch.mul(s, gamma).sub_(b).clamp_(0, 1)
    # NaN only where the answer is 0: a zero group of a ridge scope (0 * inf), or theta = b = 0 (b underflow)
    return (a * theta).div_(theta.add_(b)).nan_to_num_(nan=0.0)


def _one_scope(a: Tensor, k, method: str) -> Scopes:
    k = _check_k(k, a.numel())
    _check_method(method)
    return Scopes([a.numel()], [k], method)


def wgsef_value(a: Tensor, k: int, weights=None, method: str = "auto") -> Tensor:
    """1/2 (k-support norm of v)^2, v_j = sqrt(d_j) a_j, as a 0-dim tensor.

    Differentiable in a (and in weights): d value / d v_j = max(v_j, T), by the envelope theorem.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    return _value(a, d, _one_scope(a, k, method))


@torch.no_grad()
def wgsef_grad_coeffs(a: Tensor, k: int, weights=None, method: str = "auto") -> Tensor:
    """c with d WGSEF / d theta_g = c_g theta_g on nonzero groups (0 on zero groups).

    c_j = sqrt(d_j) max(v_j, T) / a_j: d_j on head groups (v_j >= T), sqrt(d_j) T / a_j on tail groups.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    return _grad_coeffs(a, d, _one_scope(a, k, method))


@torch.no_grad()
def wgsef_prox(a: Tensor, k: int, mu: float, weights=None, method: str = "auto") -> Tensor:
    """New group norms after the prox of mu * WGSEF_{k,d} (docs/methods.md section 1).

    theta_j = clip(gamma s_j - mu d_j, 0, 1) with s_j = sqrt(d_j) a_j and gamma chosen so that
    sum_j theta_j = k; then a_j <- a_j theta_j / (theta_j + mu d_j). With at most k nonzero groups
    every group is shrunk by 1 / (1 + mu d_j). At least min(k, #nonzero) groups stay nonzero.
    """
    _check_norms(a)
    d = _check_weights(a, weights)
    scopes = _one_scope(a, k, method)
    return _prox(a, _check_mu(mu), d, scopes)


# ----------------------------------------------------------------------------------------- group lasso
def group_lasso_value(a: Tensor, weights=None) -> Tensor:
    """sum_j w_j a_j (norms not squared), as a 0-dim tensor."""
    _check_norms(a)
    return _group_lasso_value(a, _check_weights(a, weights))


def _group_lasso_value(a: Tensor, w: Tensor | None) -> Tensor:
    wa = a if w is None else w * a
    return wa.sum(dtype=torch.float64).to(a.dtype)


@torch.no_grad()
def group_lasso_prox(a: Tensor, mu: float, weights=None) -> Tensor:
    """Block soft-threshold on the norms: max(0, a_j - mu w_j)."""
    _check_norms(a)
    w = _check_weights(a, weights)
    return _group_lasso_prox(a, _check_mu(mu), w)


@torch.no_grad()
def _group_lasso_prox(a: Tensor, mu: float, w: Tensor | None) -> Tensor:
    return (a - (mu if w is None else mu * w)).clamp_(min=0)
