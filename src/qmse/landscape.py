"""Loss landscapes: the straight line between two minima, and slices around one.

Two networks trained from different seeds reach different points of weight space; many of
them are permuted copies of one another (`qmse.symmetry`). The loss along the segment
(1 − α)·θ_a + α·θ_b usually rises above the straight line between its ends (a barrier);
after weight matching it can be much lower, which says the minima differed partly by a
permutation. Slices along filter-normalised random directions (Li et al. 2018, "Visualizing
the Loss Landscape of Neural Nets", sec. 4) show the shape of the basin around one solution.

Everything works on any nn.Module, data (x, y) and criterion: a deterministic registered
loss by name or a callable (output, target) -> scalar mean loss (`qmse.curvature.criterion_fn`).
`match_runs` and `landscape_of_run` are the same tools on `qmse train` run directories.

Every point is a parameter vector θ₀ + Σₖ cₖ dₖ. Points are evaluated in groups: the group's
parameters are stacked on a leading axis and the model is run once per data batch with
`torch.func.vmap` over `torch.func.functional_call`, not one model at a time in Python.

Buffers. A network's floating-point buffers (BatchNorm's running mean and variance) are part
of its function in eval mode, so every path and slice says what they are at each point
(`buffers`, recorded in every result): "recompute" sets the running statistics of every
BatchNorm (any norm layer with `track_running_stats`) at each point to those of given inputs,
as "reset BN stats" / REPAIR does (Jordan et al. 2022; `recompute_statistics`), the default
for a model that has them; "blend" moves every floating buffer along the path like a
parameter ((1 − α)·β_a + α·β_b on a path; a slice's directions are zero on buffers, so the
model keeps its own). Without either, an interpolation would keep model a's statistics to
its end and L(1) would not be model b's loss.
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from qmse import landscapeplot
from qmse.curvature import Criterion, criterion_fn, criterion_name, eval_mode
from qmse.errors import UserError
from qmse.rundir import load_run, prepare_data
from qmse.runs import atomic_write, claim, progress, provenance, save_figure, save_json
from qmse.symmetry import PermutationSpec, count_equivalent, permutation_spec, weight_matching

Params = dict[str, Tensor]
# Points × samples per vmapped pass: 200 keeps SimpleCNN(32, 64)'s largest activation (conv1's
# output, 100 kB per point-sample) near 20 MB, under glibc's 32 MB mmap threshold, so buffers
# are reused rather than mapped and page-faulted afresh on every pass (measured: larger passes
# spent as much time in the kernel as in the convolutions).
GROUP_SIZE = 5
BATCH_SIZE = 40
BUFFER_MODES = ("recompute", "blend")
Inputs = Tensor | Iterable  # one batch of inputs, or batches (x or (x, y) each), e.g. a DataLoader


def parameters_of(model: nn.Module) -> Params:
    """Detached copies of the model's parameters (the model itself is not touched)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def state_of(model: nn.Module) -> Params:
    """Detached copies of the model's parameters and floating-point buffers: everything a
    point of a path or slice sets (integer buffers, like BatchNorm's batch counter, are left
    to the model)."""
    buffers = {k: v.detach().clone() for k, v in model.named_buffers() if v.is_floating_point()}
    return {**parameters_of(model), **buffers}


def norm_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose running statistics `recompute` sets: every BatchNorm (1-, 2-
    or 3-D, SyncBatchNorm) and InstanceNorm that tracks running statistics."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


def _entry(layer: str, buffer: str) -> str:
    return f"{layer}.{buffer}" if layer else buffer


