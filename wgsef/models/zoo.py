"""Any torchvision classification model through the registry: `build("torchvision", arch="resnet18", ...)`.

The model is torchvision's own (random init, `num_classes` outputs); for inputs with other than 3
channels the first conv is rebuilt with `in_channels` inputs (same kernel, stride, padding, bias).
Vision transformers get `image_size` (a multiple of their patch size); other models take any size their
downsampling survives (inception_v3 needs at least 75 px).
"""
from __future__ import annotations

from torch import nn


def torchvision_model(arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3,
                      image_size: int = 32) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ValueError(f"unknown torchvision classification model '{arch}'; choose one of {', '.join(names)}")
    kwargs = {"image_size": image_size} if arch.startswith(("vit_",)) else {}
    if arch in ("googlenet", "inception_v3"):
        kwargs["aux_logits"], kwargs["init_weights"] = False, True
    model = torchvision.models.get_model(arch, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        name, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation, old.groups,
            old.bias is not None))
    return model
