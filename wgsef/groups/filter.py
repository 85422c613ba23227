"""Filter groups: output channels, coupled across layers so that a zero group is removable.

Torch-Pruning's dependency graph gives, for any traced model, the sets of channels that must be pruned
together (a conv's outputs with its BatchNorm; all producers writing into one ResNet residual stream;
MobileNet's pointwise -> depthwise chain). Of each set we keep the producer side as the group members:
every Conv2d/Linear whose output channels are in the set (weight rows and bias; a depthwise conv's
filter is its output channel) and every BatchNorm's gamma and beta. The consumers' input channels are
not in the group: once the producers are zero, the channel carries exactly zero and the consumers'
weights on it are dead, however large. A coupled set becomes a group block only if all its producer
conv/linear layers are among the selected layers (otherwise zeroing it would remove nothing).

FLOPs saved by a zero group (in MACs per sample): each producer's MACs per output channel plus each
consumer's MACs per input channel fed by it (a linear layer after a flatten reads h*w inputs per channel).
This ignores BatchNorm, activations, pooling and residual additions, and counts a consumer's MACs as
saved even if some other path still needs it.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn

from wgsef.groups.base import GroupBlock, Member
from wgsef.groups.trace import LAYER_TYPES, LayerTrace

BATCHNORM = nn.modules.batchnorm._BatchNorm


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def rows(param: Tensor) -> Member:
    """`param` with one group per leading index (a filter and its bias, BN gamma/beta)."""
    return Member(param, (param.shape[0], param[0].numel()), (0,))


def filter_blocks(model: nn.Module, example_input: Tensor, selected: dict[str, nn.Module],
                  trace: LayerTrace) -> list[GroupBlock]:
    was_training = model.training
    try:
        model.eval()  # tracing must not update BatchNorm statistics
        graph = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    taken = set(selected.values())
    order = {m: i for i, m in enumerate(model.modules())}
    blocks = []
    for group in graph.get_all_groups(root_module_types=LAYER_TYPES):
        n = len(group[0].idxs)
        producers, consumers = _split(group, graph, n, names)
        producers.sort(key=order.__getitem__)
        layers = [m for m in producers if isinstance(m, LAYER_TYPES)]
        if all(m in taken for m in layers):
            blocks.append((min(order[m] for m in layers), _block(producers, layers, consumers, n, names, trace)))
    return [b for _, b in sorted(blocks, key=lambda ib: ib[0])]


def _split(group, graph, n: int, names) -> tuple[list, list]:
    """The producers (conv/linear writing the channels, BatchNorms) of one coupled channel set, and its
    conv/linear consumers with the root channel each of their input indices belongs to."""
    producers, consumers = [], []
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        writes = graph.is_out_channel_pruning_fn(handler) or is_depthwise(module)
        if isinstance(module, nn.Module) and (module in producers or not list(module.parameters(recurse=False))):
            continue
        if isinstance(module, LAYER_TYPES) and not writes:
            consumers.append((module, torch.as_tensor(item.root_idxs, dtype=torch.long)))
        elif isinstance(module, LAYER_TYPES + (BATCHNORM,)):
            if list(item.idxs) != list(range(n)) or list(item.root_idxs) != list(range(n)):
                raise ValueError(f"filter groups: the channels of {names[module]} map onto the coupled set "
                                 "in an order that is not the identity (split/concat), which is unsupported")
            producers.append(module)
        else:
            raise ValueError(f"filter groups: {names.get(module, module)} ({type(module).__name__}) is coupled "
                             "to a channel set but only Conv2d, Linear and BatchNorm are supported")
    return producers, consumers


def _block(producers, layers, consumers, n: int, names, trace: LayerTrace) -> GroupBlock:
    members = [rows(p) for m in producers for p in (m.weight, m.bias) if p is not None]
    flops = torch.full((n,), sum(trace.macs[m] for m in layers) / n)
    for m, root in consumers:
        width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        flops += trace.macs[m] / width * torch.bincount(root, minlength=n).float()
    return GroupBlock("+".join(names[m] for m in layers), members, flops)
