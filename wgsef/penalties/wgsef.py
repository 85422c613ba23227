"""WGSEF: lam * weighted group sparse envelope function over a model's groups (docs/methods.md section 1).

Scope `layer` evaluates WGSEF on each block of the GroupSet (a layer, or a set of coupled layers) with
its own k_l; scope `global` evaluates one WGSEF over all groups with one k. A prox step never leaves
fewer than k groups nonzero, so exactly k groups come from HSPG or from the k-level finish here:
at epoch `finish_epoch` the k largest-norm groups of each scope are kept, the rest zeroed, the prox
stops and the zeroed groups are held at zero after every step (a fine-tune of the chosen structure).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from wgsef.functional import Scopes, _grad_coeffs, _prox, _value
from wgsef.groups import SCHEMES, GroupSet, build_groups
from wgsef.penalties.base import GroupPenalty

SCOPES = ("layer", "global")
WEIGHTS = ("ones", "size", "flops")


def parse_k(k) -> int | float:
    """A count (int >= 1) or a fraction of groups kept (float in (0, 1))."""
    if isinstance(k, Integral) and not isinstance(k, bool) and k >= 1:
        return int(k)
    if isinstance(k, Real) and not isinstance(k, bool) and 0 < k < 1:
        return float(k)
    raise ValueError(f"k must be a group count (int >= 1) or a kept fraction in (0, 1), got {k!r}")


def group_weights(groups: GroupSet, kind: str) -> Tensor:
    """d_j with mean 1: ones, group size, or FLOPs removed when the group is zero."""
    if kind == "ones":
        return torch.ones(len(groups))
    raw = groups.sizes if kind == "size" else groups.flops
    if raw is None or (raw <= 0).any():
        raise ValueError("weights='flops' needs positive FLOPs for every group (build groups with an example input)")
    return raw / raw.mean()


class WGSEF(GroupPenalty):
    name = "wgsef"

    def __init__(self, lam: float, k: int | float, scheme: str = "filter", scope: str = "layer",
                 weights: str = "ones", layers: list[str] | None = None, block: tuple[int, int] | None = None,
                 finish_epoch: int | None = None):
        super().__init__(lam)
        for value, allowed, what in ((scheme, SCHEMES, "scheme"), (scope, SCOPES, "scope"),
                                     (weights, WEIGHTS, "weights")):
            if value not in allowed:
                raise ValueError(f"unknown {what} '{value}'; choose one of {', '.join(allowed)}")
        if finish_epoch is not None and (not isinstance(finish_epoch, Integral) or finish_epoch < 0):
            raise ValueError(f"finish_epoch must be an epoch number >= 0 or null, got {finish_epoch!r}")
        self.k, self.scheme, self.scope, self.weights = parse_k(k), scheme, scope, weights
        self.layers, self.block, self.finish_epoch = layers, block, finish_epoch
        self.keep: Tensor | None = None  # groups kept by the k-level finish (None before it)
        self.finish: dict[str, float] = {}

    def build_groups(self, model: nn.Module, example_input: Tensor) -> GroupSet:
        groups = build_groups(model, self.scheme, example_input, layers=self.layers, block=self.block)
        if isinstance(self.k, int) and self.k > len(groups):
            raise ValueError(f"k={self.k} is larger than the number of {self.scheme} groups ({len(groups)}); "
                             "give a smaller count or a kept fraction such as k=0.5")
        sizes = [b.n for b in groups.blocks] if self.scope == "layer" else [len(groups)]
        self.bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
        # a count is capped at the scope's groups; a fraction keeps round-half-up(frac * n) groups, at least 1
        self.ks = [min(n, self.k) if isinstance(self.k, int) else max(1, math.floor(self.k * n + 0.5))
                   for n in sizes]
        self.d = group_weights(groups, self.weights)
        return groups

    def _weights(self, a: Tensor) -> Tensor | None:
        """The group weights on a's device and dtype (moved once), or None for weights='ones'."""
        if self.weights == "ones":
            return None
        if self.d.device != a.device or self.d.dtype != a.dtype:
            self.d = self.d.to(a)
        return self.d

    def _scopes(self, a: Tensor):
        """(slice, k, weights or None) of each scope; the weights follow a's device and dtype."""
        d = self._weights(a)
        for lo, hi, k in zip(self.bounds[:-1], self.bounds[1:], self.ks):
            yield slice(lo, hi), k, None if d is None else d[lo:hi]

    @property
    def scopes(self) -> Scopes:
        """All scopes at once, for the batched value, gradient and prox (rebuilt only if the ks change)."""
        if getattr(self, "_batched", None) is None or self._batched.ks != self.ks:
            self._batched = Scopes([hi - lo for lo, hi in zip(self.bounds[:-1], self.bounds[1:])], self.ks)
        return self._batched

    def norm_value(self, a: Tensor) -> Tensor:
        return _value(a, self._weights(a), self.scopes)

    def prox_factors(self, a: Tensor, mu: float) -> Tensor:
        if self.keep is not None:  # after the finish the prox is off; the kept support is enforced
            return self.keep.to(a)
        new = _prox(a, mu, self._weights(a), self.scopes)
        return torch.where(a > 0, new / a, 0.0)

    def grad_coeffs(self, a: Tensor) -> Tensor:
        if self.keep is not None:
            return torch.zeros_like(a)
        return _grad_coeffs(a, self._weights(a), self.scopes)

    # k-level finish -----------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        if self.finish_epoch is not None and epoch >= self.finish_epoch and self.keep is None:
            self.project_top_k()

    @torch.no_grad()
    def project_top_k(self) -> None:
        """Keep the k largest-norm groups of each scope, zero the others, and freeze that support."""
        a = self.groups.norms()
        keep = torch.zeros_like(a, dtype=torch.bool)
        for s, k, _ in self._scopes(a):
            keep[s.start + a[s].topk(k).indices] = True
        self.finish["group_sparsity_before_finish"] = float((a == 0).float().mean())
        self.keep = keep
        self.groups.scale_(keep.to(a))
        self.finish["group_sparsity_after_finish"] = float(self.groups.zero_mask().float().mean())

    def after_step(self, lr: float) -> None:
        if self.keep is not None:
            self.keep = self.keep.to(self.groups.params()[0].device)  # once, after loading a CPU checkpoint
            self.groups.scale_(self.keep)

    # logging and resuming ------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        params = self.groups.params()
        zeros = sum(int((p == 0).sum()) for p in params)
        return {**super().metrics(), "k": sum(self.ks), "param_sparsity": zeros / sum(p.numel() for p in params),
                **self.finish}

    def state_dict(self) -> dict:
        return {"keep": None if self.keep is None else self.keep.cpu(), "finish": dict(self.finish)}

    def load_state_dict(self, state: dict) -> None:
        self.keep, self.finish = state["keep"], dict(state["finish"])
