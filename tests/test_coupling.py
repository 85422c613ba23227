"""Groups from Torch-Pruning's dependency graph: concatenations, grouped convs, norms across channels,
and a graph that cannot be built — checked against hand-made slices and by compaction's exactness."""
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from wgsef.compress import compact
from wgsef.groups import build_groups
from tests.test_groups import randomize_bn as randomize
from wgsef.groups.base import GroupBlock, GroupSet, Member


class Dense(nn.Module):
    """conv a (3->4) BN, conv b (4->2) BN, concat [a, b] -> BN -> conv c (6->5) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.bn_cat, self.c, self.fc = nn.BatchNorm2d(6), nn.Conv2d(6, 5, 1), nn.Linear(5, 3)

    def forward(self, x):
        a = F.relu(self.bn_a(self.a(x)))
        y = torch.cat([a, F.relu(self.bn_b(self.b(a)))], 1)
        return self.fc(self.c(F.relu(self.bn_cat(y))).mean((2, 3)))


class Grouped(nn.Module):
    """conv (3->8) BN, grouped conv (8->8, groups 4) BN, conv (8->6), pool, linear."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.g, self.bn_g = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
        self.c, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn_g(self.g(F.relu(self.bn_a(self.a(x))))))
        return self.fc(self.c(x).mean((2, 3)))


X = torch.randn(3, 3, 8, 8)


def zero_units(groups, block, units):
    f = torch.ones(len(groups))
    f[sum(b.n for b in groups.blocks[:block]) + torch.as_tensor(units)] = 0
    groups.scale_(f)


def test_concat_bn_rows_join_the_group_of_their_producer():
    net = randomize(Dense())
    groups = build_groups(net, "filter", X)
    assert [(b.name, b.n) for b in groups.blocks] == [("a", 4), ("b", 2), ("c", 5)]
    a, b = net.a, net
    # group 1 of conv a: its filter, bias, bn_a row 1 and bn_cat row 1; group 0 of conv b: bn_cat row 4
    expected_a1 = sum(t.pow(2).sum() for t in (net.a.weight[1], net.a.bias[1], net.bn_a.weight[1], net.bn_a.bias[1],
                                               net.bn_cat.weight[1], net.bn_cat.bias[1]))
    expected_b0 = sum(t.pow(2).sum() for t in (net.b.weight[0], net.b.bias[0], net.bn_b.weight[0], net.bn_b.bias[0],
                                               net.bn_cat.weight[4], net.bn_cat.bias[4]))
    norms = groups.sq_norms()
    assert torch.allclose(norms[1], expected_a1) and torch.allclose(norms[4], expected_b0)
    zero_units(groups, 0, [1])
    zero_units(groups, 1, [0])
    y = {}
    net.bn_cat.register_forward_hook(lambda m, i, o: y.__setitem__("cat", o))
    small = compact(net, X[:1])
    with torch.no_grad():
        ref = net(X)
        assert (y["cat"][:, [1, 4]] == 0).all() and (y["cat"][:, [0, 5]] != 0).any()
        assert torch.allclose(small.eval()(X), ref, atol=1e-6)
    assert small.bn_cat.num_features == 4 and small.compaction_report.removed_channels == 2


def test_grouped_conv_units_take_one_channel_of_every_conv_group():
    net = randomize(Grouped())
    groups = build_groups(net, "filter", X)
    assert [(b.name, b.n) for b in groups.blocks] == [("a", 2), ("g", 2), ("c", 6)]  # 8 channels / 4 groups
    assert groups.blocks[0].sizes.tolist() == [4 * (3 + 1 + 2)] * 2  # 4 channels of conv a + bias + BN each
    zero_units(groups, 0, [1])  # channels 1, 3, 5, 7 of conv a
    assert (net.a.weight[[1, 3, 5, 7]] == 0).all() and (net.a.weight[[0, 2, 4, 6]] != 0).all()
    zero_units(groups, 1, [0])
    small = compact(net, X[:1]).eval()
    with torch.no_grad():
        assert torch.allclose(small(X), net(X), atol=1e-6)
    assert (small.g.in_channels, small.g.out_channels, small.g.groups) == (4, 4, 4)


def test_layernorm_sets_are_left_out_with_one_line_naming_it():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\): normalizes across channels") as rec:
        groups = build_groups(net, "filter", torch.randn(2, 4))
    assert [b.name for b in groups.blocks] == ["2"] and "\n" not in str(rec[0].message)
    with torch.no_grad():
        net[0].weight[1] = 0
        net[0].bias[1] = 0
    small = compact(net, torch.randn(1, 4))
    assert small[0].out_features == 6 and small.compaction_report.left_out  # kept: removing it is not exact


def test_untraceable_model_is_refused_in_one_line(monkeypatch):
    def fails(*args, **kwargs):  # what Torch-Pruning 1.6.1 does on ShuffleNet's channel shuffle
        return 1 // 0

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    refusal = "Torch-Pruning's dependency graph cannot trace Grouped: ZeroDivisionError"
    with pytest.raises(ValueError, match=refusal) as err:
        build_groups(Grouped(), "filter", X)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot trace"):
        compact(Grouped(), X[:1])


def test_entries_in_no_group_are_left_alone():
    w = nn.Parameter(torch.arange(1.0, 7.0))
    # a parameter shared by two blocks: entries 0, 1 in block A, entry 4 in block B, the rest in none
    a = Member(w, (1, 6, 1), (1,), torch.tensor([0, 1, -1, -1, -1, -1]))
    b = Member(w, (1, 6, 1), (1,), torch.tensor([-1, -1, -1, -1, 0, -1]))
    groups = GroupSet([GroupBlock("A", [a], n_groups=2), GroupBlock("B", [b], n_groups=1)])
    assert groups.norms().tolist() == [1.0, 2.0, 5.0] and groups.sizes.tolist() == [1.0, 1.0, 1.0]
    assert groups.scaled(torch.tensor([2.0, 3.0, 4.0]))[0].tolist() == [2.0, 6.0, 0.0, 0.0, 20.0, 0.0]
    groups.scale_(torch.zeros(3))
    assert w.tolist() == [0.0, 0.0, 3.0, 4.0, 0.0, 6.0]
    with pytest.raises(ValueError, match="at most one group"):
        GroupSet([GroupBlock("A", [a], n_groups=2), GroupBlock("A2", [Member(w, (1, 6, 1), (1,), torch.tensor(
            [0, -1, -1, -1, -1, -1]))], n_groups=1)])
