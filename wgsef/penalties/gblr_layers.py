"""Gaudi-GBLR layers (Lee & Kim, ICLR 2024; docs/methods.md section 5).

A weight W (m x n; a conv is its O x I*kh*kw view, PyTorch's own flattening order) is a sum of K
rank-r components, each masked to a circular row interval and a circular column interval:

    W = sum_c (U_c * mu_out,c[:, None]) (V_c * mu_in,c[None, :])

The masks are Gaudi masks: band-limited boxcars built in the frequency domain, differentiable in the
interval's width and location. Axis 0 of `widths` / `locations` is the output (row) axis, axis 1 the
input (column) axis.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT, IN = 0, 1


def _round_ste(x: Tensor, n: int, clamp: bool) -> Tensor:
    """x rounded to the 1/n grid in the forward pass, identity in the backward pass."""
    q = torch.round((x.clamp(0.0, 1.0) if clamp else x) * n) / n
    return x + (q - x).detach()


def gaudi_mask(n: int, width: Tensor, location: Tensor, sigma: float | Tensor = math.inf,
               ste: bool = True) -> Tensor:
    """Gaudi masks of length n for widths/locations of any (equal, broadcastable) shape -> (..., n).

    M(f) = w sinc(w f) / sinc(f/n) exp(-f^2 / (2 sigma^2)) exp(-i pi f (2l + w - 1/n)), f = 0..n//2,
    inverted by a real FFT without the 1/n factor. With w, l on the 1/n grid and sigma = inf this is
    the 0/1 circular boxcar of length w n starting at l n. `ste` rounds w (clamped to [0, 1]) and l
    to that grid with a straight-through estimator, as in the training forward pass.
    """
    if n < 1:
        raise ValueError(f"mask length n must be >= 1, got {n}")
    if not isinstance(sigma, Tensor) and not sigma > 0:
        raise ValueError(f"sigma must be > 0 (math.inf for no Gaussian), got {sigma}")
    width, location = torch.broadcast_tensors(torch.as_tensor(width), torch.as_tensor(location))
    if not width.is_floating_point():
        raise ValueError(f"width and location must be floating point, got {width.dtype}")
    if ste:
        width, location = _round_ste(width, n, clamp=True), _round_ste(location, n, clamp=False)
    f = torch.arange(n // 2 + 1, dtype=width.dtype, device=width.device)
    w, l = width[..., None], location[..., None]
    amplitude = w * torch.sinc(w * f) / torch.sinc(f / n) * torch.exp(-f ** 2 / (2 * sigma ** 2))
    phase = -math.pi * f * (2 * l + w - 1.0 / n)
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
    return torch.fft.irfft(spectrum, n=n, dim=-1, norm="forward")


def grid_intervals(width: Tensor, location: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(start, length) in {0..n-1} x {0..n} of the boxcars the rounded forward pass uses."""
    length = torch.round(width.detach().clamp(0.0, 1.0) * n).long()
    start = torch.round(location.detach() * n).long().remainder(n)
    return start, length


