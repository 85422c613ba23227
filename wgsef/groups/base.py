"""Groups of weights as views of parameter tensors.

A *member* is one parameter tensor seen through a reshape, with some axes of that view indexing the
groups: filter groups of a conv weight W[O, I, kh, kw] are the view (O, I*kh*kw) with group axis 0;
shape groups are the same view with group axis 1; block groups are (O/r, r, C/c, c) with axes (0, 2).
A *block* is a set of n groups made of one or more members that share the group index (a filter group
is the conv filter plus its bias and BatchNorm gamma/beta; a residual-coupled channel spans several
layers). A *GroupSet* concatenates blocks; every operation works on the vector of all group norms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
from torch import Tensor


@dataclass(frozen=True)
class Member:
    """One parameter seen as `shape`, grouped along `group_axes` (row-major group index)."""

    param: Tensor
    shape: tuple[int, ...]
    group_axes: tuple[int, ...]

    def __post_init__(self):
        if prod(self.shape) != self.param.numel():
            raise ValueError(f"member view {self.shape} does not match a parameter of shape {tuple(self.param.shape)}")
        if not self.group_axes or sorted(set(self.group_axes)) != list(self.group_axes):
            raise ValueError(f"group_axes must be increasing and non-empty, got {self.group_axes}")

    @property
    def n_groups(self) -> int:
        return prod(self.shape[a] for a in self.group_axes)

    @property
    def group_size(self) -> int:
        return self.param.numel() // self.n_groups

    def _rows(self, t: Tensor) -> Tensor:
        """`t` (shaped like the parameter) as (n_groups, group_size)."""
        rest = [a for a in range(len(self.shape)) if a not in self.group_axes]
        return t.reshape(self.shape).permute(*self.group_axes, *rest).reshape(self.n_groups, -1)

    def sq_norms(self) -> Tensor:
        return self._rows(self.param.detach()).pow(2).sum(1)

    def dots(self, other: Tensor) -> Tensor:
        """Per-group inner product of the parameter with `other` (e.g. its gradient)."""
        return (self._rows(self.param.detach()) * self._rows(other)).sum(1)

    def _broadcast(self, per_group: Tensor) -> Tensor:
        bshape = [self.shape[a] if a in self.group_axes else 1 for a in range(len(self.shape))]
        return per_group.to(self.param.dtype).reshape(bshape)

    @torch.no_grad()
    def scale_(self, factors: Tensor) -> None:
        self.param.data.view(self.shape).mul_(self._broadcast(factors))

    def expand(self, per_group: Tensor) -> Tensor:
        """A tensor shaped like the parameter holding each group's value on its entries."""
        return self._broadcast(per_group).expand(self.shape).reshape(self.param.shape)


@dataclass
class GroupBlock:
    """n groups sharing one index across `members` (usually one layer's groups).

    flops: FLOPs the network saves when each group is zero (None if unknown).
    """

    name: str
    members: list[Member]
    flops: Tensor | None = None

    def __post_init__(self):
        counts = {m.n_groups for m in self.members}
        if len(counts) != 1:
            raise ValueError(f"block {self.name}: members disagree on the number of groups {sorted(counts)}")

    @property
    def n(self) -> int:
        return self.members[0].n_groups

    @property
    def sizes(self) -> Tensor:
        return torch.full((self.n,), float(sum(m.group_size for m in self.members)))


@dataclass
class GroupSet:
    """All groups of a model, in block order; group j of the set is a slice of every member of its block."""

    blocks: list[GroupBlock]
    scheme: str = ""
    _bounds: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        self._bounds = [0]
        for b in self.blocks:
            self._bounds.append(self._bounds[-1] + b.n)

    def __len__(self) -> int:
        return self._bounds[-1]

    @property
    def layer_index(self) -> Tensor:
        """Block id of every group (for per-layer scope)."""
        return torch.cat([torch.full((b.n,), i, dtype=torch.long) for i, b in enumerate(self.blocks)])

    @property
    def sizes(self) -> Tensor:
        return torch.cat([b.sizes for b in self.blocks])

    @property
    def flops(self) -> Tensor | None:
        if any(b.flops is None for b in self.blocks):
            return None
        return torch.cat([b.flops.float() for b in self.blocks])

    def params(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for b in self.blocks:
            for m in b.members:
                seen.setdefault(id(m.param), m.param)
        return list(seen.values())

    def _per_block(self, fn) -> Tensor:
        return torch.cat([sum(fn(m) for m in b.members) for b in self.blocks])

    def sq_norms(self) -> Tensor:
        return self._per_block(Member.sq_norms)

    def norms(self) -> Tensor:
        """Euclidean norm of every group (plain, not squared)."""
        return self.sq_norms().sqrt()

    def dots(self, tensors: dict[Tensor, Tensor]) -> Tensor:
        """Per-group <tensors[param], param>; parameters without an entry contribute 0."""
        return self._per_block(lambda m: m.dots(tensors[m.param]) if m.param in tensors
                               else torch.zeros(m.n_groups, device=m.param.device))

    def grad_dots(self) -> Tensor:
        """Per-group <grad, param>; parameters without a gradient contribute 0."""
        return self.dots({p: p.grad for p in self.params() if p.grad is not None})

    def split(self, per_group: Tensor) -> list[Tensor]:
        return [per_group[lo:hi] for lo, hi in zip(self._bounds[:-1], self._bounds[1:])]

    @torch.no_grad()
    def scale_(self, factors: Tensor) -> None:
        """Multiply every group by its factor, in place."""
        if factors.shape != (len(self),):
            raise ValueError(f"expected {len(self)} group factors, got shape {tuple(factors.shape)}")
        for b, f in zip(self.blocks, self.split(factors)):
            for m in b.members:
                m.scale_(f)

    def zero_mask(self, tol: float = 0.0) -> Tensor:
        return self.norms() <= tol
