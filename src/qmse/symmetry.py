"""Hidden-unit permutation symmetry: the n! equivalent minima of a network, and weight matching.

Reordering the hidden units of a layer (rows of its weight and bias) and undoing the order in
the next layer's input axis leaves the network's function unchanged, because the activation
acts elementwise (and max-pooling per channel). So every minimum of an MSE loss (paper eq. 3)
comes with up to ∏ₗ nₗ! copies at the same height: the loss is not convex in the weights, and
the straight line between two copies usually climbs over a barrier (`qmse.landscape`).

A network's symmetry is declared once, from the parameters' side, as a `PermutationSpec`
(Git Re-Basin's permutation spec): for each hidden permutation, the state-dict entries it
acts on, each as (name, axis) or (name, axis, block). `block` > 1 is a flatten between a
convolution and a linear layer: channel c feeds the `block` consecutive input columns
c·block … (c+1)·block − 1 of the linear weight. For your own model:

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = PermutationSpec({"hidden": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]})
    twin = permute(model, random_permutation(model, torch.Generator(), spec=spec), spec=spec)

Specs are written out for `qmse.models.MLP` and `SimpleCNN`, derived for an nn.Sequential of
Linear/Conv2d layers with elementwise activations, pooling and a Flatten (`sequential_spec`),
and for other models by tracing their data flow with torch.fx (`qmse.tracespec`: norm layers
and residual additions too); `permutation_spec` picks. Buffers are permuted with their units
(a BatchNorm's running statistics with its channels), so a permuted model computes the same
function in eval mode too. `permute` checks on a probe input that the permuted model computes the
same outputs, so a spec that is not a symmetry of the model is refused, not silently used.

Convention: a permutation `p` of a layer with n units is an int64 tensor of shape (n,); the
permuted network's unit j is the original network's unit p[j].
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from qmse.curvature import eval_mode
from qmse.errors import UserError
from qmse.models import MLP, SimpleCNN
from qmse.tracespec import ELEMENTWISE, trace_axes

Perms = dict[str, Tensor]


@dataclass(frozen=True)
class PermutationSpec:
    """Which axes of which state-dict entries each hidden permutation acts on.

    axes: permutation name -> [(entry name, axis) or (entry name, axis, block), …]. Along
    `axis` the entry has n·block elements, unit c owning the `block` consecutive ones from
    c·block (block 1 if omitted); n, the permutation's number of units, is read from the
    shapes (`sizes`). Stored normalised: every entry as a (name, axis, block) triple.
    """

    axes: Mapping[str, Sequence[tuple]]

    def __post_init__(self) -> None:
        normal, owner = {}, {}
        for name, entries in dict(self.axes).items():
            triples = []
            for entry in entries:
                if not isinstance(entry, tuple) or len(entry) not in (2, 3):
                    raise UserError(
                        f"permutation {name!r}: {entry!r} is not (name, axis) or "
                        f"(name, axis, block)"
                    )
                key, axis, block = (*entry, 1) if len(entry) == 2 else entry
                if not (isinstance(key, str) and isinstance(axis, int) and isinstance(block, int)):
                    raise TypeError(f"permutation {name!r}: {entry!r} must be (str, int[, int])")
                if block < 1:
                    raise UserError(f"permutation {name!r}: block of {key!r} must be >= 1")
                if (key, axis) in owner:
                    raise UserError(
                        f"axis {axis} of {key!r} is claimed by both {owner[key, axis]!r} and "
                        f"{name!r}; one axis carries one permutation"
                    )
                owner[key, axis] = name
                triples.append((key, axis, block))
            if not triples:
                raise UserError(f"permutation {name!r} acts on nothing")
            normal[name] = tuple(triples)
        object.__setattr__(self, "axes", normal)

    def sizes(self, params: Mapping[str, Tensor]) -> dict[str, int]:
        """Units per permutation, read from the shapes of `params` (a state dict); a clear
        error if an entry is missing or the entries of one permutation disagree."""
        out = {}
        for name, triples in self.axes.items():
            for key, axis, block in triples:
                if key not in params:
                    raise UserError(
                        f"permutation {name!r} acts on {key!r}, which the model does not have; "
                        f"its entries are {list(params)}"
                    )
                shape = params[key].shape
                if not -len(shape) <= axis < len(shape) or shape[axis] % block:
                    raise UserError(
                        f"permutation {name!r}: {key!r} of shape {tuple(shape)} has no axis "
                        f"{axis} made of blocks of {block}"
                    )
                n = shape[axis] // block
                if out.setdefault(name, n) != n:
                    raise UserError(
                        f"permutation {name!r} moves {out[name]} units on {triples[0][0]!r} "
                        f"but {n} on axis {axis} of {key!r} (block {block}); every entry of a "
                        f"permutation must hold the same units"
                    )
        return out


def sequential_spec(model: nn.Sequential, prefix: str = "") -> PermutationSpec:
    """The hidden-unit symmetry of an nn.Sequential of Linear and Conv2d layers.

    One permutation per weight layer but the last, named after its key in the Sequential
    ("0", "2", …, with `prefix` in front of the entry names): its output rows (and bias)
    and the next weight layer's input axis, in blocks of in_features / channels across a
    Flatten. Between weight layers only `ELEMENTWISE` modules and one Flatten may sit; after
    the last one anything may (the outputs are not permuted).
    """
    axes: dict[str, list[tuple]] = {}
    prev: tuple[str, nn.Module] | None = None  # the weight layer whose outputs are permuted
    flattened, other = False, None  # other: the first unknown module, fine after the last layer
    for name, m in model.named_children():
        key = prefix + name
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if other is not None:
                raise TypeError(
                    f"layer {other[0]!r} is a {other[1]}; a spec is derived only across "
                    f"elementwise activations, pooling and Flatten: write a PermutationSpec "
                    f"for this model (see qmse.symmetry)"
                )
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise TypeError(f"layer {key!r} is a grouped Conv2d; write its spec by hand")
            if prev is not None:
                pname, p = prev
                n = p.out_features if isinstance(p, nn.Linear) else p.out_channels
                block = 1
                if isinstance(p, nn.Conv2d) and isinstance(m, nn.Linear):
                    if not flattened or m.in_features % n:
                        raise TypeError(
                            f"layer {key!r} (Linear, {m.in_features} inputs) follows Conv2d "
                            f"{pname!r} ({n} channels) without a Flatten of whole channels"
                        )
                    block = m.in_features // n
                elif isinstance(p, nn.Linear) and isinstance(m, nn.Conv2d):
                    raise TypeError(f"Conv2d {key!r} after Linear {pname!r}: no derived spec")
                axes[pname].append((f"{key}.weight", 1, block))
            axes[key] = [(f"{key}.weight", 0)] + (
                [(f"{key}.bias", 0)] if m.bias is not None else []
            )
            prev, flattened = (key, m), False
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise TypeError(f"Flatten {key!r} must flatten dims 1..-1 (channel-major)")
            flattened = True
        elif not isinstance(m, ELEMENTWISE) and other is None:
            other = (key, type(m).__name__)
    if prev is not None:
        del axes[prev[0]]  # the last layer's outputs are the model's
    return PermutationSpec(axes)


def simple_cnn_spec(model: SimpleCNN) -> PermutationSpec:
    """SimpleCNN's symmetry: "conv1" and "conv2" (channels), "fc1" (hidden units); conv2's
    channel c owns fc1's input columns c·side² … (c+1)·side² − 1 after the flatten."""
    block = model.fc1.in_features // model.conv2.out_channels  # side·side pixels per channel
    return PermutationSpec(
        {
            "conv1": [("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)],
            "conv2": [("conv2.weight", 0), ("conv2.bias", 0), ("fc1.weight", 1, block)],
            "fc1": [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)],
        }
    )


def traced_spec(model: nn.Module, example_input: Tensor | None = None) -> PermutationSpec:
    """The hidden-unit symmetry of `model`, derived by tracing its forward pass with torch.fx
    (`qmse.tracespec`: Linear/Conv2d, norm layers with their running statistics, activations,
    pooling, flatten, residual additions sharing one permutation). `example_input`: a batch
    to read the shapes from (default `probe_input(model)`). A UserError names the first node
    it cannot follow; pass your own `PermutationSpec` as `spec` then."""
    x = example_input if example_input is not None else probe_input(model)
    return PermutationSpec(trace_axes(model, x))


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The hidden-unit symmetry of a model: written out for a `qmse.models.MLP` (its
    Sequential: "layers.0", "layers.2", …) and a `SimpleCNN` (`simple_cnn_spec`), derived by
    tracing for any other (`traced_spec`)."""
    if isinstance(model, MLP):
        return sequential_spec(model.layers, prefix="layers.")
    if isinstance(model, SimpleCNN):
        return simple_cnn_spec(model)
    return traced_spec(model)


def probe_input(model: nn.Module, n: int = 4) -> Tensor:
    """A small seeded random batch the model accepts, shaped from its first Linear
    (n, in_features) or Conv2d (n, in_channels, s, s), s the smallest side in 1..128 that
    runs through the model. Other models: pass your own probe."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if first is not None:
        like = first.weight
        gen = torch.Generator().manual_seed(0)

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=like.dtype).to(like.device)

        if isinstance(first, nn.Linear):
            return draw(n, first.in_features)
        with eval_mode(model), torch.no_grad():
            for side in range(1, 129):
                x = draw(n, first.in_channels, side, side)
                try:
                    model(x)
                except RuntimeError:  # a shape mismatch further down: try the next size
                    continue
                return x
    raise UserError(
        f"cannot build a probe input for a {type(model).__name__}; pass probe=, a small batch "
        f"of inputs"
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
    spec: PermutationSpec,
    sizes: dict[str, int],
    params: dict[str, Tensor],
    perms: Perms,
    skip: str | None = None,
) -> dict[str, Tensor]:
    """Every entry with all permutations applied (except `skip`'s, for weight matching)."""
    out = dict(params)
    for name, touched in spec.axes.items():
        if name == skip:
            continue
        for key, axis, block in touched:
            out[key] = _apply(out[key], axis % out[key].dim(), sizes[name], block, perms[name])
    return out


