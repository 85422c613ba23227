"""Proximal SGD: an SGD step on the loss gradient, then theta <- prox_{lr * lam * Omega}(theta) (`Proximal`)."""
from __future__ import annotations

import torch
from torch import nn

from wgsef.optim import param_groups, require_group_penalty
from wgsef.optim.proximal import Proximal
from wgsef.regularizers.base import Regularizer


class ProxSGD(Proximal, torch.optim.SGD):
    pass


def prox_sgd(model: nn.Module, regularizer: Regularizer, lr: float, momentum: float = 0.9,
             weight_decay: float = 5e-4, nesterov: bool = False) -> ProxSGD:
    """Factory (configs/optimizer/prox_sgd.yaml): grouped params without weight decay, others plain SGD."""
    require_group_penalty(regularizer, "prox_sgd")
    return ProxSGD(param_groups(model, regularizer, weight_decay), regularizer, lr=lr, momentum=momentum,
                   weight_decay=weight_decay, nesterov=nesterov)
