"""Physical compaction: turn zeroed filter/channel groups and attention heads into a smaller dense model,
and save/load it.

Torch-Pruning's DependencyGraph finds the coupled channels (residual streams, the MobileNet
pointwise -> depthwise -> pointwise chain, concatenations, grouped convs, flatten into a linear layer;
read through wgsef.groups.coupling, the same sets the filter groups are made of); the zeros decide what
goes: a unit (a channel, or one channel per conv group) is removed when every producer-side parameter of
it is zero (conv/linear filter rows, their bias, the BN gamma AND beta, the depthwise filter), so it emits
exactly 0, or when every consumer reads it with zero weights (a zero input-channel group). An attention
head (wgsef.groups.head) goes when its q, k, v rows are zero or its proj columns are. A channel with a
zero filter but a nonzero BN beta emits a constant and stays. Zeros that no channel removal can exploit
(im2col columns, unstructured, N:M) stay in the compact model and are counted in the report as FLOPs-only.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from wgsef.groups.coupling import CoupledSet, Slice, coupled_sets, dependency_graph, is_depthwise, is_grouped
from wgsef.groups.head import attention_modules, head_layout
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
    removed_heads: int = 0             # attention heads removed
    left_out: list[str] = field(default_factory=list)  # coupled sets that cannot be removed exactly, why
    shape_zero_columns: dict[str, list[int]] = field(default_factory=dict)  # conv -> [zero cols, cols]
    zero_weights: int = 0              # zeros left in conv/linear weights of the compact model
    weights: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def widths(self) -> dict[str, list[int]]:
        """{conv/linear layer: [output width before, after]} (BN layers mirror their conv)."""
        return {name: [before[0], self.shapes_after[name][0]] for name, before in self.shapes_before.items()
                if len(before) > 1}


def _classifier(model: nn.Module) -> nn.Module:
    """The last conv/linear layer registered: its outputs are the logits and are never pruned."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ValueError("compaction needs a model with at least one Conv2d or Linear layer")
    return layers[-1]


def _sets(model: nn.Module, example_inputs) -> list[CoupledSet]:
    """Coupled channel sets of `model` (classifier outputs and attention qkv layers excluded: heads are
    removed as a whole by _compact_heads)."""
    graph = dependency_graph(model, example_inputs)
    ignored = [_classifier(model)] + [att.qkv for att in attention_modules(model)]
    return coupled_sets(model, graph, ignored_layers=ignored)


def _unit_norms(slices: list[Slice], n_units: int) -> torch.Tensor:
    """Squared norm per unit of the given parameter slices."""
    out = torch.zeros(n_units, dtype=torch.float64)
    for s in slices:
        part = s.param.detach().index_select(s.dim, s.idxs.to(s.param.device)).double().pow(2)
        out.index_add_(0, s.units, part.movedim(s.dim, 0).reshape(len(s.idxs), -1).sum(1).cpu())
    return out


