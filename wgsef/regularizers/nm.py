"""N:M fine-grained structured sparsity: masks and pattern counts (pure tensor math, no nn.Module).

A block is M consecutive weights along the input-channel axis, the layout of NVIDIA's sparse tensor
cores and of ASP: a Linear weight (out, in) is read row by row, a Conv2d weight (O, I/groups, kh, kw)
as O x kh x kw x I/groups. An input axis that is not a multiple of M is zero-padded at its end, so
the last, short block keeps its N largest real weights (all of them if it holds N or fewer).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_M = (2, 4, 8, 16, 32)


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m and m in SUPPORTED_M):
        raise ValueError(f"N:M sparsity needs integers 1 <= n < m with m in {SUPPORTED_M}, got n={n}, m={m}")


def input_last(weight: Tensor) -> Tensor:
    """The weight as a 2-D (rows, inputs) view with the input-channel axis last."""
    if weight.dim() == 2:
        return weight
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
    raise ValueError(f"N:M needs a Linear (2-D) or Conv2d (4-D) weight, got shape {tuple(weight.shape)}")


def _from_input_last(x: Tensor, shape: torch.Size) -> Tensor:
    if len(shape) == 2:
        return x
    o, i, kh, kw = shape
    return x.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()


def _blocks(x: Tensor, m: int, fill: float) -> Tensor:
    """(rows, inputs) -> (rows, blocks, m), the input axis padded at its end with `fill`."""
    return F.pad(x, (0, -x.shape[1] % m), value=fill).reshape(x.shape[0], -1, m)


def _n_largest(blocks: Tensor, n: int) -> Tensor:
    """Boolean (..., m): the n largest entries of each block (ties to the earlier entry). For m <= 8, each
    entry's rank is counted from the m(m-1) comparisons of whole columns: elementwise ops over all blocks at
    once, several times faster on CPU than topk + scatter over millions of 4-wide rows (SR-STE recomputes its
    mask every step). For larger m, topk."""
    m = blocks.shape[-1]
    if m > 8:
        return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, blocks.topk(n, dim=-1).indices, True)
    col = blocks.unbind(-1)
    ranks = [sum((col[j] > col[i]) if j > i else (col[j] >= col[i]) for j in range(m) if j != i) for i in range(m)]
    return torch.stack(ranks, -1) < n


def nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask (shape of `weight`) keeping the n largest |w| of every block of m inputs."""
    check_nm(n, m)
    mag = input_last(weight.detach()).abs()
    blocks = _blocks(mag, m, fill=-1.0)  # -1: padding never outranks a real weight
    keep = _n_largest(blocks, n)
    return _from_input_last(keep.flatten(1)[:, : mag.shape[1]], weight.shape)


def nm_block_ok(weight: Tensor, n: int, m: int) -> Tensor:
    """(rows, blocks) booleans: does the (zero-padded) block hold at most n nonzeros?"""
    check_nm(n, m)
    nonzero = (input_last(weight.detach()) != 0).to(torch.int32)
    return _blocks(nonzero, m, fill=0).sum(-1) <= n


def nm_follows(weight: Tensor, n: int, m: int) -> bool:
    """True when every block of m inputs holds at most n nonzeros and n:m can remove something
    (a layer with <= n inputs per group satisfies the pattern trivially and counts as dense)."""
    return input_last(weight).shape[1] > n and bool(nm_block_ok(weight, n, m).all())


def nm_pattern_counts(weights: Iterable[Tensor], n: int, m: int) -> dict[str, float]:
    """Counted from the weights: fraction of the layers, and of their weights, that follow n:m.

    A weight follows the pattern when its block does; layers with <= n inputs per group never do.
    Also returns `weight_sparsity`, the fraction of exactly zero weights.
    """
    layers = ok_layers = total = ok_weights = zeros = 0
    for w in weights:
        ins = input_last(w).shape[1]
        ok = nm_block_ok(w, n, m)
        sizes = torch.full((ok.shape[1],), m, device=ok.device)
        sizes[-1] = ins - (ok.shape[1] - 1) * m  # the real weights in the last, maybe short, block
        layers += 1
        total += w.numel()
        zeros += int((w == 0).sum())
        if ins > n:
            ok_layers += bool(ok.all())
            ok_weights += int((ok * sizes).sum())
    return {"nm_layer_fraction": ok_layers / max(layers, 1), "nm_weight_fraction": ok_weights / max(total, 1),
            "weight_sparsity": zeros / max(total, 1)}
