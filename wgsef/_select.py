"""Root finding for the WGSEF prox and value (docs/methods.md section 1).

Both need the gamma with S(gamma) = k, where

    S(gamma) = sum_j clip(gamma * s_j - b_j, 0, 1),    s_j > 0, b_j >= 0 (b may be one shared 0-dim value).

S is continuous, nondecreasing and piecewise linear with breakpoints lo_j = b_j / s_j (theta_j leaves 0)
and hi_j = (1 + b_j) / s_j (theta_j reaches 1). On an interval (L, R) holding no breakpoint of group j,
the group is *saturated* (hi_j <= L, theta = 1), *zero* (lo_j >= R) or *linear* (theta = gamma s_j - b_j),
so S(gamma) = c0 + c1 * gamma + (sum over the groups with a breakpoint inside).

`solve_sorted` sorts the 2m breakpoints (O(m log m)), for many problems at once (the rows of a padded
matrix) and without a host sync, so it is the path for many small scopes and for CUDA. `solve_linear` is Kiwiel's breakpoint search:
it keeps an interval (L, R) around the root and running sums c0, c1 of the groups already fixed on it,
and each round is one vectorised O(m) pass over the m groups that still have a breakpoint inside.
Pivots come from a random sample (solve the sampled problem, then bracket its root by a few standard
deviations of sample rank), which leaves a few per cent of the groups after one pass; a round that fails
to halve the breakpoints inside is followed by a median-of-medians pivot, which always removes 30 %,
so the total work is O(n) in the worst case. Groups left when at most `small` remain are sorted
(constant work).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE = 1 << 14  # groups sampled to place the pivots
SPREAD = 3.0  # half-width of the pivot bracket, in standard deviations of sample rank
SMALL = 1 << 13  # sort what is left once at most this many groups remain
CHUNK = 1 << 16  # CPU passes run over chunks that stay in cache


def breakpoints(s: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(lo, hi) = (b / s, (1 + b) / s); the single place they are computed, so pivots and tests agree."""
    return b / s, (1 + b) / s


def _theta_sum(s: Tensor, b: Tensor, gamma: float) -> float:
    return (gamma * s - b).clamp_(0, 1).sum(dtype=torch.float64).item()


def solve_sorted(s: Tensor, b: Tensor, k, c0: float = 0.0, c1: float = 0.0, w: float = 1.0,
                 lower: float = 0.0, upper: float = math.inf) -> Tensor:
    """Root in [lower, upper] of c0 + c1 g + w * sum_j clip(g s_j - b_j, 0, 1) = k, by sorting breakpoints;
    for every row of s at once, without a host sync.

    s: (..., m), each row one problem; entries with s = 0 never leave theta = 0 (zero groups, padding).
    b: broadcastable to s. k: a number or a tensor of shape s.shape[:-1]. Returns the roots as a float64
    tensor of shape s.shape[:-1]. Each breakpoint changes the slope and intercept of the sum; cumulative
    sums (float64) give S at every breakpoint, the first one with S >= k ends the piece that holds the root.
    """
    if s.shape[-1] == 0:  # no groups left (the linear search's endgame): one padding entry keeps the shapes
        s, b = s.new_zeros((*s.shape[:-1], 1)), b if b.dim() == 0 else b.new_zeros(())
    valid = s > 0
    lo, hi = breakpoints(s, b)
    t, order = torch.sort(torch.cat([lo.masked_fill(~valid, math.inf), hi.masked_fill(~valid, math.inf)], -1), -1)
    ws = (w * s).double()
    wb = torch.where(valid, (w * b).double(), 0.0)
    slope = torch.cat([ws, -ws], -1).gather(-1, order).cumsum(-1).add_(c1)
    cept = torch.cat([-wb, torch.where(valid, wb + w, 0.0)], -1).gather(-1, order).cumsum(-1).add_(c0)
    t64 = t.double()
    if isinstance(k, Tensor):
        k = k.unsqueeze(-1)
    i = ((cept + slope * t64 < k) & (t64 < math.inf)).sum(-1, keepdim=True)  # pieces wholly below k
    prev, has_prev = (i - 1).clamp_(min=0), i > 0
    c0 = torch.where(has_prev, cept.gather(-1, prev), c0)
    c1 = torch.where(has_prev, slope.gather(-1, prev), c1)
    left = torch.where(has_prev, t64.gather(-1, prev).clamp(min=lower), lower)
    right = t64.gather(-1, i.clamp(max=t.shape[-1] - 1)).clamp(max=upper)
    right = torch.maximum(torch.where(i < t.shape[-1], right, upper), left)
    # the root of c0 + c1 g = k on [left, right]; the middle when the piece is flat (S = k on all of it)
    sloped = torch.minimum(torch.maximum((k - c0) / c1, left), right)
    flat = torch.where(right < math.inf, (left + right) / 2, left)
    return torch.where(c1 > 0, sloped, flat).squeeze(-1)


