"""Loss landscapes: the straight line between two minima, and slices around one.

Two networks trained from different seeds reach different points of weight space; many of
them are permuted copies of one another (`qmse.symmetry`). The loss along the segment
(1 − α)·θ_a + α·θ_b usually rises in the middle (a barrier); after weight matching it can
be much lower, which says the minima differed partly by a permutation. Slices along
filter-normalised random directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets", sec. 4) show the shape of the basin around one solution: an MSE one against a QMSE one.

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

from qmse.loss import compute_loss
from qmse.runs import atomic_write, progress
from qmse.symmetry import weight_matching

Params = dict[str, Tensor]
LANDSCAPE_LOSSES = ("mse", "expected-qmse", "ce")
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


def evaluate_points(
    model: nn.Module,
    base: Params,
    directions: list[Params],
    coeffs: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    loss: str = "mse",
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
    compile: bool = False,
    resume_file: str | os.PathLike | None = None,
    quiet: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and accuracy on (x, y) at the P points base + Σₖ coeffs[p, k]·directions[k].

    coeffs: (P, K). y: int64 class indices (N,) or targets (N, C); accuracy compares argmaxes.
    `loss` must be deterministic ("mse" = ½‖r‖² of eq. 3, "expected-qmse", "ce"): QMSE itself
    draws a random v per sample, so its value at a point is not a landscape. `group_size`
    points × `batch_size` samples go through one vmapped forward pass (memory grows with
    their product). `compile` runs that pass through `torch.compile` (15-30 s once, then about
    2.4× less CPU time for SimpleCNN(32, 64); a new group or batch shape compiles again).
    `resume_file`: the sums so far are saved there atomically after every group and picked up
    by a later call with the same points, data and loss. Returns two float64 arrays (P,).
    """
    if loss not in LANDSCAPE_LOSSES:
        raise ValueError(
            f"loss={loss!r}; a landscape needs a deterministic loss, one of {LANDSCAPE_LOSSES} "
            f"(for QMSE use 'expected-qmse', its average over v)"
        )
    if coeffs.dim() != 2 or coeffs.size(1) != len(directions):
        raise ValueError(
            f"coeffs must be (P, {len(directions)}) for {len(directions)} directions, got "
            f"{tuple(coeffs.shape)}"
        )
    if x.size(0) != y.size(0) or x.size(0) == 0:
        raise ValueError(f"x and y must hold the same N ≥ 1 samples, got {len(x)} and {len(y)}")
    if group_size < 1 or batch_size < 1:
        raise ValueError(f"group_size and batch_size must be ≥ 1, got {group_size}, {batch_size}")
    labels = y if not y.is_floating_point() else y.argmax(-1)  # (N,)
    stacked = {k: torch.stack([d[k] for d in directions]) for k in base}  # (K, *shape) each
    coeffs = coeffs.to(device=x.device, dtype=next(iter(base.values())).dtype)

    def forward(params: Params, xb: Tensor) -> Tensor:
        return functional_call(model, params, (xb,))

    batched = vmap(forward, in_dims=(0, None))  # (G, B, C) outputs for G parameter sets
    if compile:
        batched = torch.compile(batched)
    P, N = coeffs.size(0), x.size(0)
    key = {
        "coeffs": coeffs.cpu().numpy(),
        "samples": N,
        "loss_name": loss,
        "fingerprint": _fingerprint(base, directions),
    }
    total_loss, correct, done = np.zeros(P), np.zeros(P), 0
    if resume_file is not None and Path(resume_file).exists():
        saved = np.load(resume_file)
        same = saved["coeffs"].shape == key["coeffs"].shape and all(
            np.array_equal(saved[k], v) for k, v in key.items()
        )
        if not same:
            raise ValueError(
                f"resume_file {resume_file} holds a different evaluation (points, data, loss "
                f"or directions differ); delete it to start afresh"
            )
        total_loss, correct, done = saved["loss_sum"], saved["correct"], int(saved["done"])
    groups = range(done, P, group_size)
    with torch.no_grad():
        for start in progress(groups, quiet=quiet, desc="points", unit="group"):
            c = coeffs[start : start + group_size]  # (G, K)
            params = {
                k: base[k] + torch.tensordot(c, stacked[k], dims=1) for k in base
            }  # (G, *shape) each
            G = c.size(0)
            for b in range(0, N, batch_size):
                xb, yb, lb = (
                    x[b : b + batch_size],
                    y[b : b + batch_size],
                    labels[b : b + batch_size],
                )
                out = batched(params, xb)  # (G, B, C)
                B, C = out.shape[1:]
                target = yb.unsqueeze(0).expand(G, *yb.shape).reshape(G * B, *yb.shape[1:])
                per_sample = compute_loss(loss, out.reshape(G * B, C), target, reduction="none")
                total_loss[start : start + G] += (
                    per_sample.reshape(G, B).sum(1).double().cpu().numpy()
                )
                correct[start : start + G] += (out.argmax(-1) == lb).sum(1).double().cpu().numpy()
            if resume_file is not None:
                buf = io.BytesIO()
                np.savez(buf, **key, loss_sum=total_loss, correct=correct, done=start + G)
                atomic_write(resume_file, buf.getvalue())
    return total_loss / N, correct / N


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    points: int = 25,
    loss: str = "mse",
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """Loss and accuracy at (1 − α)·θ_a + α·θ_b for `points` values of α evenly in [0, 1]."""
    if points < 2:
        raise ValueError(f"points={points}; need at least 2 to include both ends")
    base, end = parameters_of(model_a), parameters_of(model_b)
    if base.keys() != end.keys() or any(base[k].shape != end[k].shape for k in base):
        raise ValueError("model_a and model_b must have the same parameter names and shapes")
    alphas = torch.linspace(0, 1, points, dtype=torch.float64)
    losses, acc = evaluate_points(
        model_a,
        base,
        [{k: end[k] - base[k] for k in base}],
        alphas.unsqueeze(1),
        x,
        y,
        loss=loss,
        group_size=group_size,
        batch_size=batch_size,
    )
    return {"alphas": alphas.numpy(), "loss": losses, "accuracy": acc}


