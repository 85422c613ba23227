"""Groups of weights as views of parameter tensors.

A *member* is one parameter tensor seen through a reshape, with some axes of that view indexing the
groups: filter groups of a conv weight W[O, I, kh, kw] are the view (O, I*kh*kw) with group axis 0;
shape groups are the same view with group axis 1; block groups are (O/r, r, C/c, c) with axes (0, 2).
A member's view groups are the block's groups in order, or, with `index`, view group i is block group
index[i] (-1: not in this block). Coupled channels that pass a concatenation or a grouped conv need the
index: a BatchNorm reading a concatenation holds channels of several coupled sets (one member per set,
each covering its rows), and the channel j of every conv group forms one block group. Entries no member
covers (the rows of a set left out) belong to no group.
A *block* is a set of n groups made of one or more members that share the group index (a filter group
is the conv filter plus its bias and BatchNorm gamma/beta; a residual-coupled channel spans several
layers). A *GroupSet* concatenates blocks; every operation works on the vector of all group norms.

The GroupSet's per-step operations (norms, dots, scaling) touch all parameters in a few batched ops,
whatever the number of layers: on first use on a device it builds the group id of every parameter entry
(in the parameters' logical row-major order, concatenated), a reduction plan from entries to groups and a
flat scratch buffer with one view per parameter; then `torch._foreach_*` ops copy or scale all parameters
at once, and one or two `segment_reduce` calls sum entries into groups. Nothing is rebuilt per step and
nothing waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Member:
    """One parameter seen as `shape`, grouped along `group_axes` (row-major group index)."""

    param: Tensor
    shape: tuple[int, ...]
    group_axes: tuple[int, ...]
    index: Tensor | None = None  # block group of each view group (-1: none); None: the identity

    def __post_init__(self):
        if prod(self.shape) != self.param.numel():
            raise ValueError(f"member view {self.shape} does not match a parameter of shape {tuple(self.param.shape)}")
        if not self.group_axes or sorted(set(self.group_axes)) != list(self.group_axes):
            raise ValueError(f"group_axes must be increasing and non-empty, got {self.group_axes}")
        if self.index is not None and self.index.shape != (self.n_groups,):
            raise ValueError(f"member index has shape {tuple(self.index.shape)}, expected ({self.n_groups},)")

    @property
    def n_groups(self) -> int:
        """Groups of the view (block groups when there is no index)."""
        return prod(self.shape[a] for a in self.group_axes)

    def block_counts(self, n: int) -> Tensor:
        """How many of this member's view groups fall in each of the block's n groups."""
        if self.index is None:
            return torch.ones(n)
        return torch.bincount(self.index[self.index >= 0], minlength=n).float()

    @property
    def group_size(self) -> int:
        return self.param.numel() // self.n_groups

    @property
    def _group_shape(self) -> list[int]:
        """`shape` with the non-group axes set to 1 (a per-group tensor broadcast over the view)."""
        return [self.shape[a] if a in self.group_axes else 1 for a in range(len(self.shape))]

    def group_ids(self, offset: int) -> Tensor:
        """The group (offset + block group) of every parameter entry in row-major order, -1 where none."""
        ids = torch.arange(self.n_groups) if self.index is None else self.index.long()
        ids = torch.where(ids >= 0, ids + offset, -1).reshape(self._group_shape)
        return ids.expand(self.shape).reshape(-1)

    def expand(self, per_group: Tensor) -> Tensor:
        """A tensor shaped like the parameter holding each group's value on its entries."""
        per_group = per_group.to(self.param.dtype).reshape(self._group_shape)
        return per_group.expand(self.shape).reshape(self.param.shape)


@dataclass
class GroupBlock:
    """n groups sharing one index across `members` (usually one layer's groups).

    flops: FLOPs the network saves when each group is zero (None if unknown).
    n_groups: the number of groups; needed when every member has an index.
    """

    name: str
    members: list[Member]
    flops: Tensor | None = None
    n_groups: int | None = None

    def __post_init__(self):
        counts = {m.n_groups for m in self.members if m.index is None} | (
            {self.n_groups} if self.n_groups is not None else set())
        if len(counts) != 1:
            raise ValueError(f"block {self.name}: members disagree on the number of groups {sorted(counts)}")
        if any(m.index is not None and int(m.index.max()) >= self.n for m in self.members):
            raise ValueError(f"block {self.name}: a member index points past the block's {self.n} groups")

    @property
    def n(self) -> int:
        return self.n_groups if self.n_groups is not None else self.members[0].n_groups

    @property
    def sizes(self) -> Tensor:
        return sum(m.block_counts(self.n) * m.group_size for m in self.members)


