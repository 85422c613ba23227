"""Physical compaction: turn zeroed filter/channel groups into a smaller dense model, and save/load it.

Torch-Pruning's DependencyGraph finds the coupled channels (residual streams, the MobileNet
pointwise -> depthwise -> pointwise chain, flatten into a linear layer); the zeros decide what goes:
a channel is removed when every producer-side parameter of it is zero (conv/linear filter rows, their
bias, the BN gamma AND beta, the depthwise filter), so it emits exactly 0, or when every consumer reads it
with zero weights (a zero input-channel group). A channel with a zero filter but a nonzero BN beta emits a
constant and stays. Zeros that no channel removal can exploit (im2col columns, unstructured, N:M) stay in
the compact model and are counted in the report as FLOPs-only.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from wgsef.measure import eval_mode
from wgsef.models import build

LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@dataclass
class CompactionReport:
    """What compaction did: weight shapes before/after per layer, and the zeros it could not remove."""
    shapes_before: dict[str, list[int]]
    shapes_after: dict[str, list[int]]
    removed_channels: int = 0          # channels removed, summed over coupled groups
    kept_zero_channels: int = 0        # removable channels kept (round_to padding, or the last channel)
    shape_zero_columns: dict[str, list[int]] = field(default_factory=dict)  # conv -> [zero cols, cols]
    zero_weights: int = 0              # zeros left in conv/linear weights of the compact model
    weights: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def widths(self) -> dict[str, list[int]]:
        """{conv/linear layer: [output width before, after]} (BN layers mirror their conv)."""
        return {name: [before[0], self.shapes_after[name][0]] for name, before in self.shapes_before.items()
                if len(before) > 1}


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _check_supported(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m):
        raise ValueError(f"compaction supports dense or depthwise convs, got groups={m.groups} in {m}")
    if isinstance(m, nn.BatchNorm2d) and not m.affine:
        raise ValueError(f"compaction needs affine BatchNorm (a non-affine BN emits -mean/std), got {m}")


def _is_producer(DG: tp.DependencyGraph, item) -> bool:
    """Does this group item prune output channels (filter rows, BN entries, the depthwise filter)?"""
    return DG.is_out_channel_pruning_fn(item.dep.handler) or _is_depthwise(item.dep.target.module)


def _group_norms(DG: tp.DependencyGraph, group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared norms per root channel of the group's producer side and consumer side (None: no consumer)."""
    n = len(group[0].idxs)
    producer = torch.zeros(n, dtype=torch.float64)
    consumer = None
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Module) or next(m.parameters(recurse=False), None) is None:
            continue  # reshape/add/activation nodes carry no parameters
        if not isinstance(m, LAYER_TYPES):
            raise ValueError(f"compaction supports Conv2d, Linear and BatchNorm2d layers, got {type(m).__name__}")
        _check_supported(m)
        idx = torch.as_tensor(item.idxs, device=m.weight.device)
        root = torch.as_tensor(item.root_idxs)
        if _is_producer(DG, item):
            sq = m.weight.detach()[idx].double().pow(2).reshape(len(idx), -1).sum(1)
            if m.bias is not None:
                sq = sq + m.bias.detach()[idx].double().pow(2)
            producer.index_add_(0, root, sq.cpu())
        elif DG.is_in_channel_pruning_fn(item.dep.handler):
            sq = m.weight.detach()[:, idx].double().pow(2).transpose(0, 1).reshape(len(idx), -1).sum(1)
            consumer = torch.zeros(n, dtype=torch.float64) if consumer is None else consumer
            consumer.index_add_(0, root, sq.cpu())
    return producer, consumer


def _producer_zero_(DG: tp.DependencyGraph, group, root_idxs: list[int]) -> None:
    """Zero the producer side (filter rows, bias, BN gamma and beta) of the given root channels."""
    chosen = set(root_idxs)
    with torch.no_grad():
        for item in group:
            m = item.dep.target.module
            if not isinstance(m, LAYER_TYPES):
                continue
            if _is_producer(DG, item):
                idx = [i for i, r in zip(item.idxs, item.root_idxs) if r in chosen]
                m.weight[idx] = 0
                if m.bias is not None:
                    m.bias[idx] = 0


def _classifier(model: nn.Module) -> nn.Module:
    """The last conv/linear layer registered: its outputs are the logits and are never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("compaction needs a model with at least one Conv2d or Linear layer")
    return layers[-1]


def _groups(model: nn.Module, example_inputs):
    """Coupled channel groups of `model` (classifier outputs excluded), traced in eval mode."""
    with eval_mode(model):  # tracing runs a forward pass: keep BN running stats untouched
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    return DG, DG.get_all_groups(ignored_layers=[_classifier(model)])


def zero_random_groups_(model: nn.Module, example_inputs, fraction: float, generator: torch.Generator) -> int:
    """Zero the producer side of a random `fraction` of every coupled group's channels in place;
    returns how many channels were zeroed (used by tests and the compaction benchmark)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    DG, groups, zeroed = *_groups(model, example_inputs), 0
    for group in groups:
        n = len(group[0].idxs)
        k = int(fraction * n)
        _producer_zero_(DG, group, torch.randperm(n, generator=generator)[:k].tolist())
        zeroed += k
    return zeroed


