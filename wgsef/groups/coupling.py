"""Coupled channel sets from Torch-Pruning's dependency graph, read once for grouping and for compaction.

Torch-Pruning's `DependencyGraph` traces a model and yields, per conv/linear layer, the set of channels
that must be removed together: the layer's outputs with their BatchNorm, every producer writing into one
residual stream, the depthwise chain, the channels of a concatenation (each input's channels at their
offset: `idxs` are a module's own channels, `root_idxs` the set's), flatten into a linear layer. One
`CoupledSet` per graph group records who writes the channels (producers: conv/linear rows, their bias,
the depthwise filter, per-channel affine params of BatchNorm/InstanceNorm/per-channel GroupNorm,
free nn.Parameters such as a layer scale) and who reads them (consumers: conv/linear input columns).

A *unit* is what compaction removes at once: one channel, or, when a grouped conv (groups G, not
depthwise) is in the set, channel j of every one of its G conv groups (j + i n/G for all i: a grouped
conv keeps equal group widths), as Torch-Pruning's pruner does for grouped convs.

A set is removable only if a channel whose producers are all zero emits exactly zero and removing it
leaves every other channel as it was. Couplings that break this are reported, never guessed: a
LayerNorm or a GroupNorm over several channels normalizes across channels (a zero channel still shifts
their mean and variance), a non-affine BatchNorm emits -mean/std for a zero channel,
nn.MultiheadAttention ties its embedding width to the head width, an attention qkv layer's channels are
heads (scheme `head`). Such a set carries a one-line `problem` naming the layer and the operator.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

from wgsef.errors import first_line

LAYER_TYPES = (nn.Conv2d, nn.Linear)
BATCHNORM = nn.modules.batchnorm._BatchNorm
INSTANCENORM = nn.modules.instancenorm._InstanceNorm


@dataclass
class Slice:
    """Channels `idxs` of `param` along `dim`, and the unit each of them belongs to."""
    param: Tensor
    dim: int
    idxs: Tensor
    units: Tensor


@dataclass
class CoupledSet:
    group: object                     # the Torch-Pruning group (group.prune removes root channels)
    n: int                            # channels (root indices)
    n_units: int                      # removable units (n, or n / G with a grouped conv of G groups)
    producers: list[Slice] = field(default_factory=list)
    consumers: list[Slice] = field(default_factory=list)   # conv/linear input columns (dim 1)
    layers: list[nn.Module] = field(default_factory=list)  # producer conv/linear layers, model order
    writers: list[tuple[nn.Module, Tensor]] = field(default_factory=list)  # (producer layer, its units)
    readers: list[tuple[nn.Module, Tensor]] = field(default_factory=list)  # (consumer layer, its units)
    problem: str | None = None        # why the set cannot be removed exactly (one line), None if it can
    heads: bool = False               # written by an attention's qkv layer (its channels are heads)

    def unit_of(self, root_idxs) -> Tensor:
        return torch.as_tensor(list(root_idxs), dtype=torch.long) % self.n_units

    def channels(self, units) -> list[int]:
        """The root channels of the given units."""
        chosen = torch.zeros(self.n_units, dtype=torch.bool)
        chosen[torch.as_tensor(list(units), dtype=torch.long)] = True
        return torch.nonzero(chosen[torch.arange(self.n) % self.n_units]).flatten().tolist()


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not is_depthwise(module)


def attention_qkv(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """{qkv linear: attention module} of every head-prunable attention (see wgsef.groups.head)."""
    from wgsef.groups.head import attention_modules
    return {att.qkv: att for att in attention_modules(model)}


def dependency_graph(model: nn.Module, example_input: Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's graph of `model` traced in eval mode (BatchNorm statistics stay untouched); a
    model it cannot trace stops with one line naming the operator."""
    was_training = model.training
    try:
        model.eval()
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as err:  # Torch-Pruning fails deep inside its index mapping: name where, in one line
        where = traceback.extract_tb(err.__traceback__)[-1].name
        raise ValueError(f"Torch-Pruning's dependency graph cannot trace {type(model).__name__}: "
                         f"{type(err).__name__} in its {where} ({first_line(err)}); an operator it cannot map "
                         "(ShuffleNet's channel shuffle, Swin's window partition) leaves no channel groups") from None
    finally:
        model.train(was_training)


