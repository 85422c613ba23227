"""Deployment of trained GBLR layers: exact forms of what the layer computes in eval mode, and the
choice among them by measured latency.

Forms (each computes exactly the eval-mode layer, up to float rounding):
- `dense`: the materialised weight in a plain nn.Linear / nn.Conv2d;
- `lowrank`: the live components' masked factors as two plain layers (n -> R -> m; a conv's first
  stage is the conv itself with R output channels, its second a 1x1 conv), R = live components x rank;
- `tiled`: only the interval blocks. A live component c contributes U_c[R_c] (V_c[:, C_c] x[C_c]) with
  R_c, C_c circular intervals (the support of its masks), so the layer is y = U~ (V~ x) where every row
  of V~ (every column of U~) is nonzero on one interval only. Components are merged into a few dense
  tiles per factor -- rows sorted by interval start, cut into contiguous groups by a dynamic programme
  minimising (rows x column span) + a per-tile overhead -- so each tile is one GEMM on a contiguous
  slice of the input; a tile that crosses the end of the axis (circular wrap) is split into two GEMMs.
  Padding inside a tile is zero: it costs FLOPs, not correctness (`macs_per_column` reports what is
  executed). Conv2d: stage 1 is one conv per tile on the tile's input-channel slice, stage 2 a tiled
  1x1 product over output channels. (Tried on this project's CPU: CSR products ran no faster than
  dense, one matmul per component costs K calls, unfold copies cost about a whole mkldnn conv.)
Per-kernel convs (one matrix per tap) deploy dense only.

`deploy` times the candidates on the layer's own input (alternating, median of repeats) and keeps a
non-dense form only when it beats dense by `margin`, so the deployed layer is never slower than the
dense one by more than the timing noise, and is the dense layer itself when nothing is clearly faster.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wgsef.regularizers.gblr.layers import GBLRConv2d, GBLRLayer, GBLRLinear


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


def circular_support(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(start, length) per row of the shortest circular interval holding all its nonzeros
    (length 0 for an all-zero row)."""
    n = rows.shape[1]
    start, length = torch.zeros(len(rows), dtype=torch.long), torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows.detach().cpu()):
        pos = row.nonzero()[:, 0]
        if len(pos) == 0:
            continue
        gaps = torch.diff(pos, append=pos[:1] + n)  # gap after each nonzero, circularly
        g = int(gaps.argmax())
        start[i], length[i] = int(pos[(g + 1) % len(pos)]), n - int(gaps[g]) + 1
    return start, length


class IntervalRows(nn.Module):
    """A matrix P (R x n) whose row p is nonzero only on the circular interval [start_p, start_p +
    length_p) mod n, stored as dense tiles. `matmul(x)` = P x for x (n, cols), `t_matmul(z)` = P^T z for
    z (..., R, cols), P's rows in `self.order` (sorted) order. Tiles are planned in units of
    `block` columns (a conv's kh*kw columns per input channel) so that a tile spans whole units."""

    def __init__(self, rows: Tensor, start: Tensor, length: Tensor, overhead: float, transposed: bool,
                 block: int = 1):
        super().__init__()
        self.n, self.block = rows.shape[1], block
        start, length = start.to(rows.device), length.to(rows.device)
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
        n, parts = self.n, []
        for t, (i, j, a, b) in enumerate(self.tiles):
            tile = self.tile(t)
            if b <= n:
                parts.append(tile @ x[a:b])
            else:  # the interval wraps: columns a..n-1 then 0..b-n-1
                parts.append(torch.addmm(tile[:, :n - a] @ x[a:], tile[:, n - a:], x[:b - n]))
        return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1])

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


def _eval_factors(layer: GBLRLayer) -> tuple[Tensor, Tensor]:
    """The live components' masked factors as the eval-mode layer uses them: U~ rows (R, m) and
    V~ rows (R, n), one row per rank-1 term."""
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            mask_out, mask_in = layer.masks()
            u = (layer.U * mask_out[:, :, None]).transpose(1, 2).reshape(-1, layer.m)
            v = (layer.V * mask_in[:, None, :]).reshape(-1, layer.n)
    finally:
        layer.train(was_training)
    live = (u.abs().sum(1) > 0) & (v.abs().sum(1) > 0)
    return u[live], v[live]