def _check_norm_layers(model: nn.Module, spec: PermutationSpec) -> None:
    """A norm layer's weight, bias and running statistics are per channel: one permutation
    must move all of them or none (a spec that permutes a BatchNorm's weight but not its
    running mean would change the function in eval mode)."""
    owner = {key: name for name, triples in spec.axes.items() for key, _, _ in triples}
    for layer, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._NormBase):
            continue
        keys = [
            f"{layer}.{k}" if layer else k
            for k in ("weight", "bias", "running_mean", "running_var")
            if isinstance(getattr(m, k, None), Tensor)
        ]
        if len({owner.get(k) for k in keys}) > 1:
            moved = {k: owner.get(k) for k in keys}
            raise UserError(
                f"norm layer {layer!r}: the spec permutes its entries inconsistently ({moved}); "
                f"its weight, bias, running_mean and running_var belong to one permutation"
            )


def _check_perms(sizes: dict[str, int], perms: Perms) -> None:
    if not isinstance(perms, dict) or set(perms) != set(sizes):
        got = sorted(perms) if isinstance(perms, dict) else type(perms).__name__
        raise UserError(f"perms must have the keys {sorted(sizes)}, got {got}")
    for name, n in sizes.items():
        p = perms[name]
        if not isinstance(p, Tensor) or p.dtype != torch.int64:
            raise TypeError(f"perms[{name!r}] must be an int64 tensor, got {p!r}")
        if p.shape != (n,) or not torch.equal(p.sort().values, torch.arange(n, device=p.device)):
            raise UserError(
                f"perms[{name!r}] must be a permutation of range({n}), got {p.tolist()}"
            )


