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