class GBLRInference(nn.Module):
    """y = U~ (V~ x) + bias over the live components of a GBLR layer (its eval-mode masks).

    `overheads` are the costs of one extra tile of V~ and of U~ in weight entries (block units for
    V~), which the tile planner trades against padding entries."""

    def __init__(self, layer: GBLRLayer, overheads: tuple[float, float], block: int):
        super().__init__()
        if layer.taps != 1:
            raise ValueError("the tiled form needs one matrix per layer (per_kernel convs deploy dense)")
        self.m, self.n = layer.m, layer.n
        u_rows, v_rows = _eval_factors(layer)
        with torch.no_grad():
            self.right = IntervalRows(v_rows, *circular_support(v_rows), overheads[0], False, block)
            self.left = IntervalRows(u_rows, *circular_support(u_rows), overheads[1], True)
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
    256 -> 256 3x3 convs at 8 x 8 (scripts/bench/bench_gblr.py)."""

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
    """The tiled inference module for a trained GBLR layer (its eval-mode masks); `options`
    (tile_overhead, batch_hint) go to GBLRLinearInference / GBLRConv2dInference."""
    if isinstance(layer, GBLRConv2d):
        return GBLRConv2dInference(layer, **options)
    if isinstance(layer, GBLRLinear):
        return GBLRLinearInference(layer, **options)
    raise ValueError(f"to_inference expects a GBLRLinear or GBLRConv2d, got {type(layer).__name__}")


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def to_dense(layer: GBLRLayer) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d with the eval-mode materialised weight."""
    was_training = layer.training
    layer.eval()
    with torch.no_grad():
        kernel = layer.kernel() if isinstance(layer, GBLRConv2d) else layer.materialize()
    layer.train(was_training)
    if isinstance(layer, GBLRConv2d):
        o, i, kh, kw = layer.kernel_shape
        new = nn.Conv2d(i, o, (kh, kw), layer.stride, layer.padding, layer.dilation, bias=layer.bias is not None)
    else:
        new = nn.Linear(layer.n, layer.m, bias=layer.bias is not None)
    new = new.to(kernel.device, kernel.dtype)
    with torch.no_grad():
        new.weight.copy_(kernel)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return _frozen(new)


def to_lowrank(layer: GBLRLayer) -> nn.Module | None:
    """Two plain layers through the R live rank-1 terms (None for per-kernel convs or R = 0)."""
    if layer.taps != 1:
        return None
    u, v = _eval_factors(layer)
    r = len(u)
    if r == 0:
        return None
    kw = dict(device=u.device, dtype=u.dtype)
    if isinstance(layer, GBLRConv2d):
        o, i, kh, kwd = layer.kernel_shape
        first = nn.Conv2d(i, r, (kh, kwd), layer.stride, layer.padding, layer.dilation, bias=False, **kw)
        second = nn.Conv2d(r, o, 1, bias=layer.bias is not None, **kw)
        shapes = (first.weight.shape, second.weight.shape)
    else:
        first, second = nn.Linear(layer.n, r, bias=False, **kw), nn.Linear(r, layer.m, bias=layer.bias is not None, **kw)
        shapes = (first.weight.shape, second.weight.shape)
    with torch.no_grad():
        first.weight.copy_(v.reshape(shapes[0]))
        second.weight.copy_(u.T.reshape(shapes[1]))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return _frozen(nn.Sequential(first, second))


def candidate_forms(layer: GBLRLayer, batch_hint: int) -> dict[str, nn.Module]:
    """Every exact deployable form of `layer` whose FLOPs do not exceed the dense layer's."""
    forms = {"dense": to_dense(layer)}
    dense_params = forms["dense"].weight.numel()
    lowrank = to_lowrank(layer)
    if lowrank is not None and sum(m.weight.numel() for m in lowrank) < dense_params:
        forms["lowrank"] = lowrank
    if layer.taps == 1:
        tiled = _frozen(to_inference(layer, batch_hint=batch_hint))
        if tiled.macs_per_column < dense_params:
            forms["tiled"] = tiled
    return forms


def fastest(forms: dict[str, nn.Module], inputs: list[Tensor], margin: float, repeats: int,
            min_run_time: float, device: str = "cpu", threads: int = 1, clock: str = "cpu") -> str:
    """The name of the fastest form: for each input (e.g. batch 1 and 64), medians over `repeats`
    alternating timings on `device` with `threads` threads and `clock` (those the reported latency is
    measured with; forms and inputs are copied there, whichever device they are on). A form other than
    dense must beat dense by the fraction `margin` on every input, and the one with the lowest total time
    of those wins."""
    from wgsef.measure import latency_ms  # measure imports nothing of ours; keep the import local

    if len(forms) == 1:
        return "dense"
    total, ok = dict.fromkeys(forms, 0.0), dict.fromkeys(forms, True)
    for x in inputs:
        times = {name: [] for name in forms}
        for _ in range(repeats):
            for name, form in forms.items():
                times[name].append(latency_ms(form, x, device, threads=threads, min_run_time=min_run_time,
                                              warmup=1, clock=clock))
        median = {name: statistics.median(t) for name, t in times.items()}
        for name in forms:
            total[name] += median[name]
            ok[name] &= name == "dense" or median[name] <= (1 - margin) * median["dense"]
    return min((name for name in forms if ok[name]), key=total.get)
