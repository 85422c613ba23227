"""LeNet-5 (two 5x5 convs, three fully connected layers), sized for any square input >= 12; `width` scales
every layer (6-16-120-84 at width 1)."""
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0):
        super().__init__()
        c1, c2, h1, h2 = (max(1, round(c * width)) for c in (6, 16, 120, 84))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs images of at least 12x12 pixels, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, h1), nn.ReLU(inplace=True),
            nn.Linear(h1, h2), nn.ReLU(inplace=True), nn.Linear(h2, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe, the MNIST benchmark of structured-sparsity papers (SSL, SBP, L0, Bayesian Compression):
    conv 20 (5x5) -> max-pool 2 -> conv 50 (5x5) -> max-pool 2 -> fc 500 + ReLU -> fc 10, unpadded, as in
    Caffe's examples/mnist/lenet_train_test.prototxt (431,080 parameters at 28x28). Caffe's prototxt has no
    ReLU after the convolutions; the PyTorch LeNet-5-Caffe of L0 (AMLab-Amsterdam/L0_regularization) and most
    re-implementations put one there, so `conv_relu=True` is the default and `conv_relu=False` is Caffe's net
    exactly. `width` scales every hidden layer (20-50-500 at width 1)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0,
                 conv_relu: bool = True):
        super().__init__()
        c1, c2, h = (max(1, round(c * width)) for c in (20, 50, 500))
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5_caffe needs images of at least 16x16 pixels, got {image_size}")
        act = (lambda: nn.ReLU(inplace=True)) if conv_relu else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), act(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), act(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, h), nn.ReLU(inplace=True), nn.Linear(h, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