def permute(
    model: nn.Module,
    perms: Perms,
    *,
    spec: PermutationSpec | None = None,
    probe: Tensor | None = None,
) -> nn.Module:
    """A new model computing the same function, its hidden units reordered by `perms`.

    perms: permutation name -> int64 (n,), new unit j = old unit p[j]. spec: the model's
    symmetry (default `permutation_spec(model)`). The permuted copy is run against the
    original on `probe` (default `probe_input(model)`) in eval mode; outputs that differ by
    more than rounding (10⁴ machine epsilons of the output's scale) raise a ValueError: the
    spec is not a symmetry of this model. The input model is left untouched.

    Shape:
        - perms[name]: (n,) int64, a permutation of range(n), n the units it reorders.
        - probe: a batch the model accepts, e.g. (B, in_features).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from qmse.symmetry import permute
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> twin = permute(model, {"0": torch.tensor([2, 0, 1])})  # hidden layer "0": 3 units
        >>> torch.equal(twin[0].weight, model[0].weight[[2, 0, 1]])  # new unit j = old p[j]
        True
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(twin(x), model(x))  # another point of weight space, same function
        True
    """
    spec = spec if spec is not None else permutation_spec(model)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    sizes = spec.sizes(params)
    _check_perms(sizes, perms)
    _check_norm_layers(model, spec)
    out = copy.deepcopy(model)
    out.load_state_dict(_permuted_params(spec, sizes, params, perms))
    x = probe if probe is not None else probe_input(model)
    with eval_mode(model), eval_mode(out), torch.no_grad():
        want, got = model(x), out(x)
    scale = want.abs().max().clamp_min(1).item()
    err = (got - want).abs().max().item()
    if not err <= 1e4 * torch.finfo(want.dtype).eps * scale:
        raise UserError(
            f"the permuted model's outputs differ from the original's by up to {err:.3g} (output "
            f"scale {scale:.3g}) on a probe input: the PermutationSpec is not a symmetry of this "
            f"model; check which axes each permutation acts on, and the block after a flatten"
        )
    return out


