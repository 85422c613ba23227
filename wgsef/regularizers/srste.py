"""SR-STE: N:M fine-grained structured sparsity (Zhou et al., ICLR 2021; docs/methods.md section 4).

`attach` swaps every eligible nn.Conv2d / nn.Linear for a subclass whose forward uses W * mask.
- mode="scratch" (SR-STE): the mask is recomputed from the dense weights every forward; the dense
  weights get the straight-through gradient of the masked weights plus decay * (1 - mask) * W.
- mode="oneshot" (NVIDIA ASP recipe): on attach the (trained) weights are pruned once by magnitude and
  that mask stays fixed (an `nm_mask` buffer); the gradient is masked, so momentum and weight decay
  keep the pruned weights at exactly zero; `decay` is not used.
The swapped layers keep their parameters and state-dict keys (one-shot adds the `nm_mask` buffer).

Layer choice: as the official recipe (aojunzz/NM-sparsity, ResNet-50 2:4), the first layer to run on
`example_input` (the stem conv) is sparse and the last (the classifier) stays dense; `first_layer:
dense` / `skip_last: false` change either. Layers with one input channel per group (depthwise, and a
stem on 1-channel images) or with at most n inputs per group stay dense. Layers whose inputs per group
are not a multiple of m are zero-padded for the mask (incompatible="pad", as ASP does; the official
code groups m consecutive weights of the O x kh x kw x I layout instead, across kernel taps) or left
dense (incompatible="dense").
`report()` lists every decision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.nm import check_nm, nm_follows, nm_mask, nm_pattern_counts

CPU_MESSAGE = ("2:4 semi-structured kernels need a CUDA GPU with sparse tensor cores; "
               "on CPU N:M is reported as FLOPs only")


class _SRSTEMask(torch.autograd.Function):
    """W * mask forward; backward: the gradient of W * mask passes straight through to the dense W,
    plus decay * (1 - mask) * W (the sparse-refined term)."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * weight.masked_fill(mask, 0), None, None


class _NMLayer:
    """Mixin for a Conv2d / Linear whose forward uses its N:M-masked weight."""

    def _setup_nm(self, n: int, m: int, decay: float, fixed: bool) -> None:
        self.n, self.m, self.decay = n, m, decay
        self.register_buffer("nm_mask", nm_mask(self.weight, n, m) if fixed else None)

    def current_mask(self) -> Tensor:
        return self.nm_mask if self.nm_mask is not None else nm_mask(self.weight, self.n, self.m)

    def effective_weight(self) -> Tensor:
        if self.nm_mask is not None:
            return self.weight * self.nm_mask
        return _SRSTEMask.apply(self.weight, nm_mask(self.weight, self.n, self.m), self.decay)

    def extra_repr(self) -> str:
        kind = "fixed" if self.nm_mask is not None else f"sr-ste decay={self.decay}"
        return f"{super().extra_repr()}, {self.n}:{self.m} {kind}"