@dataclass
class GroupSet:
    """All groups of a model, in block order; group j of the set is a slice of every member of its block.

    An entry is in at most one group: a parameter is in one member, or in several members whose indices
    cover disjoint view groups.
    """

    blocks: list[GroupBlock]
    scheme: str = ""
    _bounds: list[int] = field(init=False, repr=False)
    _params: list[Tensor] = field(init=False, repr=False)
    _flat: "_Flat | None" = field(init=False, repr=False, default=None)
    _cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        self._bounds = [0]
        for b in self.blocks:
            self._bounds.append(self._bounds[-1] + b.n)
        members = [m for b in self.blocks for m in b.members]
        self._params = list({id(m.param): m.param for m in members}.values())
        if len(self._params) != len(members):  # shared parameters: their members must cover disjoint entries
            for p in self._params:
                shared = [m for m in members if m.param is p]
                if len(shared) > 1 and (any(m.index is None for m in shared) or any(
                        int(c) > 1 for c in sum((m.group_ids(0) >= 0).int() for m in shared))):
                    raise ValueError("a parameter entry appears in two members of one group set; "
                                     "each entry must be in at most one group")

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
        return list(self._params)

    def cached(self, key, like: Tensor, make: Callable[[], Tensor]) -> Tensor:
        """`make()` (a per-group tensor, built once on the CPU), kept on `like`'s device and dtype: constants
        such as group sizes or weights are not rebuilt or copied every step."""
        full = (key, like.device, like.dtype)
        if full not in self._cache:
            self._cache[full] = make().to(device=like.device, dtype=like.dtype)
        return self._cache[full]

    def _layout(self) -> "_Flat":
        p = self._params[0]
        if self._flat is None or self._flat.device != p.device or self._flat.dtype != p.dtype:
            self._flat = _Flat(self, p.device, p.dtype)
        return self._flat

    @torch.no_grad()
    def sq_norms(self) -> Tensor:
        flat = self._layout()
        torch._foreach_copy_(flat.views, self._params)
        return flat.reduce(flat.buffer.square_())

    def norms(self) -> Tensor:
        """Euclidean norm of every group (plain, not squared)."""
        return self.sq_norms().sqrt_()

    @torch.no_grad()
    def dots(self, tensors: dict[Tensor, Tensor] | list[Tensor | None]) -> Tensor:
        """Per-group <tensors[param], param>; `tensors` maps parameters to tensors of their shape (or is a
        list in `params()` order); parameters without an entry (or None) contribute 0."""
        others = [tensors.get(p) for p in self._params] if isinstance(tensors, dict) else list(tensors)
        flat = self._layout()
        have = [i for i, t in enumerate(others) if t is not None]
        if len(have) < len(others):
            torch._foreach_zero_([v for v, t in zip(flat.views, others) if t is None])
        if have:
            products = torch._foreach_mul([self._params[i] for i in have], [others[i] for i in have])
            torch._foreach_copy_([flat.views[i] for i in have], products)
        return flat.reduce(flat.buffer)

    def grad_dots(self) -> Tensor:
        """Per-group <grad, param>; parameters without a gradient contribute 0."""
        return self.dots([p.grad for p in self._params])

    def split(self, per_group: Tensor) -> list[Tensor]:
        return [per_group[lo:hi] for lo, hi in zip(self._bounds[:-1], self._bounds[1:])]

    def _check(self, factors: Tensor) -> None:
        if factors.shape != (len(self),):
            raise ValueError(f"expected {len(self)} group factors, got shape {tuple(factors.shape)}")

    def _broadcast(self, factors: Tensor, outside: float) -> list[Tensor]:
        """Views (of the scratch buffer, valid until the next call) shaped like each parameter, holding
        each entry's group factor (`outside` for entries in no group)."""
        flat = self._layout()
        factors = factors.to(device=flat.device, dtype=flat.dtype)
        if flat.n_out > len(self):  # entries in no group keep their value
            factors = torch.cat([factors, factors.new_full((1,), outside)])
        torch.index_select(factors, 0, flat.group_of_entry, out=flat.buffer)
        return flat.views

    @torch.no_grad()
    def scale_(self, factors: Tensor) -> None:
        """Multiply every group by its factor, in place."""
        self._check(factors)
        torch._foreach_mul_(self._params, self._broadcast(factors, 1.0))

    @torch.no_grad()
    def scaled(self, factors: Tensor) -> list[Tensor]:
        """New tensors c_g * theta_g, one per parameter in `params()` order (e.g. a penalty's gradient)."""
        self._check(factors)
        return torch._foreach_mul(self._params, self._broadcast(factors, 0.0))

    def zero_mask(self, tol: float = 0.0) -> Tensor:
        return self.norms() <= tol