def identity_permutation(model: nn.Module, *, spec: PermutationSpec | None = None) -> Perms:
    """The permutations that leave `model` as it is."""
    spec = spec if spec is not None else permutation_spec(model)
    return {name: torch.arange(n) for name, n in spec.sizes(model.state_dict()).items()}


def random_permutation(
    model: nn.Module, generator: torch.Generator, *, spec: PermutationSpec | None = None
) -> Perms:
    """Independent uniform permutations of every hidden layer, drawn from `generator`."""
    spec = spec if spec is not None else permutation_spec(model)
    sizes = spec.sizes(model.state_dict())
    return {name: torch.randperm(n, generator=generator) for name, n in sizes.items()}


def inverse_permutation(perms: Perms) -> Perms:
    """q with permute(permute(m, perms), q) == m."""
    return {name: torch.argsort(p) for name, p in perms.items()}


def _unit_signatures(
    spec: PermutationSpec, n: int, params: dict[str, Tensor], name: str
) -> list[bytes]:
    """One byte string per unit of permutation `name`: all weights touching that unit."""
    rows = [
        _unit_axis(params[key].detach().cpu().double(), axis % params[key].dim(), n, block).reshape(
            n, -1
        )
        for key, axis, block in spec.axes[name]
    ]
    sig = torch.cat(rows, dim=1)  # (n, all weights of the unit)
    return [row.numpy().tobytes() for row in sig]


def count_equivalent(model: nn.Module, *, spec: PermutationSpec | None = None) -> int:
    """How many distinct weight vectors compute `model`'s function by hidden-unit permutation.

    Counts ∏ₗ nₗ! / ∏ⱼ mⱼ!, where the mⱼ are the sizes of the groups of identical units of a
    layer: units whose incoming weights, bias and outgoing weights are all exactly equal
    (swapping two of them changes no weight). By orbit–stabiliser the orbit size is
    ∏ nₗ! / |stabiliser|, and permutations inside such groups always fix the weights, so this
    is an upper bound; it is exact whenever units with equal incoming weights and bias also have
    equal outgoing weights (then, layer by layer from the input, the stabiliser can move only
    identical units). That holds for generic trained networks (all mⱼ = 1: ∏ nₗ!) and for
    duplicated units. Returned as an exact Python int (it overflows floats for SimpleCNN).

    Shape:
        - Output: a Python int, no tensor (∏ nₗ! overflows float64 for SimpleCNN).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from qmse.symmetry import count_equivalent
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> count_equivalent(model)  # 3 distinct hidden units: 3!
        6
        >>> with torch.no_grad():  # make unit 1 a copy of unit 0: 3! / 2!
        ...     model[0].weight[1], model[0].bias[1] = model[0].weight[0], model[0].bias[0]
        ...     model[2].weight[0, 1] = model[2].weight[0, 0]
        >>> count_equivalent(model)
        3
    """
    spec = spec if spec is not None else permutation_spec(model)
    params = model.state_dict()
    count = 1
    for name, n in spec.sizes(params).items():
        count *= math.factorial(n)
        for m in Counter(_unit_signatures(spec, n, params, name)).values():
            count //= math.factorial(m)
    return count


