"""Inference for trained GBLR layers that computes only the live interval blocks.

A live component c contributes U_c[R_c] (V_c[:, C_c] x[C_c]) with R_c, C_c circular intervals, so the
layer is y = U~ (V~ x) where every row of V~ (every column of U~) is nonzero on one interval only.
Candidates tried on this project's CPU (2 cores; 512 x 512, batch 64, 20% of dense FLOPs): CSR
sparse-dense products for V~ and U~ ran no faster than dense (MKL's CSR kernels run far below GEMM
speed), and one small matmul per component costs K kernel launches. Used instead: merge components
into a few dense tiles per factor -- rows sorted by interval start, cut into contiguous groups by a
dynamic programme minimising (rows x column span) + a per-tile overhead -- so each tile is one GEMM
on a contiguous slice of the input. A tile that crosses the end of the axis (circular wrap) is split
into two GEMMs. Padding inside a tile is zero: it costs FLOPs, not correctness (`macs_per_column`
reports what is executed). Conv2d: stage 1 is one conv per tile on the tile's input-channel slice
(unfold / im2col copies alone cost about as much as mkldnn's whole dense conv), stage 2 a tiled
1x1 product over output channels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wgsef.penalties.gblr_layers import GBLRConv2d, GBLRLayer, GBLRLinear


def plan_tiles(start: np.ndarray, length: np.ndarray, overhead: float) -> tuple[np.ndarray, list[tuple]]:
    """Order rows by start and cut them into groups minimising sum(rows * span) + overhead per group.

    Returns the row order and tiles (i, j, a, b): sorted rows i..j-1 cover columns a..b-1 of the
    unwrapped axis (b may exceed the axis length; those columns wrap around)."""
    order = np.argsort(start, kind="stable")
    s, e = start[order], start[order] + length[order]
    k = len(s)
    best, cut = np.full(k + 1, np.inf), np.zeros(k + 1, dtype=int)
    best[0] = 0.0
    for i in range(k):  # O(K^2) vectorised over the group's end j
        cost = best[i] + np.arange(1, k - i + 1) * (np.maximum.accumulate(e[i:]) - s[i]) + overhead
        better = cost < best[i + 1:]
        best[i + 1:][better], cut[i + 1:][better] = cost[better], i
    tiles, j = [], k
    while j > 0:
        i = cut[j]
        tiles.append((int(i), int(j), int(s[i]), int(e[i:j].max())))
        j = i
    return order, tiles[::-1]


class IntervalRows(nn.Module):
    """A matrix P (R x n) whose row p is nonzero only on the circular interval [start_p, start_p +
    length_p) mod n, stored as dense tiles. `matmul(x)` = P x for x (n, cols), `t_matmul(z)` = P^T z for
    z (..., R, cols), P's rows in `self.order` (sorted) order. Tiles are planned in units of
    `block` columns (a conv's kh*kw columns per input channel) so that a tile spans whole units."""

    def __init__(self, rows: Tensor, start: Tensor, length: Tensor, overhead: float, transposed: bool,
                 block: int = 1):
        super().__init__()
        self.n, self.block = rows.shape[1], block
        end = start + length
        order, tiles = plan_tiles((start // block).cpu().numpy(), (-(-end // block) - start // block).cpu().numpy(),
                                  overhead)
        self.tiles = [(i, j, a * block, b * block) for i, j, a, b in tiles]  # in columns
        self.register_buffer("order", torch.as_tensor(order, device=rows.device))
        s, e = start[self.order], end[self.order]
        for t, (i, j, a, b) in enumerate(self.tiles):
            pos = torch.arange(a, b, device=rows.device)
            inside = (pos >= s[i:j, None]) & (pos < e[i:j, None])
            tile = rows[self.order[i:j]][:, pos % self.n] * inside
            # weights are parameters (frozen), so parameter counts see them
            self.register_parameter(f"tile{t}", nn.Parameter((tile.T if transposed else tile).contiguous(),
                                                             requires_grad=False))
        self.macs_per_column = sum((j - i) * (b - a) for i, j, a, b in self.tiles)

    def tile(self, t: int) -> Tensor:
        return getattr(self, f"tile{t}")

    def matmul(self, x: Tensor) -> Tensor:
        """(R, cols) = P (n, cols), rows in sorted order."""
        n, z = self.n, x.new_empty(len(self.order), x.shape[1])
        for t, (i, j, a, b) in enumerate(self.tiles):
            tile = self.tile(t)
            if b <= n:
                torch.mm(tile, x[a:b], out=z[i:j])
            else:  # the interval wraps: columns a..n-1 then 0..b-n-1
                torch.mm(tile[:, :n - a], x[a:], out=z[i:j])
                z[i:j].addmm_(tile[:, n - a:], x[:b - n])
        return z

    def t_matmul(self, z: Tensor) -> Tensor:
        """(..., n, cols) = P^T (..., R, cols), z's rows in sorted order."""
        n, y = self.n, z.new_zeros(*z.shape[:-2], self.n, z.shape[-1])
        for t, (i, j, a, b) in enumerate(self.tiles):
            tile, zg = self.tile(t), z[..., i:j, :]
            if b <= n:
                y[..., a:b, :] += tile @ zg
            else:
                y[..., a:, :] += tile[:n - a] @ zg
                y[..., :b - n, :] += tile[n - a:] @ zg
        return y


class GBLRInference(nn.Module):
    """y = U~ (V~ x) + bias over the live components of a GBLR layer, with exact 0/1 interval masks.

    `overheads` are the costs of one extra tile of V~ and of U~ in weight entries (block units for
    V~), which the tile planner trades against padding entries."""

    def __init__(self, layer: GBLRLayer, overheads: tuple[float, float], block: int):
        super().__init__()
        self.m, self.n = layer.m, layer.n
        with torch.no_grad():
            out_start, out_len, in_start, in_len = layer.intervals()
            live = ((out_len > 0) & (in_len > 0)).nonzero()[:, 0]

            def expand(t: Tensor) -> Tensor:  # one row per rank-1 term
                return t[live].repeat_interleave(layer.rank)

            v_rows = layer.V[live].reshape(-1, self.n)
            u_rows = layer.U[live].transpose(1, 2).reshape(-1, self.m)
            self.right = IntervalRows(v_rows, expand(in_start), expand(in_len), overheads[0], False, block)
            self.left = IntervalRows(u_rows, expand(out_start), expand(out_len), overheads[1], True)
            # stage 1 emits rows in right.order; stage 2 reads them in left.order
            position = torch.empty_like(self.right.order)
            position[self.right.order] = torch.arange(len(position), device=position.device)
            self.register_buffer("perm", position[self.left.order])
            self.register_parameter("bias", None if layer.bias is None else
                                    nn.Parameter(layer.bias.detach().clone(), requires_grad=False))
        self.macs_per_column = self.right.macs_per_column + self.left.macs_per_column


class GBLRLinearInference(GBLRInference):
    """`tile_overhead`: MACs one more GEMM call is worth, at `batch_hint` rows per call."""

    def __init__(self, layer: GBLRLinear, tile_overhead: float = 1e5, batch_hint: int = 16):
        _check(tile_overhead, batch_hint)
        super().__init__(layer, (tile_overhead / batch_hint,) * 2, block=1)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.n)
        y = self.left.t_matmul(self.right.matmul(flat.T)[self.perm]).T
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.m)


