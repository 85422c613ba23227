"""VGG16, CIFAR-style (3x3 convs), with or without BatchNorm, and a configurable classifier.

Max-pooling stops once the feature map is 1x1, so the same network runs on 28x28, 32x32 and smaller
inputs; a global average pool makes the classifier input 512 whatever the size.

The default (`vgg16`) is VGG16-BN with bias-free convs and a 512-classes classifier behind one hidden
Linear of 512. OTO's networks (Chen et al. 2021, tianyic/only_train_once `backend/vgg.py`) are the
registry's `vgg16_oto` (no BatchNorm) and `vgg16_bn_oto`: convs with bias, two hidden Linear layers of
512 each followed by ReLU and dropout 0.5, conv weights drawn from N(0, 2 / (kh kw O)) and zero biases.
"""
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
INITS = ("torch", "fan_out")


class VGG(nn.Module):
    def __init__(self, cfg=VGG16, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0, batch_norm: bool = True, conv_bias: bool = False,
                 hidden: tuple[int, ...] = (512,), dropout: float = 0.0, init: str = "torch"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown VGG init '{init}'; choose one of {', '.join(INITS)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"VGG dropout must lie in [0, 1), got {dropout}")
        layers, side, c_in = [], image_size, in_channels
        for v in cfg:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            c_out = max(1, round(v * width))
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=conv_bias))
            layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            h = max(1, round(h * width))
            head += [nn.Linear(c_in, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            c_in = h
        self.classifier = nn.Sequential(*head, nn.Linear(c_in, num_classes))
        if init == "fan_out":  # N(0, 2 / (kh kw O)) conv weights, zero conv biases (OTO's VGG)
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
