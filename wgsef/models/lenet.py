"""LeNet-5 (two 5x5 convs, three fully connected layers), sized for any square input >= 8."""
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size // 2) - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5 needs images of at least 12x12 pixels, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
