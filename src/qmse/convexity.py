"""Is a loss convex in the weights? Loss against chord on random segments of weight space.

A function L is convex iff on every segment w(t) = (1 − t) w_a + t w_b it stays at or below
the chord (1 − t) L(w_a) + t L(w_b). One segment that rises above its chord proves L is not
convex; many that never do are evidence (not proof) that it is. The demonstration: the MSE
of linear regression and the cross-entropy of logistic regression are convex in w, the MSE
of a network with one hidden layer is not (its hidden-unit permutations alone give distinct
minima at the same height, `qmse.symmetry`).

`convexity_check` takes any loss of a flat weight vector; `curvature.loss_fn(model,
criterion, data)` makes one from a model, a loss and data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.func import vmap

from qmse.curvature import loss_fn
from qmse.models import MLP
from qmse.runs import claim, provenance, save_figure, save_json


def segment_losses(
    loss_at: Callable[[Tensor], Tensor], w_a: Tensor, w_b: Tensor, points: int = 21
) -> tuple[Tensor, Tensor, Tensor]:
    """(t, loss, chord) along w(t) = (1 − t) w_a + t w_b: the loss and the straight line
    between its end values, each (points,). A convex loss never rises above the chord."""
    t = torch.linspace(0, 1, points, dtype=w_a.dtype)
    ws = (1 - t)[:, None] * w_a + t[:, None] * w_b  # (points, P)
    loss = vmap(loss_at)(ws).detach()  # (points,)
    chord = (1 - t) * loss[0] + t * loss[-1]
    return t, loss, chord


def convexity_check(
    loss_at: Callable[[Tensor], Tensor],
    dim: int,
    *,
    segments: int = 200,
    points: int = 21,
    scale: float = 3.0,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Loss against chord on `segments` random segments between N(0, scale²·I) weights.

    `loss_at` maps a flat weight vector (dim,) to a scalar and must work under `vmap`.
    A point violates convexity when loss − chord > 1e-9·max(1, |chord|) (float64 rounding
    stays far below). Returns the count of violating segments, the largest interior gap
    seen (≤ 0 for a convex loss: how close it came to the chord) and its segment.
    """
    worst, worst_gap, violating = None, -math.inf, 0
    for _ in range(segments):
        w_a = scale * torch.randn(dim, generator=generator, dtype=dtype)
        w_b = scale * torch.randn(dim, generator=generator, dtype=dtype)
        t, loss, chord = segment_losses(loss_at, w_a, w_b, points)
        gap = (loss - chord)[1:-1]  # interior points; the ends are 0 by construction
        violating += bool((gap > 1e-9 * chord[1:-1].abs().clamp_min(1)).any())
        if gap.max().item() > worst_gap:
            worst_gap = gap.max().item()
            worst = {"t": t.tolist(), "loss": loss.tolist(), "chord": chord.tolist()}
    return {
        "segments": segments,
        "violating_segments": violating,
        "max_gap": worst_gap,
        "worst_segment": worst,
        "scale": scale,
        "points": points,
    }


def convexity_demo(*, segments: int = 200, points: int = 21, seed: int = 0) -> dict:
    """Three losses checked with `convexity_check`: linear regression (½(f − y)², "mse"),
    logistic regression (two-class softmax cross-entropy, "ce"), both convex in w, and the
    same ½(f − y)² of a 1-hidden-layer tanh MLP (8 hidden units), which is not.

    Data: 100 samples, 5 features, drawn from `seed`, in float64. Returns one result of
    `convexity_check` per model.
    """
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(100, 5, generator=g, dtype=torch.float64)  # (N, 5)
    w_true = torch.randn(5, 1, generator=g, dtype=torch.float64)
    y_reg = X @ w_true + 0.5 * torch.randn(100, 1, generator=g, dtype=torch.float64)  # (N, 1)
    p_one = torch.sigmoid(X @ w_true).squeeze(1)  # (N,)
    y_cls = (torch.rand(100, generator=g, dtype=torch.float64) < p_one).long()  # (N,) classes

    def problem(hidden: list[int], outputs: int, criterion: str, y: Tensor) -> tuple:
        with torch.random.fork_rng(devices=[]):  # the weights are drawn per segment anyway
            model = MLP(5, hidden, outputs, activation="tanh").to(torch.float64)
        w, loss_at = loss_fn(model, criterion, (X, y))
        return loss_at, w.numel()

    problems = {
        "linear-regression": problem([], 1, "mse", y_reg),
        "logistic-regression": problem([], 2, "ce", y_cls),
        "mlp-1-hidden": problem([8], 1, "mse", y_reg),
    }
    return {
        name: convexity_check(loss_at, dim, segments=segments, points=points, generator=g)
        for name, (loss_at, dim) in problems.items()
    }


def plot_convexity(result: dict) -> Figure:
    """One panel per model of a `convexity_demo` result: the loss along its worst segment
    and the chord."""
    fig = Figure(figsize=(3.3 * len(result), 2.8), layout="tight")
    axes = fig.subplots(1, len(result), squeeze=False)[0]
    for ax, (name, r) in zip(axes, result.items()):
        seg = r["worst_segment"]
        ax.plot(seg["t"], seg["loss"], label="loss")
        ax.plot(seg["t"], seg["chord"], "--", label="chord")
        ax.set_title(
            f"{name}\n{r['violating_segments']}/{r['segments']} segments above chord", fontsize=8
        )
        ax.set_xlabel("t")
    axes[0].set_ylabel("loss along (1−t)w_a + t w_b")
    axes[0].legend(fontsize=7)
    return fig


def convexity_report(
    out_dir: str | os.PathLike, *, segments: int = 200, points: int = 21, seed: int = 0
) -> dict:
    """Run `convexity_demo` and write convexity.json (config, results, provenance) and the
    figure diagnose-convexity.png to `out_dir`; return the results."""
    out = Path(out_dir)
    with claim(out, "convexity", recognise=lambda d: (d / "convexity.json").exists()):
        result = convexity_demo(segments=segments, points=points, seed=seed)
        save_json(out / "convexity.json",
                  {"config": {"segments": segments, "points": points, "seed": seed},
                   "results": result, "provenance": provenance("cpu")})  # fmt: skip
        save_figure(out / "diagnose-convexity.png", plot_convexity(result))
    return result
