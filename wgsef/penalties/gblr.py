"""Gaudi-GBLR as a Regularizer (Lee & Kim, ICLR 2024; docs/methods.md section 5).

`attach` swaps Linear / Conv2d layers for GBLR layers; the penalty lam * sum(w_in + w_out) acts by a
proximal step on the widths after every optimizer step; sigma follows the homotopy schedule;
`finalize` swaps every GBLR layer for its tiled inference module (exact 0/1 masks).

Project choices where the paper is silent (document in the README):
- the prox step is lam * lr with lr the learning rate the loop reports (the weights' lr);
- `target_width` compares with the plain mean of all widths (both axes, all GBLR layers);
- grouped / depthwise convs are never swapped; first / last refer to the eligible layers in
  `model.modules()` order;
- `finalize` uses sigma = inf, so the deployed masks are exact boxcars even when training ended at a
  finite sigma; evaluate the finalized model.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from wgsef.penalties.base import Regularizer
from wgsef.penalties.gblr_infer import to_inference
from wgsef.penalties.gblr_layers import GBLRConv2d, GBLRLayer, GBLRLinear, dense_flops, gblr_flops


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class GBLR(Regularizer):
    name = "gblr"

    def __init__(self, lam: float, ratio: float, rank: int = 1, init: str = "svd",
                 structural_lr: float = 0.005, sigma_start: float = 1.0, sigma_end: float = 100.0,
                 warmup_epochs: int = 5, gaussian: bool = True, target_width: float | None = None,
                 skip_first: bool = True, skip_last: bool = True):
        if lam < 0:
            raise ValueError(f"regularization strength lam must be >= 0, got {lam}")
        if structural_lr <= 0:
            raise ValueError(f"structural_lr must be > 0, got {structural_lr}")
        if not 0 < sigma_start <= sigma_end:
            raise ValueError(f"need 0 < sigma_start <= sigma_end, got {sigma_start}, {sigma_end}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if target_width is not None and not 0 <= target_width <= 1:
            raise ValueError(f"target_width must be in [0, 1] or None, got {target_width}")
        if not 0 < ratio <= 1 or rank < 1 or init not in ("svd", "scratch"):
            raise ValueError(f"need 0 < ratio <= 1, rank >= 1, init 'svd' or 'scratch'; got {ratio}, {rank}, {init!r}")
        self.lam, self.ratio, self.rank, self.init = float(lam), ratio, rank, init
        self.structural_lr, self.warmup_epochs = structural_lr, warmup_epochs
        self.sigma_start, self.sigma_end, self.gaussian = sigma_start, sigma_end, gaussian
        self.target_width, self.skip_first, self.skip_last = target_width, skip_first, skip_last
        self.sigma = sigma_start if gaussian else math.inf
        self.layers: list[GBLRLayer] = []
        self.out_hw: dict[int, tuple[int, int] | None] = {}  # id(GBLR layer) -> conv output size
        self.model_dense_flops = 0   # all Linear/Conv2d layers of the model, dense
        self.skipped_flops = 0       # the layers left dense

    # --- the protocol -----------------------------------------------------------------------
    def attach(self, model: nn.Module, example_input: Tensor) -> nn.Module:
        names = [n for n, mod in model.named_modules() if _eligible(mod)]
        chosen = names[int(self.skip_first):len(names) - int(self.skip_last)]
        if not chosen:
            raise ValueError("GBLR found no Linear/Conv2d layer to replace (check skip_first/skip_last)")
        counted = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
        out_hw = self._output_sizes(model, example_input, counted)
        dense = {n: dense_flops(model.get_submodule(n), out_hw[n]) for n in counted}
        self.model_dense_flops = sum(dense.values())
        self.skipped_flops = sum(f for n, f in dense.items() if n not in chosen)
        for name in chosen:
            old = model.get_submodule(name)
            new = (GBLRConv2d if isinstance(old, nn.Conv2d) else GBLRLinear)(old, self.ratio, self.rank, self.init)
            new.set_sigma(self.sigma)
            _set_submodule(model, name, new)
            self.layers.append(new)
            self.out_hw[id(new)] = out_hw[name]
        return model

    @staticmethod
    @torch.no_grad()
    def _output_sizes(model: nn.Module, x: Tensor, names: list[str]) -> dict:
        sizes, hooks = {}, []
        for n in names:
            mod = model.get_submodule(n)
            conv = isinstance(mod, nn.Conv2d)
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, y, n=n, conv=conv: sizes.__setitem__(n, tuple(y.shape[-2:]) if conv else None)))
        was_training = model.training
        model.eval()  # no BatchNorm statistics updates from this probe
        try:
            model(x)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        return sizes

    def structural_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.widths, layer.locations)]

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": self.structural_params(), "lr": self.structural_lr, "weight_decay": 0.0}]

    def sigma_at(self, epoch: int, epochs: int) -> float:
        """sigma_start until warmup_epochs, then linear to sigma_end at the last epoch (epochs - 1)."""
        if not self.gaussian:
            return math.inf
        if epoch < self.warmup_epochs:
            return self.sigma_start
        span = epochs - 1 - self.warmup_epochs
        t = 1.0 if span <= 0 else min(1.0, (epoch - self.warmup_epochs) / span)
        return self.sigma_start + t * (self.sigma_end - self.sigma_start)

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        self.sigma = self.sigma_at(epoch, epochs)
        for layer in self.layers:
            layer.set_sigma(self.sigma)

    def mean_width(self) -> float:
        widths = [layer.widths.detach() for layer in self.layers]
        return float(sum(w.sum() for w in widths) / sum(w.numel() for w in widths))

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        shrink = self.lam > 0 and (self.target_width is None or self.mean_width() > self.target_width)
        for layer in self.layers:
            if shrink:
                layer.widths.copy_(torch.nn.functional.softshrink(layer.widths, self.lam * lr).clamp_(0.0, 1.0))
            layer.locations.remainder_(1.0)

    def value(self) -> float:
        """lam * sum of all widths (the penalty the prox step minimises)."""
        return self.lam * sum(float(layer.widths.detach().sum()) for layer in self.layers)

    def flops(self) -> tuple[int, int]:
        """(GBLR MACs, dense MACs) per sample over the swapped layers."""
        gblr = sum(gblr_flops(layer, self.out_hw[id(layer)]) for layer in self.layers)
        dense = sum(dense_flops(layer, self.out_hw[id(layer)]) for layer in self.layers)
        return gblr, dense

    def metrics(self) -> dict[str, float]:
        gblr, dense = self.flops()
        return {"mean_width": self.mean_width(), "sigma": self.sigma, "penalty": self.value(),
                "flops_ratio": gblr / dense,
                "model_flops_ratio": (gblr + self.skipped_flops) / self.model_dense_flops}

    def finalize(self, model: nn.Module) -> nn.Module:
        swapped = {id(layer) for layer in self.layers}
        for name, mod in list(model.named_modules()):
            if id(mod) in swapped:
                _set_submodule(model, name, to_inference(mod))
        return model

    def state_dict(self) -> dict:
        return {"sigma": self.sigma}

    def load_state_dict(self, state: dict) -> None:
        self.sigma = state["sigma"]
        for layer in self.layers:
            layer.set_sigma(self.sigma)