class _Flat:
    """The device-side layout of a GroupSet: a scratch buffer holding every parameter's entries (logical
    row-major order, parameters concatenated), a view of it per parameter, the group of every entry, and
    the plan that sums entries into groups.

    Plan: the entries of one group often form a few long contiguous runs (a filter row of the conv weight,
    then one entry of each BN/bias vector): one segment_reduce sums each run, a second gathers the runs of
    each group and sums them. If runs are short (shape or channel groups cut across rows) the entries are
    first gathered into group order, which makes every group one run.
    """

    def __init__(self, groups: GroupSet, device: torch.device, dtype: torch.dtype):
        params = groups._params
        if any(p.device != device for p in params):
            raise ValueError("the parameters of a group set must all be on one device")
        self.device, self.dtype = device, dtype
        n = self.n_groups = len(groups)
        members: dict[int, list[Tensor]] = {}
        for b, lo in zip(groups.blocks, groups._bounds):
            for m in b.members:
                members.setdefault(id(m.param), []).append(m.group_ids(lo))
        gid = torch.cat([torch.stack(members[id(p)]).amax(0) for p in params])  # disjoint: -1 elsewhere
        self.n_out = n + int(bool((gid < 0).any()))  # uncovered entries sum into one extra group, dropped
        gid = torch.where(gid < 0, n, gid)
        index = torch.int32 if gid.numel() < 2**31 else torch.long
        self.group_of_entry = gid.to(device=device, dtype=index)
        self.buffer = torch.empty(gid.numel(), device=device, dtype=dtype)
        self.views = [v.view(p.shape) for v, p in zip(self.buffer.split([p.numel() for p in params]), params)]
        self.stages: list[tuple[Tensor | None, Tensor | None]] = []  # (gather order, segment lengths)
        run_gid, run_len = torch.unique_consecutive(gid, return_counts=True)
        first = None
        if 4 * run_gid.numel() > gid.numel() and not bool((gid[1:] >= gid[:-1]).all()):
            # short runs (groups cut across rows): sort the entries by group first
            first = torch.sort(gid, stable=True).indices
            run_gid, run_len = torch.unique_consecutive(gid[first], return_counts=True)
        self._stage(first, run_len)
        if not torch.equal(run_gid, torch.arange(self.n_out)):  # runs of a group are apart: gather them
            order = torch.sort(run_gid, stable=True).indices
            self._stage(order, torch.bincount(run_gid, minlength=self.n_out))

    def _stage(self, order: Tensor | None, lengths: Tensor) -> None:
        on = {"device": self.device}
        self.stages.append((None if order is None else order.to(**on, dtype=self.group_of_entry.dtype),
                            None if bool((lengths == 1).all()) else lengths.to(**on)))

    def reduce(self, per_entry: Tensor) -> Tensor:
        """Sum the entries of each group."""
        x = per_entry
        for order, lengths in self.stages:
            if order is not None:
                x = x.index_select(0, order)
            if lengths is not None:  # unsafe: skip the checks of lengths (ours, checked at build) that read
                x = torch.segment_reduce(x, "sum", lengths=lengths, unsafe=True)  # the device on the host
        if self.n_out > self.n_groups:
            x = x[:self.n_groups]
        return x.clone() if x is per_entry else x
