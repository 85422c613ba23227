"""Which conv/linear layers a grouping covers, and what one traced forward pass tells about them.

`LayerTrace` runs the model once on an example input (eval mode, nothing is updated) with hooks on
every Conv2d/Linear and BatchNorm, recording per layer: its multiply-accumulates per sample (MACs), the
BatchNorm that reads its output directly, and the autograd node of its output (to test whether a
shortcut goes around it).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

LAYER_TYPES = (nn.Conv2d, nn.Linear)


def layer_macs(module: nn.Module, output: Tensor) -> float:
    """Multiply-accumulates of one forward of `module` per sample (bias adds not counted)."""
    per_output = module.weight[0].numel()  # (I/groups)*kh*kw for a conv, in_features for a linear
    batch = output.shape[0] if output.dim() > 1 else 1
    return output.numel() / batch * per_output


class LayerTrace:
    def __init__(self, model: nn.Module, example_input: Tensor):
        self.order: list[nn.Module] = []             # conv/linear layers in execution order
        self.macs: dict[nn.Module, float] = {}
        self.bn_after: dict[nn.Module, nn.Module] = {}
        self._node: dict[nn.Module, object] = {}
        produced: dict[int, nn.Module] = {}
        outputs: list[Tensor] = []                   # keeps ids in `produced` unique while tracing

        def on_layer(module, _inputs, out):
            if module not in self.macs:
                self.order.append(module)
                self.macs[module] = 0.0
            self.macs[module] += layer_macs(module, out)
            self._node[module] = out.grad_fn
            produced[id(out)] = module
            outputs.append(out)

        def on_bn(module, inputs):
            src = produced.get(id(inputs[0]))
            if src is not None:
                self.bn_after[src] = module

        hooks = [m.register_forward_hook(on_layer) for m in model.modules() if isinstance(m, LAYER_TYPES)]
        hooks += [m.register_forward_pre_hook(on_bn) for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        was_training = model.training
        self._input = example_input.detach().clone().requires_grad_(True)
        try:
            model.eval()
            with torch.enable_grad():
                self._output = model(self._input)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        if not isinstance(self._output, Tensor):
            raise ValueError(f"grouping needs a model that returns one tensor, got {type(self._output).__name__}")

    def bypassed(self, module: nn.Module) -> bool:
        """True if the output depends on the input through a path that avoids `module` (a shortcut)."""
        blocked, seen = self._node[module], set()
        stack = [self._output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node is blocked or node in seen:
                continue
            seen.add(node)
            if getattr(node, "variable", None) is self._input:
                return True
            stack.extend(n for n, _ in node.next_functions)
        return False


def select_layers(model: nn.Module, layers: list[str] | None, trace: LayerTrace | None) -> dict[str, nn.Module]:
    """Conv/linear layers (name -> module) matching the `layers` globs.

    Default: every conv/linear layer except the final classifier (whose outputs are the logits), taken
    as the last one executed (the last one registered when there is no trace). Layers the forward pass
    never runs are left out when there is a trace.
    """
    names = {m: n for n, m in model.named_modules()}
    candidates = trace.order if trace is not None else [m for m in model.modules() if isinstance(m, LAYER_TYPES)]
    if not candidates:
        raise ValueError("the model has no Conv2d or Linear layer to group")
    if layers is None:
        return {names[m]: m for m in candidates[:-1]}
    if isinstance(layers, str):
        layers = [layers]
    for pattern in layers:
        if not any(fnmatchcase(names[m], pattern) for m in candidates):
            raise ValueError(f"layer pattern '{pattern}' matches no Conv2d/Linear layer of the model")
    return {names[m]: m for m in candidates if any(fnmatchcase(names[m], p) for p in layers)}
