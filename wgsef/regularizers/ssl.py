"""SSL: structured sparsity learning (Wen et al., NeurIPS 2016), docs/methods.md section 2.

Group lasso over any combination of filter, channel, shape and depth groups, each with its own lambda:
R(theta) = sum_t lam_t * sum_{g in type t} w_g ||theta_g||_2 (w_g = 1 as in the paper, or sqrt(|g|)).

mode="subgradient" is the original recipe: the penalty is added to the loss, so SGD (+ momentum) follows
lam_t w_g theta_g / ||theta_g|| (0 on a zero group); exact zeros come at `finetune_epoch`, where every
group with norm below `threshold` is zeroed and the network is fine-tuned with that structure frozen
(zeroed groups held at zero after every step, penalty off). mode="prox" instead applies the block
soft-threshold of each group type after each step, one type after the other: overlapping groups of
different types have no closed-form joint prox, so this sequential composition is the project's own
choice. SSL keeps the optimizer's weight decay on every parameter, as the original Caffe recipe does.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from wgsef.groups.base import GroupSet
from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.group_lasso import GroupLasso

TYPES = ("filter", "channel", "shape", "depth")
MODES = ("subgradient", "prox")


class _GroupLassoTerm(torch.autograd.Function):
    """sum over group sets t of sum_g c_tg <theta_g, stopgrad(theta_g)>, differentiable in the parameters.

    With c_tg = lam_t w_g / ||theta_g|| (0 on zero groups) its value is sum_t lam_t sum_g w_g ||theta_g|| and
    its gradient is exactly lam_t w_g theta_g / ||theta_g||, and 0 on a zero group, where autograd through
    a square root gives NaN. The gradient of all sets comes from a few batched ops (GroupSet.scaled), one
    tensor per parameter however many sets share it.
    """

    @staticmethod
    def forward(ctx, value, sets, coeffs, *params):
        ctx.sets, ctx.coeffs, ctx.params = sets, coeffs, params
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        grads: dict[int, Tensor] = {}
        for groups, c in zip(ctx.sets, ctx.coeffs):
            ps, gs = groups.params(), groups.scaled(c)
            shared = [i for i, p in enumerate(ps) if id(p) in grads]
            if shared:
                torch._foreach_add_([grads[id(ps[i])] for i in shared], [gs[i] for i in shared])
            grads.update((id(p), g) for p, g in zip(ps, gs) if id(p) not in grads)
        out = [grads[id(p)] for p in ctx.params]
        torch._foreach_mul_(out, grad)
        return (None, None, None, *out)


def group_lasso_term(sets: list[GroupSet], coeffs: list[Tensor], sq_norms: list[Tensor]) -> Tensor:
    """sum_t sum_g c_tg ||theta_g||^2 with gradient c_tg theta_g (see _GroupLassoTerm); sq_norms are each
    set's squared group norms (detached)."""
    value = sum((c * sq).sum() for c, sq in zip(coeffs, sq_norms))
    params = list({id(p): p for groups in sets for p in groups.params()}.values())
    return _GroupLassoTerm.apply(value, sets, coeffs, *params)


class SSL(Regularizer):
    name = "ssl"

    def __init__(self, lams: dict[str, float], mode: str = "subgradient", threshold: float = 1e-4,
                 finetune_epoch: int | None = None, layers=None, weights: str = "ones"):
        lams = dict(lams)
        if not lams:
            raise ValueError(f"SSL needs at least one group type in lams, e.g. {{'filter': 1e-4}}; types: {', '.join(TYPES)}")
        unknown = sorted(set(lams) - set(TYPES))
        if unknown:
            raise ValueError(f"unknown SSL group types {unknown}; choose from {', '.join(TYPES)}")
        if mode not in MODES:
            raise ValueError(f"unknown SSL mode '{mode}'; choose one of {', '.join(MODES)}")
        if threshold < 0:
            raise ValueError(f"SSL threshold must be >= 0, got {threshold}")
        if finetune_epoch is not None and (int(finetune_epoch) != finetune_epoch or finetune_epoch < 0):
            raise ValueError(f"SSL finetune_epoch must be an epoch number >= 0 or null, got {finetune_epoch!r}")
        self.penalties = {t: GroupLasso(lam, scheme=t, weights=weights, layers=layers) for t, lam in lams.items()}
        self.mode, self.threshold, self.finetune_epoch = mode, float(threshold), finetune_epoch
        self.masks: dict[str, Tensor] | None = None  # keep-masks once the structure is frozen

    @property
    def frozen(self) -> bool:
        return self.masks is not None

    def attach(self, model: nn.Module, example_input: Tensor) -> nn.Module:
        # build_groups raises a ValueError for depth groups on a network without shortcuts (e.g. VGG)
        for pen in self.penalties.values():
            pen.attach(model, example_input)
        return model

    def value(self) -> Tensor:
        """sum_t lam_t Omega_t(theta)."""
        return sum(pen.lam * pen.value() for pen in self.penalties.values())

    def loss(self) -> Tensor | None:
        if self.mode != "subgradient" or self.frozen:
            return None
        pens = list(self.penalties.values())
        sq = [pen.groups.sq_norms() for pen in pens]
        coeffs = [pen.grad_coeffs(s.sqrt()).mul_(pen.lam) for pen, s in zip(pens, sq)]
        return group_lasso_term([pen.groups for pen in pens], coeffs, sq)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.finetune_epoch is not None and epoch >= self.finetune_epoch and not self.frozen:
            self.freeze()

    @torch.no_grad()
    def freeze(self) -> None:
        """Zero every group whose norm is below `threshold` (all types judged on the same weights), then
        hold that structure for the rest of training with the penalty off."""
        self.masks = {t: pen.groups.norms() >= self.threshold for t, pen in self.penalties.items()}
        self._apply_masks()

    def _apply_masks(self) -> None:
        for t, pen in self.penalties.items():
            like = pen.groups.params()[0]  # masks restored from a checkpoint live on the CPU
            pen.groups.scale_(self.masks[t].to(device=like.device, dtype=like.dtype))

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if self.frozen:
            self._apply_masks()
        elif self.mode == "prox":
            for pen in self.penalties.values():
                pen.prox_(lr)

    def metrics(self) -> dict[str, float]:
        """Per group type, plus group_sparsity over the groups of all types together."""
        out, penalty, zero, total = {}, 0.0, 0, 0
        for t, pen in self.penalties.items():
            a = pen.groups.norms()
            zero, total = zero + int((a == 0).sum()), total + a.numel()
            value = float(pen.norm_value(a))
            penalty += pen.lam * value
            out[f"{t}_penalty"] = pen.lam * value
            out[f"{t}_group_sparsity"] = float((a == 0).float().mean())
            out[f"{t}_below_threshold"] = float((a < self.threshold).float().mean())
            out[f"{t}_nonzero_groups"] = int((a > 0).sum())
        out["penalty"] = penalty
        out["group_sparsity"] = zero / max(total, 1)
        out["frozen"] = float(self.frozen)
        return out

    def state_dict(self) -> dict:
        return {"masks": None if self.masks is None else {t: m.cpu() for t, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.masks = state["masks"]