def barrier(values: np.ndarray) -> float:
    """Height of the path above its ends: max along the path − mean of the two ends."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.max() - 0.5 * (values[0] + values[-1]))


def interpolation_barriers(
    model_a: nn.Module,
    model_b: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    points: int = 25,
    loss: str = "mse",
    seed: int = 0,
    group_size: int = GROUP_SIZE,
    batch_size: int = BATCH_SIZE,
) -> dict:
    """The straight path a → b before and after permuting b onto a by weight matching.

    Returns arrays `alphas`, `naive_loss`, `naive_accuracy`, `aligned_loss`,
    `aligned_accuracy`, the loss barriers `naive_barrier` / `aligned_barrier` (max − mean of
    ends) and the matching `perms`.
    """
    perms, aligned = weight_matching(model_a, model_b, seed=seed)
    kw = dict(points=points, loss=loss, group_size=group_size, batch_size=batch_size)
    naive = interpolate(model_a, model_b, x, y, **kw)
    matched = interpolate(model_a, aligned, x, y, **kw)
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
    x: Tensor,
    y: Tensor,
    *,
    dims: int = 2,
    points: int = 25,
    span: float = 1.0,
    seed: int = 0,
    loss: str = "mse",
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
        raise ValueError(f"dims={dims}; a slice is 1- or 2-dimensional")
    if points < 2 or span <= 0:
        raise ValueError(f"need points ≥ 2 and span > 0, got points={points}, span={span}")
    g = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(model, g) for _ in range(dims)]
    coords = torch.linspace(-span, span, points, dtype=torch.float64)
    grid = torch.cartesian_prod(*[coords] * dims).reshape(-1, dims)  # (points**dims, dims)
    losses, acc = evaluate_points(
        model,
        parameters_of(model),
        directions,
        grid,
        x,
        y,
        loss=loss,
        group_size=group_size,
        batch_size=batch_size,
        compile=compile,
        resume_file=resume_file,
        quiet=quiet,
    )
    shape = (points,) * dims
    return {"coords": coords.numpy(), "loss": losses.reshape(shape), "accuracy": acc.reshape(shape)}


def plot_interpolation(result: dict, path: str | os.PathLike, title: str = "") -> None:
    """Loss and accuracy along the path a → b, before and after weight matching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    a = result["alphas"]
    for kind, style in (("naive", "-o"), ("aligned", "-s")):
        label = f"{kind} (barrier {result[f'{kind}_barrier']:.4f})"
        ax_l.plot(a, result[f"{kind}_loss"], style, ms=3, label=label)
        ax_a.plot(a, 100 * result[f"{kind}_accuracy"], style, ms=3, label=kind)
    ax_l.set(xlabel="α  (0 = model a, 1 = model b)", ylabel="loss", title="loss along the path")
    ax_a.set(xlabel="α", ylabel="accuracy (%)", title="accuracy along the path")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_slice(result: dict, path: str | os.PathLike, title: str = "") -> None:
    """A 1-D slice as a line plot (loss and accuracy), a 2-D one as contour + surface."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, loss = result["coords"], result["loss"]
    if loss.ndim == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(c, loss, "-o", ms=3, color="C0")
        ax.set(xlabel="step along filter-normalised direction", ylabel="loss")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(c, 100 * result["accuracy"], "--", color="C1")
        twin.set_ylabel("accuracy (%)", color="C1")
    else:
        fig = plt.figure(figsize=(11, 4.5))
        ax = fig.add_subplot(1, 2, 1)
        A, B = np.meshgrid(c, c, indexing="ij")
        levels = np.unique(np.quantile(loss, np.linspace(0.02, 0.98, 15)))  # even area per band
        cs = ax.contour(A, B, loss, levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize=7, fmt="%.3g")
        ax.plot([0], [0], "r*", ms=10)
        ax.set(xlabel="direction 1", ylabel="direction 2", aspect="equal")
        ax.locator_params(nbins=5)
        ax3 = fig.add_subplot(1, 2, 2, projection="3d")
        ax3.plot_surface(A, B, loss, cmap="viridis", linewidth=0, antialiased=True)
        ax3.set(xlabel="direction 1", ylabel="direction 2", zlabel="loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _training_sample(config: dict, samples: int, device: torch.device | str):
    """The first `samples` training images and labels of a run's data (as it saw them)."""
    from qmse.rundir import prepare_data

    if samples < 1:
        raise ValueError(f"samples={samples}; need at least one training sample")
    data = prepare_data(config, device)
    return data.x_train[:samples], data.y_train[:samples]


