"""Hidden-unit permutation symmetry: the n! equivalent minima of a network, and weight matching.

Reordering the hidden units of a layer (rows of its weight and bias) and undoing the order in
the next layer's input axis leaves the network's function unchanged, because the activation
acts elementwise (and max-pooling per channel). So every minimum of an MSE loss (paper eq. 3)
comes with up to ∏ₗ nₗ! copies at the same height: the loss is not convex in the weights, and
the straight line between two copies usually climbs over a barrier (`qmse.landscape`).

A network's symmetry is declared once, as a `PermutationSpec`: for each hidden permutation,
the (parameter name, axis, block) triples it acts on (git-re-basin's spec). `block` > 1 is
the flatten between a convolution and a linear layer: channel c of `conv2` feeds the `block`
consecutive input columns c·block … (c+1)·block − 1 of `fc1`.

Convention: a permutation `p` of a layer with n units is an int64 tensor of shape (n,); the
permuted network's unit j is the original network's unit p[j].
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from qmse.models import MLP, SimpleCNN

Perms = dict[str, Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which parameters each hidden permutation acts on.

    sizes: permutation name -> number of units n.
    axes: permutation name -> ((parameter name, axis, block), …); along `axis` the parameter
        has n·block entries, unit c owning the `block` consecutive ones from c·block.
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[tuple[str, int, int], ...]]


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The hidden-unit symmetry of a `qmse.models.MLP` (any depth) or `SimpleCNN`.

    MLP: one permutation per hidden layer, named after the Linear producing it
    ("layers.0", "layers.2", …). SimpleCNN: "conv1" and "conv2" (channels) and "fc1" (units).
    """
    if isinstance(model, MLP):
        names = [f"layers.{i}" for i, m in enumerate(model.layers) if isinstance(m, nn.Linear)]
        sizes, axes = {}, {}
        for name, nxt in zip(names[:-1], names[1:]):
            layer = model.get_submodule(name)
            sizes[name] = layer.out_features
            touched = [(f"{name}.weight", 0, 1), (f"{nxt}.weight", 1, 1)]
            if layer.bias is not None:
                touched.insert(1, (f"{name}.bias", 0, 1))
            axes[name] = tuple(touched)
        return PermutationSpec(sizes, axes)
    if isinstance(model, SimpleCNN):
        c1, c2, hidden = model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features
        block = model.fc1.in_features // c2  # side·side pixels per conv2 channel after flatten
        return PermutationSpec(
            {"conv1": c1, "conv2": c2, "fc1": hidden},
            {
                "conv1": (("conv1.weight", 0, 1), ("conv1.bias", 0, 1), ("conv2.weight", 1, 1)),
                "conv2": (("conv2.weight", 0, 1), ("conv2.bias", 0, 1), ("fc1.weight", 1, block)),
                "fc1": (("fc1.weight", 0, 1), ("fc1.bias", 0, 1), ("fc2.weight", 1, 1)),
            },
        )
    raise TypeError(
        f"model is a {type(model).__name__}; permutation specs exist for qmse.models.MLP and "
        f"qmse.models.SimpleCNN only"
    )


def _unit_axis(w: Tensor, axis: int, n: int, block: int) -> Tensor:
    """View of `w` with the units of `axis` as a leading axis: (n, rest…) (block folded in)."""
    shape = list(w.shape)
    w = w.reshape(shape[:axis] + [n, block] + shape[axis + 1 :])  # unit axis split as (n, block)
    return w.movedim(axis, 0)  # (n, …, block, …)


def _apply(w: Tensor, axis: int, n: int, block: int, perm: Tensor) -> Tensor:
    """`w` with its units along `axis` reordered so that new unit j is old unit perm[j]."""
    shape = list(w.shape)
    w = w.reshape(shape[:axis] + [n, block] + shape[axis + 1 :])
    return w.index_select(axis, perm.to(w.device)).reshape(shape)


def _permuted_params(
    spec: PermutationSpec, params: dict[str, Tensor], perms: Perms, skip: str | None = None
) -> dict[str, Tensor]:
    """Every parameter with all permutations applied (except `skip`'s, for weight matching)."""
    out = dict(params)
    for name, touched in spec.axes.items():
        if name == skip:
            continue
        for key, axis, block in touched:
            out[key] = _apply(out[key], axis, spec.sizes[name], block, perms[name])
    return out


def _check_perms(spec: PermutationSpec, perms: Perms) -> None:
    if not isinstance(perms, dict) or set(perms) != set(spec.sizes):
        got = sorted(perms) if isinstance(perms, dict) else type(perms).__name__
        raise ValueError(f"perms must have the keys {sorted(spec.sizes)}, got {got}")
    for name, n in spec.sizes.items():
        p = perms[name]
        if not isinstance(p, Tensor) or p.dtype != torch.int64:
            raise TypeError(f"perms[{name!r}] must be an int64 tensor, got {p!r}")
        if p.shape != (n,) or not torch.equal(p.sort().values, torch.arange(n, device=p.device)):
            raise ValueError(
                f"perms[{name!r}] must be a permutation of range({n}), got {p.tolist()}"
            )


def permute(model: nn.Module, perms: Perms) -> nn.Module:
    """A new model computing exactly the same function, its hidden units reordered by `perms`.

    perms: permutation name (see `permutation_spec`) -> int64 (n,), new unit j = old unit p[j].
    The input model is left untouched.
    """
    spec = permutation_spec(model)
    _check_perms(spec, perms)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    out = copy.deepcopy(model)
    out.load_state_dict(_permuted_params(spec, params, perms))
    return out


