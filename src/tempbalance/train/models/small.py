"""Small models for the embedded data sets: a 1-D CNN for mnist1d (B, 1, 40), a 2-D CNN for
the 8x8 digits (B, 1, 8, 8), and an MLP (any input, flattened)."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


def _scaled(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


class CNN1d(nn.Module):
    """Conv1d(k5) + 3 x Conv1d(k3, pad 1), each BN + ReLU, max-pool after the 1st and 3rd
    of the k3 convs, global average pool, Linear. Input (B, C, L), output (B, num_classes)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        c = _scaled(64, width)
        self.conv1 = nn.Conv1d(in_channels, c, 5)
        self.bn1 = nn.BatchNorm1d(c)
        self.conv2 = nn.Conv1d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(c)
        self.conv3 = nn.Conv1d(c, c, 3, padding=1)
        self.bn3 = nn.BatchNorm1d(c)
        self.conv4 = nn.Conv1d(c, c, 3, padding=1)
        self.bn4 = nn.BatchNorm1d(c)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool1d(2)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.relu(self.bn2(self.conv2(out))))
        out = self.relu(self.bn3(self.conv3(out)))
        out = self.pool(self.relu(self.bn4(self.conv4(out))))
        return self.linear(out.mean(dim=2))


class DeepCNN1d(nn.Module):
    """The deeper mnist1d CNN: Conv1d(k5), then ``stages`` stages of ``per_stage``
    Conv1d(k3, pad 1) layers (BN + ReLU each, max-pool after each stage), global average
    pool, Linear. 1 + stages * per_stage conv layers (10 at the defaults). Input (B, C, L) with
    L >= 4 + 2 ** stages, output (B, num_classes)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: float = 1.0, stages: int = 3, per_stage: int = 3):
        super().__init__()
        c = _scaled(64, width)
        layers: list[nn.Module] = [nn.Conv1d(in_channels, c, 5), nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
        for _ in range(stages):
            for _ in range(per_stage):
                layers += [nn.Conv1d(c, c, 3, padding=1), nn.BatchNorm1d(c), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool1d(2))
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.linear(self.features(x).mean(dim=2))


class DigitsCNN(nn.Module):
    """conv32-conv64-pool-conv64-conv128-pool (3x3, BN + ReLU), global average pool, Linear.
    Input (B, C, 8, 8), output (B, num_classes)."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in (32, 64, "M", 64, 128, "M"):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = _scaled(item, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flatten, ``depth - 1`` hidden Linear(hidden) + ReLU layers, Linear(num_classes)."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 512, depth: int = 5):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(size, hidden), nn.ReLU(inplace=True)]
            size = hidden
        layers.append(nn.Linear(size, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_model("cnn1d")
def cnn1d(num_classes: int, in_channels: int = 1, width: float = 1.0) -> CNN1d:
    """The mnist1d 1-D CNN (64 channels at width 1)."""
    return CNN1d(num_classes, in_channels, width)


@register_model("cnn1d-deep")
def cnn1d_deep(num_classes: int, in_channels: int = 1, width: float = 1.0) -> DeepCNN1d:
    """The deeper mnist1d 1-D CNN: 10 conv layers (9 of them balanced by default), 64 channels
    at width 1."""
    return DeepCNN1d(num_classes, in_channels, width)


@register_model("cnn-digits")
def cnn_digits(num_classes: int, in_channels: int = 1, width: float = 1.0) -> DigitsCNN:
    """The 8x8 digits 2-D CNN."""
    return DigitsCNN(num_classes, in_channels, width)


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 1, width: float = 1.0, in_features: int = 40, depth: int = 5) -> MLP:
    """An MLP, ``512 * width`` wide; ``in_features`` = flattened input size (40 for mnist1d,
    64 for digits)."""
    return MLP(num_classes, in_features * in_channels, _scaled(512, width), depth)
