"""Gaudi-GBLR as a Regularizer (Lee & Kim, ICLR 2024; docs/methods.md section 5).

`attach` swaps Linear / Conv2d layers for GBLR layers; the penalty lam * sum(w_in + w_out) acts by a
proximal step on the widths after every optimizer step, widths <- clamp(softshrink(widths, lam * lr),
0, 1) (clamped after every step, also while the shrinkage pauses); sigma follows the homotopy schedule;
`finalize` deploys every GBLR layer in the fastest of its exact forms (`deploy`: candidate_forms, fastest).

Official choices (changwoolee/Gaudi-GBLR), each an option: widths and locations trained by Adam with
betas (0, 0.999) at lr 0.005 following the weights' schedule (`structural_optimizer: adam`; `sgd` puts
them in the main optimizer with their own lr and momentum); `width_init` splr / lr<ratio>,
`location_init` zero / linspace; `per_kernel` convs; in ResNets only the convs of the residual stages
(`layers: auto`); eval-mode masks hard-shrunk (`eval_hard`).

Project choices where the paper is silent (documented in docs/choices.md):
- the prox step is lam * lr with lr the weights' learning rate (`shrink_lr: weights`; the official
  callback reads the last param group's lr, which is the structural group: `shrink_lr: structural`);
- `target_width` compares with the plain mean of all widths (both axes, all GBLR layers);
- grouped / depthwise convs are never swapped; first / last refer to the eligible layers in
  `model.modules()` order.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn

from wgsef.regularizers.base import Regularizer
from wgsef.regularizers.gblr.deploy import candidate_forms, fastest, to_dense, to_inference
from wgsef.regularizers.gblr.layers import (LOCATION_INITS, GBLRConv2d, GBLRLayer, GBLRLinear, MaskPlan,
                                         _parse_width_init, dense_flops, gblr_flops)

LAYER_CHOICES = ("auto", "all", "residual")


def _eligible(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros")


def _in_residual_stage(name: str, module: nn.Module) -> bool:
    """A conv of a ResNet stage (`layerN...`), shortcut / downsample convs excluded (official recipe)."""
    parts = name.split(".")
    return (isinstance(module, nn.Conv2d) and parts[0].startswith("layer")
            and not {"shortcut", "downsample"} & set(parts))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class StructuralAdam:
    """Adam without weight decay (torch.optim.Adam's update, eps 1e-8) over GBLR's widths and locations,
    in a few foreach ops with a host-side step count (torch's Adam reads one step tensor per parameter).
    `step` clears the gradients it used."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float], eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.steps = params, lr, betas, eps, 0
        self.exp_avg: list[Tensor] | None = None  # created at the first step, on the parameters' device
        self.exp_avg_sq: list[Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not have:
            return
        (beta1, beta2), self.steps = self.betas, self.steps + 1
        if self.exp_avg_sq is None:
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
            self.exp_avg = [torch.zeros_like(p) for p in self.params] if beta1 > 0 else None
        params, grads = [self.params[i] for i in have], [self.params[i].grad for i in have]
        sq = [self.exp_avg_sq[i] for i in have]
        torch._foreach_mul_(sq, beta2)
        torch._foreach_addcmul_(sq, grads, grads, 1 - beta2)
        avg = grads
        if self.exp_avg is not None:
            avg = [self.exp_avg[i] for i in have]
            torch._foreach_lerp_(avg, grads, 1 - beta1)
        denom = torch._foreach_sqrt(sq)
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** self.steps))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, avg, denom, -self.lr / (1 - beta1 ** self.steps))
        for p in params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.exp_avg, self.exp_avg_sq = (None if saved is None else [t.to(p.device) for t, p in zip(saved, self.params)]
                                         for saved in (state["exp_avg"], state["exp_avg_sq"]))