def _classify(s: Tensor, b: Tensor, L: float, R: float, chunk: int):
    """Fix the groups without a breakpoint in (L, R).

    Returns (d0, d1, s_mid, b_mid): the fixed groups add d0 + d1 * gamma to S on [L, R]
    (d0 = #saturated - sum of b over linear, d1 = sum of s over linear); the rest are returned.
    L == R is allowed: then nothing is left and d0 + d1 * L = S(L) exactly.
    """
    shared_b = b.dim() == 0
    n_sat, n_lin, sum_s, sum_b = 0, 0, 0.0, 0.0
    mid_s, mid_b = [], []
    for start in range(0, s.numel(), chunk):
        sc = s[start:start + chunk]
        bc = b if shared_b else b[start:start + chunk]
        lo, hi = breakpoints(sc, bc)
        unsat = hi > L
        lin = (lo <= L) & ((hi >= R) if L < R else unsat)  # with L == R, hi == L is saturated only
        mid = unsat & (lo < R) & ~lin  # not saturated, not zero, not linear
        n_sat += sc.numel() - torch.count_nonzero(unsat)
        linf = lin.to(sc.dtype)
        sum_s += torch.dot(sc, linf).double()
        if shared_b:
            n_lin += torch.count_nonzero(lin)
        else:
            sum_b += torch.dot(bc, linf).double()
            mid_b.append(bc[mid])
        mid_s.append(sc[mid])
    d0 = float(n_sat) - (float(n_lin) * b.item() if shared_b else float(sum_b))
    s_mid = torch.cat(mid_s) if mid_s else s
    b_mid = b if shared_b else (torch.cat(mid_b) if mid_b else b)
    return d0, float(sum_s), s_mid, b_mid


def _inside(s: Tensor, b: Tensor, L: float, R: float) -> Tensor:
    """The breakpoints of these groups that lie strictly inside (L, R)."""
    t = torch.cat(breakpoints(s, b))
    return t[(t > L) & (t < R)]


def _sample_pivots(s, b, k, c0, c1, L, R, size, gen) -> tuple[float, float] | None:
    """Solve the problem on a random sample of the groups, then bracket its root by SPREAD standard
    deviations of rank among the sample's breakpoints inside (L, R); None if the sample has none."""
    m = s.numel()
    size = min(size, max(m // 16, 64))  # the sample's sorts stay a small part of the round
    idx = torch.randint(m, (size,), generator=gen, device=s.device)
    ss, bs = s[idx], (b if b.dim() == 0 else b[idx])
    g = solve_sorted(ss, bs, k, c0, c1, m / size, L, R).item()
    t = torch.sort(_inside(ss, bs, L, R)).values  # only groups with s = 0 have none
    if t.numel() == 0:
        return None
    i = int(torch.count_nonzero(t < g))
    d = math.ceil(SPREAD * math.sqrt(t.numel()))
    return t[max(i - 1 - d, 0)].item(), t[min(i + d, t.numel() - 1)].item()


def mom_select(x: Tensor, kth: int) -> float:
    """The kth smallest value of x (0-based) by median-of-medians selection: O(len(x)) worst case."""
    while x.numel() > 25:
        p = mom_pivot(x)
        below = int(torch.count_nonzero(x < p))
        if kth < below:
            x = x[x < p]
            continue
        at_most = int(torch.count_nonzero(x <= p))
        if kth < at_most:
            return p
        x, kth = x[x > p], kth - at_most
    return torch.sort(x).values[kth].item()


def mom_pivot(x: Tensor) -> float:
    """The median of the medians of groups of five: at least ~30 % of x lies on each side of it."""
    m = x.numel() // 5 * 5
    if m == 0:
        return torch.sort(x).values[x.numel() // 2].item()
    medians = x[:m].view(-1, 5).sort(dim=1).values[:, 2]
    return mom_select(medians, (medians.numel() - 1) // 2)


def solve_linear(s: Tensor, b: Tensor, k: float, *, sample: int = SAMPLE, small: int = SMALL,
                 chunk: int = CHUNK) -> float:
    """Root of S(gamma) = k in O(len(s)) time without a full sort.

    Needs 0 < k < #{s_j > 0}; groups with s_j = 0 need b_j > 0 (they are dropped by the first pass).
    """
    if s.is_cuda:
        chunk = max(s.numel(), 1)  # on a GPU one launch per pass beats cache-sized chunks
    gen = torch.Generator(device=s.device)
    gen.manual_seed(0)
    L, R, c0, c1 = 0.0, math.inf, 0.0, 0.0  # S(L) < k <= S(R); groups fixed on [L, R] add c0 + c1 g
    inside, use_mom = 2 * s.numel(), False
    while s.numel() > small:
        pivots = None if use_mom else _sample_pivots(s, b, k, c0, c1, L, R, sample, gen)
        p1, p2 = pivots or (mom_pivot(_inside(s, b, L, R)),) * 2
        d0, d1, s_mid, b_mid = _classify(s, b, p1, p2, chunk)  # expect the root inside [p1, p2]
        e0, e1 = c0 + d0, c1 + d1  # S(p) = e0 + e1 p + (sum over the groups left) for p in [p1, p2]
        if e0 + e1 * p1 + _theta_sum(s_mid, b_mid, p1) >= k:
            side = (L, p1)
        elif e0 + e1 * p2 + _theta_sum(s_mid, b_mid, p2) < k:
            side = (p2, R)
        else:
            side = None
        if side is None:
            L, R = p1, p2
        else:  # the root is outside [p1, p2] (always so when p1 == p2): fix the groups for that side
            L, R = side
            d0, d1, s_mid, b_mid = _classify(s, b, L, R, chunk)
        c0, c1, s, b = c0 + d0, c1 + d1, s_mid, b_mid
        left = _inside(s, b, L, R).numel()
        inside, use_mom = left, left > inside / 2
    return solve_sorted(s, b, k, c0, c1, 1.0, L, R).item()