class NMConv2d(_NMLayer, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class NMLinear(_NMLayer, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _rebuild(layer: nn.Module, cls: type, weight: Tensor) -> nn.Module:
    """A `cls` layer with `layer`'s hyper-parameters, its bias and the given weight (shared, not copied)."""
    if isinstance(layer, nn.Conv2d):
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    else:
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    new.weight, new.bias = weight, layer.bias
    new.train(layer.training)
    return new


def _replace(model: nn.Module, new_for: dict[int, nn.Module]) -> nn.Module:
    """Swap modules by identity everywhere they occur (shared modules included)."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if id(child) in new_for:
                setattr(parent, name, new_for[id(child)])
    return new_for.get(id(model), model)


def _inputs_per_group(layer: nn.Module) -> int:
    return layer.in_channels // layer.groups if isinstance(layer, nn.Conv2d) else layer.in_features


def _run_order(model: nn.Module, example_input: Tensor | None, layers: list[nn.Module]) -> list[nn.Module]:
    """The layers in the order they first run on `example_input` (registration order without one)."""
    if example_input is None:
        return layers
    order, flags = [], {mod: mod.training for mod in model.modules()}
    hooks = [layer.register_forward_pre_hook(lambda mod, args: order.append(mod)) for layer in layers]
    try:
        model.eval()  # keep BatchNorm running statistics untouched
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for mod, flag in flags.items():
            mod.training = flag
    return list(dict.fromkeys(order))


def effective_weights(model: nn.Module) -> list[Tensor]:
    """The weight each Conv2d / Linear of `model` actually multiplies with (masked where wrapped)."""
    with torch.no_grad():
        return [mod.effective_weight() if isinstance(mod, _NMLayer) else mod.weight
                for mod in model.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]


def nm_pattern_report(model: nn.Module, n: int, m: int) -> dict[str, float]:
    """Fraction of the model's Conv2d/Linear layers, and of their weights, that follow n:m (counted
    from the effective weights), and the fraction of those weights that are zero."""
    return nm_pattern_counts(effective_weights(model), n, m)


class SRSTE(Regularizer):
    """N:M sparsity by SR-STE (mode="scratch") or by one-shot magnitude pruning (mode="oneshot").

    n:m: 1 <= n < m with m in (2, 4, 8, 16, 32); only 2:4 (and patterns inside it: 1:4, 1:2) has GPU
    kernels (`to_semi_structured`), other patterns are reported as FLOPs only.
    """

    name = "srste"

    def __init__(self, n: int = 2, m: int = 4, decay: float = 2e-4, mode: str = "scratch",
                 incompatible: str = "pad", first_layer: str = "sparse", skip_last: bool = True):
        check_nm(n, m)
        if decay < 0:
            raise ValueError(f"SR-STE decay must be >= 0, got {decay}")
        if mode not in ("scratch", "oneshot"):
            raise ValueError(f"SR-STE mode must be 'scratch' or 'oneshot', got '{mode}'")
        if incompatible not in ("pad", "dense"):
            raise ValueError(f"incompatible must be 'pad' or 'dense' (layers whose inputs are not a multiple "
                             f"of m), got '{incompatible}'")
        if first_layer not in ("sparse", "dense"):
            raise ValueError(f"first_layer must be 'sparse' (official recipe) or 'dense', got '{first_layer}'")
        self.n, self.m, self.decay, self.mode = n, m, float(decay), mode
        self.incompatible, self.first_layer, self.skip_last = incompatible, first_layer, skip_last
        self.model: nn.Module | None = None
        self._report: dict = {}

    def _dense_reason(self, layer: nn.Module, first: nn.Module | None, last: nn.Module | None) -> str | None:
        k = _inputs_per_group(layer)
        if self.first_layer == "dense" and layer is first:
            return "first layer"
        if self.skip_last and layer is last:
            return "last layer"
        if k == 1:
            return "depthwise (1 input channel per group)"
        if k <= self.n:
            return f"{k} inputs per group <= n={self.n}"
        if k % self.m and self.incompatible == "dense":
            return f"{k} inputs per group not a multiple of m={self.m}"
        return None

    def attach(self, model: nn.Module, example_input: Tensor | None) -> nn.Module:
        named = [(name, mod) for name, mod in model.named_modules() if type(mod) in (nn.Conv2d, nn.Linear)]
        order = _run_order(model, example_input, [mod for _, mod in named])
        first, last = (order[0], order[-1]) if order else (None, None)
        self._report = {"sparse": [], "padded": [], "dense": {}}
        new_for = {}
        for name, layer in named:
            reason = self._dense_reason(layer, first, last)
            if reason:
                self._report["dense"][name] = reason
                continue
            new = _rebuild(layer, NMConv2d if isinstance(layer, nn.Conv2d) else NMLinear, layer.weight)
            new._setup_nm(self.n, self.m, self.decay, fixed=self.mode == "oneshot")
            new_for[id(layer)] = new
            self._report["sparse"].append(name)
            if _inputs_per_group(layer) % self.m:
                self._report["padded"].append(name)
            if self.mode == "oneshot":
                with torch.no_grad():
                    new.weight.mul_(new.nm_mask)  # prune the dense weights once, in place
        self.model = _replace(model, new_for)
        return self.model

    def report(self) -> dict:
        """{'sparse': [layer names], 'padded': [names, a subset of sparse], 'dense': {name: reason}}."""
        return self._report

    def metrics(self) -> dict[str, float]:
        out = nm_pattern_report(self.model, self.n, self.m)
        out.update(nm_sparse_layers=len(self._report["sparse"]), nm_padded_layers=len(self._report["padded"]),
                   nm_dense_layers=len(self._report["dense"]))
        return out

    def finalize(self, model: nn.Module) -> nn.Module:
        """Fold the masks into the weights; every N:M layer becomes a plain nn.Conv2d / nn.Linear."""
        new_for = {}
        for mod in model.modules():
            if isinstance(mod, _NMLayer):
                with torch.no_grad():
                    weight = nn.Parameter(mod.effective_weight().clone(), mod.weight.requires_grad)
                plain = nn.Conv2d if isinstance(mod, nn.Conv2d) else nn.Linear
                new_for[id(mod)] = _rebuild(mod, plain, weight)
        self.model = _replace(model, new_for)
        return self.model


def to_semi_structured(model: nn.Module) -> dict:
    """Give every eligible nn.Linear of a finalized 2:4 model a torch semi-structured sparse weight,
    in place (inference only: the new weights do not require grad).

    Eligible: a plain nn.Linear whose weight is on CUDA, float16 or bfloat16, follows 2:4 along its
    inputs, and has a shape torch's backend accepts (cuSPARSELt: both dims multiples of 16;
    CUTLASS: rows a multiple of 32, columns of 64). Needs compute capability >= 8.0.
    Returns {'converted': [names], 'skipped': {name: reason}}.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(CPU_MESSAGE)
    if torch.cuda.get_device_capability() < (8, 0):
        major, minor = torch.cuda.get_device_capability()
        raise RuntimeError(f"2:4 semi-structured kernels need sparse tensor cores (compute capability >= 8.0), "
                           f"this GPU is sm_{major}{minor}; N:M is reported as FLOPs only")
    report = {"converted": [], "skipped": {}}
    for name, layer in model.named_modules():
        if type(layer) is not nn.Linear:
            continue
        reason = _semi_structured_obstacle(layer.weight)
        if reason is None:
            try:
                sparse = to_sparse_semi_structured(layer.weight.detach().contiguous())
            except RuntimeError as err:  # torch's own shape constraints
                reason = str(err).splitlines()[0]
        if reason:
            report["skipped"][name] = reason
            continue
        layer.weight = nn.Parameter(sparse, requires_grad=False)
        report["converted"].append(name)
    return report


def _semi_structured_obstacle(weight: Tensor) -> str | None:
    if isinstance(weight, SparseSemiStructuredTensor):
        return "already semi-structured"
    if not weight.is_cuda:
        return "weight not on CUDA"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype}, needs float16 or bfloat16"
    if not nm_follows(weight, 2, 4):
        return "weights do not follow 2:4"
    return None
