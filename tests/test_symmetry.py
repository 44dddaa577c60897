"""qmse.symmetry against brute force: outputs of permuted nets, enumerated orbits, known perms."""

import itertools
import math

import pytest
import torch
from torch import nn

from qmse.loss import mse_loss_half
from qmse.models import MLP, SimpleCNN
from qmse.symmetry import (
    PermutationSpec,
    count_equivalent,
    identity_permutation,
    inverse_permutation,
    permutation_spec,
    permute,
    probe_input,
    random_permutation,
    sequential_spec,
    weight_matching,
    worked_example,
)


def _mlp(seed: int, hidden=(5, 4, 3), bias=True, activation="tanh") -> MLP:
    torch.manual_seed(seed)
    return MLP(3, list(hidden), 2, activation=activation, bias=bias).double()


def _cnn(seed: int) -> SimpleCNN:
    torch.manual_seed(seed)  # image 12 → fc1 sees c2 × 3 × 3: a block of 9 columns per channel
    return SimpleCNN(
        in_channels=2, image_size=12, num_classes=3, channels=(4, 5), hidden=6
    ).double()


def _flat(model) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in model.state_dict().values()])


def _same_weights(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_worked_example_same_function_different_weights(activation):
    a, b = worked_example(activation)
    x = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-13)
    assert not torch.equal(_flat(a), _flat(b))
    assert (_flat(a) - _flat(b)).norm() > 1
    # and b is exactly a with its two hidden units swapped
    assert _same_weights(permute(a, {"layers.0": torch.tensor([1, 0])}), b)
    assert count_equivalent(a) == 2


def test_worked_example_weights():
    a, b = worked_example()
    assert a.layers[0].weight.tolist() == [[-1.5, 2.0], [1.7, 0.4]]
    assert a.layers[2].weight.tolist() == [[2.3, 0.8]]
    assert b.layers[0].weight.tolist() == [[1.7, 0.4], [-1.5, 2.0]]
    assert b.layers[2].weight.tolist() == [[0.8, 2.3]]


def _sizes(model) -> dict[str, int]:
    return permutation_spec(model).sizes(model.state_dict())