def weight_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    spec: PermutationSpec | None = None,
    probe: Tensor | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[Perms, nn.Module]:
    """Permute `model_b`'s hidden units to bring its weights closest to `model_a`'s.

    Git Re-Basin's weight matching (Ainsworth et al. 2023, alg. 1): maximise
    Σ_w ⟨W_a, π(W_b)⟩ over the permutations π by coordinate descent. Each step fixes every
    permutation but one, whose objective is then linear, ⟨A, P⟩ with A[i, k] the inner product
    of a's unit i and b's unit k over every weight that permutation touches (the other
    permutations applied); `scipy.optimize.linear_sum_assignment` solves it exactly. Layers
    are visited in a random order (seeded by `seed` and the sweep number) until a full sweep
    improves nothing, or `max_iter` sweeps. Only parameters enter the objective: buffers the
    spec names (a BatchNorm's running statistics) are statistics of the data, not weights, and
    are permuted with their units, as in the original (whose batch statistics are not
    parameters). `spec` (default `permutation_spec(model_a)`) and
    `probe` are those of `permute`. Returns (perms, aligned copy of model_b); neither input is
    changed, and the aligned model computes model_b's function (checked by `permute`).

    Shape:
        - Output perms[name]: (n,) int64, new unit j of the aligned model = model_b's p[j].

    Examples::

        >>> import torch
        >>> from qmse.symmetry import weight_matching, worked_example
        >>> a, b = worked_example()  # two 2-2-1 networks, hidden units swapped
        >>> perms, aligned = weight_matching(a, b)
        >>> perms
        {'layers.0': tensor([1, 0])}
        >>> all(torch.equal(p, q) for p, q in zip(aligned.parameters(), a.parameters()))
        True
    """
    spec = spec if spec is not None else permutation_spec(model_a)
    params_a = {k: v.detach().cpu().double() for k, v in model_a.state_dict().items()}
    params_b = {k: v.detach().cpu().double() for k, v in model_b.state_dict().items()}
    shapes_a = {k: v.shape for k, v in params_a.items()}
    if shapes_a != {k: v.shape for k, v in params_b.items()}:
        raise UserError(
            "model_a and model_b have different architectures (state-dict names or shapes "
            "differ); weight matching needs the same shapes"
        )
    sizes = spec.sizes(params_a)
    weights = {k for k, _ in model_a.named_parameters()}
    for name, params in (("model_a", params_a), ("model_b", params_b)):
        bad = [k for k in weights if not torch.isfinite(params[k]).all()]
        if bad:
            raise UserError(
                f"{name} has non-finite weights ({', '.join(bad[:3])}): a diverged model "
                f"cannot be matched; check its training"
            )
    perms = {name: torch.arange(n) for name, n in sizes.items()}
    names = list(sizes)
    for sweep in range(max_iter):
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed + sweep))
        progress = False
        for name in (names[i] for i in order.tolist()):
            n = sizes[name]
            others = _permuted_params(spec, sizes, params_b, perms, skip=name)
            A = torch.zeros(n, n, dtype=torch.float64)
            for key, axis, block in (t for t in spec.axes[name] if t[0] in weights):
                axis %= params_a[key].dim()
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
    return perms, permute(model_b, perms, spec=spec, probe=probe)


def worked_example(activation: str = "sigmoid") -> tuple[MLP, MLP]:
    """Two 2-2-1 networks (no biases) that differ by a swap of their hidden units, as `MLP`s.

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