class GBLR(Regularizer):
    name = "gblr"

    def __init__(self, lam: float, ratio: float, rank: int = 1, init: str = "svd",
                 structural_lr: float = 0.005, sigma_start: float = 1.0, sigma_end: float = 100.0,
                 warmup_epochs: int = 5, gaussian: bool = True, target_width: float | None = None,
                 skip_first: bool = True, skip_last: bool = True, *, structural_optimizer: str = "adam",
                 structural_betas: tuple[float, float] = (0.0, 0.999), structural_momentum: float = 0.9,
                 shrink_lr: str = "weights", width_init: str = "splr", location_init: str = "linspace",
                 per_kernel: bool = False, layers: str = "auto", eval_hard: bool = True,
                 deploy: str = "fastest", deploy_margin: float = 0.1, deploy_batches: tuple[int, ...] = (1, 64),
                 deploy_repeats: int = 3, deploy_min_run_time: float = 0.05, deploy_device: str = "cpu",
                 deploy_threads: int = 1, deploy_clock: str = "cpu"):
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
        choices = {"structural_optimizer": (structural_optimizer, ("adam", "sgd")),
                   "shrink_lr": (shrink_lr, ("weights", "structural")), "layers": (layers, LAYER_CHOICES),
                   "location_init": (location_init, LOCATION_INITS), "deploy": (deploy, ("fastest", "dense", "tiled")),
                   "deploy_device": (deploy_device, ("cpu", "cuda")), "deploy_clock": (deploy_clock, ("cpu", "wall"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        _parse_width_init(width_init)
        betas = tuple(float(b) for b in structural_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas) or not 0 <= structural_momentum < 1:
            raise ValueError(f"structural_betas must be two values in [0, 1) and structural_momentum in [0, 1), "
                             f"got {structural_betas}, {structural_momentum}")
        deploy_batches = tuple(int(b) for b in deploy_batches)
        if (not 0 <= deploy_margin < 1 or not deploy_batches or min(deploy_batches) < 1 or deploy_repeats < 1
                or deploy_min_run_time <= 0 or deploy_threads < 1 or (deploy_clock == "cpu" and
                                                                       (deploy_device, deploy_threads) != ("cpu", 1))):
            raise ValueError("need 0 <= deploy_margin < 1, deploy_batches >= 1, deploy_repeats >= 1, "
                             "deploy_min_run_time > 0, deploy_threads >= 1 (deploy_clock cpu: device cpu, 1 thread); "
                             f"got {deploy_margin}, {deploy_batches}, {deploy_repeats}, {deploy_min_run_time}, "
                             f"{deploy_threads}, {deploy_clock} on {deploy_device}")
        self.lam, self.ratio, self.rank, self.init = float(lam), ratio, rank, init
        self.structural_lr, self.warmup_epochs = structural_lr, warmup_epochs
        self.structural_optimizer, self.structural_betas = structural_optimizer, betas
        self.structural_momentum, self.shrink_lr = structural_momentum, shrink_lr
        self.sigma_start, self.sigma_end, self.gaussian = sigma_start, sigma_end, gaussian
        self.target_width, self.skip_first, self.skip_last = target_width, skip_first, skip_last
        self.layer_options = dict(width_init=width_init, location_init=location_init, eval_hard=eval_hard)
        self.per_kernel, self.layer_choice = per_kernel, layers
        self.deploy, self.deploy_margin, self.deploy_batches = deploy, deploy_margin, deploy_batches
        self.deploy_repeats, self.deploy_min_run_time = deploy_repeats, deploy_min_run_time
        self.deploy_device, self.deploy_threads, self.deploy_clock = deploy_device, int(deploy_threads), deploy_clock
        self.sigma = sigma_start if gaussian else math.inf
        self.layers: list[GBLRLayer] = []
        self.names: list[str] = []
        self.out_hw: dict[int, tuple[int, int] | None] = {}  # id(GBLR layer) -> conv output size
        self.model_dense_flops = 0   # all Linear/Conv2d layers of the model, dense
        self.skipped_flops = 0       # the layers left dense
        self.optimizer: StructuralAdam | None = None
        self.base_lr: float | None = None  # the weights' lr at the first step: the schedule's scale
        self.deployment: dict[str, str] = {}  # layer name -> deployed form, after finalize
        self.example: Tensor | None = None
        self._hook = None

    # --- the protocol -----------------------------------------------------------------------
    def choose(self, model: nn.Module) -> list[str]:
        """Names of the layers to make GBLR (see `layers`, `skip_first`, `skip_last`)."""
        names = [n for n, mod in model.named_modules() if _eligible(mod)]
        residual = [n for n in names if _in_residual_stage(n, model.get_submodule(n))]
        mode = ("residual" if residual else "all") if self.layer_choice == "auto" else self.layer_choice
        if mode == "residual":
            return residual
        return names[int(self.skip_first):len(names) - int(self.skip_last)]

    def attach(self, model: nn.Module, example_input: Tensor) -> nn.Module:
        chosen = self.choose(model)
        if not chosen:
            raise ValueError("GBLR found no Linear/Conv2d layer to replace (check layers, skip_first, skip_last)")
        counted = [n for n, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))]
        out_hw = self._output_sizes(model, example_input, counted)
        dense = {n: dense_flops(model.get_submodule(n), out_hw[n]) for n in counted}
        self.model_dense_flops = sum(dense.values())
        self.skipped_flops = sum(f for n, f in dense.items() if n not in chosen)
        for name in chosen:
            old = model.get_submodule(name)
            if isinstance(old, nn.Conv2d):
                new = GBLRConv2d(old, self.ratio, self.rank, self.init, self.per_kernel, **self.layer_options)
            else:
                new = GBLRLinear(old, self.ratio, self.rank, self.init, **self.layer_options)
            new.set_sigma(self.sigma)
            _set_submodule(model, name, new)
            self.layers.append(new)
            self.names.append(name)
            self.out_hw[id(new)] = out_hw[name]
        self.example = example_input[:1].detach()
        self._plan = MaskPlan(self.layers)
        self._hook = model.register_forward_pre_hook(self._build_masks)
        if self.structural_optimizer == "adam":
            self.optimizer = StructuralAdam(self.structural_params(), self.structural_lr, self.structural_betas)
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

    # --- all masks in a few batched FFTs -------------------------------------------------------
    def _build_masks(self, _model: nn.Module, _args) -> None:
        """Forward pre-hook: every layer's masks, in one elementwise pass and one FFT per distinct mask
        length (MaskPlan); each layer takes its own pair once (GBLRLayer.masks)."""
        for layer, pair in zip(self.layers, self._plan.masks(self.layers, self.sigma, self.layers[0].hard)):
            layer._bank = pair

    # --- training --------------------------------------------------------------------------
    def structural_params(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (layer.widths, layer.locations)]

    def param_groups(self, model: nn.Module) -> list[dict]:
        if self.structural_optimizer == "adam":  # stepped here, in after_step; kept out of the main optimizer
            return [{"params": self.structural_params(), "external": True}]
        return [{"params": self.structural_params(), "lr": self.structural_lr,
                 "momentum": self.structural_momentum, "weight_decay": 0.0}]

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
        """`lr`: the weights' learning rate of the step just taken. Steps the structural Adam (its lr
        follows the weights' schedule), then widths <- clamp(softshrink(widths, lam * lr), 0, 1), which
        equals clamp(widths - lam * lr, 0, 1); with a target width the threshold is 0 while the mean
        width is <= target (decided on the device: no host sync). Locations wrap into [0, 1)."""
        if self.base_lr is None:
            self.base_lr = lr if lr > 0 else 1.0
        structural_lr = self.structural_lr * lr / self.base_lr
        if self.optimizer is not None:
            self.optimizer.lr = structural_lr
            self.optimizer.step()
        widths = [layer.widths for layer in self.layers]
        locations = [layer.locations for layer in self.layers]
        threshold = self.lam * (lr if self.shrink_lr == "weights" else structural_lr)
        if threshold > 0:
            if self.target_width is not None:
                mean = torch.cat([w.reshape(-1) for w in widths]).mean()
                threshold = (mean > self.target_width) * threshold  # a 0-dim tensor
            torch._foreach_sub_(widths, threshold)
        torch._foreach_clamp_min_(widths, 0.0)
        torch._foreach_clamp_max_(widths, 1.0)
        torch._foreach_sub_(locations, torch._foreach_floor(locations))

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

    # --- deployment ------------------------------------------------------------------------
    @torch.no_grad()
    def _layer_inputs(self, model: nn.Module, batch: int) -> dict[int, Tensor]:
        """Each GBLR layer's input on the example input repeated to `batch` (eval mode)."""
        inputs, hooks = {}, []
        for layer in self.layers:
            hooks.append(layer.register_forward_hook(
                lambda mod, args, _y: inputs.__setitem__(id(mod), args[0].detach())))
        flags = {m: m.training for m in model.modules()}
        model.eval()
        try:
            model(self.example.expand(batch, *self.example.shape[1:]).contiguous())
        finally:
            for h in hooks:
                h.remove()
            for m, flag in flags.items():
                m.training = flag
        return inputs

    def finalize(self, model: nn.Module) -> nn.Module:
        """Swap every GBLR layer for an exact form of what it computes in eval mode: with `deploy:
        fastest` the fastest of dense, low-rank and tiled timed on the layer's own input at every
        batch size of deploy_batches (a non-dense form must win by deploy_margin at each of them), on the
        device, thread count and clock the reported latency is measured with (deploy_device, deploy_threads,
        deploy_clock: the config passes measure.threads and measure.clock; CPU, whatever device trained);
        `deploy: dense|tiled` forces one (per-kernel layers always deploy dense)."""
        inputs = [self._layer_inputs(model, b) for b in self.deploy_batches] if self.deploy == "fastest" else []
        for name, layer in zip(self.names, self.layers):
            if self.deploy == "fastest":
                forms = candidate_forms(layer, batch_hint=max(self.deploy_batches))
                choice = fastest(forms, [x[id(layer)] for x in inputs], self.deploy_margin, self.deploy_repeats,
                                 self.deploy_min_run_time, device=self.deploy_device, threads=self.deploy_threads,
                                 clock=self.deploy_clock)
                form = forms[choice]
            elif self.deploy == "tiled" and layer.taps == 1:
                choice, form = "tiled", to_inference(layer, batch_hint=max(self.deploy_batches)).eval()
            else:
                choice, form = "dense", to_dense(layer)
            self.deployment[name] = choice
            _set_submodule(model, name, form)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return model

    def state_dict(self) -> dict:
        return {"sigma": self.sigma, "base_lr": self.base_lr,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        self.sigma, self.base_lr = state["sigma"], state.get("base_lr")
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        for layer in self.layers:
            layer.set_sigma(self.sigma)