def test_spec_names_and_sizes():
    assert _sizes(_mlp(0)) == {"layers.0": 5, "layers.2": 4, "layers.4": 3}
    spec = permutation_spec(_cnn(0))
    assert _sizes(_cnn(0)) == {"conv1": 4, "conv2": 5, "fc1": 6}
    assert ("fc1.weight", 1, 9) in spec.axes["conv2"]
    assert _sizes(MLP(3, [], 2)) == {}
    with pytest.raises(ValueError, match="cannot derive a permutation spec .* PermutationSpec"):
        permutation_spec(nn.Sequential(nn.Linear(2, 3), nn.GroupNorm(1, 3), nn.Linear(3, 1)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: _mlp(1),
        lambda: _mlp(2, hidden=(7,), bias=False, activation="relu"),
        lambda: _mlp(3, hidden=(4, 6), activation="sigmoid"),
        lambda: _cnn(4),
    ],
)
def test_permute_keeps_function_and_moves_weights(make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perms = random_permutation(model, torch.Generator().manual_seed(5))
    new = permute(model, perms)
    g = torch.Generator().manual_seed(6)
    x = (
        torch.randn(64, 2, 12, 12, generator=g, dtype=torch.float64)
        if isinstance(model, SimpleCNN)
        else torch.randn(64, 3, generator=g, dtype=torch.float64)
    )
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=0, atol=1e-12)
    assert not torch.equal(_flat(new), _flat(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert _same_weights(permute(new, inverse_permutation(perms)), model)


def test_cnn_flatten_block_is_needed():
    """Permuting fc1's input columns one by one (block 1) instead of in channel blocks breaks it."""
    model = _cnn(7)
    p = torch.tensor([1, 0, 2, 3, 4])
    new = permute(model, {**identity_permutation(model), "conv2": p})
    wrong = permute(model, identity_permutation(model))
    with torch.no_grad():
        wrong.conv2.weight.copy_(model.conv2.weight[p])
        wrong.conv2.bias.copy_(model.conv2.bias[p])
        cols = torch.arange(45).reshape(5, 9)[p].reshape(-1)  # the right columns …
        torch.testing.assert_close(new.fc1.weight, model.fc1.weight[:, cols], rtol=0, atol=0)
        wrong.fc1.weight.copy_(model.fc1.weight[:, torch.cat([p, torch.arange(5, 45)])])
        x = torch.randn(8, 2, 12, 12, dtype=torch.float64)
        assert (wrong(x) - model(x)).abs().max() > 1e-3  # … and not column by column


def test_bad_perms_are_refused():
    model = _mlp(0)
    good = identity_permutation(model)
    with pytest.raises(ValueError, match="keys"):
        permute(model, {"layers.0": good["layers.0"]})
    with pytest.raises(ValueError, match="permutation of range"):
        permute(model, {**good, "layers.2": torch.tensor([0, 0, 1, 2])})
    with pytest.raises(TypeError, match="int64"):
        permute(model, {**good, "layers.4": torch.tensor([0.0, 1.0, 2.0])})


def _all_perms(model):
    sizes = _sizes(model)
    for choice in itertools.product(*(itertools.permutations(range(n)) for n in sizes.values())):
        yield dict(zip(sizes, (torch.tensor(c) for c in choice)))


def _brute_force_orbit(model, x, y):
    """Distinct weight vectors over all ∏ nₗ! permutations, and their MSE losses."""
    seen, losses = set(), []
    for perms in _all_perms(model):
        new = permute(model, perms)
        seen.add(_flat(new).numpy().tobytes())
        with torch.no_grad():
            losses.append(mse_loss_half(new(x), y).item())
    return len(seen), losses


def _duplicate_unit(model, layer: int, src: int, dst: int) -> None:
    """Make hidden unit dst of Linear `layer` identical to unit src (in, bias and out)."""
    lin, nxt = model.layers[layer], model.layers[layer + 2]
    with torch.no_grad():
        lin.weight[dst] = lin.weight[src]
        lin.bias[dst] = lin.bias[src]
        nxt.weight[:, dst] = nxt.weight[:, src]


@pytest.mark.parametrize("duplicates", [[], [(0, 0, 1)], [(0, 0, 1), (0, 0, 2)], [(2, 1, 0)]])
def test_count_equivalent_matches_brute_force(duplicates):
    model = _mlp(8, hidden=(3, 2))
    for layer, src, dst in duplicates:
        _duplicate_unit(model, layer, src, dst)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = torch.randn(50, 2, generator=g, dtype=torch.float64)
    distinct, losses = _brute_force_orbit(model, x, y)
    assert len(losses) == math.factorial(3) * math.factorial(2)
    assert max(losses) - min(losses) < 1e-12  # every permuted copy sits at the same loss
    assert count_equivalent(model) == distinct
    expected = {0: 12, 1: 6, 2: 2}[len([d for d in duplicates if d[0] == 0])]
    expected //= 2 if any(d[0] == 2 for d in duplicates) else 1
    assert distinct == expected


def test_count_equivalent_is_an_upper_bound_when_swaps_are_coupled():
    """Units a, b of layer 1 share incoming weights but not outgoing ones; swapping them together
    with units c, d of layer 2 fixes every weight, though neither swap alone does: the orbit is
    smaller than ∏ n!/∏ m! (documented as an upper bound)."""
    model = _mlp(10, hidden=(3, 2))
    l1, l2, l3 = model.layers[0], model.layers[2], model.layers[4]
    with torch.no_grad():
        l1.weight[1] = l1.weight[0]
        l1.bias[1] = l1.bias[0]
        l2.weight[1, 0], l2.weight[1, 1] = l2.weight[0, 1], l2.weight[0, 0]
        l2.weight[1, 2] = l2.weight[0, 2]
        l2.bias[1] = l2.bias[0]
        l3.weight[:, 1] = l3.weight[:, 0]
    x = torch.randn(20, 3, dtype=torch.float64)
    distinct, _ = _brute_force_orbit(model, x, torch.zeros(20, 2, dtype=torch.float64))
    assert distinct == 6
    assert count_equivalent(model) == 12


def test_count_equivalent_cnn_big_int():
    model = _cnn(11)
    assert count_equivalent(model) == math.factorial(4) * math.factorial(5) * math.factorial(6)
    with torch.no_grad():
        model.conv2.weight[3] = model.conv2.weight[1]
        model.conv2.bias[3] = model.conv2.bias[1]
        model.fc1.weight[:, 27:36] = model.fc1.weight[:, 9:18]  # channel 3's block = channel 1's
    assert count_equivalent(model) == math.factorial(4) * math.factorial(5) * math.factorial(6) // 2
    big = SimpleCNN()
    n = count_equivalent(big)
    assert isinstance(n, int)
    assert n == math.factorial(32) * math.factorial(64) * math.factorial(128)


@pytest.mark.parametrize("make", [lambda s: _mlp(s, hidden=(16, 12, 8)), _cnn])
def test_weight_matching_recovers_a_random_permutation(make):
    a = make(12)
    perms = random_permutation(a, torch.Generator().manual_seed(13))
    b = permute(a, perms)
    found, aligned = weight_matching(a, b, seed=0)
    inverse = inverse_permutation(perms)
    assert all(torch.equal(found[k], inverse[k]) for k in perms)
    assert _same_weights(aligned, a)


@pytest.mark.parametrize("make", [lambda s: _mlp(s, hidden=(16, 12, 8)), _cnn])
def test_weight_matching_keeps_function_and_improves_objective(make):
    a, b = make(14), make(15)
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    perms, aligned = weight_matching(a, b, seed=3)
    x = (
        torch.randn(32, 2, 12, 12, dtype=torch.float64)
        if isinstance(a, SimpleCNN)
        else torch.randn(32, 3, dtype=torch.float64)
    )
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), rtol=0, atol=1e-12)
    assert all(torch.equal(b_before[k], v) for k, v in b.state_dict().items())
    assert _flat(a) @ _flat(aligned) > _flat(a) @ _flat(b)
    again, _ = weight_matching(a, b, seed=3)
    assert all(torch.equal(perms[k], again[k]) for k in perms)  # seeded: deterministic


