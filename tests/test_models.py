"""qmse.models against hand-written functional forward passes and closed-form sizes."""

import pytest
import torch
import torch.nn.functional as F

from qmse.models import MLP, SimpleCNN


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_simple_cnn_matches_the_paper_layout(in_channels, size):
    torch.manual_seed(0)
    model = SimpleCNN(in_channels, size, num_classes=7, channels=(4, 6), hidden=5).double()
    x = torch.randn(3, in_channels, size, size, dtype=torch.float64)
    h = F.max_pool2d(F.relu(F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, model.conv2.weight, model.conv2.bias, padding=1)), 2)
    assert h.shape == (3, 6, size // 4, size // 4)
    h = F.relu(h.flatten(1) @ model.fc1.weight.T + model.fc1.bias)
    ref = h @ model.fc2.weight.T + model.fc2.bias
    torch.testing.assert_close(model(x), ref)
    side = size // 4
    count = (in_channels * 9 + 1) * 4 + (4 * 9 + 1) * 6 + (6 * side * side + 1) * 5 + 6 * 7
    assert sum(p.numel() for p in model.parameters()) == count


def test_mlp_layers_and_activation():
    torch.manual_seed(0)
    model = MLP(4, [5, 3], 2, activation="tanh").double()
    x = torch.randn(6, 4, dtype=torch.float64)
    lin = [model.layers[i] for i in (0, 2, 4)]
    ref = torch.tanh(torch.tanh(x @ lin[0].weight.T + lin[0].bias) @ lin[1].weight.T + lin[1].bias)
    torch.testing.assert_close(model(x), ref @ lin[2].weight.T + lin[2].bias)
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [5], 2, activation="gelu")
