"""Group lasso: lam * Omega(theta), Omega = sum_j w_j ||theta_{G_j}||_2 (docs/methods.md section 2).

The norm is NOT squared: a squared group norm is a ridge penalty (weight decay) and never zeroes a group.
Use with `optimizer=prox_sgd` (block soft-threshold after each step) or `optimizer=hspg`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from wgsef.functional import _group_lasso_prox, _group_lasso_value
from wgsef.groups import SCHEMES, build_groups
from wgsef.groups.base import GroupSet
from wgsef.regularizers.base import GroupPenalty

WEIGHTS = ("sqrt_size", "ones")


class GroupLasso(GroupPenalty):
    """Group lasso over one grouping scheme (filter, channel, shape, depth, unstructured, block).

    `layers` (globs) and `block` (r, c) are passed to `wgsef.groups.build_groups`. Assigning `.groups`
    directly (a hand-built GroupSet) is supported: the weights follow whatever groups are set.
    """

    name = "group_lasso"

    def __init__(self, lam: float, scheme: str = "filter", weights: str = "sqrt_size",
                 layers: list[str] | None = None, block: tuple[int, int] | None = None,
                 weight_decay: float | None = None):
        super().__init__(lam, weight_decay)
        for value, allowed, what in ((scheme, SCHEMES, "scheme"), (weights, WEIGHTS, "group lasso weights")):
            if value not in allowed:
                raise ValueError(f"unknown {what} '{value}'; choose one of {', '.join(allowed)}")
        self.scheme, self.weights, self.layers, self.block = scheme, weights, layers, block

    def build_groups(self, model: nn.Module, example_input: Tensor) -> GroupSet:
        return build_groups(model, self.scheme, example_input, layers=self.layers, block=self.block)

    def group_weights(self, like: Tensor) -> Tensor:
        """w_j = sqrt(|G_j|) (element count, coupled BN/bias included) or 1, on `like`'s device and dtype
        (built once per device, kept by the GroupSet)."""
        def make() -> Tensor:
            sizes = self.groups.sizes
            return sizes.sqrt() if self.weights == "sqrt_size" else torch.ones_like(sizes)
        return self.groups.cached(("group_lasso", self.weights), like, make)

    def norm_value(self, a: Tensor) -> Tensor:
        return _group_lasso_value(a, self.group_weights(a))

    def prox_factors(self, a: Tensor, mu: float) -> Tensor:
        # block soft-threshold max(0, 1 - mu w_j / a_j), as new norm / old norm; a zero group stays zero
        new = _group_lasso_prox(a, mu, self.group_weights(a))
        return torch.where(a > 0, new / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))

    def grad_coeffs(self, a: Tensor) -> Tensor:
        # d/dtheta_g of w_g ||theta_g|| = (w_g / a_g) theta_g; 0 on a zero group (a valid subgradient)
        w = self.group_weights(a)
        return torch.where(a > 0, w / a.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(a))