class GBLRConv2dInference(GBLRInference):
    """Stage 1 is one conv per tile on the tile's slice of input channels (tiles span whole channels:
    no unfold copy); stage 2 is a tiled matmul over output channels (a 1x1 conv).

    `tile_overhead`: MACs per output position one more call is worth. A conv call makes memory passes
    over its input slice and output, so its fixed cost grows with batch x positions like its MACs
    (~1 ms per call at 16 x 32 x 32 on this project's CPU); 8000 was the best of 1e3..1e6 on
    256 -> 256 3x3 convs at 8 x 8 (scripts/bench_gblr.py)."""

    def __init__(self, layer: GBLRConv2d, tile_overhead: float = 8000.0, batch_hint: int = 16):
        _check(tile_overhead, batch_hint)
        self.kernel_shape = layer.kernel_shape
        kh, kw = layer.kernel_shape[2:]
        super().__init__(layer, (tile_overhead / (kh * kw), tile_overhead), block=kh * kw)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        channels, (kh, kw) = self.kernel_shape[1], self.kernel_shape[2:]
        parts = []
        for t, (i, j, a, b) in enumerate(self.right.tiles):
            c0, c1 = a // (kh * kw), b // (kh * kw)
            weight = self.right.tile(t).view(j - i, c1 - c0, kh, kw)
            if c1 <= channels:
                parts.append(self._conv(x[:, c0:c1], weight))
            else:  # wraps around the input channels
                parts.append(self._conv(x[:, c0:], weight[:, :channels - c0])
                             + self._conv(x[:, :c1 - channels], weight[:, channels - c0:]))
        if not parts:  # no live component: an empty z of the right spatial size
            parts.append(self._conv(x[:, :1], x.new_zeros(0, 1, kh, kw)))
        z = torch.cat(parts, dim=1)
        batch, oh, ow = z.shape[0], z.shape[2], z.shape[3]
        y = self.left.t_matmul(z.flatten(2)[:, self.perm]).view(batch, self.m, oh, ow)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _check(tile_overhead: float, batch_hint: int) -> None:
    if tile_overhead < 0 or batch_hint < 1:
        raise ValueError(f"need tile_overhead >= 0 and batch_hint >= 1, got {tile_overhead}, {batch_hint}")


def to_inference(layer: GBLRLayer, **options) -> nn.Module:
    """The efficient inference module for a trained GBLR layer (sigma = inf boxcar masks); `options`
    (tile_overhead, batch_hint) go to GBLRLinearInference / GBLRConv2dInference."""
    if isinstance(layer, GBLRConv2d):
        return GBLRConv2dInference(layer, **options)
    if isinstance(layer, GBLRLinear):
        return GBLRLinearInference(layer, **options)
    raise ValueError(f"to_inference expects a GBLRLinear or GBLRConv2d, got {type(layer).__name__}")
