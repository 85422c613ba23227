"""Grouping schemes: counts and sizes against hand counts, coupling checked by zeroing groups."""
import pytest
import torch
from torch import nn

from wgsef.groups import build_groups
from wgsef.models import build

SCHEMES = ("filter", "channel", "shape", "unstructured")


def small_net():
    """conv(3->4, bias) BN relu, conv(4->6) relu, flatten, linear(96->5) relu, linear(5->3); input 8x8."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, bias=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(96, 5), nn.ReLU(), nn.Linear(5, 3))


def counts(groups):
    return [(b.name, b.n, int(b.sizes[0])) for b in groups.blocks]


def randomize_bn(model):
    """BatchNorm with nonzero statistics and shift, so that a channel left out of a group would show."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.running_mean, m.bias, m.weight):
                t.data.normal_()
            m.running_var.data.uniform_(0.5, 2)
    return model.eval()


X8 = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("scheme, expected", [
    # filter: W[o] + bias[o] + BN gamma/beta[o]; the classifier (last linear) is left out
    ("filter", [("0", 4, 27 + 1 + 2), ("3", 6, 36), ("6", 5, 96 + 1)]),
    ("channel", [("0", 3, 4 * 9), ("3", 4, 6 * 9), ("6", 96, 5)]),
    ("shape", [("0", 27, 4), ("3", 36, 6), ("6", 96, 5)]),
    ("unstructured", [("0", 108, 1), ("3", 216, 1), ("6", 480, 1)]),
])
def test_small_net_counts(scheme, expected):
    assert counts(build_groups(small_net(), scheme, X8)) == expected


def test_block_tiles_and_skips_untileable_layers():
    with pytest.warns(UserWarning, match="6 do not tile"):
        groups = build_groups(small_net(), "block", X8, block=(2, 3))
    # conv 4x27 -> 2x9 tiles of 6, conv 6x36 -> 3x12 tiles; linear 5x96 has an odd row count
    assert counts(groups) == [("0", 18, 6), ("3", 36, 6)]
    w = groups.blocks[0].members[0].param.detach().reshape(4, 27)
    assert torch.allclose(groups.norms()[:18], w.reshape(2, 2, 9, 3).permute(0, 2, 1, 3).reshape(18, 6).norm(dim=1))


def test_filter_norms_are_explicit_slices():
    net = randomize_bn(small_net())
    conv, bn = net[0], net[1]
    expected = (conv.weight.flatten(1).pow(2).sum(1) + conv.bias ** 2 + bn.weight ** 2 + bn.bias ** 2).sqrt()
    assert torch.allclose(build_groups(net, "filter", X8).norms()[:4], expected)


def test_filter_flops_hand_count():
    # conv0: 6x6 outputs x 27 MACs; its consumer conv3 spends 6 filters x 9 x 4x4 outputs per input channel
    # conv3: 4x4 x 36; linear6 reads 16 inputs per channel, 5 MACs each; linear6: 96; linear8: 3 per input
    flops = build_groups(small_net(), "filter", X8).flops
    assert flops.tolist() == [36 * 27 + 6 * 9 * 16] * 4 + [16 * 36 + 16 * 5] * 6 + [96 + 3] * 5


def test_layerwise_flops_are_weight_shares_of_layer_macs():
    groups = build_groups(small_net(), "shape", X8)  # one shape column = one MAC per output pixel per filter
    assert groups.flops.tolist() == [36 * 4] * 27 + [16 * 6] * 36 + [5] * 96


def test_layer_globs_and_errors():
    assert [b.name for b in build_groups(small_net(), "filter", X8, layers=["*"]).blocks] == ["0", "3", "6", "8"]
    assert [b.name for b in build_groups(small_net(), "channel", X8, layers=["3", "8"]).blocks] == ["3", "8"]
    assert [b.name for b in build_groups(small_net(), "channel", layers=["3"]).blocks] == ["3"]  # no trace needed
    with pytest.raises(ValueError, match="matches no"):
        build_groups(small_net(), "filter", X8, layers=["conv*"])
    with pytest.raises(ValueError, match="unknown grouping scheme"):
        build_groups(small_net(), "rows", X8)
    with pytest.raises(ValueError, match="block=\\(rows, cols\\)"):
        build_groups(small_net(), "block", X8)
    with pytest.raises(ValueError, match="needs example_input"):
        build_groups(small_net(), "filter")
    with pytest.raises(ValueError, match="residual shortcut"):
        build_groups(small_net(), "depth", X8)


def test_grouping_leaves_the_model_untouched():
    net = small_net().train()
    stats = [t.clone() for t in net[1].buffers()]
    build_groups(net, "filter", torch.randn(4, 3, 8, 8))
    assert net.training and all(torch.equal(a, b) for a, b in zip(stats, net[1].buffers()))