def identity_permutation(model: nn.Module) -> Perms:
    """The permutations that leave `model` as it is."""
    return {name: torch.arange(n) for name, n in permutation_spec(model).sizes.items()}


def random_permutation(model: nn.Module, generator: torch.Generator) -> Perms:
    """Independent uniform permutations of every hidden layer, drawn from `generator`."""
    sizes = permutation_spec(model).sizes
    return {name: torch.randperm(n, generator=generator) for name, n in sizes.items()}


def inverse_permutation(perms: Perms) -> Perms:
    """q with permute(permute(m, perms), q) == m."""
    return {name: torch.argsort(p) for name, p in perms.items()}


def _unit_signatures(spec: PermutationSpec, params: dict[str, Tensor], name: str) -> list[bytes]:
    """One byte string per unit of permutation `name`: all weights touching that unit."""
    n = spec.sizes[name]
    rows = [
        _unit_axis(params[key].detach().cpu().double(), axis, n, block).reshape(n, -1)
        for key, axis, block in spec.axes[name]
    ]
    sig = torch.cat(rows, dim=1)  # (n, all weights of the unit)
    return [row.numpy().tobytes() for row in sig]


def count_equivalent(model: nn.Module) -> int:
    """How many distinct weight vectors compute `model`'s function by hidden-unit permutation.

    Counts ∏ₗ nₗ! / ∏ⱼ mⱼ!, where the mⱼ are the sizes of the groups of identical units of a
    layer: units whose incoming weights, bias and outgoing weights are all exactly equal
    (swapping two of them changes no weight). By orbit–stabiliser the orbit size is
    ∏ nₗ! / |stabiliser|, and permutations inside such groups always fix the weights, so this
    is an upper bound; it is exact whenever units with equal incoming weights and bias also have
    equal outgoing weights (then, layer by layer from the input, the stabiliser can move only
    identical units). That holds for generic trained networks (all mⱼ = 1: ∏ nₗ!) and for
    duplicated units. Returned as an exact Python int (it overflows floats for SimpleCNN).
    """
    spec = permutation_spec(model)
    params = model.state_dict()
    count = 1
    for name, n in spec.sizes.items():
        count *= math.factorial(n)
        for m in Counter(_unit_signatures(spec, params, name)).values():
            count //= math.factorial(m)
    return count


def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[Perms, nn.Module]:
    """Permute `model_b`'s hidden units to bring its weights closest to `model_a`'s.

    Git Re-Basin's weight matching (Ainsworth et al. 2022, alg. 1): maximise
    Σ_w ⟨W_a, π(W_b)⟩ over the permutations π by coordinate descent. Each step fixes every
    permutation but one, whose objective is then linear, ⟨A, P⟩ with A[i, k] the inner product
    of a's unit i and b's unit k over every weight that permutation touches (the other
    permutations applied); `scipy.optimize.linear_sum_assignment` solves it exactly. Layers are
    visited in a random order (seeded by `seed` and the sweep number) until a full sweep
    improves nothing, or `max_iter` sweeps. Returns (perms, aligned copy of model_b);
    neither input is changed, and the aligned model computes model_b's function exactly.
    """
    spec = permutation_spec(model_a)
    if permutation_spec(model_b) != spec:
        raise ValueError(
            f"model_a and model_b have different architectures ({spec.sizes} vs "
            f"{permutation_spec(model_b).sizes}); weight matching needs the same shapes"
        )
    params_a = {k: v.detach().cpu().double() for k, v in model_a.state_dict().items()}
    params_b = {k: v.detach().cpu().double() for k, v in model_b.state_dict().items()}
    perms = identity_permutation(model_a)
    names = list(spec.sizes)
    for sweep in range(max_iter):
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + sweep))
        progress = False
        for name in (names[i] for i in order.tolist()):
            n = spec.sizes[name]
            others = _permuted_params(spec, params_b, perms, skip=name)
            A = torch.zeros(n, n, dtype=torch.float64)
            for key, axis, block in spec.axes[name]:
                wa = _unit_axis(params_a[key], axis, n, block).reshape(n, -1)  # (n, rest)
                wb = _unit_axis(others[key], axis, n, block).reshape(n, -1)  # (n, rest)
                A += wa @ wb.T  # (n, n)
            _, cols = linear_sum_assignment(A.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.int64)
            old_score = A[torch.arange(n), perms[name]].sum().item()
            new_score = A[torch.arange(n), new].sum().item()
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                progress = True
                perms[name] = new
        if not progress:
            break
    return perms, permute(model_b, perms)


def worked_example(activation: str = "sigmoid") -> tuple[MLP, MLP]:
    """The 2-2-1 networks of the seeds' Q&A thread (no biases), as two `MLP`s.

    a: W1 = [[-1.5, 2.0], [1.7, 0.4]], W2 = [2.3, 0.8];
    b: W1 = [[1.7, 0.4], [-1.5, 2.0]], W2 = [0.8, 2.3] (hidden units swapped).
    Different points of weight space with the same output on every input, so if a is a
    minimum of the loss, b is another one at the same height.
    """
    nets = []
    for w1, w2 in (
        ([[-1.5, 2.0], [1.7, 0.4]], [[2.3, 0.8]]),
        ([[1.7, 0.4], [-1.5, 2.0]], [[0.8, 2.3]]),
    ):
        net = MLP(2, [2], 1, activation=activation, bias=False).double()
        with torch.no_grad():
            net.layers[0].weight.copy_(torch.tensor(w1, dtype=torch.float64))
            net.layers[2].weight.copy_(torch.tensor(w2, dtype=torch.float64))
        nets.append(net)
    return nets[0], nets[1]
