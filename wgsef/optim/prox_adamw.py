"""Proximal AdamW: an AdamW step on the loss gradient, then theta <- prox_{lr * lam * Omega}(theta).

Decoupled, not the exact preconditioned prox (see `wgsef.optim.proximal`): AdamW's step is taken as
usual and the penalty's prox follows with mu = lr * lam, as AdamW decouples weight decay from the
adaptive step. With Adam's learning rates (~1e-3) the same per-step shrinkage needs a lam about
lr_SGD / lr_Adam times larger than with prox_sgd.
"""
from __future__ import annotations

import torch
from torch import nn

from wgsef.optim import param_groups, require_group_penalty
from wgsef.optim.proximal import Proximal
from wgsef.regularizers.base import Regularizer


class ProxAdamW(Proximal, torch.optim.AdamW):
    pass


def prox_adamw(model: nn.Module, regularizer: Regularizer, lr: float, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False) -> ProxAdamW:
    """Factory (configs/optimizer/prox_adamw.yaml): grouped params without weight decay (the penalty
    replaces it), the others with AdamW's decoupled weight decay."""
    require_group_penalty(regularizer, "prox_adamw")
    return ProxAdamW(param_groups(model, regularizer, weight_decay), regularizer, lr=lr, betas=tuple(betas),
                     eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
