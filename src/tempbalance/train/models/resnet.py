"""CIFAR ResNet18/34 (3x3 stem, stride 1, no max-pool; BasicBlock with a 1x1 conv + BN
shortcut when the shape changes) and the same nets for 64 px TinyImageNet inputs."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


def _channels(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU with an identity or projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: input (B, C, H, W) with H, W >= 8; output (B, num_classes)."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        planes = [_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_planes = planes[0]
        for stage, (count, p) in enumerate(zip(blocks, planes)):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(count):
                stage_blocks.append(BasicBlock(in_planes, p, stride if i == 0 else 1))
                in_planes = p
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out).flatten(1))


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet18 (11.2 M parameters at width 1, 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


@register_model("resnet34")
def resnet34(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """CIFAR ResNet34."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


@register_model("resnet18-64")
def resnet18_64(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet18 for 64 px TinyImageNet inputs: the CIFAR topology (3x3 stride-1 stem) with global
    average pooling over the 8x8 final map."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


@register_model("resnet34-64")
def resnet34_64(num_classes: int, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet34 for 64 px TinyImageNet inputs (see ``resnet18-64``)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)