def test_weight_matching_one_hidden_layer_is_the_brute_force_optimum():
    """With one hidden layer the objective is a single assignment problem: check all 6! perms."""
    a, b = _mlp(16, hidden=(6,)), _mlp(17, hidden=(6,))
    best = max(_flat(a) @ _flat(permute(b, p)) for p in _all_perms(b))
    _, aligned = weight_matching(a, b)
    torch.testing.assert_close(_flat(a) @ _flat(aligned), best, rtol=1e-12, atol=0)


def test_weight_matching_refuses_different_shapes_and_diverged_models():
    with pytest.raises(ValueError, match="architectures"):
        weight_matching(_mlp(0), _mlp(0, hidden=(5, 4, 2)))
    diverged = _mlp(1)
    with torch.no_grad():
        diverged.layers[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"model_b has non-finite weights \(layers.2.bias\)"):
        weight_matching(_mlp(0), diverged)


# ------------------------------------------------------------- models qmse does not define


def _conv_seq(seed: int) -> nn.Sequential:
    """A user's Sequential: two convs, pooling, a Flatten of 3 channels × 3 × 3, two Linears."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 6 * 6, 7), nn.Tanh(), nn.Linear(7, 2), nn.Softmax(-1),
    ).double()  # fmt: skip


class TwoPath(nn.Module):
    """Not a Sequential: h = tanh(A x) feeds both a hidden layer and a skip to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.mid = nn.Linear(5, 4)
        self.out = nn.Linear(4, 2)
        self.skip = nn.Linear(5, 2, bias=False)

    def forward(self, x):  # (N, 3) -> (N, 2)
        h = torch.tanh(self.inp(x))  # (N, 5)
        return self.out(torch.relu(self.mid(h))) + self.skip(h)


