import pytest
import torch

from wgsef.models import MODELS, build

SHAPES = [(1, 28), (3, 32), (1, 16)]  # Fashion-MNIST, CIFAR, digits default


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels,size", SHAPES)
def test_forward_backward(name, channels, size):
    kw = {} if name.startswith("lenet5") or name == "torchvision" else {"width": 0.25}  # torchvision's: no width
    model = build(name, num_classes=7, in_channels=channels, image_size=size, **kw)
    x = torch.randn(3, channels, size, size)
    out = model(x)
    assert out.shape == (3, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_full_width_sizes():
    """Parameter counts of the standard CIFAR-10 architectures."""
    counts = {n: sum(p.numel() for p in build(n, 10, 3, 32).parameters()) for n in MODELS}
    assert counts["resnet18"] == 11_173_962  # the well-known CIFAR ResNet18 count
    assert counts["lenet5"] == 83_126
    assert 14_000_000 < counts["vgg16"] < 16_000_000
    assert 3_000_000 < counts["mobilenetv1"] < 3_500_000
    # LeNet-5-Caffe on MNIST: the 431K parameters of the papers (e.g. Louizos et al. 2017/2018, Neklyudov et al.)
    assert sum(p.numel() for p in build("lenet5_caffe", 10, 1, 28).parameters()) == 431_080


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'alexnet'; choose one of lenet5"):
        build("alexnet", 10, 3, 32)
