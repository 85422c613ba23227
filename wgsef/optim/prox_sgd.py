"""Proximal SGD: an SGD step on the loss gradient, then theta <- prox_{lr * lam * Omega}(theta).

`ProxSGD` is torch.optim.SGD (so LR schedulers, state_dict and momentum work unchanged) whose step
ends with `regularizer.prox_(lr)`, lr read from the param group holding the grouped parameters at
that moment (schedulers write param_group['lr']). Momentum and weight decay see the loss gradient
only: the grouped parameters get weight decay 0 from the penalty's own param group.
"""
from __future__ import annotations

import torch
from torch import nn

from wgsef.optim import param_groups, require_group_penalty
from wgsef.penalties.base import GroupPenalty, Regularizer


class ProxSGD(torch.optim.SGD):
    def __init__(self, params, regularizer: GroupPenalty, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        require_group_penalty(regularizer, "prox_sgd")
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.regularizer = regularizer
        grouped = {id(p) for p in regularizer.groups.params()}
        holders = [i for i, g in enumerate(self.param_groups) if grouped & {id(p) for p in g["params"]}]
        if len(holders) != 1 or not grouped <= {id(p) for p in self.param_groups[holders[0]]["params"]}:
            raise ValueError("prox_sgd needs all grouped parameters in one param group "
                             "(build the groups with wgsef.optim.param_groups)")
        self.grouped_index = holders[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.regularizer.prox_(self.param_groups[self.grouped_index]["lr"])
        return loss


def prox_sgd(model: nn.Module, regularizer: Regularizer, lr: float, momentum: float = 0.9,
             weight_decay: float = 5e-4, nesterov: bool = False) -> ProxSGD:
    """Factory (configs/optimizer/prox_sgd.yaml): grouped params without weight decay, others plain SGD."""
    require_group_penalty(regularizer, "prox_sgd")
    return ProxSGD(param_groups(model, regularizer, weight_decay), regularizer, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, nesterov=nesterov)
