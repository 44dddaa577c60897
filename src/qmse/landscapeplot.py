"""The figures of `qmse.landscape`: the loss along an interpolation path before and after
weight matching, and 1-D/2-D slices on one shared colour scale (matplotlib's object API)."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from qmse.errors import UserError


def plot_interpolation(result: dict, title: str = "") -> Figure:
    """Loss and accuracy along the path a → b, before and after weight matching."""
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_l, ax_a = fig.subplots(1, 2)
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
    return fig


def plot_slices(results: dict[str, dict], title: str = "") -> Figure:
    """Named slices of `random_slice` on one figure, on one scale so they can be compared.

    1-D: loss and accuracy of every slice on two shared panels. 2-D: one filled contour
    panel per slice, all with the same levels (quantiles of the pooled values, so each band
    covers an equal share of the grid points) and one colour bar; the centre is starred.
    """
    dims = {r["loss"].ndim for r in results.values()}
    if len(dims) != 1:
        raise UserError("plot_slices draws slices of one dimension at a time")
    if dims == {1}:
        fig = Figure(figsize=(10, 4), layout="tight")
        ax_l, ax_a = fig.subplots(1, 2)
        for name, r in results.items():
            ax_l.plot(r["coords"], r["loss"], "-o", ms=3, label=name)
            ax_a.plot(r["coords"], 100 * r["accuracy"], "-o", ms=3, label=name)
        ax_l.set(xlabel="step along the filter-normalised direction", ylabel="loss")
        ax_a.set(xlabel="step along the filter-normalised direction", ylabel="accuracy (%)")
        for ax in (ax_l, ax_a):
            ax.grid(alpha=0.3)
            ax.legend()
    else:
        pooled = np.concatenate([r["loss"].ravel() for r in results.values()])
        levels = np.unique(np.quantile(pooled, np.linspace(0, 1, 16)))
        norm = BoundaryNorm(levels, 256)  # one colour per band, evenly spread over the map
        fig = Figure(figsize=(4.6 * len(results) + 1.2, 4.6), layout="constrained")
        axes = fig.subplots(1, len(results), squeeze=False)[0]
        for ax, (name, r) in zip(axes, results.items()):
            A, B = np.meshgrid(r["coords"], r["coords"], indexing="ij")
            filled = ax.contourf(A, B, r["loss"], levels=levels, norm=norm, cmap="viridis")
            ax.contour(A, B, r["loss"], levels=levels, colors="k", linewidths=0.3)
            ax.plot([0], [0], "r*", ms=10)
            ax.set(xlabel="direction 1", ylabel="direction 2", aspect="equal", title=name)
            ax.locator_params(nbins=5)
        bar = fig.colorbar(filled, ax=list(axes), spacing="uniform", format="%.3g")
        bar.set_label("loss")
    if title:
        fig.suptitle(title)
    return fig
