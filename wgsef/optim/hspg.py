"""HSPG: half-space stochastic projected gradient (Chen et al. 2020; OTO), docs/methods.md section 3.

Problem: min f(theta) + lam * Omega(theta) for any `GroupPenalty` (group lasso, WGSEF). Per step, with
learning rate eta, the direction d = grad f + weight_decay * theta (+ lam c_g theta_g on grouped parameters
outside the prox stage, c = penalty.grad_coeffs(norms)), then momentum on d (default 0, as in OTO):

  stage 1 (epoch < n_p)   stage1="subgradient": theta <- theta - eta d        (OTO's code; the default)
                          stage1="prox":        theta <- prox_{eta lam Omega}(theta - eta d)
  stage 2 (epoch >= n_p)  every group that is zero stays zero forever; for each nonzero group g the trial
                          x_g = theta_g - eta d_g is taken unless <x_g, theta_g> < eps_g ||theta_g||^2, in
                          which case theta_g <- 0.

Parameters outside the groups always take the plain (momentum) SGD step. eps_g is `eps_linear` for a
block whose largest member is a 2-D (Linear) weight and `eps_conv` otherwise. `max_group_sparsity` caps the
fraction of zero groups: when too many groups qualify, the smallest-norm ones are zeroed and the rest kept.

Momentum: `momentum_buffers="per_stage"` (OTO) keeps one buffer for stage 1 and starts the half-space
stage from a fresh one; "shared" carries one buffer across the switch.

k-aware half-space stage (a penalty with a target k per scope, i.e. WGSEF; `keep_top_k`): only the
nonzero groups outside their scope's top-k by r_j = a_j / sqrt(d_j) (`keep_score`, the ranking of WGSEF's
prox, top-k finish and closing_mu) are candidates for the half-space test,
so no scope ever falls below k nonzero groups. The candidates' penalty gradient is WGSEF's tail gradient
lam sqrt(d_j) T theta_j / a_j with the tail mean T replaced by v_(k), v of the scope's k-th ranked group: a group
lasso, which zeroes in finite time, where the 2-homogeneous WGSEF (T shrinks with the candidates) only
shrinks them geometrically. At every epoch of stage 2 after the first, each scope that still has more than k
nonzero groups multiplies its candidates' lam by `lam_growth` (a lam continuation on the candidates only).
Exactly k then comes from the half-space test itself, or from WGSEF's hard top-k finish
(`regularizer.finish_epoch`) for whatever it has not zeroed.

The step is batched and sync-free: GroupSet's batched norms, dots and scaling, torch._foreach_* updates,
eps and the scope tables built once on the device. The stage follows the epoch: the training loop calls
`set_epoch(epoch)` at the start of every epoch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wgsef.functional import rank_in_scope  # noqa: F401 (imported from here by older code and tests)
from wgsef.groups.base import GroupSet
from wgsef.optim import param_groups, require_group_penalty
from wgsef.regularizers.base import GroupPenalty, Regularizer

STAGE1 = ("subgradient", "prox")
BUFFERS = ("per_stage", "shared")


def group_eps(groups: GroupSet, eps_conv: float, eps_linear: float) -> Tensor:
    """eps of every group: eps_linear for blocks of Linear weights (2-D), eps_conv for conv weights."""
    return torch.cat([torch.full((b.n,), eps_linear if max(m.param.ndim for m in b.members) == 2 else eps_conv)
                      for b in groups.blocks])


def capped(zero: Tensor, norms: Tensor, max_fraction: float) -> Tensor:
    """`zero` limited so that at most floor(max_fraction * n) groups end up zero: the smallest-norm
    candidates are kept as candidates, the rest dropped (sync-free)."""
    budget = math.floor(max_fraction * len(norms)) - (norms == 0).sum()
    key = torch.where(zero, norms, torch.full_like(norms, math.inf))
    order = key.argsort(stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(norms), device=norms.device)
    return zero & (rank < budget)


class HSPG(torch.optim.Optimizer):
    def __init__(self, params, regularizer: GroupPenalty, lr: float, n_p: int, eps_conv: float = 0.0,
                 eps_linear: float = 0.9, momentum: float = 0.0, weight_decay: float = 0.0,
                 stage1: str = "subgradient", max_group_sparsity: float | None = None,
                 momentum_buffers: str = "per_stage", keep_top_k: bool = True, lam_growth: float = 4.0):
        self.regularizer = require_group_penalty(regularizer, "hspg")
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or n_p < 0 or int(n_p) != n_p:
            raise ValueError(f"hspg needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, an epoch n_p >= 0; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, n_p={n_p}")
        if not (0 <= eps_conv < 1 and 0 <= eps_linear < 1):
            raise ValueError(f"hspg eps must lie in [0, 1), got eps_conv={eps_conv}, eps_linear={eps_linear}")
        if lam_growth < 1:
            raise ValueError(f"hspg lam_growth must be >= 1, got {lam_growth}")
        for value, allowed, what in ((stage1, STAGE1, "stage1"), (momentum_buffers, BUFFERS, "momentum_buffers")):
            if value not in allowed:
                raise ValueError(f"unknown hspg {what} '{value}'; choose one of {', '.join(allowed)}")
        if max_group_sparsity is not None and not 0 <= max_group_sparsity <= 1:
            raise ValueError(f"max_group_sparsity must lie in [0, 1], got {max_group_sparsity}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        owners = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        grouped = regularizer.groups.params()
        if any(p not in owners for p in grouped):
            raise ValueError("hspg must be given every parameter of the regularizer's groups")
        if len({owners[p] for p in grouped}) > 1:
            raise ValueError("hspg needs all grouped parameters in one param group (one learning rate)")
        self._grouped_index = owners[grouped[0]] if grouped else 0
        self._grouped = set(grouped)
        self.n_p, self.stage1, self.max_group_sparsity = int(n_p), stage1, max_group_sparsity
        self.momentum_buffers, self.lam_growth = momentum_buffers, lam_growth
        self.eps = group_eps(regularizer.groups, eps_conv, eps_linear)
        self.scopes = self._scope_table(regularizer) if keep_top_k else None
        self.lam_boost = None if self.scopes is None else torch.ones(len(self.scopes["k"]))  # per scope
        self.epoch = 0

    @staticmethod
    def _scope_table(reg: GroupPenalty) -> dict[str, Tensor] | None:
        """Per group: its scope, its scope's first position and k; None for penalties without a k."""
        if not hasattr(reg, "ks"):
            return None
        sizes = torch.tensor(reg.bounds).diff()
        scope = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        return {"scope": scope, "start": torch.tensor(reg.bounds[:-1])[scope],
                "k_of": torch.tensor(reg.ks)[scope], "k": torch.tensor(reg.ks)}

    @property
    def stage(self) -> str:
        """'subgradient' or 'prox' before epoch n_p, 'half_space' from then on."""
        return "half_space" if self.epoch >= self.n_p else self.stage1

    def _buffer_key(self) -> str:
        half = self.stage == "half_space" and self.momentum_buffers == "per_stage"
        return "momentum_buffer_half_space" if half else "momentum_buffer"

    @torch.no_grad()
    def set_epoch(self, epoch: int) -> None:
        """Enter `epoch`: in stage 2, drop stage 1's momentum (per_stage) and continue the candidates' lam."""
        first_half_space = self.stage != "half_space" and epoch >= self.n_p
        if self.scopes is not None and epoch > self.n_p and epoch > self.epoch and self.lam_growth > 1:
            self._grow_lam()
        self.epoch = int(epoch)
        if first_half_space and self.momentum_buffers == "per_stage":
            for state in self.state.values():
                state.pop("momentum_buffer", None)

    def _grow_lam(self) -> None:
        """Multiply the candidates' lam by lam_growth in every scope still above k (on the device)."""
        norms = self.regularizer.groups.norms()
        self._to_device(norms)
        nonzero = torch.zeros_like(self.lam_boost).index_add_(0, self.scopes["scope"], (norms > 0).to(norms))
        self.lam_boost = torch.where(nonzero > self.scopes["k"], self.lam_boost * self.lam_growth, self.lam_boost)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hspg"] = {"epoch": self.epoch, "stage": self.stage,
                         "lam_boost": None if self.lam_boost is None else self.lam_boost.cpu()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hspg = state_dict.pop("hspg", None)
        if hspg is None:
            raise ValueError("not an hspg optimizer state (no 'hspg' entry); was it saved by another optimizer?")
        super().load_state_dict(state_dict)
        self.epoch = int(hspg["epoch"])
        if self.lam_boost is not None and hspg.get("lam_boost") is not None:
            self.lam_boost = hspg["lam_boost"].to(self.lam_boost)

    # -- the step ----------------------------------------------------------------------------------------
    def _to_device(self, like: Tensor) -> None:
        """Move eps and the scope tables to the parameters' device and dtype, once."""
        if self.eps.device != like.device or self.eps.dtype != like.dtype:
            self.eps = self.eps.to(like)
            if self.scopes is not None:
                self.scopes = {k: v.to(like.device) for k, v in self.scopes.items()}
                self.lam_boost = self.lam_boost.to(like)

    def _penalty_directions(self, coeffs: Tensor) -> dict[Tensor, Tensor]:
        """coeffs_g theta_g (+ the loss gradient) on every grouped parameter (new tensors)."""
        params = self.regularizer.groups.params()
        work = dict(zip(params, self.regularizer.groups.scaled(coeffs)))
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            torch._foreach_add_([work[p] for p in with_grad], [p.grad for p in with_grad])
        return work

    def _directions(self, penalty: dict[Tensor, Tensor]) -> list[tuple[dict, list[Tensor], list[Tensor]]]:
        """(param group, params, directions after weight decay and momentum) for every param group."""
        key, out = self._buffer_key(), []
        for group in self.param_groups:
            params = [p for p in group["params"] if p in penalty or p.grad is not None]
            if not params:
                continue
            ds = [penalty[p] if p in penalty else p.grad for p in params]
            if group["weight_decay"]:
                ds = torch._foreach_add(ds, params, alpha=group["weight_decay"])
            if group["momentum"]:
                states = [self.state[p] for p in params]
                old = [i for i, s in enumerate(states) if key in s]
                if old:
                    bufs = [states[i][key] for i in old]
                    torch._foreach_mul_(bufs, group["momentum"])
                    torch._foreach_add_(bufs, [ds[i] for i in old])
                for i, s in enumerate(states):
                    if key not in s:
                        s[key] = ds[i].detach().clone()
                ds = [s[key] for s in states]
            out.append((group, params, ds))
        return out

    def _candidates(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        """The k-aware stage's candidates (outside their scope's top-k by the penalty's keep ranking, the one
        its prox and top-k finish use: a / sqrt(d)) and their penalty coefficients: a group lasso
        lam_boost * lam * sqrt(d_j) v_(k) / a_j, v_(k) = sqrt(d) a of the scope's k-th ranked group."""
        reg, s = self.regularizer, self.scopes
        root_d = torch.ones_like(norms) if getattr(reg, "weights", "ones") == "ones" else reg.d.to(norms).sqrt()
        v = norms * root_d
        rank = reg.keep_rank(norms)
        v_k = torch.zeros_like(self.lam_boost).index_add_(0, s["scope"], torch.where(rank == s["k_of"] - 1, v, 0.0))
        scale = reg.lam * self.lam_boost[s["scope"]] * root_d * v_k[s["scope"]]
        coeffs = torch.where(norms > 0, scale / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        return rank >= s["k_of"], coeffs

    def _zero(self, norms: Tensor, trial_dot: Tensor, outside: Tensor | None) -> Tensor:
        """Nonzero groups whose trial point leaves the half-space (k-aware candidates only, then the cap)."""
        zero = (norms > 0) & (trial_dot < self.eps * norms.square())
        if outside is not None:
            zero &= outside
        return zero if self.max_group_sparsity is None else capped(zero, norms, self.max_group_sparsity)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reg, stage = self.regularizer, self.stage
        subgradient = stage != "prox" and reg.lam > 0
        norms = reg.groups.norms() if subgradient or stage == "half_space" else None
        outside = None
        if stage == "half_space":
            self._to_device(norms)
            if self.scopes is not None:
                outside, tail = self._candidates(norms)
        if subgradient:
            coeffs = reg.lam * reg.grad_coeffs(norms)
            if outside is not None:
                coeffs = torch.where(outside, tail, coeffs)
        updates = self._directions(self._penalty_directions(coeffs) if subgradient else {})
        if stage == "half_space":
            grouped = {p: d for _, params, ds in updates for p, d in zip(params, ds) if p in self._grouped}
            lr = self.param_groups[self._grouped_index]["lr"]
            trial_dot = norms.square() - lr * reg.groups.dots(grouped)  # <theta - eta d, theta>
            keep = (norms > 0) & ~self._zero(norms, trial_dot, outside)
        for group, params, ds in updates:
            torch._foreach_add_(params, ds, alpha=-group["lr"])
        if stage == "prox":
            reg.prox_(self.param_groups[self._grouped_index]["lr"])
        elif stage == "half_space":
            reg.groups.scale_(keep.to(norms.dtype))
        return loss


def hspg(model: nn.Module, regularizer: Regularizer, lr: float, n_p: int = 5, eps_conv: float = 0.0,
         eps_linear: float = 0.9, momentum: float = 0.0, weight_decay: float = 0.0, stage1: str = "subgradient",
         max_group_sparsity: float | None = None, momentum_buffers: str = "per_stage", keep_top_k: bool = True,
         lam_growth: float = 4.0) -> HSPG:
    """HSPG over `model` for a group penalty; weight decay as every optimizer: `weight_decay` on every parameter,
    grouped ones too unless the penalty sets its own (`regularizer.weight_decay`)."""
    require_group_penalty(regularizer, "hspg")
    return HSPG(param_groups(model, regularizer, weight_decay), regularizer, lr=lr, n_p=n_p, eps_conv=eps_conv,
                eps_linear=eps_linear, momentum=momentum, weight_decay=weight_decay, stage1=stage1,
                max_group_sparsity=max_group_sparsity, momentum_buffers=momentum_buffers, keep_top_k=keep_top_k,
                lam_growth=lam_growth)