def coupled_sets(model: nn.Module, graph: tp.DependencyGraph,
                 ignored_layers: list[nn.Module] = ()) -> list[CoupledSet]:
    """Every coupled channel set of the graph rooted at a conv/linear layer (ignored layers' sets left out)."""
    names = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    qkv = attention_qkv(model)
    order = {m: i for i, m in enumerate(model.modules())}
    params = {p: m for m in model.modules() for p in m.parameters(recurse=False)}  # parameter -> its module
    return [_read(group, graph, names, qkv, order, params)
            for group in graph.get_all_groups(ignored_layers=list(ignored_layers), root_module_types=LAYER_TYPES)]


def _channel_groups(group, names) -> tuple[int, str | None]:
    """G of the grouped convs in the set (1 if none), or a problem."""
    g = 1
    for item in group:
        m = item.dep.target.module
        if is_grouped(m):
            if list(item.idxs) != list(item.root_idxs):
                return 1, f"{names[m]} (grouped Conv2d) reads its channels through a concatenation or split"
            g = max(g, m.groups)
    return g, None


def _read(group, graph, names, qkv, order, params) -> CoupledSet:
    n = len(group[0].idxs)
    g, problem = _channel_groups(group, names)
    if n % g:
        problem = problem or f"{names[group[0].dep.target.module]}: {n} channels do not split into {g} conv groups"
        g = 1
    cs = CoupledSet(group, n, n // g, problem=problem)
    seen = set()
    for item in group:
        m, handler = item.dep.target.module, item.dep.handler
        if id(m) in seen and not isinstance(m, LAYER_TYPES):
            continue
        seen.add(id(m))
        idxs = torch.as_tensor(list(item.idxs), dtype=torch.long)
        units = cs.unit_of(item.root_idxs)
        why = _unsupported(m)
        if why:
            cs.problem = cs.problem or f"{names.get(m, type(m).__name__)} ({type(m).__name__}): {why}"
        elif isinstance(m, nn.Parameter):
            cs.producers.append(Slice(m, item.dep.target.pruning_dim, idxs, units))
        elif isinstance(m, LAYER_TYPES) and (graph.is_out_channel_pruning_fn(handler) or is_depthwise(m)):
            if m not in cs.layers:  # a depthwise conv comes twice (its input and output channels)
                cs.layers.append(m)
                cs.writers.append((m, units))
                cs.producers += [Slice(p, 0, idxs, units) for p in (m.weight, m.bias) if p is not None]
        elif isinstance(m, LAYER_TYPES):
            cs.readers.append((m, units))
            if not is_grouped(m):  # a grouped conv's columns are per conv group: not read as consumer
                cs.consumers.append(Slice(m.weight, 1, idxs, units))
        elif isinstance(m, (BATCHNORM, INSTANCENORM, nn.GroupNorm)) and getattr(m, "affine", True):
            cs.producers += [Slice(p, 0, idxs, units) for p in (m.weight, m.bias) if p is not None]
    cs.layers.sort(key=order.__getitem__)
    cs.producers.sort(key=lambda s: order.get(params.get(s.param), -1))
    cs.heads = any(m in qkv for m in cs.layers)
    if cs.heads:
        names_ = ", ".join(names[m] for m in cs.layers if m in qkv)
        cs.problem = cs.problem or f"{names_} (attention qkv Linear): its channels are heads, grouped by scheme 'head'"
    return cs


def _unsupported(m: nn.Module | nn.Parameter) -> str | None:
    """Why this coupled module prevents exact removal (None: it does not)."""
    if isinstance(m, nn.Parameter) or not isinstance(m, nn.Module):
        return None
    if isinstance(m, nn.LayerNorm):
        return "normalizes across channels; a zero channel still changes the mean and variance of the others"
    if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
        return "normalizes across the channels of a group; a zero channel still changes the others' statistics"
    if isinstance(m, BATCHNORM) and not m.affine:
        return "is not affine, so a zero channel emits -mean/std instead of 0"
    if isinstance(m, nn.MultiheadAttention):
        return "ties its embedding width to the head width; use an attention with qkv/proj Linear layers"
    if isinstance(m, LAYER_TYPES + (BATCHNORM, INSTANCENORM, nn.GroupNorm, nn.PReLU)):
        return None
    if next(m.parameters(recurse=False), None) is None:
        return None  # reshape, add, concat, activation: no parameters
    return "is a layer type whose coupling to channels is not known"