@pytest.mark.parametrize("scheme", SCHEMES + ("depth",))
def test_scale_then_norms(scheme):
    groups = build_groups(build("resnet18", 10, 3, 16, width=0.25), scheme, torch.randn(2, 3, 16, 16))
    before = groups.norms()
    f = torch.rand(len(groups))
    groups.scale_(f)
    assert torch.allclose(groups.norms(), f * before, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ real models
def model(name):
    return build(name, 10, 3, 16, width=0.25)


X16 = torch.randn(2, 3, 16, 16)


def test_vgg16_counts():
    # width 0.25: convs 16,16 | 32,32 | 64 x3 | 128 x6, each W[o] (in*9) + BN; classifier hidden 128 (+ bias)
    widths = [3, 16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128]
    filt = build_groups(model("vgg16"), "filter", X16)
    assert [(b.n, int(b.sizes[0])) for b in filt.blocks] == [
        (o, i * 9 + 2) for i, o in zip(widths[:-1], widths[1:])] + [(128, 129)]
    assert len(filt) == 1184
    assert len(build_groups(model("vgg16"), "channel", X16)) == sum(widths[:-1]) + 128
    assert len(build_groups(model("vgg16"), "shape", X16)) == 9 * sum(widths[:-1]) + 128


def test_resnet18_counts():
    filt = build_groups(model("resnet18"), "filter", X16)
    streams = [b for b in filt.blocks if "+" in b.name]
    # one block per residual stream: stem (27 + BN) + conv2 of both blocks (16*9 + BN); later stages add
    # the downsample conv (c_in + BN) and two conv2 (c*9 + BN)
    assert [(b.n, int(b.sizes[0])) for b in streams] == [
        (16, 29 + 2 * 146), (32, 18 + 2 * 290), (64, 34 + 2 * 578), (128, 66 + 2 * 1154)]
    assert streams[0].name == "conv1+layer1.0.conv2+layer1.1.conv2"
    assert len(filt.blocks) == 4 + 8 and len(filt) == 2 * (16 + 32 + 64 + 128) + (16 + 32 + 64 + 128)
    depth = build_groups(model("resnet18"), "depth", X16)
    assert len(depth) == 19 and all(b.n == 1 for b in depth.blocks)  # 16 block convs + 3 downsample convs
    assert int(depth.blocks[0].sizes[0]) == 16 * 16 * 9 + 2 * 16  # conv weight + its BN
    assert {b.name for b in depth.blocks} == {f"layer{s}.{j}.conv{c}" for s in range(1, 5) for j in (0, 1)
                                              for c in (1, 2)} | {f"layer{s}.0.shortcut.0" for s in (2, 3, 4)}


def test_mobilenet_counts():
    filt = build_groups(model("mobilenetv1"), "filter", X16)
    c = [8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]  # stem, then each block's output
    # stem + first depthwise; each pointwise with the next depthwise (9 + BN); the last pointwise alone
    expected = [(8, 27 + 2 + 9 + 2)] + [(c[i + 1], c[i] + 2 + 9 + 2) for i in range(12)] + [(256, 256 + 2)]
    assert [(b.n, int(b.sizes[0])) for b in filt.blocks] == expected
    assert filt.blocks[1].name == "features.3.3+features.4.0"


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "mobilenetv1"])
def test_layerwise_counts_from_layer_shapes(name):
    layers = [m for m in model(name).modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    expected = {"channel": sum(m.weight.shape[1] for m in layers),
                "shape": sum(m.weight[0].numel() for m in layers),
                "unstructured": sum(m.weight.numel() for m in layers)}
    for scheme, n in expected.items():
        groups = build_groups(model(name), scheme, X16)
        assert len(groups) == n and len(groups.blocks) == len(layers)


def test_coupled_set_needs_all_its_producers_selected():
    # the first residual stream also contains the stem conv1, which is not selected
    blocks = build_groups(model("resnet18"), "filter", X16, layers=["layer1.*"]).blocks
    assert [b.name for b in blocks] == ["layer1.0.conv1", "layer1.1.conv1"]


def test_depth_needs_shortcuts():
    with pytest.raises(ValueError, match="residual shortcut"):
        build_groups(model("vgg16"), "depth", X16)


# ------------------------------------------------------------------------------- coupling really removes
def channel_outputs(net, names, x):
    """Outputs of the named modules on x."""
    out = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.clone()))
             for n in names]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return out


def zero_group(groups, block_index, channel):
    f = torch.ones(len(groups))
    f[sum(b.n for b in groups.blocks[:block_index]) + channel] = 0
    groups.scale_(f)


