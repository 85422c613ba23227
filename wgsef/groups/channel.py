"""Channel groups: W[:, c] of a conv (all filters' slice c) or column c of a linear weight.

A grouped conv is grouped over its weight as stored: c indexes the I/groups input channels of each
filter group (for a depthwise conv there is one channel group, the whole layer).
"""
from torch import nn

from wgsef.groups.base import Member
from wgsef.groups.layerwise import weight_view


def channel_view(module: nn.Module) -> list[Member]:
    o, i = module.weight.shape[:2]
    return [weight_view(module, (o, i, module.weight[0, 0].numel()), (1,))]
