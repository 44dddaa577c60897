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
"""

from __future__ import annotations

import io
import math
import os
import time
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


def parameters_of(model: nn.Module) -> Params:
    """Detached copies of the model's parameters (the model itself is not touched)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


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
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy on data = (x, y) at the P points base + Σₖ coeffs[p, k]·dₖ.

    coeffs: (P, K) for the K `directions`. `criterion`: a deterministic registered loss name
    or a callable (output, target) -> scalar mean loss; a random loss (QMSE's v) has no value
    at a point and is refused with the name of its expectation. Accuracy, only where the
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
    }
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
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """Loss and accuracy on `data` at (1 − α)·θ_a + α·θ_b for `points` values of α evenly in
    [0, 1] (`evaluate_points`); the two models need the same parameter names and shapes.
    Only parameters are blended, so models whose floating-point buffers differ (BatchNorm's
    running statistics) are refused: the path would keep model a's buffers to its end, and
    L(1) would not be model b's loss."""
    if points < 2:
        raise UserError(f"points={points}; need at least 2 to include both ends")
    base, end = parameters_of(model_a), parameters_of(model_b)
    if base.keys() != end.keys() or any(base[k].shape != end[k].shape for k in base):
        raise UserError("model_a and model_b must have the same parameter names and shapes")
    buffers_b = dict(model_b.named_buffers())
    differ = [
        k
        for k, v in model_a.named_buffers()
        if v.is_floating_point() and (k not in buffers_b or not torch.equal(v, buffers_b[k]))
    ]
    if differ:
        raise UserError(
            f"model_a and model_b have different buffers ({', '.join(differ[:3])}): "
            f"interpolating their parameters alone would keep model a's buffers (BatchNorm's "
            f"running statistics) along the whole path; not supported for such models"
        )
    alphas = torch.linspace(0, 1, points, dtype=torch.float64)
    direction = {k: end[k] - base[k] for k in base}
    losses, acc = evaluate_points(model_a, criterion, data, base, [direction], alphas.unsqueeze(1),
                                  group_size=group_size, batch_size=batch_size)  # fmt: skip
    return {"alphas": alphas.numpy(), "loss": losses, "accuracy": acc}


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
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """The straight path a → b before and after permuting b onto a by weight matching.

    `spec`: the models' `PermutationSpec` (default `qmse.symmetry.permutation_spec(model_a)`).
    Returns arrays `alphas`, `naive_loss`, `naive_accuracy`, `aligned_loss`,
    `aligned_accuracy`, the loss barriers `naive_barrier` / `aligned_barrier` (`barrier`) and
    the matching `perms`.
    """
    spec = spec if spec is not None else permutation_spec(model_a)
    perms, aligned = weight_matching(model_a, model_b, spec=spec, seed=seed)
    kw = dict(points=points, group_size=group_size, batch_size=batch_size)
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
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
    compile: bool = False,
    resume_file: str | os.PathLike | None = None,
    quiet: bool = True,
) -> dict[str, np.ndarray]:
    """Loss and accuracy on a 1-D or 2-D grid θ + a·d₁ (+ b·d₂), a, b ∈ [−span, span].

    d₁, d₂ are independent filter-normalised Gaussian directions from
    `torch.Generator().manual_seed(seed)` (`filter_normalized_direction`). Returns `coords`
    (points,) and `loss`, `accuracy` of shape (points,) or (points, points) indexed [a, b].
    `compile`, `resume_file`: see `evaluate_points`.
    """
    if dims not in (1, 2):
        raise UserError(f"dims={dims}; a slice is 1- or 2-dimensional")
    if points < 2 or not 0 < span < math.inf:
        raise UserError(f"need points ≥ 2 and a finite span > 0, got points={points}, span={span}")
    g = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(model, g) for _ in range(dims)]
    coords = torch.linspace(-span, span, points, dtype=torch.float64)
    grid = torch.cartesian_prod(*[coords] * dims).reshape(-1, dims)  # (points**dims, dims)
    losses, acc = evaluate_points(model, criterion, data, parameters_of(model), directions, grid,
                                  group_size=group_size, batch_size=batch_size, compile=compile,
                                  resume_file=resume_file, quiet=quiet)  # fmt: skip
    shape = (points,) * dims
    _check_finite(losses, "the loss on the slice")
    return {"coords": coords.numpy(), "loss": losses.reshape(shape), "accuracy": acc.reshape(shape)}


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
    _save_npz(out / f"landscape-{dims}d.npz", res)
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
