"""Compaction: outputs equal the zero-masked model, widths shrink exactly where the zeros allow."""
import pytest
import torch
from torch import nn

from wgsef.compress import compact, load_compact, save_compact, zero_random_groups_
from wgsef.models import build

SIDE = 16
MODELS = {"lenet5": 1, "lenet5_caffe": 1, "vgg16": 3, "resnet18": 3, "mobilenetv1": 3}  # name -> input channels
CLASSIFIER = {"lenet5": "classifier.5", "lenet5_caffe": "classifier.3", "vgg16": "classifier.3", "resnet18": "fc",
              "mobilenetv1": "fc"}


def make(name, seed=0):
    """A width-0.25 model in eval mode with random BN affine params and running statistics."""
    torch.manual_seed(seed)
    kwargs = {} if name.startswith("lenet5") else {"width": 0.25}
    model = build(name, num_classes=10, in_channels=MODELS[name], image_size=SIDE, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.normal_()
            m.bias.data.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


def inputs(name, batch=3):
    return torch.randn(batch, MODELS[name], SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(dense, small, x):
    with torch.no_grad():
        assert (dense(x) - small.eval()(x)).abs().max().item() <= 1e-5


def widths(model):
    return {k: v[0] for k, v in model.compaction_report.shapes_after.items()}


def zero_filter_(conv, bn, channels, beta=True):
    """Zero the producer side of `channels`: filter rows, BN gamma and (if beta) BN beta."""
    with torch.no_grad():
        conv.weight[channels] = 0
        bn.weight[channels] = 0
        if beta:
            bn.bias[channels] = 0


@pytest.mark.parametrize("name", list(MODELS))
def test_random_zero_groups_compact_to_the_same_function(name):
    model, x = make(name), inputs(name)
    zeroed = zero_random_groups_(model, x[:1], 0.5, torch.Generator().manual_seed(2))
    small = compact(model, x[:1])
    report = small.compaction_report
    assert zeroed > 0 and report.removed_channels == zeroed and report.kept_zero_channels == 0
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert_same_outputs(model, small, x)
    # the original keeps its shapes (compact works on a copy); the classifier keeps all its outputs
    assert [p.shape for p in model.parameters()] == [p.shape for p in make(name).parameters()]
    assert report.shapes_after[CLASSIFIER[name]][0] == 10


@pytest.mark.parametrize("name", list(MODELS))
def test_no_zero_group_leaves_shapes_and_outputs_unchanged(name):
    model, x = make(name), inputs(name)
    small = compact(model, x[:1])
    assert small.compaction_report.shapes_after == small.compaction_report.shapes_before
    assert small.compaction_report.removed_channels == 0
    assert_same_outputs(model, small, x)


def test_zero_filter_with_nonzero_beta_is_kept_and_zero_beta_is_removed():
    model, x = make("vgg16"), inputs("vgg16")
    conv, bn = model.features[0], model.features[1]
    zero_filter_(conv, bn, [0, 1], beta=False)  # these channels emit the constant beta
    zero_filter_(conv, bn, [2, 3])              # these emit exactly zero
    small = compact(model, x[:1])
    assert widths(small)["features.0"] == 14 and small.features[3].weight.shape[1] == 14
    layer_widths = small.compaction_report.widths()
    assert layer_widths["features.0"] == [16, 14] and "features.1" not in layer_widths
    assert_same_outputs(model, small, x)


def test_zero_input_channel_of_the_only_consumer_removes_the_channel():
    model, x = make("vgg16"), inputs("vgg16")
    with torch.no_grad():
        model.features[3].weight[:, [5, 7]] = 0  # channel group zero: nobody reads channels 5 and 7
    small = compact(model, x[:1])
    assert widths(small)["features.0"] == 14
    assert_same_outputs(model, small, x)


def resnet_stem_stream(model):
    """(conv, bn) pairs producing the first residual stream: the stem and layer1's second convs."""
    return [(model.conv1, model.bn1)] + [(b.conv2, b.bn2) for b in model.layer1]


def test_residual_channel_needs_every_producer_zero():
    model, x = make("resnet18"), inputs("resnet18")
    stream = resnet_stem_stream(model)
    for conv, bn in stream[:-1]:
        zero_filter_(conv, bn, [0, 1, 2])
    zero_filter_(*stream[-1], [1, 2])  # channel 0 still produced by the last block: it stays
    small = compact(model, x[:1])
    assert widths(small)["conv1"] == 14 and widths(small)["layer1.1.conv2"] == 14
    assert small.layer2[0].conv1.weight.shape[1] == small.layer2[0].shortcut[0].weight.shape[1] == 14
    assert_same_outputs(model, small, x)


def test_residual_stream_all_zero_keeps_one_channel_and_whole_block_zero():
    model, x = make("resnet18"), inputs("resnet18")
    for conv, bn in resnet_stem_stream(model):
        zero_filter_(conv, bn, list(range(16)))
    block = model.layer2[1]
    zero_filter_(block.conv1, block.bn1, list(range(block.conv1.out_channels)))  # a whole block's inner channels
    small = compact(model, x[:1])
    w = widths(small)
    assert w["conv1"] == w["layer1.1.conv2"] == 1 and small.layer2[0].shortcut[0].in_channels == 1
    # layer1's inner channels die too: their only consumers (the zeroed conv2 filters) read them with zeros
    assert w["layer1.0.conv1"] == w["layer1.1.conv1"] == 1
    assert w["layer2.1.conv1"] == 1 and small.layer2[1].conv2.in_channels == 1
    assert small.compaction_report.kept_zero_channels == 4
    assert_same_outputs(model, small, x)


def test_depthwise_chain_needs_the_depthwise_side_zero_too():
    model, x = make("mobilenetv1"), inputs("mobilenetv1")
    pw, pw_bn = model.features[3][3], model.features[3][4]   # 16 channels feeding block features[4]
    dw, dw_bn = model.features[4][0], model.features[4][1]
    zero_filter_(pw, pw_bn, [0, 1, 2, 3])
    zero_filter_(dw, dw_bn, [0, 1])  # channels 2, 3: the depthwise BN still emits a constant
    small = compact(model, x[:1])
    assert widths(small)["features.3.3"] == 14
    assert small.features[4][0].groups == small.features[4][0].out_channels == 14
    assert_same_outputs(model, small, x)


def test_depthwise_chain_single_surviving_channel():
    model, x = make("mobilenetv1"), inputs("mobilenetv1")
    pw, pw_bn, dw, dw_bn = model.features[3][3], model.features[3][4], model.features[4][0], model.features[4][1]
    dead = list(range(1, 16))
    zero_filter_(pw, pw_bn, dead)
    zero_filter_(dw, dw_bn, dead)
    small = compact(model, x[:1])
    assert tuple(small.features[4][0].weight.shape) == (1, 1, 3, 3) and small.features[4][3].in_channels == 1
    assert_same_outputs(model, small, x)


def test_round_to_8_keeps_multiples_of_8():
    torch.manual_seed(0)
    model = build("vgg16", num_classes=10, in_channels=3, image_size=SIDE, width=0.5).eval()
    x = inputs("vgg16")
    zero_random_groups_(model, x[:1], 0.3, torch.Generator().manual_seed(3))
    small = compact(model, x[:1], round_to=8)
    report = small.compaction_report
    for name, shape in report.shapes_after.items():
        if name != "classifier.3":
            assert shape[0] % 8 == 0, name
    assert report.kept_zero_channels > 0 and report.removed_channels > 0
    assert_same_outputs(model, small, x)
    with pytest.raises(ValueError, match="round_to"):
        compact(model, x[:1], round_to=0)


def test_remaining_shape_and_unstructured_zeros_are_reported():
    model, x = make("vgg16"), inputs("vgg16")
    conv = model.features[3]
    with torch.no_grad():
        conv.weight[:, 2, 0, 0] = 0   # one im2col column
        conv.weight[:, 4, 1, :] = 0   # three more
        conv.weight[0, 0, 2, 2] = 0   # unstructured
    report = compact(model, x[:1]).compaction_report
    assert report.shape_zero_columns["features.3"] == [4, 16 * 9]
    assert report.zero_weights == 4 * 16 + 1
    assert report.removed_channels == 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv1"])
def test_save_load_roundtrip_gives_identical_outputs(name, tmp_path):
    model, x = make(name), inputs(name)
    zero_random_groups_(model, x[:1], 0.5, torch.Generator().manual_seed(4))
    small = compact(model, x[:1]).eval()
    path = tmp_path / "compact.pt"
    save_compact(small, path, {"name": name, "num_classes": 10, "in_channels": 3, "image_size": SIDE,
                               "width": 0.25})
    loaded = load_compact(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in small.parameters()]


def test_save_and_load_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        save_compact(make("lenet5"), tmp_path / "a.pt", {"width": 1})
    torch.save({"state_dict": {}}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="save_compact"):
        load_compact(tmp_path / "b.pt")
