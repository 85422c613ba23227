"""Unstructured groups: every weight is its own group (biases are not grouped)."""
from torch import nn

from wgsef.groups.base import Member
from wgsef.groups.layerwise import weight_view


def unstructured_view(module: nn.Module) -> list[Member]:
    return [weight_view(module, (module.weight.numel(),), (0,))]
