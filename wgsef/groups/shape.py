"""Shape groups: W[:, c, h, w], one column of the im2col GEMM (the same as channel groups for a linear)."""
from torch import nn

from wgsef.groups.base import Member
from wgsef.groups.layerwise import weight_view


def shape_view(module: nn.Module) -> list[Member]:
    o = module.weight.shape[0]
    return [weight_view(module, (o, module.weight[0].numel()), (1,))]