def test_resnet_stream_group_zeroes_the_channel_everywhere():
    net = randomize_bn(model("resnet18"))
    groups = build_groups(net, "filter", X16)
    zero_group(groups, 0, 5)
    x = torch.randn(3, 3, 16, 16)
    outs = channel_outputs(net, ["bn1", "layer1.0", "layer1.1", "layer1.0.bn1"], x)
    for name in ("bn1", "layer1.0", "layer1.1"):
        assert (outs[name][:, 5] == 0).all() and (outs[name][:, 4] != 0).any(), name
    assert (outs["layer1.0.bn1"][:, 5] != 0).any()  # block-internal channels are separate groups


def test_vgg_filter_group_zeroes_after_bn_relu():
    net = randomize_bn(model("vgg16"))
    groups = build_groups(net, "filter", X16)
    zero_group(groups, 2, 7)
    out = channel_outputs(net, ["features.9", "features.8"], X16)  # features.7 conv, .8 BN, .9 ReLU
    assert (out["features.8"][:, 7] == 0).all() and (out["features.9"][:, 7] == 0).all()
    assert (out["features.8"][:, 6] != 0).any()


def test_mobilenet_chain_group_zeroes_pointwise_and_depthwise():
    net = randomize_bn(model("mobilenetv1"))
    groups = build_groups(net, "filter", X16)
    zero_group(groups, 1, 3)  # features.3.3 (pointwise) + features.4.0 (depthwise), channel 3
    out = channel_outputs(net, ["features.3.4", "features.4.1"], X16)  # the two BatchNorms, before ReLU
    assert (out["features.3.4"][:, 3] == 0).all() and (out["features.4.1"][:, 3] == 0).all()
    assert (out["features.4.1"][:, 2] != 0).any()


# ------------------------------------------------------------------------------- batched group operations
def member_rows(m, t):
    """`t` (shaped like m's parameter) as (n_groups, group_size), the reference slicing of a member."""
    rest = [a for a in range(len(m.shape)) if a not in m.group_axes]
    return t.reshape(m.shape).permute(*m.group_axes, *rest).reshape(m.n_groups, -1)


def reference_dots(groups, tensors):
    """Per group, sum over its members of <tensors[param] rows, param rows>, block by block."""
    return torch.cat([sum((member_rows(m, m.param.detach()) * member_rows(m, tensors[m.param])).sum(1)
                          for m in b.members) for b in groups.blocks])


@pytest.mark.filterwarnings("ignore:block groups")  # ResNet18's stem conv does not tile into 2x2 blocks
@pytest.mark.parametrize("scheme", SCHEMES + ("depth", "block"))
@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_norms_dots_and_scaling_match_member_slices(scheme, channels_last):
    net = build("resnet18", 10, 3, 16, width=0.25)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    groups = build_groups(net, scheme, torch.randn(2, 3, 16, 16), block=(2, 2) if scheme == "block" else None)
    params = groups.params()
    with torch.no_grad():
        params[0].zero_()  # zero groups must give norms of exactly zero
    sq = reference_dots(groups, {p: p.detach() for p in params})
    assert torch.allclose(groups.sq_norms(), sq, rtol=1e-5, atol=1e-7)
    assert torch.allclose(groups.norms(), sq.sqrt(), rtol=1e-5, atol=1e-7)
    other = {p: torch.randn_like(p) for p in params}
    assert torch.allclose(groups.dots(other), reference_dots(groups, other), rtol=1e-4, atol=1e-5)
    missing = dict(other)
    del missing[params[-1]]  # a parameter without an entry contributes 0
    ref = reference_dots(groups, {**missing, params[-1]: torch.zeros_like(params[-1])})
    assert torch.allclose(groups.dots(missing), ref, rtol=1e-4, atol=1e-5)
    f = torch.rand(len(groups))
    expected = [member_rows(m, m.param.detach()) * f[lo:lo + m.n_groups, None]
                for b, lo in zip(groups.blocks, groups._bounds) for m in b.members]
    scaled = dict(zip(map(id, params), groups.scaled(f)))
    groups.scale_(f)
    members = [m for b in groups.blocks for m in b.members]
    for m, e in zip(members, expected):
        assert torch.allclose(member_rows(m, m.param.detach()), e, rtol=1e-6, atol=1e-7)
        assert torch.allclose(member_rows(m, scaled[id(m.param)]), e, rtol=1e-6, atol=1e-7)


def test_batched_ops_do_not_grow_with_the_number_of_layers():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    def ops(net, x):
        groups = build_groups(net, "filter", x)
        groups.scale_(torch.ones(len(groups)))  # first use builds the layout
        factors = torch.rand(len(groups))
        Count.n = 0
        with Count():
            groups.scale_(factors * groups.norms())
        return Count.n, len(groups.params())

    (small, small_params), (large, large_params) = ops(small_net(), X8), ops(model("resnet18"), X16)
    assert large_params > 3 * small_params and large == small <= 12