def _set_norms(cs: CoupledSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared norms per unit of the producer side and of the consumer side (None: no complete consumer
    side, e.g. no consumer or a grouped conv among the readers)."""
    complete = cs.consumers and not any(is_grouped(m) for m, _ in cs.readers)
    return _unit_norms(cs.producers, cs.n_units), _unit_norms(cs.consumers, cs.n_units) if complete else None


def _producer_zero_(cs: CoupledSet, units: list[int]) -> None:
    """Zero the producer side (filter rows, bias, norm gamma and beta, free parameters) of the given units."""
    chosen = torch.zeros(cs.n_units, dtype=torch.bool)
    chosen[units] = True
    with torch.no_grad():
        for s in cs.producers:
            idx = s.idxs[chosen[s.units]].to(s.param.device)
            s.param.index_fill_(s.dim, idx, 0.0)


def zero_random_groups_(model: nn.Module, example_inputs, fraction: float, generator: torch.Generator) -> int:
    """Zero the producer side of a random `fraction` of every removable coupled set's units in place;
    returns how many channels were zeroed (used by tests and the compaction benchmark)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    zeroed = 0
    for cs in _sets(model, example_inputs):
        if cs.problem is None:
            k = int(fraction * cs.n_units)
            _producer_zero_(cs, torch.randperm(cs.n_units, generator=generator)[:k].tolist())
            zeroed += k * (cs.n // cs.n_units)
    return zeroed


def _compact_heads(att: nn.Module) -> int:
    """Remove the heads of one attention module whose q, k, v rows (and biases) are all zero or whose
    proj columns are all zero (at least one head stays); returns how many went."""
    heads, width = head_layout(att)
    qkv, proj = att.qkv, att.proj
    rows = qkv.weight.detach().reshape(3, heads, width, -1).double().pow(2).sum((0, 2, 3))
    if qkv.bias is not None:
        rows += qkv.bias.detach().reshape(3, heads, width).double().pow(2).sum((0, 2))
    cols = proj.weight.detach().reshape(proj.out_features, heads, width).double().pow(2).sum((0, 2))
    keep = ~((rows == 0) | (cols == 0))
    if not keep.any():
        keep[torch.argmax(rows + cols)] = True
    if bool(keep.all()):
        return 0
    kept = torch.nonzero(keep).flatten().to(qkv.weight.device)
    out_rows = (torch.arange(3, device=kept.device)[:, None] * heads + kept[None, :]).flatten()
    out_rows = (out_rows[:, None] * width + torch.arange(width, device=kept.device)).flatten()
    in_cols = (kept[:, None] * width + torch.arange(width, device=kept.device)).flatten()
    att.qkv = _linear_slice(qkv, rows=out_rows)
    att.proj = _linear_slice(proj, cols=in_cols)
    if not isinstance(getattr(type(att), "num_heads", None), property):  # wgsef's ViT derives it from qkv
        att.num_heads = len(kept)
    return heads - len(kept)


def _linear_slice(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A Linear holding old's weight rows `rows` (and bias) and columns `cols` (None: all)."""
    w = old.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(old.bias.detach() if rows is None else old.bias.detach()[rows])
    return new.train(old.training)


def _layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(m.weight.shape) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)}


def _remaining_zeros(model: nn.Module, report: CompactionReport) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            report.zero_weights += int((w == 0).sum())
            report.weights += w.numel()
            if isinstance(m, nn.Conv2d) and w.shape[2] * w.shape[3] > 1 and not is_depthwise(m):
                cols = w.flatten(1).abs().sum(0)  # one entry per im2col column W[:, c, h, w]
                report.shape_zero_columns[name] = [int((cols == 0).sum()), cols.numel()]


def compact(model: nn.Module, example_inputs, round_to: int = 1) -> nn.Module:
    """A deep copy of `model` with every all-zero channel group and attention head physically removed.

    round_to > 1 keeps each compacted width (in units: channels, or channels per conv group with a
    grouped conv) a multiple of round_to (capped at the original width) by keeping the removable units
    with the largest norms; at least one unit (and one head per attention) always survives. Coupled sets
    that cannot be removed exactly stay whole and are listed in the report's `left_out`. The returned
    module carries a `compaction_report` (CompactionReport).
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    model = copy.deepcopy(model)
    report = CompactionReport(shapes_before=_layer_shapes(model), shapes_after={})
    with eval_mode(model):
        report.removed_heads = sum(_compact_heads(att) for att in attention_modules(model)
                                   if att.qkv is not _classifier(model))
        sets = _sets(model, example_inputs)
    for cs in sets:
        producer, consumer = _set_norms(cs)
        removable = producer == 0
        if consumer is not None:
            removable |= consumer == 0
        n, n_removable, per_unit = cs.n_units, int(removable.sum()), cs.n // cs.n_units
        if cs.problem is not None:
            report.left_out.append(cs.problem)
            report.kept_zero_channels += n_removable * per_unit
            continue
        keep = min(n, max(1, math.ceil((n - n_removable) / round_to) * round_to))
        n_remove = n - keep
        if n_remove <= 0:
            report.kept_zero_channels += n_removable * per_unit
            continue
        candidates = torch.nonzero(removable).flatten()
        total = producer + (consumer if consumer is not None else 0)
        order = torch.argsort(total[candidates], stable=True)  # keep the largest norms, remove the rest
        cs.group.prune(idxs=cs.channels(sorted(candidates[order[:n_remove]].tolist())))
        report.removed_channels += n_remove * per_unit
        report.kept_zero_channels += (n_removable - n_remove) * per_unit
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
