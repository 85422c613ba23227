"""Block groups: r x c tiles of the 2-D weight view O x (I*kh*kw), as in block-sparse (BSR) storage.

A layer whose view does not divide into r x c tiles is left out (build_groups warns, naming it).
"""
from torch import nn

from wgsef.groups.base import Member
from wgsef.groups.layerwise import weight_view


def parse_block(block) -> tuple[int, int]:
    if block is None or len(block) != 2 or any(int(s) != s or s < 1 for s in block):
        raise ValueError(f"scheme 'block' needs block=(rows, cols) with two positive integers, got {block}")
    return int(block[0]), int(block[1])


def block_view(module: nn.Module, block: tuple[int, int]) -> list[Member] | None:
    r, c = block
    o, cols = module.weight.shape[0], module.weight[0].numel()
    if o % r or cols % c:
        return None
    return [weight_view(module, (o // r, r, cols // c, c), (0, 2))]
