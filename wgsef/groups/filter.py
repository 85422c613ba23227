"""Filter groups: output channels, coupled across layers so that a zero group is removable.

Torch-Pruning's dependency graph gives, for any traced model, the sets of channels that must be pruned
together (wgsef.groups.coupling; compaction reads the same sets, so a zero group is what compaction
removes). Of each set we keep the producer side as the group members: the rows of every Conv2d/Linear
whose output channels are in the set (weight and bias; a depthwise conv's filter is its output channel),
the per-channel affine parameters of the BatchNorms on the channels (also those reading them after a
concatenation, as in DenseNet: a zero channel must stay zero after them), and free parameters such as a
layer scale. A group is one channel, or, with a grouped conv in the set, one channel per conv group
(see coupling). The consumers' input channels are not in the group: once the producers are zero, the
channel carries exactly zero and the consumers' weights on it are dead, however large. A coupled set
becomes a group block only if all its producer conv/linear layers are among the selected layers
(otherwise zeroing it would remove nothing); a set that cannot be removed exactly (a LayerNorm on its
channels, ...) is left out with a warning naming the layer and the operator.

FLOPs saved by a zero group (in MACs per sample): each producer's MACs per output channel plus each
consumer's MACs per input channel fed by it (a linear layer after a flatten reads h*w inputs per channel).
This ignores BatchNorm, activations, pooling and residual additions, and counts a consumer's MACs as
saved even if some other path still needs it.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from wgsef.groups.base import GroupBlock, Member
from wgsef.groups.coupling import CoupledSet, Slice, coupled_sets, dependency_graph
from wgsef.groups.trace import LayerTrace


def slice_member(s: Slice) -> Member:
    """The parameter seen as (before, channels, after) with the channel axis grouped by unit."""
    shape = s.param.shape
    before, after = shape[:s.dim].numel(), shape[s.dim + 1:].numel()
    if s.dim == 0 and torch.equal(s.idxs, torch.arange(shape[0])) and torch.equal(s.units, s.idxs):
        return Member(s.param, (shape[0], after), (0,))  # the plain case: one group per row
    index = torch.full((shape[s.dim],), -1, dtype=torch.long)
    index[s.idxs] = s.units
    return Member(s.param, (before, shape[s.dim], after), (1,), index)


def filter_blocks(model: nn.Module, example_input: Tensor, selected: dict[str, nn.Module], trace: LayerTrace,
                  keep: Callable[[CoupledSet], bool] | None = None, scheme: str = "filter") -> list[GroupBlock]:
    """One block per coupled set whose producer layers are all selected (and that `keep` accepts)."""
    names = {m: n for n, m in model.named_modules()}
    taken = set(selected.values())
    order = {m: i for i, m in enumerate(model.modules())}
    blocks, left_out = [], []
    for cs in coupled_sets(model, dependency_graph(model, example_input)):
        if not cs.layers or not all(m in taken for m in cs.layers) or (keep is not None and not keep(cs)):
            continue
        if cs.problem:
            left_out.append(cs.problem)
            continue
        blocks.append((order[cs.layers[0]], _block(cs, names, trace)))
    if left_out:
        warnings.warn(f"{scheme} groups leave out {len(left_out)} coupled channel set(s): " + "; ".join(left_out))
    return [b for _, b in sorted(blocks, key=lambda ib: ib[0])]


def _block(cs: CoupledSet, names, trace: LayerTrace) -> GroupBlock:
    flops = torch.zeros(cs.n_units)
    for m, units, width in ([(m, u, m.weight.shape[0]) for m, u in cs.writers]
                            + [(m, u, m.weight.shape[1] * m.groups if isinstance(m, nn.Conv2d) else m.in_features)
                               for m, u in cs.readers]):
        flops += trace.macs.get(m, 0.0) / width * torch.bincount(units, minlength=cs.n_units).float()
    members = [slice_member(s) for s in cs.producers]
    n_groups = None if any(m.index is None for m in members) else cs.n_units
    return GroupBlock("+".join(names[m] for m in cs.layers), members, flops, n_groups)