TWO_PATH_SPEC = PermutationSpec(
    {
        "h": [("inp.weight", 0), ("inp.bias", 0), ("mid.weight", 1), ("skip.weight", 1)],
        "m": [("mid.weight", 0), ("mid.bias", 0), ("out.weight", 1)],
    }
)


def _two_path(seed: int) -> TwoPath:
    torch.manual_seed(seed)
    return TwoPath().double()


def test_sequential_spec_is_derived_with_the_flatten_block():
    model = _conv_seq(0)
    spec = permutation_spec(model)
    assert spec.axes == {
        "0": (("0.weight", 0, 1), ("0.bias", 0, 1), ("3.weight", 1, 1)),
        "3": (("3.weight", 0, 1), ("3.bias", 0, 1), ("6.weight", 1, 36)),
        "6": (("6.weight", 0, 1), ("6.bias", 0, 1), ("8.weight", 1, 1)),
    }
    assert probe_input(model).shape == (4, 2, 12, 12)  # the smallest side that runs
    assert sequential_spec(MLP(3, [4], 2).layers, prefix="layers.") == permutation_spec(
        MLP(3, [4], 2)
    )
    with pytest.raises(TypeError, match="LayerNorm"):
        sequential_spec(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 1)))
    with pytest.raises(TypeError, match="Flatten"):
        sequential_spec(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Linear(4, 3)))


@pytest.mark.parametrize("make, spec", [(_conv_seq, None), (_two_path, TWO_PATH_SPEC)])
def test_user_models_permute_and_match(make, spec):
    """permute keeps the function (against a direct evaluation), and weight matching finds
    the inverse of a random permutation exactly."""
    a = make(20)
    perms = random_permutation(a, torch.Generator().manual_seed(21), spec=spec)
    b = permute(a, perms, spec=spec)
    x = probe_input(a, n=16) if spec is None else torch.randn(16, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-12)
    assert not torch.equal(_flat(a), _flat(b))
    found, aligned = weight_matching(a, b, spec=spec)
    inverse = inverse_permutation(perms)
    assert all(torch.equal(found[k], inverse[k]) for k in perms)
    assert _same_weights(aligned, a)
    n = count_equivalent(a, spec=spec)
    sizes = (spec or permutation_spec(a)).sizes(a.state_dict())
    assert n == math.prod(math.factorial(k) for k in sizes.values())


def test_a_wrong_spec_makes_permute_raise():
    model = _two_path(22)
    wrong = PermutationSpec(  # forgets that h also feeds the skip connection
        {
            "h": [("inp.weight", 0), ("inp.bias", 0), ("mid.weight", 1)],
            "m": [("mid.weight", 0), ("mid.bias", 0), ("out.weight", 1)],
        }
    )
    perms = random_permutation(model, torch.Generator().manual_seed(23), spec=wrong)
    with pytest.raises(ValueError, match="not a symmetry"):
        permute(model, perms, spec=wrong)
    with pytest.raises(ValueError, match="probe"):
        probe_input(nn.Sequential(nn.Embedding(3, 2)))
    a = _conv_seq(0)
    bad_block = PermutationSpec({**permutation_spec(a).axes, "3": (("3.weight", 0), ("3.bias", 0),
                                                                   ("6.weight", 1))})  # fmt: skip
    with pytest.raises(ValueError, match="same units"):
        random_permutation(a, torch.Generator(), spec=bad_block)


def test_spec_validation_names_the_problem():
    model = _two_path(0)
    with pytest.raises(ValueError, match="does not have"):
        permute(model, {"h": torch.arange(5)}, spec=PermutationSpec({"h": [("nope.weight", 0)]}))
    with pytest.raises(ValueError, match="claimed by both"):
        PermutationSpec({"a": [("inp.weight", 0)], "b": [("inp.weight", 0)]})
    with pytest.raises(ValueError, match="no axis"):
        identity_permutation(model, spec=PermutationSpec({"h": [("inp.bias", 1)]}))
    with pytest.raises(ValueError, match=r"\(name, axis\)"):
        PermutationSpec({"h": ["inp.weight"]})
