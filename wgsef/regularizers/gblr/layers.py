"""Gaudi-GBLR layers (Lee & Kim, ICLR 2024; docs/methods.md section 5).

A weight W (m x n; a conv is its O x I*kh*kw view, PyTorch's own flattening order, or with
`per_kernel` one O x I matrix per kernel tap as in the official ResNet recipe) is a sum of K rank-r
components, each masked to a circular row interval and a circular column interval:

    W = sum_c (U_c * mu_out,c[:, None]) (V_c * mu_in,c[None, :])

The masks are Gaudi masks: band-limited boxcars built in the frequency domain, differentiable in the
interval's width and location. Axis 0 of `widths` / `locations` is the output (row) axis, axis 1 the
input (column) axis (the official code has them the other way round). With T taps (per-kernel convs)
components are numbered tap-major: component t*K + k is component k of tap t.

Eval mode (`module.eval()`) builds the masks as the official code does at inference: rounded widths of
at most one entry are hard-shrunk to 0 and mask entries below 1e-3 in magnitude are zeroed
(`eval_hard=False` keeps the training masks).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUT, IN = 0, 1
MASK_ZERO = 1e-3  # eval mode: mask entries below this magnitude are zeroed (official value)
WIDTH_INITS = ("ones", "splr", "lr")  # "splr" / "lr" may carry a ratio: "splr0.5", "lr0.35"
LOCATION_INITS = ("zero", "linspace", "random")


def _round_ste(x: Tensor, n: int | Tensor, clamp: bool) -> Tensor:
    """x rounded to the 1/n grid in the forward pass, identity in the backward pass."""
    q = torch.round((x.clamp(0.0, 1.0) if clamp else x) * n) / n
    return x + (q - x).detach()


@functools.lru_cache(maxsize=64)
def _constants(spec: tuple[tuple[int, int], ...], sigma: float, dtype: torch.dtype, device: torch.device):
    """For rows grouped by mask length (spec: (n, rows) per group): the shared frequencies f and -pi f,
    f = 0..max(n)//2, and per row exp(-f^2 / (2 sigma^2)) / sinc(f / n) and 1/n."""
    f = torch.arange(max(n for n, _ in spec) // 2 + 1, dtype=torch.float64)
    gains, inv_n = [], []
    for n, rows in spec:
        gain = torch.exp(-f ** 2 / (2 * sigma ** 2)) / torch.sinc(f / n)
        gains.append(gain.masked_fill(f > n // 2, 0.0).expand(rows, -1))
        inv_n.append(torch.full((rows, 1), 1.0 / n, dtype=torch.float64))
    f = f.to(device, dtype)
    return (f, f * -math.pi, torch.cat(gains).to(device, dtype),
            torch.cat(inv_n).to(device, dtype))


def gaudi_masks(spec: tuple[tuple[int, int], ...], width: Tensor, location: Tensor, sigma: float = math.inf,
                hard: bool = False) -> list[Tensor]:
    """Gaudi masks for rows grouped by length: width, location (R,) with the rows of group g (length
    n_g, c_g rows) contiguous in spec order -> [(c_g, n_g)]. One elementwise pass builds every row's
    spectrum (padded to the longest), then one inverse real FFT per distinct length. No rounding here
    (see gaudi_mask's `ste`); `hard` as in gaudi_mask."""
    f, neg_pi_f, gain, inv_n = _constants(spec, float(sigma), width.dtype, width.device)
    w, l = width[:, None], location[:, None]
    if hard:
        w = torch.where(w.abs() > inv_n, w, 0.0)
    # amplitude * exp(i phase) as cos + i sin: a complex exp is ~9x slower on CPU (GBLR builds these every step)
    amplitude, phase = w * torch.sinc(w * f) * gain, (2 * l + w - inv_n) * neg_pi_f
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
    masks, start = [], 0
    for n, rows in spec:
        mask = torch.fft.irfft(spectrum[start:start + rows, :n // 2 + 1], n=n, dim=-1, norm="forward")
        masks.append(mask.masked_fill(mask.abs() < MASK_ZERO, 0.0) if hard else mask)
        start += rows
    return masks


def gaudi_mask(n: int, width: Tensor, location: Tensor, sigma: float | Tensor = math.inf,
               ste: bool = True, hard: bool = False) -> Tensor:
    """Gaudi masks of length n for widths/locations of any (equal, broadcastable) shape -> (..., n).

    M(f) = w sinc(w f) / sinc(f/n) exp(-f^2 / (2 sigma^2)) exp(-i pi f (2l + w - 1/n)), f = 0..n//2,
    inverted by a real FFT without the 1/n factor. With w, l on the 1/n grid and sigma = inf this is
    the 0/1 circular boxcar of length w n starting at l n. `ste` rounds w (clamped to [0, 1]) and l
    to that grid with a straight-through estimator, as in the training forward pass. `hard` is the
    official eval mode: widths of at most 1/n (after rounding) become 0, entries below 1e-3 become 0.
    """
    if n < 1:
        raise ValueError(f"mask length n must be >= 1, got {n}")
    sigma = float(sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (math.inf for no Gaussian), got {sigma}")
    width, location = torch.broadcast_tensors(torch.as_tensor(width), torch.as_tensor(location))
    if not width.is_floating_point():
        raise ValueError(f"width and location must be floating point, got {width.dtype}")
    if ste:
        width, location = _round_ste(width, n, clamp=True), _round_ste(location, n, clamp=False)
    shape = width.shape
    mask, = gaudi_masks(((n, width.numel()),), width.reshape(-1), location.reshape(-1), sigma, hard)
    return mask.view(*shape, n)


class MaskPlan:
    """How to build the masks of several GBLR layers at once: every (layer, axis) row of widths /
    locations, flattened layer by layer, reordered so that rows of equal mask length are contiguous."""

    def __init__(self, layers: list["GBLRLayer"]):
        groups = {}  # n -> [(layer index, axis, flat rows)]
        offset = 0
        for i, layer in enumerate(layers):
            c = layer.widths.shape[1]
            for axis, n in ((OUT, layer.m), (IN, layer.n)):
                groups.setdefault(n, []).append((i, axis, torch.arange(offset, offset + c)))
                offset += c
        self.n_layers = len(layers)
        self.spec = tuple((n, sum(len(r) for *_, r in members)) for n, members in groups.items())
        self.members = [[(i, axis) for i, axis, _ in members] for members in groups.values()]
        self.sizes = [[len(r) for *_, r in members] for members in groups.values()]
        self.order = torch.cat([r for members in groups.values() for *_, r in members])
        self.lengths = torch.cat([torch.full((c,), float(n)) for n, c in self.spec])
        self.device = None

    def masks(self, layers: list["GBLRLayer"], sigma: float, hard: bool) -> list[tuple[Tensor, Tensor]]:
        """[(output-axis masks, input-axis masks)] per layer, in the training forward's rounding."""
        ref = layers[0].widths
        if self.device != ref.device:
            self.order, self.lengths, self.device = self.order.to(ref.device), self.lengths.to(ref.device), ref.device
        lengths = self.lengths.to(ref.dtype)
        width = _round_ste(torch.cat([l.widths.reshape(-1) for l in layers])[self.order], lengths, clamp=True)
        location = _round_ste(torch.cat([l.locations.reshape(-1) for l in layers])[self.order], lengths, clamp=False)
        out = [[None, None] for _ in range(self.n_layers)]
        for group, members, sizes in zip(gaudi_masks(self.spec, width, location, sigma, hard),
                                         self.members, self.sizes):
            for (i, axis), mask in zip(members, group.split(sizes)):
                out[i][axis] = mask
        return [tuple(pair) for pair in out]


def grid_intervals(width: Tensor, location: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(start, length) in {0..n-1} x {0..n} of the boxcars the rounded forward pass uses."""
    length = torch.round(width.detach().clamp(0.0, 1.0) * n).long()
    start = torch.round(location.detach() * n).long().remainder(n)
    return start, length


def _parse_width_init(spec: str) -> tuple[str, float | None]:
    for kind in ("splr", "lr", "ones"):  # "splr" before "lr": both end in "lr"
        if spec.startswith(kind):
            rest = spec[len(kind):]
            try:
                ratio = float(rest) if rest else None
            except ValueError:
                break
            if kind == "ones" and rest or ratio is not None and not 0 < ratio <= 1:
                break
            return kind, ratio
    raise ValueError(f"width_init must be ones, splr[<ratio>] or lr[<ratio>] with 0 < ratio <= 1, got {spec!r}")


def init_widths(kind: str, ratio: float | None, k: int, m: int, n: int, saving: float) -> Tensor:
    """(2, K) initial widths of one GBLR matrix (axis 0 output, axis 1 input), as the official code:
    ones: all 1; splr: the first int(K ratio / 2) components full, the rest at ratio/2 / (1 - ratio/2)
    on both axes; lr: the first int(K ratio) full, the rest dead with a one-entry width on one axis
    (input axis for even, output axis for odd rest positions). ratio defaults to 1 / saving, saving =
    the factor parameters over m n (capped at 1: at saving < 1 the official formula divides by <= 0)."""
    ratio = min(1.0, 1.0 / saving) if ratio is None else ratio
    widths = torch.ones(2, k, dtype=torch.float64)
    if kind == "splr":
        full = int(k * ratio * 0.5)
        widths[:, full:] = min(1.0, 0.5 * ratio / (1 - 0.5 * ratio))
    elif kind == "lr":
        full = int(k * ratio)
        widths[:, full:] = 0.0
        widths[IN, full::2] = 1.0 / n
        widths[OUT, full + 1::2] = 1.0 / m
    return widths


def init_locations(kind: str, k: int) -> Tensor:
    """(2, K) initial locations: zero, linspace (component c at c / K on both axes) or random."""
    if kind == "zero":
        return torch.zeros(2, k, dtype=torch.float64)
    if kind == "linspace":
        return (torch.arange(k, dtype=torch.float64) / k).expand(2, k).clone()
    return torch.rand(2, k, dtype=torch.float64)


class GBLRLayer(nn.Module):
    """The factors, masks and structural parameters shared by the Linear and Conv2d variants.

    `weight` is (m, n), or (T, m, n) for T independent matrices (per-kernel conv taps)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, ratio: float, rank: int = 1,
                 init: str = "svd", width_init: str = "ones", location_init: str = "random",
                 eval_hard: bool = True):
        super().__init__()
        weight = weight.detach()
        weight = weight[None] if weight.dim() == 2 else weight
        taps, m, n = weight.shape
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if rank < 1:
            raise ValueError(f"rank per component must be >= 1, got {rank}")
        k = int(ratio * min(m, n) // rank)
        if k < 1:
            raise ValueError(f"ratio {ratio} * min({m}, {n}) / rank {rank} leaves no component")
        if init not in ("svd", "scratch"):
            raise ValueError(f"init must be 'svd' or 'scratch', got {init!r}")
        if location_init not in LOCATION_INITS:
            raise ValueError(f"location_init must be one of {', '.join(LOCATION_INITS)}, got {location_init!r}")
        width_kind, width_ratio = _parse_width_init(width_init)
        self.m, self.n, self.rank, self.n_components, self.taps = m, n, rank, k, taps
        self.eval_hard = eval_hard
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.U = nn.Parameter(torch.empty(taps * k, m, rank, **kw))
        self.V = nn.Parameter(torch.empty(taps * k, rank, n, **kw))
        saving = k * rank * (m + n) / (m * n)
        self.widths = nn.Parameter(init_widths(width_kind, width_ratio, k, m, n, saving).repeat(1, taps).to(**kw))
        self.locations = nn.Parameter(torch.cat([init_locations(location_init, k) for _ in range(taps)], 1).to(**kw))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.register_buffer("sigma", torch.tensor(math.inf, **kw))
        self._sigma = math.inf  # python copy: mask constants are cached per (n, sigma), no device read
        with torch.no_grad():
            self._init_svd(weight) if init == "svd" else self._init_scratch()

    def _init_svd(self, weight: Tensor) -> None:
        # per tap: top K*r singular triplets, sqrt(S) on each side (the official low_rank_project)
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        t, k, r, kr = self.taps, self.n_components, self.rank, self.n_components * self.rank
        root = s[:, :kr].sqrt()
        self.U.copy_((u[:, :, :kr] * root[:, None]).view(t, self.m, k, r).permute(0, 2, 1, 3).reshape(t * k, self.m, r))
        self.V.copy_((vh[:, :kr] * root[:, :, None]).reshape(t * k, r, self.n))

    def _init_scratch(self) -> None:
        # Var(W_ij) = K r Var(U) Var(V) = 1/(3 fan_in), the variance of PyTorch's default Linear init
        fan_in = self.n * self.taps
        bound = math.sqrt(3.0) * (3.0 * fan_in * self.n_components * self.rank) ** -0.25
        self.U.uniform_(-bound, bound)
        self.V.uniform_(-bound, bound)

    def set_sigma(self, sigma: float) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (math.inf for no Gaussian), got {sigma}")
        self.sigma.fill_(sigma)
        self._sigma = float(sigma)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sigma = float(self.sigma)

    @property
    def hard(self) -> bool:
        """Masks in the official eval-mode form (see the module docstring)."""
        return self.eval_hard and not self.training

    def masks(self) -> tuple[Tensor, Tensor]:
        """(T*K, m) output-axis masks and (T*K, n) input-axis masks at the current sigma. The GBLR
        regularizer builds every layer's masks in a few batched FFTs before the model's forward pass
        and hands them over once (`_bank`); a layer used alone builds its own."""
        bank = self.__dict__.pop("_bank", None)
        if bank is not None:
            return bank
        if self.__dict__.get("_plan") is None:
            self._plan = MaskPlan([self])
        return self._plan.masks([self], self._sigma, self.hard)[0]

    def materialize(self) -> Tensor:
        """The dense weight: (m, n), or (T, m, n) with taps."""
        mask_out, mask_in = self.masks()
        t, k, r = self.taps, self.n_components, self.rank
        left = (self.U * mask_out[:, :, None]).view(t, k, self.m, r).transpose(1, 2).reshape(t, self.m, k * r)
        right = (self.V * mask_in[:, None, :]).view(t, k * r, self.n)
        weight = torch.bmm(left, right)
        return weight[0] if t == 1 else weight

    def intervals(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rounded (out_start, out_len, in_start, in_len) per component."""
        return (*grid_intervals(self.widths[OUT], self.locations[OUT], self.m),
                *grid_intervals(self.widths[IN], self.locations[IN], self.n))

    def live_lengths(self) -> tuple[Tensor, Tensor]:
        """(out_len, in_len) per component as the current mode computes: rounded interval lengths, with
        eval mode's hard-shrink (one-entry widths dropped) applied when it is on."""
        _, m_c, _, n_c = self.intervals()
        if self.hard:
            m_c, n_c = m_c * (m_c > 1), n_c * (n_c > 1)
        return m_c, n_c


class GBLRLinear(GBLRLayer):
    """A Linear layer made GBLR, initialised from `linear` (its weight by SVD, or from scratch)."""

    def __init__(self, linear: nn.Linear, ratio: float, rank: int = 1, init: str = "svd", **options):
        super().__init__(linear.weight, linear.bias, ratio, rank, init, **options)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.materialize(), self.bias)


class GBLRConv2d(GBLRLayer):
    """A Conv2d whose weight is GBLR: one O x I*kh*kw matrix, or with `per_kernel` one O x I matrix per
    kernel tap (the official ResNet recipe); runs as one conv with the materialised weight."""

    def __init__(self, conv: nn.Conv2d, ratio: float, rank: int = 1, init: str = "svd",
                 per_kernel: bool = False, **options):
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError("GBLRConv2d needs groups=1 and padding_mode='zeros'")
        w = conv.weight
        super().__init__(w.flatten(2).permute(2, 0, 1) if per_kernel else w.flatten(1), conv.bias, ratio, rank,
                         init, **options)
        self.per_kernel = per_kernel
        self.kernel_shape = tuple(w.shape)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.out_hw: tuple[int, int] | None = None  # spatial output size of the last forward

    def kernel(self) -> Tensor:
        """The materialised (O, I, kh, kw) conv weight."""
        w = self.materialize()
        return (w.permute(1, 2, 0) if self.per_kernel else w).reshape(self.kernel_shape)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation)
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
    a component is live when both lengths are >= 1 (> 1 in eval mode, whose hard-shrink drops
    one-entry widths). Conv: times output positions (every tap's matrix runs at every position)."""
    m_c, n_c = layer.live_lengths()
    live = (m_c >= 1) & (n_c >= 1)
    per = torch.minimum(layer.rank * (m_c + n_c), m_c * n_c)
    return int(per[live].sum()) * _positions(layer, out_hw)


def dense_flops(layer: nn.Module, out_hw: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates per sample of the dense layer (nn.Linear, nn.Conv2d or a GBLR layer)."""
    if isinstance(layer, GBLRLayer):
        m, n = layer.m, layer.n * layer.taps
    elif isinstance(layer, (nn.Linear, nn.Conv2d)):
        m, n = layer.weight.shape[0], layer.weight[0].numel()
    else:
        raise ValueError(f"dense_flops handles Linear, Conv2d and GBLR layers, got {type(layer).__name__}")
    return m * n * _positions(layer, out_hw)
