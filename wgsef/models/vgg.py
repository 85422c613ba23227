"""VGG16 with BatchNorm, CIFAR-style (3x3 convs, a 512-512-classes classifier).

Max-pooling stops once the feature map is 1x1, so the same network runs on 28x28, 32x32 and smaller
inputs; a global average pool makes the classifier input 512 whatever the size.
"""
from torch import nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg=VGG16, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0):
        super().__init__()
        layers, side, c_in = [], image_size, in_channels
        for v in cfg:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            c_out = max(1, round(v * width))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = max(1, round(512 * width))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
