"""Model registry: `build(name, num_classes, in_channels, image_size, **kwargs)`."""
from functools import partial

from torch import nn

from wgsef.models.lenet import LeNet5, LeNet5Caffe
from wgsef.models.mobilenet import MobileNetV1
from wgsef.models.resnet import ResNet
from wgsef.models.vgg import VGG
from wgsef.models.vit import ViT
from wgsef.models.zoo import torchvision_model

# OTO's VGG16 and VGG16-BN (tianyic/only_train_once backend/vgg.py): see wgsef/models/vgg.py
OTO_VGG = dict(conv_bias=True, hidden=(512, 512), dropout=0.5, init="fan_out")
MODELS = {"lenet5": LeNet5, "lenet5_caffe": LeNet5Caffe, "vgg16": VGG, "resnet18": ResNet, "mobilenetv1": MobileNetV1,
          "vgg16_oto": partial(VGG, batch_norm=False, **OTO_VGG),
          "vgg16_bn_oto": partial(VGG, batch_norm=True, **OTO_VGG),
          "vit": ViT, "torchvision": torchvision_model}


def build(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    """Build a registered model; `width` (VGG, ResNet, MobileNet) scales every layer's channel count."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
