"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks, depth
d = 6n + 4, widths 16, 16k, 32k, 64k; used for TinyImageNet in the paper."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with identity or 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k: input (B, C, H, W), output (B, num_classes)."""

    def __init__(self, depth: int, k: int, num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth={depth} must be 6n + 4")
        n = (depth - 4) // 6
        widths = [max(1, int(round(c * width))) for c in (16, 16 * k, 32 * k, 64 * k)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths[1:]):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, (1 if stage == 0 else 2) if i == 0 else 1, dropout))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.linear(self.pool(self.relu(self.bn(out))).flatten(1))


@register_model("wrn16-8")
def wrn16_8(num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    """WRN-16-8."""
    return WideResNet(16, 8, num_classes, in_channels, width, dropout)


@register_model("wrn28-6")
def wrn28_6(num_classes: int, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> WideResNet:
    """WRN-28-6."""
    return WideResNet(28, 6, num_classes, in_channels, width, dropout)