def _short(run_dir: str | os.PathLike) -> str:
    """A run's folder and its parent, e.g. "diagnose-fmnist/mse", for figure titles."""
    path = Path(run_dir).resolve()
    return f"{path.parent.name}/{path.name}"


def _describe(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> dict[str, float]:
    zero = [{k: torch.zeros_like(v) for k, v in parameters_of(model).items()}]
    value, acc = evaluate_points(
        model, parameters_of(model), zero, torch.zeros(1, 1), x, y, loss=loss
    )
    return {"loss": float(value[0]), "accuracy": float(acc[0])}


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

    Loads both runs (`qmse.rundir.load_run`), evaluates on the first `samples` training images
    of run_a's data, and writes to `out`: interpolation.npz (the arrays), interpolation.png,
    summary.json (barriers, end points, the number of permuted copies of model a, config and
    provenance). Returns the summary.
    """
    from qmse.rundir import load_run
    from qmse.runs import provenance, save_json
    from qmse.symmetry import count_equivalent

    model_a, config_a = load_run(run_a, device)
    model_b, config_b = load_run(run_b, device)
    if config_a["dataset"] != config_b["dataset"]:
        raise ValueError(
            f"run_a was trained on {config_a['dataset']} and run_b on {config_b['dataset']}; "
            f"matching compares two runs of the same data set"
        )
    x, y = _training_sample(config_a, samples, device)
    start, cpu = time.perf_counter(), time.process_time()
    res = interpolation_barriers(model_a, model_b, x, y, points=points, loss=loss, seed=seed)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in res.items() if isinstance(v, np.ndarray)}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(out / "interpolation.npz", buf.getvalue())
    count = count_equivalent(model_a)
    summary = {
        "run_a": str(run_a),
        "run_b": str(run_b),
        "loss": loss,
        "samples": int(x.size(0)),
        "points": points,
        "seed": seed,
        "naive_barrier": res["naive_barrier"],
        "aligned_barrier": res["aligned_barrier"],
        "naive_max_accuracy_drop": float(
            0.5 * (res["naive_accuracy"][0] + res["naive_accuracy"][-1])
            - res["naive_accuracy"].min()
        ),
        "aligned_max_accuracy_drop": float(
            0.5 * (res["aligned_accuracy"][0] + res["aligned_accuracy"][-1])
            - res["aligned_accuracy"].min()
        ),
        "end_a": _describe(model_a, x, y, loss),
        "end_b": _describe(model_b, x, y, loss),
        "units_moved": {k: int((p != torch.arange(len(p))).sum()) for k, p in res["perms"].items()},
        "equivalent_copies_of_a_log10": math.log10(count),
        "wall_s": wall,
        "cpu_s": cpu,
        "config_a": config_a,
        "config_b": config_b,
        "provenance": provenance(device),
    }
    save_json(out / "summary.json", summary)
    title = f"{_short(run_a)} → {_short(run_b)} ({loss}, {x.size(0)} training samples)"
    plot_interpolation(res, out / "interpolation.png", title=title)
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
    from qmse.rundir import load_run
    from qmse.runs import provenance, save_json

    model, config = load_run(run_dir, device)
    x, y = _training_sample(config, samples, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"partial-{dims}d.npz"
    start, cpu = time.perf_counter(), time.process_time()
    res = random_slice(
        model,
        x,
        y,
        dims=dims,
        points=points,
        span=span,
        seed=seed,
        loss=loss,
        group_size=group_size,
        batch_size=batch_size,
        compile=compile,
        resume_file=partial,
        quiet=quiet,
    )
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    buf = io.BytesIO()
    np.savez(buf, **res)
    atomic_write(out / f"landscape-{dims}d.npz", buf.getvalue())
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
    plot_slice(res, out / f"landscape-{dims}d.png", title=title)
    return summary
