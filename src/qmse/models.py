"""The networks used across qmse: the paper's SimpleCNN, a plain MLP, and a CIFAR ResNet.

The paper (sec. 4) says only "two convolutional layers followed by two fully connected
layers"; the widths below are ours, and every one is an argument. The ResNet (with
BatchNorm and residual additions) is the network of the symmetry experiments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qmse.errors import UserError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class SimpleCNN(nn.Module):
    """conv3×3(c1) → ReLU → maxpool2 → conv3×3(c2) → ReLU → maxpool2 → fc(hidden) → ReLU → fc(C).

    Convolutions use padding 1, so a 28×28 image reaches the first linear layer as c2×7×7 and
    a 32×32 one as c2×8×8.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = image_size // 4
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_channels, H, W) -> (B, C)
        x = self.pool(torch.relu(self.conv1(x)))  # (B, c1, H/2, W/2)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, c2, H/4, W/4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.fc2(x)


class MLP(nn.Module):
    """Fully connected network in_features → hidden[0] → … → out_features.

    Layers live in `self.layers` (an nn.Sequential of Linear and activation modules), so the
    Linear weights are `layers.0.weight`, `layers.2.weight`, ….
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"activation={activation!r}; expected one of {sorted(ACTIVATIONS)}")
        sizes = [in_features, *hidden, out_features]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_features) -> (B, out_features)
        return self.layers(x.flatten(1))


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus the input (through a 1×1 conv and BN where
    the stride or the width changes, He et al.'s option B), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, channels, H/s, W/s)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, sec. 4.2) with a width multiplier.

    conv3×3(16w) → BN → ReLU, three stages of `blocks` `BasicBlock`s with 16w, 32w and 64w
    channels (the second and third start with stride 2), global average pooling and a linear
    layer: blocks=3 is ResNet-20 (6·blocks + 2 weight layers), w = `width`. Any image side
    works (32×32 reaches the pooling as 8×8).
    """

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, width: int = 1, blocks: int = 3
    ) -> None:
        super().__init__()
        if width < 1 or blocks < 1:
            raise UserError(f"width={width}, blocks={blocks}; both must be >= 1")
        c = 16 * width
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        stages, in_c = [], c
        for i, out_c in enumerate((c, 2 * c, 4 * c)):
            layers = []
            for j in range(blocks):
                layers.append(BasicBlock(in_c, out_c, stride=2 if i > 0 and j == 0 else 1))
                in_c = out_c
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * c, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_channels, H, W) -> (B, num_classes)
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16w, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64w, H/4, W/4)
        return self.fc(self.pool(x).flatten(1))  # (B, 64w) -> (B, num_classes)