def _layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.weight.shape) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def _remaining_zeros(model: nn.Module, report: CompactionReport) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            report.zero_weights += int((w == 0).sum())
            report.weights += w.numel()
            if isinstance(m, nn.Conv2d) and w.shape[2] * w.shape[3] > 1 and not _is_depthwise(m):
                cols = w.flatten(1).abs().sum(0)  # one entry per im2col column W[:, c, h, w]
                report.shape_zero_columns[name] = [int((cols == 0).sum()), cols.numel()]


def compact(model: nn.Module, example_inputs, round_to: int = 1) -> nn.Module:
    """A deep copy of `model` with every all-zero channel group physically removed.

    round_to > 1 keeps each compacted width a multiple of round_to (capped at the original width) by
    keeping the removable channels with the largest norms; at least one channel always survives. The
    returned module carries a `compaction_report` (CompactionReport).
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    model = copy.deepcopy(model)
    report = CompactionReport(shapes_before=_layer_shapes(model), shapes_after={})
    DG, groups = _groups(model, example_inputs)
    for group in groups:
        producer, consumer = _group_norms(DG, group)
        removable = producer == 0
        if consumer is not None:
            removable |= consumer == 0
        n, n_removable = len(producer), int(removable.sum())
        keep = min(n, max(1, math.ceil((n - n_removable) / round_to) * round_to))
        n_remove = n - keep
        if n_remove <= 0:
            report.kept_zero_channels += n_removable
            continue
        candidates = torch.nonzero(removable).flatten()
        total = producer + (consumer if consumer is not None else 0)
        order = torch.argsort(total[candidates], stable=True)  # keep the largest norms, remove the rest
        group.prune(idxs=sorted(candidates[order[:n_remove]].tolist()))
        report.removed_channels += n_remove
        report.kept_zero_channels += n_removable - n_remove
    report.shapes_after = _layer_shapes(model)
    _remaining_zeros(model, report)
    model.compaction_report = report
    return model


# --- saving without pickling modules -------------------------------------------------------------

def _layer_spec(m: nn.Module) -> dict:
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features}
    return {"type": "BatchNorm2d", "out": m.num_features}


def _resized(old: nn.Module, spec: dict) -> nn.Module:
    """A fresh layer like `old` (kernel, stride, bias, eps, ...) with the widths of `spec`."""
    kind = spec.get("type")
    if kind != type(old).__name__:
        raise ValueError(f"saved layer type {kind} does not match the built {type(old).__name__}")
    if isinstance(old, nn.Conv2d):
        return nn.Conv2d(spec["in"], spec["out"], old.kernel_size, old.stride, old.padding, old.dilation,
                         spec["groups"], old.bias is not None, old.padding_mode)
    if isinstance(old, nn.Linear):
        return nn.Linear(spec["in"], spec["out"], old.bias is not None)
    return nn.BatchNorm2d(spec["out"], old.eps, old.momentum, old.affine, old.track_running_stats)


def save_compact(model: nn.Module, path, arch: dict) -> None:
    """Save `model` as {"spec": JSON string, "state_dict": tensors}; `arch` is the wgsef.models.build
    call that made the dense model: {"name": ..., "num_classes": ..., "in_channels": ..., "image_size":
    ..., plus constructor kwargs such as "width"}."""
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"arch must be a dict with the model 'name' and its build kwargs, got {arch!r}")
    layers = {name: _layer_spec(m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    spec = json.dumps({"arch": arch, "layers": layers})
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec": spec, "state_dict": state}, path)


def _read(path, map_location) -> tuple[dict, dict]:
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        return json.loads(blob["spec"]), blob["state_dict"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a save_compact checkpoint ({err!r}); save it with save_compact") from err


def load_arch(path) -> dict:
    """The wgsef.models.build arguments stored by save_compact (name, num_classes, ..., width)."""
    return _read(path, "cpu")[0]["arch"]


def load_compact(path, map_location="cpu") -> nn.Module:
    """Rebuild a model saved by save_compact: build the dense architecture, resize each layer, load."""
    spec, state = _read(path, map_location)
    arch = dict(spec["arch"])
    model = build(arch.pop("name"), **arch)
    for name, layer_spec in spec["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _resized(getattr(parent, child), layer_spec))
    model.load_state_dict(state)
    return model
