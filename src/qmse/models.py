"""The networks used across qmse: the paper's SimpleCNN and a plain MLP.

The paper (sec. 4) says only "two convolutional layers followed by two fully connected
layers"; the widths below are ours, and every one is an argument.
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
