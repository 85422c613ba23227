"""Optimizer factories with one signature: `factory(model, regularizer, **hyperparameters)`.

Hydra configs point at these with `_partial_: true`; the training loop calls `factory(model, regularizer)`
after the regularizer has been attached, so each method can ask for its own param-group settings.
"""
from __future__ import annotations

import torch
from torch import nn

from wgsef.regularizers.base import GroupPenalty, Regularizer


def require_group_penalty(regularizer: Regularizer, optimizer: str) -> GroupPenalty:
    """The proximal optimizers work on group penalties (WGSEF, group lasso) only, once attached."""
    if not isinstance(regularizer, GroupPenalty):
        raise ValueError(f"optimizer {optimizer} needs a group penalty regularizer (wgsef or group_lasso), "
                         f"got {type(regularizer).__name__}")
    if regularizer.groups is None:
        raise ValueError(f"attach the regularizer to the model (regularizer.attach) before building {optimizer}")
    return regularizer


def param_groups(model: nn.Module, regularizer: Regularizer, weight_decay: float) -> list[dict]:
    """The regularizer's special groups, then every other trainable parameter with `weight_decay` (last:
    the loop reads the weights' lr from the last group). Groups marked "external" are stepped by the
    regularizer itself (GBLR's structural Adam) and left out."""
    special = [dict(g) for g in regularizer.param_groups(model)]
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [g for g in special if g["params"] and not g.get("external")]
    if rest:
        groups.append({"params": rest, "weight_decay": weight_decay})
    return groups


def sgd(model: nn.Module, regularizer: Regularizer, lr: float, momentum: float = 0.9,
        weight_decay: float = 5e-4, nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, regularizer, weight_decay), lr=lr, momentum=momentum,
                           weight_decay=weight_decay, nesterov=nesterov)


def adamw(model: nn.Module, regularizer: Regularizer, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """Plain AdamW (configs/optimizer/adamw.yaml): the transformer recipes' optimizer (Gaudi-GBLR's ViT:
    lr 5e-4, weight decay 0.05) for dense and GBLR runs."""
    return torch.optim.AdamW(param_groups(model, regularizer, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             weight_decay=weight_decay)
