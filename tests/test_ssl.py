"""SSL (Wen et al. 2016, docs/methods.md section 2): group types, subgradient, freeze + fine-tune, prox mode."""
import pytest
import torch
from torch import nn

from wgsef.groups.base import GroupBlock, GroupSet, Member
from wgsef.models import build
from wgsef.regularizers.group_lasso import GroupLasso
from wgsef.regularizers.ssl import SSL

X32 = torch.zeros(2, 3, 32, 32)


def test_shape_groups_are_im2col_columns_on_vgg16():
    model = build("vgg16", 10, 3, 32, width=0.25)
    ssl = SSL({"shape": 1e-4})
    ssl.attach(model, X32)
    groups = ssl.penalties["shape"].groups
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]  # classifier excluded
    assert len(groups.blocks) == len(layers) == 14
    for block, norms, layer in zip(groups.blocks, groups.split(groups.norms()), layers):
        w = layer.weight.detach()
        assert block.n == w[0].numel() and (block.sizes == w.shape[0]).all()
        columns = w.reshape(w.shape[0], -1).norm(dim=0)  # W[:, c, h, w] in (c, h, w) order
        assert torch.allclose(norms, columns)


def test_depth_groups_are_whole_layers_under_a_shortcut_on_resnet18():
    model = build("resnet18", 10, 3, 32, width=0.25)
    ssl = SSL({"depth": 1e-4})
    ssl.attach(model, X32)
    groups = ssl.penalties["depth"].groups
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name.startswith("layer")}
    assert len(groups) == len(convs) == 19  # 16 block convs + 3 downsample convs; not the stem, not fc
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for block, norm in zip(groups.blocks, groups.norms()):
        conv = convs[block.name]
        bn = bns[block.name.replace("conv", "bn") if "shortcut" not in block.name else block.name[:-1] + "1"]
        assert block.n == 1 and int(block.sizes[0]) == conv.weight.numel() + 2 * bn.num_features
        ref = torch.cat([conv.weight.flatten(), bn.weight, bn.bias]).detach().norm()
        assert torch.allclose(norm, ref)


def test_depth_groups_without_shortcuts_are_refused():
    with pytest.raises(ValueError, match="shortcut"):
        SSL({"filter": 1e-4, "depth": 1e-4}).attach(build("vgg16", 10, 3, 32, width=0.25), X32)


def conv_ssl(mode="subgradient", lams=None, **kwargs):
    """SSL on one conv weight W[4, 3, 3, 3] with filter and shape groups built by hand."""
    w = nn.Parameter(torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ssl = SSL(lams or {"filter": 0.3, "shape": 0.2}, mode=mode, **kwargs)
    for t, axis in (("filter", 0), ("shape", 1)):
        if t in ssl.penalties:
            ssl.penalties[t].groups = GroupSet([GroupBlock(t, [Member(w, (4, 27), (axis,))])])
    return ssl, w


def reference_penalty(w, lams, skip_zero=True):
    """sum_t lam_t sum_g ||W_g||, groups sliced by hand; zero groups left out (their subgradient is 0)."""
    rows = w.reshape(4, 27)
    slices = {"filter": [rows[o] for o in range(4)], "shape": [rows[:, j] for j in range(27)]}
    return sum(lam * sum(g.norm() for g in slices[t] if not (skip_zero and g.detach().norm() == 0))
               for t, lam in lams.items())


def test_subgradient_loss_equals_autograd_of_the_penalty_and_is_zero_on_zero_groups():
    lams = {"filter": 0.3, "shape": 0.2}
    ssl, w = conv_ssl(lams=lams)
    with torch.no_grad():
        w[1] = 0.0        # a zero filter
        w[:, 2, 0, 1] = 0.0  # a zero shape column
    loss = ssl.loss()
    assert torch.allclose(loss, ssl.value()) and torch.allclose(loss, reference_penalty(w, lams))
    loss.backward()
    grad = w.grad.clone()
    w.grad = None
    reference_penalty(w, lams).backward()
    assert torch.isfinite(grad).all() and torch.allclose(grad, w.grad)

    ssl, w = conv_ssl(lams={"filter": 0.3})
    with torch.no_grad():
        w[1] = 0.0
    ssl.loss().backward()
    assert torch.count_nonzero(w.grad[1]) == 0 and torch.count_nonzero(w.grad[0]) == 27


def test_freeze_zeroes_small_groups_and_keeps_them_zero_through_finetuning():
    ssl, w = conv_ssl(threshold=2.0, finetune_epoch=3)
    with torch.no_grad():
        w[2] *= 0.1  # one filter clearly below the threshold
    before = w.detach().clone()
    ssl.on_epoch_start(2, 10)
    assert not ssl.frozen and torch.equal(w.detach(), before)
    ssl.on_epoch_start(3, 10)
    filters, columns = w.detach().reshape(4, 27).norm(dim=1), w.detach().reshape(4, 27).norm(dim=0)
    small_f, small_s = before.reshape(4, 27).norm(dim=1) < 2.0, before.reshape(4, 27).norm(dim=0) < 2.0
    assert small_f[2] and small_s.any() and not small_s.all()
    assert (filters[small_f] == 0).all() and (columns[small_s] == 0).all()
    assert ssl.loss() is None
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        w.sum().neg().backward()  # a gradient on every weight, zeroed ones included
        opt.step()
        ssl.after_step(0.1)
    rows = w.detach().reshape(4, 27)
    assert (rows.norm(dim=1)[small_f] == 0).all() and (rows.norm(dim=0)[small_s] == 0).all()
    assert (rows[~small_f][:, ~small_s] != 0).all()
    m = ssl.metrics()
    assert m["filter_group_sparsity"] == pytest.approx(float(small_f.float().mean()))
    assert m["shape_group_sparsity"] == pytest.approx(float(small_s.float().mean())) and m["frozen"] == 1.0

    restored, _ = conv_ssl(threshold=2.0, finetune_epoch=3)
    restored.load_state_dict(ssl.state_dict())
    assert restored.frozen and all(torch.equal(restored.masks[t], ssl.masks[t]) for t in ssl.masks)


def test_prox_mode_applies_each_types_prox_in_turn():
    ssl, w = conv_ssl(mode="prox")
    ref = nn.Parameter(w.detach().clone())
    assert ssl.loss() is None
    ssl.after_step(lr=4.0)
    for t, axis in (("filter", 0), ("shape", 1)):
        pen = GroupLasso(ssl.penalties[t].lam, weights="ones")
        pen.groups = GroupSet([GroupBlock(t, [Member(ref, (4, 27), (axis,))])])
        pen.prox_(4.0)
    assert torch.allclose(w, ref) and torch.count_nonzero(w) < w.numel()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown SSL group types"):
        SSL({"kernel": 1e-4})
    with pytest.raises(ValueError, match="at least one"):
        SSL({})
    with pytest.raises(ValueError, match="mode"):
        SSL({"filter": 1e-4}, mode="adam")
    with pytest.raises(ValueError, match="lam"):
        SSL({"filter": -1.0})
    with pytest.raises(ValueError, match="finetune_epoch"):
        SSL({"filter": 1e-4}, finetune_epoch=-1)
