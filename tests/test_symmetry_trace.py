"""Permutation specs derived by tracing (qmse.tracespec), on the models people train."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qmse.curvature import eval_mode
from qmse.landscape import interpolation_barriers, recompute_statistics
from qmse.models import MLP, ResNet, SimpleCNN
from qmse.symmetry import (
    PermutationSpec,
    inverse_permutation,
    permutation_spec,
    permute,
    random_permutation,
    sequential_spec,
    simple_cnn_spec,
    traced_spec,
    weight_matching,
)


def _shifted_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Non-trivial running statistics (not 0 and 1), so permuting them matters in eval mode."""
    with torch.no_grad():
        model.train()
        model(1.7 * x + 0.4)
    return model.eval()


def _outputs_agree(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with eval_mode(a), eval_mode(b), torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


def test_traced_spec_equals_the_written_out_ones():
    """Independent references: the hand-written SimpleCNN spec (with its flatten block of
    7·7) and the Sequential walker's specs."""
    torch.manual_seed(0)
    cnn = SimpleCNN(1, 28, 10, channels=(3, 4), hidden=5)
    assert traced_spec(cnn) == simple_cnn_spec(cnn)
    mlp = MLP(3, [4, 5], 2)
    assert traced_spec(mlp) == sequential_spec(mlp.layers, prefix="layers.")
    seq = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 7), nn.Tanh(), nn.Linear(7, 2),
    )  # fmt: skip
    assert traced_spec(seq) == sequential_spec(seq) == permutation_spec(seq)
    assert permutation_spec(nn.Linear(2, 2)).axes == {}  # no hidden units


def test_resnet20_traced_spec_permutes_without_changing_outputs():
    """ResNet-20 (3 blocks a stage, width ×2) on CIFAR-shaped input: one permutation per
    residual stream (3) and per block's inner channels (9); a random one keeps the outputs,
    and weight matching finds its inverse."""
    torch.manual_seed(0)
    width = 2
    model = ResNet(3, 10, width=width, blocks=3).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    _shifted_statistics(model, x)
    spec = permutation_spec(model)
    sizes = spec.sizes(model.state_dict())
    assert sizes["conv1"] == sizes["layer1.0.conv1"] == 16 * width  # stem = stage-1 stream
    assert sizes["layer2.0.conv2"] == 32 * width and sizes["layer3.0.conv2"] == 64 * width
    assert len(sizes) == 3 + 9
    assert ("layer2.0.shortcut.0.weight", 1, 1) in spec.axes["conv1"]  # joins the two streams
    assert ("layer3.2.bn2.running_var", 0, 1) in spec.axes["layer3.0.conv2"]
    perms = random_permutation(model, torch.Generator().manual_seed(5), spec=spec)
    twin = permute(model, perms, spec=spec, probe=x)
    with torch.no_grad():
        scale = model(x).abs().max().item()
    assert _outputs_agree(model, twin, x) < 1e-12 * scale
    moved = twin.layer2[0].bn1.running_mean
    assert not torch.equal(moved, model.layer2[0].bn1.running_mean)
    torch.testing.assert_close(moved, model.layer2[0].bn1.running_mean[perms["layer2.0.conv1"]])
    found, aligned = weight_matching(model, twin, spec=spec)
    inverse = inverse_permutation(perms)
    assert all(torch.equal(found[k], inverse[k]) for k in perms)
    torch.testing.assert_close(aligned.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_a_residual_stream_needs_its_shared_permutation():
    """Splitting the stage-1 stream into two permutations (stem vs. blocks) is not a
    symmetry: permute refuses it. The traced spec is not vacuously accepted."""
    torch.manual_seed(0)
    model = ResNet(1, 10, width=1, blocks=1).double()
    x = torch.randn(4, 1, 32, 32, dtype=torch.float64)
    _shifted_statistics(model, x)
    axes = {k: list(v) for k, v in traced_spec(model).axes.items()}
    stem = [e for e in axes["conv1"] if e[0].startswith(("conv1", "bn1"))]
    axes["conv1"] = [e for e in axes["conv1"] if e not in stem]
    axes["stem"] = stem
    split = PermutationSpec(axes)
    perms = random_permutation(model, torch.Generator().manual_seed(1), spec=split)
    with pytest.raises(ValueError, match="not a symmetry"):
        permute(model, perms, spec=split, probe=x)


class Functional(nn.Module):
    """Written with functions and tensor methods, as many user models are."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 2 * 2, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.mean_head = nn.Linear(5, 3)

    def forward(self, x):  # (N, 2, 8, 8) -> (N, 3)
        h = F.relu(self.bn(self.conv(x * 2.0 - 1.0)))  # preprocessing: fixed tensors
        h = h + torch.tanh(self.conv2(h))  # a residual addition
        pooled = F.avg_pool2d(h, 4)  # (N, 5, 2, 2)
        z = self.norm(torch.relu(self.fc(pooled.view(pooled.size(0), -1))))  # block 4
        return self.head(z) + self.mean_head(h.mean((2, 3)))


class ResidualMLP(nn.Module):
    """x + f(x) on the input: the stream is the input's, so it cannot be permuted."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 7), nn.Linear(7, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(x + self.down(torch.relu(self.up(x))))


@pytest.mark.parametrize(
    "make, shape, names",
    [
        (Functional, (5, 2, 8, 8), {"conv", "fc"}),
        (ResidualMLP, (5, 4), {"up"}),
        (
            lambda: nn.Sequential(
                nn.Linear(3, 6),
                nn.BatchNorm1d(6),
                nn.ReLU(),
                nn.Dropout(0.1),
                nn.Linear(6, 4),
                nn.LayerNorm(4),
                nn.Linear(4, 2),
            ),
            (5, 3),
            {"0", "4"},
        ),  # fmt: skip
    ],
)
def test_user_models_written_many_ways(make, shape, names):
    torch.manual_seed(1)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    if any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules()):
        _shifted_statistics(model, x)
    spec = traced_spec(model, x)
    assert set(spec.axes) == names
    perms = random_permutation(model, torch.Generator().manual_seed(2), spec=spec)
    twin = permute(model, perms, spec=spec, probe=x)
    assert _outputs_agree(model, twin, x) < 1e-12
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.cat([h, h], 1))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(torch.relu(self.a(x))))


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else -self.a(x)