def _statistics_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode but for its norm layers, which are in train mode with
    momentum None: a forward pass then accumulates their running statistics as a plain average
    over batches (`torch.optim.swa_utils.update_bn`), and Dropout stays off."""
    twin = copy.deepcopy(model).eval()
    for name in norm_layers(twin):
        layer = twin.get_submodule(name)
        layer.train()
        layer.momentum = None
    return twin


def _statistics_at(twin: nn.Module, state: Params, batches: list[Tensor]) -> Params:
    """The running means and variances of `twin`'s norm layers at the point `state`,
    recomputed on `batches`: every layer sees its inputs with the layers before it already
    recomputed (normalised by each batch's own statistics, as in training), and its running
    mean and unbiased variance are the averages over the batches of theirs."""
    fresh = {}
    for name in norm_layers(twin):
        layer = twin.get_submodule(name)
        fresh[_entry(name, "running_mean")] = torch.zeros_like(layer.running_mean)
        fresh[_entry(name, "running_var")] = torch.ones_like(layer.running_var)
        fresh[_entry(name, "num_batches_tracked")] = torch.zeros_like(layer.num_batches_tracked)
    with torch.no_grad():
        for xb in batches:
            functional_call(twin, {**state, **fresh}, (xb,))  # updates `fresh` in place
    return {k: v for k, v in fresh.items() if v.is_floating_point()}


def _input_batches(inputs: Inputs) -> list[Tensor]:
    """`inputs` as a list of input batches: a tensor is one batch; an iterable yields batches,
    each x or (x, y, …) (a DataLoader)."""
    if isinstance(inputs, Tensor):
        batches = [inputs]
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in inputs]
    if not batches or any(not isinstance(b, Tensor) or b.size(0) == 0 for b in batches):
        raise UserError(
            "bn_data must be a non-empty batch of inputs or an iterable of them (x or (x, y) "
            "each, like a DataLoader)"
        )
    return batches


def recompute_statistics(model: nn.Module, inputs: Inputs) -> nn.Module:
    """A copy of `model` whose norm layers' running statistics are those of `inputs` ("reset
    BN stats"; see `_statistics_at` for the averaging over batches): what "recompute" puts at
    every point of a path, here for one model. `model` is not changed; the copy keeps its
    training flags."""
    if not norm_layers(model):
        raise UserError("the model has no norm layer with running statistics to recompute")
    stats = _statistics_at(_statistics_twin(model), state_of(model), _input_batches(inputs))
    out = copy.deepcopy(model)
    with torch.no_grad():
        for k, v in stats.items():
            out.get_buffer(k).copy_(v)
    return out


def resolve_buffers(model: nn.Module, buffers: str | None, bn_data: Inputs | None) -> str:
    """The buffer mode of a path or slice: `buffers` checked, or for None "recompute" if the
    model has running statistics (`norm_layers`) and "blend" if not."""
    mode = buffers if buffers is not None else ("recompute" if norm_layers(model) else "blend")
    if mode not in BUFFER_MODES:
        raise UserError(f"buffers={buffers!r}; expected one of {BUFFER_MODES} or None")
    if mode == "recompute" and not norm_layers(model):
        raise UserError(
            "buffers='recompute', but the model has no norm layer with running statistics "
            "(BatchNorm, InstanceNorm with track_running_stats); use buffers='blend'"
        )
    if mode == "blend" and bn_data is not None:
        raise UserError("bn_data is used only with buffers='recompute'; drop it or switch")
    return mode


def _check_buffers(model_a: nn.Module, model_b: nn.Module, mode: str) -> None:
    """Refuse the buffers that `mode` cannot carry from a to b: a buffer only one model has,
    an integer buffer that differs (it can be neither blended nor recomputed; norm layers'
    batch counters, unused in eval mode, excepted), and with "recompute" a floating buffer
    that differs and is not a running statistic."""
    stats = {_entry(n, b) for n in norm_layers(model_a) for b in ("running_mean", "running_var")}
    counters = {_entry(n, "num_batches_tracked") for n in norm_layers(model_a)}
    buffers_b = dict(model_b.named_buffers())
    if set(buffers_b) != {k for k, _ in model_a.named_buffers()}:
        raise UserError("model_a and model_b must have the same buffers (names and shapes)")
    for k, v in model_a.named_buffers():
        w = buffers_b[k]
        if w.shape != v.shape:
            raise UserError(f"buffer {k!r} is {tuple(v.shape)} in model_a, {tuple(w.shape)} in b")
        if k in stats or k in counters or torch.equal(v, w):
            continue
        if not v.is_floating_point():
            raise UserError(
                f"buffer {k!r} ({v.dtype}) differs between the models: an integer buffer can be "
                f"neither blended nor recomputed along a path; make it equal in both models"
            )
        if mode == "recompute":
            raise UserError(
                f"buffer {k!r} differs between the models and is not a norm layer's running "
                f"statistic, so buffers='recompute' cannot set it; pass buffers='blend' to move "
                f"every buffer along the path like a parameter"
            )


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> Params:
    """A Gaussian direction with each filter rescaled to the norm of the model's filter.

    Li et al. (2018) eq. 1: d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ_{i,j}‖ for every filter j (a conv
    output channel, a row of a Linear weight), so a step of 1 along d moves each filter by its
    own size and plots of networks with different weight scales are comparable. Biases (1-D
    parameters) get a zero direction, as in their code's `ignore="biasbn"`.
    """
    direction = {}
    for name, w in parameters_of(model).items():
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)  # (filters,)
        w_norm = w.flatten(1).norm(dim=1)  # (filters,)
        direction[name] = d * (w_norm / d_norm).reshape(-1, *[1] * (w.dim() - 1))
    return direction


def _fingerprint(base: Params, directions: list[Params]) -> float:
    """A number that changes when the base point or a direction does (to validate a resume)."""
    return float(
        sum(
            (v.double() ** 2).sum() + v.double().sum()
            for p in [base, *directions]
            for v in p.values()
        )
    )


def _save_npz(path: str | os.PathLike, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _class_labels(y: Tensor, out: Tensor) -> Tensor | None:
    """The class indices to score accuracy against, where the targets are class indices:
    int targets shaped like the output `out` (of the first samples) without its last, class
    dimension ((N,) for (N, C), (N, T) for (N, T, C)), or float targets of the output's
    shape that are exactly one-hot; else None (regression targets, (N,) logits: accuracy is
    then NaN, never the argmax of numbers that are not classes)."""
    if out.dim() < 2:
        return None
    if not y.is_floating_point():
        return y if y.shape[1:] == out.shape[1:-1] else None
    if y.shape[1:] != out.shape[1:]:
        return None
    one_hot = bool(((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all())
    return y.argmax(-1) if one_hot else None


def evaluate_points(
    model: nn.Module,
    criterion: Criterion,
    data: tuple[Tensor, Tensor],
    base: Params,
    directions: list[Params],
    coeffs: Tensor,
    *,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
    compile: bool = False,
    resume_file: str | os.PathLike | None = None,
    quiet: bool = True,
    statistics: list[Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy on data = (x, y) at the P points base + Σₖ coeffs[p, k]·dₖ.

    coeffs: (P, K) for the K `directions`. base and directions hold parameters and any
    floating buffers (`state_of`); entries they lack are the model's own. `statistics`: input
    batches on which the running statistics of the norm layers are recomputed at every point
    (`_statistics_at`, one pass over them per point), replacing those of base and directions.
    `criterion`: a deterministic registered loss name or a callable (output, target) ->
    scalar mean loss; a random loss (QMSE's v) has no value at a point and is refused with
    the name of its expectation. Accuracy, only where the
    targets are class indices (`_class_labels`: int (N,) for (N, C) outputs, (N, T) for
    (N, T, C), or exactly one-hot floats), is the share of argmax hits over all positions;
    NaN for other targets. `group_size` points × `batch_size` samples go through one vmapped
    forward pass in eval mode (memory grows with their product). `compile` runs that pass through
    `torch.compile` (15-30 s once, then about 2.4× less CPU time for SimpleCNN(32, 64); a new
    group or batch shape compiles again). `resume_file`: the sums so far are saved there
    atomically after every group and picked up by a later call with the same points, data
    and criterion. Returns two float64 arrays (P,).
    """
    crit = criterion_fn(criterion)
    x, y = data
    if coeffs.dim() != 2 or coeffs.size(1) != len(directions):
        raise UserError(
            f"coeffs must be (P, {len(directions)}) for {len(directions)} directions, got "
            f"{tuple(coeffs.shape)}"
        )
    if x.size(0) != y.size(0) or x.size(0) == 0:
        raise UserError(f"x and y must hold the same N ≥ 1 samples, got {len(x)} and {len(y)}")
    if group_size < 1 or batch_size < 1:
        raise UserError(f"group_size and batch_size must be ≥ 1, got {group_size}, {batch_size}")
    stacked = {k: torch.stack([d[k] for d in directions]) for k in base}  # (K, *shape) each
    twin = _statistics_twin(model) if statistics is not None else None
    coeffs = coeffs.to(device=x.device, dtype=next(iter(base.values())).dtype)

    def forward(params: Params, xb: Tensor) -> Tensor:
        return functional_call(model, params, (xb,))

    with eval_mode(model), torch.no_grad():
        labels = _class_labels(y, forward(base, x[:1]))  # (N, *) or None
    batched = vmap(forward, in_dims=(0, None))  # (G, B, C) outputs for G parameter sets
    if compile:
        batched = torch.compile(batched)
    P, N = coeffs.size(0), x.size(0)
    key = {
        "coeffs": coeffs.cpu().numpy(),
        "samples": N,
        "criterion": criterion_name(criterion),
        "fingerprint": _fingerprint(base, directions),
        "statistics": -1.0 if statistics is None else sum(float(b.double().square().sum())
                                                          for b in statistics),
    }  # fmt: skip
    total_loss, correct, done = np.zeros(P), np.zeros(P), 0
    if resume_file is not None and Path(resume_file).exists():
        saved = np.load(resume_file)
        same = set(key) <= set(saved.files) and saved["coeffs"].shape == key["coeffs"].shape
        if not (same and all(np.array_equal(saved[k], v) for k, v in key.items())):
            raise UserError(
                f"resume_file {resume_file} holds a different evaluation (points, data, "
                f"criterion or directions differ); delete it to start afresh"
            )
        total_loss, correct, done = saved["loss_sum"], saved["correct"], int(saved["done"])
    groups = range(done, P, group_size)
    with eval_mode(model), torch.no_grad():
        for start in progress(groups, quiet=quiet, desc="points", unit="group"):
            c = coeffs[start : start + group_size]  # (G, K)
            params = {
                k: base[k] + torch.tensordot(c, stacked[k], dims=1) for k in base
            }  # (G, *shape) each
            G = c.size(0)
            if twin is not None:
                stats = [_statistics_at(twin, {k: v[g] for k, v in params.items()}, statistics)
                         for g in range(G)]  # fmt: skip
                params.update({k: torch.stack([s[k] for s in stats]) for k in stats[0]})
            for b in range(0, N, batch_size):
                xb, yb = x[b : b + batch_size], y[b : b + batch_size]
                out = batched(params, xb)  # (G, B, C)
                means = torch.stack([crit(o, yb) for o in out])  # (G,) mean loss per point
                total_loss[start : start + G] += xb.size(0) * means.double().cpu().numpy()
                if labels is not None:
                    hits = out.argmax(-1) == labels[b : b + batch_size]  # (G, B, *)
                    correct[start : start + G] += hits.flatten(1).sum(1).double().cpu().numpy()
            if resume_file is not None:
                _save_npz(resume_file, {**key, "loss_sum": total_loss, "correct": correct,
                                        "done": start + G})  # fmt: skip
    accuracy = correct / labels.numel() if labels is not None else np.full(P, np.nan)
    return total_loss / N, accuracy


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    criterion: Criterion,
    data: tuple[Tensor, Tensor],
    *,
    points: int = 25,
    buffers: str | None = None,
    bn_data: Inputs | None = None,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """Loss and accuracy on `data` at (1 − α)·θ_a + α·θ_b for `points` values of α evenly in
    [0, 1] (`evaluate_points`); the two models need the same parameter and buffer names and
    shapes.

    buffers (module docstring, "Buffers"): "recompute" (the default for a model with running
    statistics) sets the norm layers' statistics at every α to those of `bn_data` (default:
    the inputs of `data`, as one batch), so the ends are a and b with statistics of those
    inputs: exactly a and b when theirs were computed on them (`recompute_statistics`).
    "blend" (the default otherwise) blends every floating buffer like the parameters, so the
    ends are a and b as they are. Buffers a mode cannot carry are refused (`_check_buffers`).
    Returns `alphas`, `loss`, `accuracy` (float64 arrays) and `buffers` (the mode used).
    """
    if points < 2:
        raise UserError(f"points={points}; need at least 2 to include both ends")
    mode = resolve_buffers(model_a, buffers, bn_data)
    base, end = state_of(model_a), state_of(model_b)
    if base.keys() != end.keys() or any(base[k].shape != end[k].shape for k in base):
        raise UserError("model_a and model_b must have the same parameter names and shapes")
    _check_buffers(model_a, model_b, mode)
    statistics = None
    if mode == "recompute":
        statistics = _input_batches(data[0] if bn_data is None else bn_data)
    alphas = torch.linspace(0, 1, points, dtype=torch.float64)
    direction = {k: end[k] - base[k] for k in base}
    losses, acc = evaluate_points(model_a, criterion, data, base, [direction], alphas.unsqueeze(1),
                                  group_size=group_size, batch_size=batch_size,
                                  statistics=statistics)  # fmt: skip
    return {"alphas": alphas.numpy(), "loss": losses, "accuracy": acc, "buffers": mode}


def barrier(values: np.ndarray) -> float:
    """The loss barrier of a path evaluated at α evenly spaced in [0, 1], both ends included:
    max over α of L(α) − ((1 − α)·L(0) + α·L(1)), the height above the straight line between
    the ends (Frankle et al. 2020; Entezari et al. 2022; Ainsworth et al. 2023, "Git
    Re-Basin"). 0 for a path that never rises above that line (the ends count); on the grid,
    so a bump between grid points is underestimated. For accuracy, barrier(−accuracy) is the
    largest drop below the line between the ends' accuracies."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise UserError(f"values must be a path of ≥ 2 points, got shape {values.shape}")
    alphas = np.linspace(0.0, 1.0, values.size)
    chord = (1 - alphas) * values[0] + alphas * values[-1]
    return float(np.max(values - chord))


def interpolation_barriers(
    model_a: nn.Module,
    model_b: nn.Module,
    criterion: Criterion,
    data: tuple[Tensor, Tensor],
    *,
    spec: PermutationSpec | None = None,
    points: int = 25,
    seed: int = 0,
    buffers: str | None = None,
    bn_data: Inputs | None = None,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """The straight path a → b before and after permuting b onto a by weight matching.

    `spec`: the models' `PermutationSpec` (default `qmse.symmetry.permutation_spec(model_a)`).
    `buffers`, `bn_data`: see `interpolate` (the matching permutes b's buffers with its units).
    Returns arrays `alphas`, `naive_loss`, `naive_accuracy`, `aligned_loss`,
    `aligned_accuracy`, the loss barriers `naive_barrier` / `aligned_barrier` (`barrier`),
    the matching `perms` and the buffer mode `buffers`.
    """
    spec = spec if spec is not None else permutation_spec(model_a)
    perms, aligned = weight_matching(model_a, model_b, spec=spec, seed=seed)
    kw = dict(points=points, buffers=buffers, bn_data=bn_data, group_size=group_size,
              batch_size=batch_size)  # fmt: skip
    naive = interpolate(model_a, model_b, criterion, data, **kw)
    matched = interpolate(model_a, aligned, criterion, data, **kw)
    return {
        "alphas": naive["alphas"],
        "naive_loss": naive["loss"],
        "naive_accuracy": naive["accuracy"],
        "aligned_loss": matched["loss"],
        "aligned_accuracy": matched["accuracy"],
        "naive_barrier": barrier(naive["loss"]),
        "aligned_barrier": barrier(matched["loss"]),
        "perms": perms,
        "buffers": naive["buffers"],
    }


def random_slice(
    model: nn.Module,
    criterion: Criterion,
    data: tuple[Tensor, Tensor],
    *,
    dims: int = 2,
    points: int = 25,
    span: float = 1.0,
    seed: int = 0,
    buffers: str | None = None,
    bn_data: Inputs | None = None,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
    compile: bool = False,
    resume_file: str | os.PathLike | None = None,
    quiet: bool = True,
) -> dict:
    """Loss and accuracy on a 1-D or 2-D grid θ + a·d₁ (+ b·d₂), a, b ∈ [−span, span].

    d₁, d₂ are independent filter-normalised Gaussian directions from
    `torch.Generator().manual_seed(seed)` (`filter_normalized_direction`), zero on buffers.
    `buffers`: "recompute" (the default for a model with running statistics) sets them at
    every point to those of `bn_data` (default: the inputs of `data`, as one batch); "blend"
    keeps the model's own. Returns `coords` (points,), `loss`, `accuracy` of shape (points,)
    or (points, points) indexed [a, b], and `buffers` (the mode used). `compile`,
    `resume_file`: see `evaluate_points`.
    """
    if dims not in (1, 2):
        raise UserError(f"dims={dims}; a slice is 1- or 2-dimensional")
    if points < 2 or not 0 < span < math.inf:
        raise UserError(f"need points ≥ 2 and a finite span > 0, got points={points}, span={span}")
    mode = resolve_buffers(model, buffers, bn_data)
    statistics = None
    if mode == "recompute":
        statistics = _input_batches(data[0] if bn_data is None else bn_data)
    g = torch.Generator().manual_seed(seed)
    base = state_of(model)
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    directions = [{**zero, **filter_normalized_direction(model, g)} for _ in range(dims)]
    coords = torch.linspace(-span, span, points, dtype=torch.float64)
    grid = torch.cartesian_prod(*[coords] * dims).reshape(-1, dims)  # (points**dims, dims)
    losses, acc = evaluate_points(model, criterion, data, base, directions, grid,
                                  group_size=group_size, batch_size=batch_size, compile=compile,
                                  resume_file=resume_file, quiet=quiet,
                                  statistics=statistics)  # fmt: skip
    shape = (points,) * dims
    _check_finite(losses, "the loss on the slice")
    return {"coords": coords.numpy(), "loss": losses.reshape(shape),
            "accuracy": acc.reshape(shape), "buffers": mode}  # fmt: skip


def _check_finite(values: np.ndarray, what: str) -> None:
    """A non-finite value is an error, never a figure."""
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise UserError(
            f"{what} is not finite at {bad} of {values.size} points (the model overflows "
            f"there): use a smaller span, or check the run"
        )


def _training_sample(config: dict, samples: int, device: torch.device | str):
    """The first `samples` training images and labels of a run's data (as it saw them)."""
    if samples < 1:
        raise UserError(f"samples={samples}; need at least one training sample")
    data = prepare_data(config, device)
    return data.x_train[:samples], data.y_train[:samples]


def _older(directory: Path) -> bool:
    """A directory written by match_runs or landscape_of_run before directories recorded
    their kind: it holds their summary.json (or run folders that do)."""
    return (directory / "summary.json").exists() or any(directory.glob("*/summary.json"))


def _short(run_dir: str | os.PathLike) -> str:
    """A run's folder and its parent, e.g. "diagnose-fmnist/mse", for figure titles."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}"


def match_runs(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    out: str | os.PathLike,
    *,
    points: int = 25,
    samples: int = 1000,
    loss: str = "mse",
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Barrier on the straight path between two trained runs, before and after weight matching.

    Loads both runs (`qmse.rundir.load_run`), evaluates the deterministic registered `loss`
    on the first `samples` training images of run_a's data, and writes to `out`:
    interpolation.npz (the arrays), interpolation.png, summary.json (barriers, accuracy
    drops below the line between the ends, end points, the number of permuted copies of
    model a, config and provenance). Returns the summary.
    """
    model_a, config_a = load_run(run_a, device)
    model_b, config_b = load_run(run_b, device)
    if config_a["dataset"] != config_b["dataset"]:
        raise UserError(
            f"run_a was trained on {config_a['dataset']} and run_b on {config_b['dataset']}; "
            f"matching compares two runs of the same data set"
        )
    x, y = _training_sample(config_a, samples, device)
    with claim(out, "weight-matching", recognise=_older):
        return _match_runs(run_a, run_b, Path(out), model_a, model_b, config_a, config_b,
                           loss, (x, y), points, seed, device)  # fmt: skip


def _match_runs(run_a, run_b, out, model_a, model_b, config_a, config_b, loss, data, points,
                seed, device) -> dict:  # fmt: skip
    """match_runs's work once `out` is claimed."""
    x, _ = data
    start, cpu = time.perf_counter(), time.process_time()
    res = interpolation_barriers(model_a, model_b, loss, data, points=points, seed=seed)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for path in ("naive", "aligned"):
        _check_finite(res[f"{path}_loss"], f"the loss along the {path} path")
    _save_npz(
        out / "interpolation.npz", {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
    )
    summary = {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "loss": loss,
        "samples": int(x.size(0)),
        "points": points,
        "seed": seed,
        "buffers": res["buffers"],
        "naive_barrier": res["naive_barrier"],
        "aligned_barrier": res["aligned_barrier"],
        "naive_max_accuracy_drop": barrier(-res["naive_accuracy"]),
        "aligned_max_accuracy_drop": barrier(-res["aligned_accuracy"]),
        **{
            f"end_{e}": {
                "loss": res["naive_loss"][i].item(),
                "accuracy": res["naive_accuracy"][i].item(),
            }
            for e, i in (("a", 0), ("b", -1))
        },
        "units_moved": {k: int((p != torch.arange(len(p))).sum()) for k, p in res["perms"].items()},
        "equivalent_copies_of_a_log10": math.log10(count_equivalent(model_a)),
        "wall_s": wall,
        "cpu_s": cpu,
        "config_a": config_a,
        "config_b": config_b,
        "provenance": provenance(device),
    }
    save_json(out / "summary.json", summary)
    title = f"{_short(run_a)} → {_short(run_b)} ({loss}, {x.size(0)} training samples)"
    save_figure(out / "interpolation.png", landscapeplot.plot_interpolation(res, title=title))
    return summary


def landscape_of_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dims: int = 2,
    points: int = 25,
    span: float = 1.0,
    samples: int = 1000,
    loss: str = "mse",
    seed: int = 0,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
    compile: bool = False,
    device: str = "cpu",
    quiet: bool = False,
) -> dict:
    """A 1-D or 2-D filter-normalised slice around a trained run (`random_slice`), saved.

    Writes to `out`: landscape-{dims}d.npz (coords, loss, accuracy), landscape-{dims}d.png and
    summary.json (settings, the evaluation's wall time, config, provenance). Returns the summary.
    Resumable: partial sums live in `out`/partial-{dims}d.npz until the slice is complete.
    """
    model, config = load_run(run_dir, device)
    x, y = _training_sample(config, samples, device)
    with claim(out, "landscape", recognise=_older):
        return _landscape_of_run(
            run_dir, Path(out), model, config, (x, y), dims, points, span, loss, seed,
            group_size, batch_size, compile, device, quiet,
        )  # fmt: skip


def _landscape_of_run(run_dir, out, model, config, data, dims, points, span, loss, seed,
                      group_size, batch_size, compile, device, quiet) -> dict:  # fmt: skip
    """landscape_of_run's work once `out` is claimed."""
    x, y = data
    partial = out / f"partial-{dims}d.npz"
    start, cpu = time.perf_counter(), time.process_time()
    res = random_slice(model, loss, (x, y), dims=dims, points=points, span=span, seed=seed,
                       group_size=group_size, batch_size=batch_size, compile=compile,
                       resume_file=partial, quiet=quiet)  # fmt: skip
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    _save_npz(out / f"landscape-{dims}d.npz", {k: v for k, v in res.items() if k != "buffers"})
    partial.unlink(missing_ok=True)
    centre = res["loss"][(points // 2,) * dims] if points % 2 else None
    summary = {
        "run": str(run_dir),
        "dims": dims,
        "points": points,
        "span": span,
        "samples": int(x.size(0)),
        "loss": loss,
        "seed": seed,
        "buffers": res["buffers"],
        "group_size": group_size,
        "batch_size": batch_size,
        "evaluations": points**dims,
        "compile": compile,
        "wall_s": wall,  # this call's evaluation (after a resume: only the remaining points)
        "cpu_s": cpu,  # CPU time of the process (all threads, user + system) in that time
        "torch_threads": torch.get_num_threads(),
        "centre_loss": None if centre is None else float(centre),
        "min_loss": float(res["loss"].min()),
        "max_loss": float(res["loss"].max()),
        "config": config,
        "provenance": provenance(device),
    }
    save_json(out / "summary.json", summary)
    title = f"{_short(run_dir)}: {config['loss']}-trained, {loss} on {x.size(0)} training samples"
    figure = landscapeplot.plot_slices({_short(run_dir): res}, title=title)
    save_figure(out / f"landscape-{dims}d.png", figure)
    return summary


def landscapes_of_runs(
    run_dirs: list[str | os.PathLike], out: str | os.PathLike, **options
) -> list[dict]:
    """`landscape_of_run` for each run (same directions seed, so the same Gaussian draw),
    into `out`/<run folder name>, then `out`/landscape-{dims}d.png: all slices on one scale
    with one colour bar (`plot_slices`). `options` go to `landscape_of_run`. Returns the
    summaries."""
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) != len(names):
        raise UserError(f"run folders {names} share a name; give runs distinct folder names")
    out = Path(out)
    with claim(out, "landscape", recognise=_older):
        return _landscapes_of_runs(run_dirs, names, out, options)


def _landscapes_of_runs(run_dirs, names, out: Path, options: dict) -> list[dict]:
    """landscapes_of_runs's work once `out` is claimed."""
    summaries = [landscape_of_run(r, out / n, **options) for r, n in zip(run_dirs, names)]
    dims = summaries[0]["dims"]
    results = {}
    for r, n, s in zip(run_dirs, names, summaries):
        with np.load(out / n / f"landscape-{dims}d.npz") as saved:
            results[f"{_short(r)} ({s['config']['loss']}-trained)"] = dict(saved)
    s = summaries[0]
    title = f"{s['loss']} on {s['samples']} training samples, directions seed {s['seed']}"
    save_figure(out / f"landscape-{dims}d.png", landscapeplot.plot_slices(results, title=title))
    return summaries
