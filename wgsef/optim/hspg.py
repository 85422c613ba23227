"""HSPG: half-space stochastic projected gradient (Chen et al. 2020; OTO), docs/methods.md section 3.

Problem: min f(theta) + lam * Omega(theta) for any `GroupPenalty` (group lasso, WGSEF). Per step, with
learning rate eta and the direction d = grad f + weight_decay * theta (+ momentum, default 0 as in OTO):

  stage 1 (epoch < n_p)   stage1="prox":        theta <- prox_{eta lam Omega}(theta - eta d)
                          stage1="subgradient": theta <- theta - eta (d + lam grad Omega)  (OTO's code)
  stage 2 (epoch >= n_p)  every group that is zero stays zero forever; for each nonzero group g the trial
                          x_g = theta_g - eta (d_g + lam c_g theta_g), c = penalty.grad_coeffs(norms), is
                          taken unless <x_g, theta_g> < eps_g ||theta_g||^2, in which case theta_g <- 0.

Parameters outside the groups always take the plain SGD step. eps_g is `eps_linear` for a block whose
largest member is a 2-D (Linear) weight and `eps_conv` otherwise. `max_group_sparsity` caps the fraction of
zero groups: when too many groups qualify, the smallest-norm ones are zeroed and the rest kept.
The stage follows the epoch: the training loop calls `set_epoch(epoch)` at the start of every epoch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wgsef.groups.base import GroupSet
from wgsef.optim import param_groups, require_group_penalty
from wgsef.penalties.base import GroupPenalty, Regularizer

STAGE1 = ("prox", "subgradient")


def group_eps(groups: GroupSet, eps_conv: float, eps_linear: float) -> Tensor:
    """eps of every group: eps_linear for blocks of Linear weights (2-D), eps_conv for conv weights."""
    return torch.cat([torch.full((b.n,), eps_linear if max(m.param.ndim for m in b.members) == 2 else eps_conv)
                      for b in groups.blocks])


class HSPG(torch.optim.Optimizer):
    def __init__(self, params, regularizer: GroupPenalty, lr: float, n_p: int, eps_conv: float = 0.0,
                 eps_linear: float = 0.9, momentum: float = 0.0, weight_decay: float = 0.0,
                 stage1: str = "prox", max_group_sparsity: float | None = None):
        self.regularizer = require_group_penalty(regularizer, "hspg")
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or n_p < 0 or int(n_p) != n_p:
            raise ValueError(f"hspg needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, an epoch n_p >= 0; "
                             f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, n_p={n_p}")
        if not (0 <= eps_conv < 1 and 0 <= eps_linear < 1):
            raise ValueError(f"hspg eps must lie in [0, 1), got eps_conv={eps_conv}, eps_linear={eps_linear}")
        if stage1 not in STAGE1:
            raise ValueError(f"unknown hspg stage1 '{stage1}'; choose one of {', '.join(STAGE1)}")
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
        self.n_p, self.stage1, self.max_group_sparsity = int(n_p), stage1, max_group_sparsity
        self.eps = group_eps(regularizer.groups, eps_conv, eps_linear)
        self.epoch = 0

    @property
    def stage(self) -> str:
        """'prox' or 'subgradient' before epoch n_p, 'half_space' from then on."""
        return "half_space" if self.epoch >= self.n_p else self.stage1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hspg"] = {"epoch": self.epoch, "stage": self.stage}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        hspg = state_dict.pop("hspg", None)
        if hspg is None:
            raise ValueError("not an hspg optimizer state (no 'hspg' entry); was it saved by another optimizer?")
        super().load_state_dict(state_dict)
        self.epoch = int(hspg["epoch"])

    def _updates(self, penalty_grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """eta * direction for every parameter with a gradient (or a penalty gradient)."""
        updates = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and p not in penalty_grads:
                    continue
                d = p.grad if p.grad is not None else torch.zeros_like(p)
                if group["weight_decay"]:
                    d = d + group["weight_decay"] * p
                if p in penalty_grads:
                    d = d + penalty_grads[p]
                if group["momentum"]:
                    buf = self.state[p].get("momentum_buffer")
                    buf = d.clone() if buf is None else buf.mul_(group["momentum"]).add_(d)
                    self.state[p]["momentum_buffer"] = d = buf
                updates[p] = group["lr"] * d
        return updates

    def _penalty_grads(self, norms: Tensor) -> dict[Tensor, Tensor]:
        """lam * c_g * theta_g on every member of every group (0 on zero groups)."""
        reg = self.regularizer
        coeffs = reg.lam * reg.grad_coeffs(norms)
        grads: dict[Tensor, Tensor] = {}
        for block, c in zip(reg.groups.blocks, reg.groups.split(coeffs)):
            for m in block.members:
                g = m.expand(c) * m.param
                grads[m.param] = grads[m.param] + g if m.param in grads else g
        return grads

    def _zero_candidates(self, norms: Tensor, updates: dict[Tensor, Tensor]) -> Tensor:
        """Nonzero groups whose trial point makes an obtuse-enough angle with theta_g, after the cap."""
        sq = norms.square()
        trial_dot = sq - self.regularizer.groups.dots(updates)  # <theta - eta d, theta>
        out = (norms > 0) & (trial_dot < self.eps.to(sq) * sq)
        if self.max_group_sparsity is None:
            return out
        budget = math.floor(self.max_group_sparsity * len(norms)) - int((norms == 0).sum())
        if int(out.sum()) <= budget:
            return out
        idx = out.nonzero().squeeze(1)
        chosen = idx[norms[idx].argsort()[:max(budget, 0)]]  # zero the smallest, keep the largest norms
        capped = torch.zeros_like(out)
        capped[chosen] = True
        return capped

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        reg, stage = self.regularizer, self.stage
        norms = reg.groups.norms()
        penalty_grads = self._penalty_grads(norms) if stage != "prox" and reg.lam > 0 else {}
        updates = self._updates(penalty_grads)
        zero = self._zero_candidates(norms, updates) if stage == "half_space" else None
        for p, u in updates.items():
            p.sub_(u)
        if stage == "prox":
            reg.prox_(self.param_groups[self._grouped_index]["lr"])
        elif stage == "half_space":
            reg.groups.scale_(((norms > 0) & ~zero).to(norms.dtype))
        return loss


def hspg(model: nn.Module, regularizer: Regularizer, lr: float, n_p: int = 5, eps_conv: float = 0.0,
         eps_linear: float = 0.9, momentum: float = 0.0, weight_decay: float = 0.0, stage1: str = "prox",
         max_group_sparsity: float | None = None) -> HSPG:
    """HSPG over `model` for a group penalty; grouped parameters get no weight decay (the penalty replaces it)."""
    require_group_penalty(regularizer, "hspg")
    return HSPG(param_groups(model, regularizer, weight_decay), regularizer, lr=lr, n_p=n_p, eps_conv=eps_conv,
                eps_linear=eps_linear, momentum=momentum, weight_decay=weight_decay, stage1=stage1,
                max_group_sparsity=max_group_sparsity)
