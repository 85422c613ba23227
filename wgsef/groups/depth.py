"""Depth groups: a whole layer (weight, bias, and the BatchNorm reading its output) as one group.

Only layers with a shortcut around them qualify: the traced output must still depend on the input
through a path that avoids the layer (ResNet blocks' convs and downsample convs). Zeroing such a group
leaves the network connected; the BatchNorm is included so the layer's branch emits exactly zero.
"""
from torch import nn

from wgsef.groups.base import Member
from wgsef.groups.trace import LayerTrace


def whole(param) -> Member:
    return Member(param, (1, param.numel()), (0,))


def depth_view(trace: LayerTrace):
    def view(module: nn.Module) -> list[Member] | None:
        if not trace.bypassed(module):
            return None
        bn = trace.bn_after.get(module)
        params = [module.weight, module.bias] + ([bn.weight, bn.bias] if bn is not None else [])
        return [whole(p) for p in params if p is not None]
    return view