class GBLRLayer(nn.Module):
    """The factors, masks and structural parameters shared by the Linear and Conv2d variants."""

    def __init__(self, weight: Tensor, bias: Tensor | None, ratio: float, rank: int = 1,
                 init: str = "svd"):
        super().__init__()
        m, n = weight.shape
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if rank < 1:
            raise ValueError(f"rank per component must be >= 1, got {rank}")
        k = int(ratio * min(m, n) // rank)
        if k < 1:
            raise ValueError(f"ratio {ratio} * min({m}, {n}) / rank {rank} leaves no component")
        if init not in ("svd", "scratch"):
            raise ValueError(f"init must be 'svd' or 'scratch', got {init!r}")
        self.m, self.n, self.rank, self.n_components = m, n, rank, k
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.U = nn.Parameter(torch.empty(k, m, rank, **kw))
        self.V = nn.Parameter(torch.empty(k, rank, n, **kw))
        self.widths = nn.Parameter(torch.ones(2, k, **kw))
        self.locations = nn.Parameter(torch.rand(2, k, **kw))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("sigma", torch.tensor(math.inf, **kw))
        with torch.no_grad():
            self._init_svd(weight.detach()) if init == "svd" else self._init_scratch()

    def _init_svd(self, weight: Tensor) -> None:
        # top K*r singular triplets, sqrt(S) on each side; all widths 1 so the masks are all ones
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        kr = self.n_components * self.rank
        root = s[:kr].sqrt()
        self.U.copy_((u[:, :kr] * root).T.reshape(self.n_components, self.rank, self.m).transpose(1, 2))
        self.V.copy_((vh[:kr] * root[:, None]).reshape(self.n_components, self.rank, self.n))

    def _init_scratch(self) -> None:
        # Var(W_ij) = K r Var(U) Var(V) = 1/(3n), the variance of PyTorch's default Linear init
        bound = math.sqrt(3.0) * (3.0 * self.n * self.n_components * self.rank) ** -0.25
        self.U.uniform_(-bound, bound)
        self.V.uniform_(-bound, bound)

    def set_sigma(self, sigma: float) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (math.inf for no Gaussian), got {sigma}")
        self.sigma.fill_(sigma)

    def masks(self) -> tuple[Tensor, Tensor]:
        """(K, m) output-axis masks and (K, n) input-axis masks at the current sigma."""
        return (gaudi_mask(self.m, self.widths[OUT], self.locations[OUT], self.sigma),
                gaudi_mask(self.n, self.widths[IN], self.locations[IN], self.sigma))

    def materialize(self) -> Tensor:
        """The dense m x n weight matrix."""
        mask_out, mask_in = self.masks()
        left = (self.U * mask_out[:, :, None]).permute(1, 0, 2).reshape(self.m, -1)
        right = (self.V * mask_in[:, None, :]).reshape(-1, self.n)
        return left @ right

    def intervals(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rounded (out_start, out_len, in_start, in_len) per component."""
        return (*grid_intervals(self.widths[OUT], self.locations[OUT], self.m),
                *grid_intervals(self.widths[IN], self.locations[IN], self.n))


class GBLRLinear(GBLRLayer):
    """A Linear layer made GBLR, initialised from `linear` (its weight by SVD, or from scratch)."""

    def __init__(self, linear: nn.Linear, ratio: float, rank: int = 1, init: str = "svd"):
        super().__init__(linear.weight, linear.bias, ratio, rank, init)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.materialize(), self.bias)


class GBLRConv2d(GBLRLayer):
    """A Conv2d whose O x I*kh*kw weight matrix is GBLR; runs as one conv with the materialised
    weight (the same arithmetic as unfold + matmul, without the unfolded copy)."""

    def __init__(self, conv: nn.Conv2d, ratio: float, rank: int = 1, init: str = "svd"):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("GBLRConv2d needs groups=1 and padding_mode='zeros'")
        super().__init__(conv.weight.flatten(1), conv.bias, ratio, rank, init)
        self.kernel_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.out_hw: tuple[int, int] | None = None  # spatial output size of the last forward

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.materialize().view(self.kernel_shape), self.bias, self.stride,
                     self.padding, self.dilation)
        self.out_hw = tuple(y.shape[-2:])
        return y


def _positions(layer: nn.Module, out_hw: tuple[int, int] | None) -> int:
    if not isinstance(layer, (nn.Conv2d, GBLRConv2d)):
        return 1
    out_hw = out_hw or getattr(layer, "out_hw", None)
    if out_hw is None:
        raise ValueError("conv FLOPs need out_hw: pass it or run one forward pass first")
    return out_hw[0] * out_hw[1]


def gblr_flops(layer: GBLRLayer, out_hw: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates per sample by the paper's count: per live component
    min(r (m' + n'), m' n') with m', n' the rounded interval lengths (= ceil(w m) for w on the grid);
    a component is live when both rounded widths are >= 1/length. Conv: times output positions."""
    out_start, m_c, in_start, n_c = layer.intervals()
    live = (m_c >= 1) & (n_c >= 1)
    per = torch.minimum(layer.rank * (m_c + n_c), m_c * n_c)
    return int(per[live].sum()) * _positions(layer, out_hw)


def dense_flops(layer: nn.Module, out_hw: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates per sample of the dense layer (nn.Linear, nn.Conv2d or a GBLR layer)."""
    if isinstance(layer, GBLRLayer):
        m, n = layer.m, layer.n
    elif isinstance(layer, (nn.Linear, nn.Conv2d)):
        m, n = layer.weight.shape[0], layer.weight[0].numel()
    else:
        raise ValueError(f"dense_flops handles Linear, Conv2d and GBLR layers, got {type(layer).__name__}")
    return m * n * _positions(layer, out_hw)
