"""model=vit: head and mlp groups against explicit slices, exact compaction of heads and hidden units,
save/load of the compacted model, WGSEF with k heads per block, GBLR on its linear layers."""
import pytest
import torch
from torch import nn

from wgsef.compress import compact, load_compact, save_compact
from wgsef.groups import build_groups
from wgsef.models import build
from wgsef.regularizers.gblr import GBLR
from wgsef.regularizers.wgsef import WGSEF

ARCH = dict(name="vit", num_classes=10, in_channels=1, image_size=8, patch_size=2, dim=32, depth=2, heads=4,
            mlp_ratio=2.0)
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def vit(seed=0):
    torch.manual_seed(seed)
    arch = dict(ARCH)
    model = build(arch.pop("name"), **arch).eval()
    nn.init.normal_(model.head.weight, std=0.5)  # the official init zeroes the head: make outputs differ
    return model


def zero(groups, indices):
    f = torch.ones(len(groups))
    f[indices] = 0
    groups.scale_(f)


def relative_error(a, b):
    return ((a - b).norm() / a.norm()).item()


def test_head_groups_are_q_k_v_rows_of_one_head():
    model = vit()
    groups = build_groups(model, "head", X[:1])
    assert [(b.name, b.n) for b in groups.blocks] == [("blocks.0.attn", 4), ("blocks.1.attn", 4)]
    qkv = model.blocks[1].attn.qkv
    rows = [part * 32 + 8 * 2 + r for part in range(3) for r in range(8)]  # head 2 of q, k and v (width 8)
    expected = qkv.weight[rows].pow(2).sum() + qkv.bias[rows].pow(2).sum()
    assert torch.allclose(groups.sq_norms()[4 + 2], expected)
    assert groups.sizes.tolist() == [3 * 8 * (32 + 1)] * 8


def test_mlp_groups_are_hidden_units():
    model = vit()
    groups = build_groups(model, "mlp", X[:1])
    assert [(b.name, b.n) for b in groups.blocks] == [("blocks.0.mlp.fc1", 64), ("blocks.1.mlp.fc1", 64)]
    fc1 = model.blocks[0].mlp.fc1
    assert torch.allclose(groups.sq_norms()[:64], fc1.weight.pow(2).sum(1) + fc1.bias.pow(2))


def test_zero_heads_and_units_compact_exactly_and_reload(tmp_path):
    model = vit()
    zero(build_groups(model, "head", X[:1]), [0, 3, 5, 6, 7])  # block 0 keeps 2 heads, block 1 keeps 1
    zero(build_groups(model, "mlp", X[:1]), list(range(0, 128, 2)))
    small = compact(model, X[:1]).eval()
    report = small.compaction_report
    assert report.removed_heads == 5 and report.removed_channels == 64
    assert [b.attn.num_heads for b in small.blocks] == [2, 1]
    assert [b.mlp.fc1.out_features for b in small.blocks] == [32, 32]
    with torch.no_grad():
        assert relative_error(model(X), small(X)) <= 1e-5
    save_compact(small, tmp_path / "vit.pt", ARCH)
    loaded = load_compact(tmp_path / "vit.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


def test_proj_columns_zero_also_remove_the_head():
    model = vit()
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[:, 8:16] = 0  # head 1's output is read with zero weights
    small = compact(model, X[:1]).eval()
    assert small.blocks[0].attn.num_heads == 3 and small.compaction_report.removed_heads == 1
    with torch.no_grad():
        assert relative_error(model(X), small(X)) <= 1e-5


@pytest.mark.parametrize("scheme, kept", [("head", [2, 2]), ("mlp", [32, 32])])
def test_wgsef_top_k_per_block_then_compaction(scheme, kept):
    model = vit()
    reg = WGSEF(lam=1e-3, k=0.5, scheme=scheme)
    reg.attach(model, X[:1])
    reg.project_top_k()
    small = compact(model, X[:1]).eval()
    widths = [b.attn.num_heads if scheme == "head" else b.mlp.fc1.out_features for b in small.blocks]
    assert widths == kept
    with torch.no_grad():
        assert relative_error(model(X), small(X)) <= 1e-5


def test_gblr_replaces_the_blocks_linear_layers_only():
    model = vit()
    gblr = GBLR(lam=1e-3, ratio=1.0, location_init="zero")
    chosen = gblr.choose(model)
    assert chosen == [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                          "mlp.fc2")]
    model = gblr.attach(model, X[:1])
    assert model(X).shape == (4, 10)


def test_bad_vit_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build("vit", num_classes=10, in_channels=1, image_size=8, patch_size=3)
    with pytest.raises(ValueError, match="multiple of heads"):
        build("vit", num_classes=10, in_channels=1, image_size=8, patch_size=2, dim=30, heads=4)


class TimmAttention(nn.Module):
    """timm's layout: a plain `num_heads` attribute that the forward pass reads."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


def test_heads_of_any_attention_with_the_timm_layout():
    torch.manual_seed(0)
    net = nn.Sequential(TimmAttention(), nn.Flatten(), nn.Linear(5 * 16, 3)).eval()
    x = torch.randn(2, 5, 16)
    groups = build_groups(net, "head", x[:1])
    assert [(b.name, b.n) for b in groups.blocks] == [("0", 4)]
    zero(groups, [1, 2])
    small = compact(net, x[:1]).eval()
    assert small[0].num_heads == 2 and small[0].qkv.out_features == 24
    with torch.no_grad():
        assert relative_error(net(x), small(x)) <= 1e-5
