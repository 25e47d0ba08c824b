"""CIFAR VGG16/19 with BatchNorm: 3x3 conv + BN + ReLU stacks, five 2x2 max-pools, one
Linear classifier on the 512-channel 1x1 map (input 32x32; global pooling for other sizes)."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model

_CONFIGS = {
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG with BatchNorm: input (B, C, H, W), output (B, num_classes)."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = max(1, int(round(item * width)))
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG16 with BatchNorm (13 conv layers + 1 Linear)."""
    return VGG(16, num_classes, in_channels, width)


@register_model("vgg19")
def vgg19(num_classes: int, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG19 with BatchNorm (16 conv layers + 1 Linear)."""
    return VGG(19, num_classes, in_channels, width)
