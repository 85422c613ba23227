"""MobileNetV1, CIFAR-style: stride-1 3x3 stem, then 13 depthwise-separable blocks.

Each block is depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU. Strides of 2 are skipped once
the feature map is 1x1, so small inputs work.
"""
from torch import nn

# (output channels, stride) of each depthwise-separable block
MOBILENET_V1 = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(*conv_bn(c_in, c_in, 3, stride, groups=c_in), *conv_bn(c_in, c_out, 1, 1))


class MobileNetV1(nn.Module):
    def __init__(self, cfg=MOBILENET_V1, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0):
        super().__init__()
        c_in, side = max(1, round(32 * width)), image_size
        layers = conv_bn(in_channels, c_in, 3, 1)
        for c, stride in cfg:
            stride = stride if side >= 2 else 1
            side = (side + stride - 1) // stride
            c_out = max(1, round(c * width))
            layers.append(DepthwiseSeparable(c_in, c_out, stride))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