def test_what_it_cannot_follow_is_named():
    cases = [
        (Concat(), (2, 3), r"node 'cat' \(call_function cat\)"),
        (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1)),
            (2, 1, 5, 5),
            r"module '1' \(GroupNorm\) is not a module it knows",
        ),  # fmt: skip
        (
            nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2)),
            (2, 1, 7, 7),
            r"module '1' \(Conv2d\)",
        ),  # fmt: skip
        (Shared(), (2, 3), r"module 'a' \(Linear\) is called twice"),
        (Branching(), (2, 3), "torch.fx cannot trace Branching"),
    ]
    for model, shape, message in cases:
        with pytest.raises(ValueError, match=message):
            traced_spec(model, torch.randn(*shape))


def _toy_images(n: int, seed: int):
    """1×16×16 images whose class (of 4) is the brightest quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 16, 16, generator=g)
    for c in range(4):
        r, s = divmod(c, 2)
        x[y == c, :, 8 * r : 8 * r + 8, 8 * s : 8 * s + 8] += 1.0
    return x, y


def _trained_resnet(seed: int, x, y) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet(1, 4, width=1, blocks=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(30):
        batch = slice(32 * (step % 4), 32 * (step % 4) + 32)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return recompute_statistics(model.eval(), x)


def test_weight_matching_two_resnets_lowers_the_barrier():
    """Two small ResNets trained from different seeds: with BN statistics recomputed at every
    point (the default), the path ends at each model's own loss, and matching lowers the
    straight-path barrier."""
    x, y = _toy_images(128, 0)
    a, b = _trained_resnet(1, x, y), _trained_resnet(2, x, y)
    before = copy.deepcopy(b.state_dict())
    res = interpolation_barriers(a, b, "ce", (x, y), points=5, bn_data=x)
    assert res["buffers"] == "recompute"
    with torch.no_grad():
        own = [F.cross_entropy(m(x), y).item() for m in (a, b)]
    torch.testing.assert_close(res["naive_loss"][[0, -1]].tolist(), own, rtol=1e-5, atol=0)
    torch.testing.assert_close(res["aligned_loss"][[0, -1]].tolist(), own, rtol=1e-5, atol=0)
    assert res["aligned_barrier"] < 0.8 * res["naive_barrier"]
    assert res["naive_barrier"] > 0.01
    torch.testing.assert_close(b.state_dict(), before, rtol=0, atol=0)
