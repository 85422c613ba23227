"""`Proximal`: any torch optimizer followed by the group penalty's prox, theta <- prox_{lr * lam * Omega}(theta).

`Proximal` is a mixin: `class ProxSGD(Proximal, torch.optim.SGD)` is torch.optim.SGD (LR schedulers,
state_dict, momentum unchanged) whose step ends with `regularizer.prox_(lr)`, lr read from the param group
holding the grouped parameters at that moment (schedulers write param_group['lr']). The base step sees
the loss gradient only: the grouped parameters get weight decay 0 from the penalty's own param group.

For SGD this is proximal SGD. For an adaptive base step (Adam, AdamW) it is the *decoupled* proximal
step, as torchao's PAT `PruneOptimizer` applies its proximal map after any base optimizer with
gamma = lr * lambda: the prox uses the scalar step lr, not the exact preconditioned prox
argmin_x lam Omega(x) + 1/2 ||x - y||^2_D in Adam's metric D, which has no closed form for group penalties.
"""
from __future__ import annotations

import torch

from wgsef.optim import require_group_penalty
from wgsef.regularizers.base import GroupPenalty


class Proximal:
    """Mixin over a torch.optim.Optimizer subclass: base step, then the penalty's prox at the current lr."""

    def __init__(self, params, regularizer: GroupPenalty, **hyperparameters):
        name = type(self).__name__
        require_group_penalty(regularizer, name)
        super().__init__(params, **hyperparameters)
        self.regularizer = regularizer
        grouped = {id(p) for p in regularizer.groups.params()}
        holders = [i for i, g in enumerate(self.param_groups) if grouped & {id(p) for p in g["params"]}]
        if len(holders) != 1 or not grouped <= {id(p) for p in self.param_groups[holders[0]]["params"]}:
            raise ValueError(f"{name} needs all grouped parameters in one param group "
                             "(build the groups with wgsef.optim.param_groups)")
        self.grouped_index = holders[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.regularizer.prox_(self.param_groups[self.grouped_index]["lr"])
        return loss
