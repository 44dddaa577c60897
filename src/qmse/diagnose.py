"""Where did training stop, and why: the paper's optimality analysis (sec. 2.2) made measurable.

For one sample with residual r = y − f (length C) and Jacobian J = ∂f/∂w (C × P), the MSE
gradient is −Jᵀr (eq. 4) = −Σ_c r_c ∇f_c (eq. 5), so training stops when
    case 1: r = 0                       (the global minimum, eq. 3 is zero),
    case 2: every ∇f_c = 0              (J = 0, e.g. all ReLUs dead),
    case 3: r ≠ 0 but Jᵀr = 0           (r in the left null space of J).
Over a data set the MSE gradient is −(1/N) Σ_i J_iᵀ r_i = −(1/N) 𝐉ᵀR with 𝐉 the N·C × P
stacked Jacobian and R the stacked residual; the set stops when that *sum* vanishes, which
needs no single J_iᵀ r_i to be zero. With P ≫ C a per-sample J_i generically has no left null
space, and with an output bias it never has one (∂f/∂b = I_C is a block of J_i, so
‖J_iᵀu‖ ≥ ‖u‖ for every u): no r_i ≠ 0 and no v_i lies in the null space of J_iᵀ.
𝐉 (N·C rows) has a left null space as soon as N·C > rank 𝐉: whole-set case 3 is where
least squares with a nonzero residual ends (docs/theory.md, "Where MSE stops").

These stopping cases are MSE's and need (N, C) outputs with targets of that shape or class
indices; the curvature around the point is measured for any loss and output shape
(`qmse.hessian.hessian_summary`): a registered deterministic loss by name or the user's own
callable. The model is read as `qmse.curvature` reads it, in eval mode: parameters,
buffers, `requires_grad` flags and every module's mode are the same before and after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import jacrev, jvp, vjp, vmap

from qmse.curvature import (
    Criterion,
    criterion_name,
    density_on_grid,
    eval_mode,
    lanczos,
    model_fn,
)
from qmse.errors import UserError
from qmse.hessian import hessian_summary
from qmse.runs import (
    progress,
)

CASES = {0: "not-stationary", 1: "global-minimum", 2: "zero-jacobian", 3: "null-space"}
_JACOBIAN_BUDGET = 2**26  # per-sample Jacobian entries held at once (256 MB in float32)


# ---------------------------------------------------------------- first order: eqs. 4-5


def _float_targets(y: Tensor, out: Tensor) -> Tensor:
    """Targets as floats shaped like the output: int class indices become one-hot."""
    if y.is_floating_point():
        if y.shape != out.shape:
            raise UserError(
                f"target shape {tuple(y.shape)} does not match model output "
                f"{tuple(out.shape)}; pass targets of the output's shape or int class indices"
            )
        return y.to(out.dtype)
    if y.shape != out.shape[:1] or out.dim() != 2:
        raise UserError(
            f"integer targets must be class indices of shape ({out.shape[0]},) for output "
            f"{tuple(out.shape)}, got {tuple(y.shape)}"
        )
    if (y < 0).any() or (y >= out.shape[1]).any():
        raise UserError(f"class indices must lie in [0, {out.shape[1]}), got {y.min()}..{y.max()}")
    return F.one_hot(y.long(), out.shape[1]).to(out.dtype)  # (N, C)


def gradient_geometry(
    model: nn.Module, x: Tensor, y: Tensor, *, gauss_newton_steps: int = 10, seed: int = 0
) -> dict:
    """Per-sample and whole-set quantities of the MSE optimality condition (eqs. 4-5).

    Per sample i (tensors of length N, or (N, C)), with G_i = J_i J_iᵀ the C × C Gram matrix:
      residual_norm ‖r_i‖, grad_norm ‖J_iᵀ r_i‖ = √(r_iᵀ G_i r_i) (the sample's MSE gradient),
      output_grad_norms ‖∇f_ic‖ = √G_i[c, c] (N, C), jacobian_fro ‖J_i‖_F, jacobian_spec
      ‖J_i‖₂ = √λ_max(G_i), jacobian_smin σ_min(J_i) = √λ_min(G_i) (0 when J_i has a left
      null space), ratio ‖J_iᵀ r_i‖ / (‖J_i‖₂ ‖r_i‖) ∈ [0, 1] (0: r_i in the left null space).
    Whole set (floats): residual_norm ‖R‖, grad_norm ‖Σ_i J_iᵀ r_i‖ (N times the gradient
    of the mean ½‖r‖²), jacobian_fro ‖𝐉‖_F, jacobian_spec ‖𝐉‖₂ (top Ritz value of 𝐉ᵀ𝐉 after
    `gauss_newton_steps` Lanczos steps: a lower bound, so the whole-set ratio is an upper
    bound and a case-3 verdict is conservative), ratio ‖𝐉ᵀR‖ / (‖𝐉‖₂ ‖R‖); 𝐉ᵀ𝐉/N is the
    Gauss-Newton part of the MSE Hessian. The spectral norm makes a ratio of 1 attainable
    (r along the top singular direction); ‖J‖_F ≥ ‖J‖₂ would shrink ratios by up to √rank.

    Costs C backward passes per sample (per-sample Jacobians, vmapped in chunks that hold at
    most 2²⁶ Jacobian entries) plus one VJP and `gauss_newton_steps` JVP+VJP on the batch.
    """
    w, f = model_fn(model)
    with eval_mode(model), torch.no_grad():
        out = f(w, x)  # (N, C)
        if out.dim() != 2:
            raise UserError(
                f"the stopping-case geometry needs model outputs (N, C), got "
                f"{tuple(out.shape)}; for the Hessian alone use diagnose_model(..., "
                f"geometry=False) or qmse.hessian.hessian_summary"
            )
        r = _float_targets(y, out) - out  # (N, C)
        N, C = r.shape
        P = w.numel()

        def f_one(wv: Tensor, xi: Tensor) -> Tensor:
            return f(wv, xi.unsqueeze(0)).squeeze(0)  # (C,)

        per_sample_jac = vmap(jacrev(f_one), in_dims=(None, 0))
        chunk = max(1, _JACOBIAN_BUDGET // (C * P))
        grams = []
        for s in range(0, N, chunk):
            J = per_sample_jac(w, x[s : s + chunk])  # (n, C, P)
            grams.append(J @ J.transpose(1, 2))  # (n, C, C)
        G = torch.cat(grams).double()  # (N, C, C)
        eig = torch.linalg.eigvalsh(G).clamp_min(0)  # (N, C) ascending
        rd = r.double()
        res = rd.norm(dim=1)  # (N,)
        gnorm = torch.einsum("nc,ncd,nd->n", rd, G, rd).clamp_min(0).sqrt()  # (N,)
        spec = eig[:, -1].sqrt()
        per_sample = {
            "residual_norm": res,
            "grad_norm": gnorm,
            "output_grad_norms": torch.diagonal(G, dim1=1, dim2=2).clamp_min(0).sqrt(),
            "jacobian_fro": G.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(0).sqrt(),
            "jacobian_spec": spec,
            "jacobian_smin": eig[:, 0].sqrt(),
            "ratio": _safe_ratio(gnorm, spec * res),
        }

        _, pull = vjp(lambda wv: f(wv, x), w)
        total_grad = pull(r)[0]  # (P,)  Σ_i J_iᵀ r_i = 𝐉ᵀR

        def gauss_newton(v: Tensor) -> Tensor:  # v ↦ 𝐉ᵀ𝐉 v
            return pull(jvp(lambda wv: f(wv, x), (w,), (v,))[1])[0]

        steps = min(gauss_newton_steps, P)
        gen = torch.Generator(device=w.device).manual_seed(seed)
        nodes, _ = lanczos(gauss_newton, P, steps, generator=gen, dtype=w.dtype)
        set_spec = math.sqrt(max(nodes[-1].item(), 0.0))
        set_res = rd.norm().item()
        set_grad = total_grad.double().norm().item()
        whole_set = {
            "residual_norm": set_res,
            "grad_norm": set_grad,
            "jacobian_fro": per_sample["jacobian_fro"].pow(2).sum().sqrt().item(),
            "jacobian_spec": set_spec,
            "ratio": _safe_ratio(torch.tensor(set_grad), torch.tensor(set_spec * set_res)).item(),
        }
    return {
        "n_samples": N,
        "n_outputs": C,
        "n_params": P,
        "per_sample": per_sample,
        "whole_set": whole_set,
    }


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den is 0 (then num is 0 too: ‖Jᵀr‖ ≤ ‖J‖‖r‖)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def classify_stop(
    geometry: dict,
    *,
    tol_residual: float = 1e-3,
    tol_gradient: float = 1e-6,
    tol_ratio: float = 1e-3,
) -> dict:
    """Which of the paper's three stopping cases (sec. 2.2) holds, per sample and for the set.

    Per sample, checked in order (first match wins, 0 = none: the sample's gradient is not ~0):
      1 global-minimum  ‖r_i‖ ≤ tol_residual
      2 zero-jacobian   max_c ‖∇f_ic‖ ≤ tol_gradient (absolute: every class gradient ~0)
      3 null-space      ‖J_iᵀ r_i‖ ≤ tol_ratio · ‖J_i‖₂ ‖r_i‖ (relative: r_i ~ left null space)
    For the whole set the same tests read: 1 every sample is case 1 (max_i ‖r_i‖); 2 every
    class gradient of every sample is ~0; 3 the set's MSE gradient Σ_i J_iᵀ r_i = 𝐉ᵀR is
    small relative to ‖𝐉‖₂ ‖R‖. Whole-set case 3 is the one that stops (full-batch) training;
    the per-sample cases say whether single samples are stuck on their own.
    `geometry` is the output of `gradient_geometry`. Tolerances are returned with the result.
    """
    for name, tol in (
        ("tol_residual", tol_residual),
        ("tol_gradient", tol_gradient),
        ("tol_ratio", tol_ratio),
    ):
        if not tol >= 0:
            raise UserError(f"{name} must be >= 0, got {tol}")
    ps, ws = geometry["per_sample"], geometry["whole_set"]
    res, out_grad, ratio = ps["residual_norm"], ps["output_grad_norms"], ps["ratio"]
    case = torch.zeros_like(res, dtype=torch.long)
    case = torch.where(ratio <= tol_ratio, 3, case)
    case = torch.where(out_grad.amax(dim=1) <= tol_gradient, 2, case)
    case = torch.where(res <= tol_residual, 1, case)
    if res.max() <= tol_residual:
        set_case = 1
    elif out_grad.max() <= tol_gradient:
        set_case = 2
    elif ws["ratio"] <= tol_ratio:
        set_case = 3
    else:
        set_case = 0
    counts = {CASES[c]: int((case == c).sum()) for c in CASES}
    return {
        "tolerances": {
            "tol_residual": tol_residual,
            "tol_gradient": tol_gradient,
            "tol_ratio": tol_ratio,
        },
        "per_sample_case": case,
        "per_sample_counts": counts,
        "whole_set_case": set_case,
        "whole_set_label": CASES[set_case],
    }


# ---------------------------------------------------------------- second order


def label_curvature(lambda_min: float, lambda_max: float, rel_tol: float = 1e-3) -> str:
    """Label a point by its curvature: "saddle" if λ_min < −rel_tol·|λ_max|, "minimum" if
    λ_min > rel_tol·|λ_max|, else "flat" (degenerate: undecided at second order).

    Relative to λ_max so that the label does not depend on the loss's scale. A label says
    what the curvature is; it describes a critical point only where the gradient is ~0.
    """
    if not rel_tol >= 0:
        raise UserError(f"rel_tol must be >= 0, got {rel_tol}")
    tol = rel_tol * abs(lambda_max)
    if lambda_min < -tol:
        return "saddle"
    return "minimum" if lambda_min > tol else "flat"


# ---------------------------------------------------------------- one model, one run, two runs


def _criteria(criterion: Criterion | Sequence[Criterion]) -> dict[str, Criterion]:
    """One criterion or a list of them, keyed by their report labels (`criterion_name`)."""
    many = list(criterion) if isinstance(criterion, (list, tuple)) else [criterion]
    if not many:
        raise UserError("criterion is an empty list; give at least one loss")
    named = {criterion_name(c): c for c in many}
    if len(named) != len(many):
        raise UserError(
            f"criteria {[criterion_name(c) for c in many]} share a label; give each its own "
            f"name (e.g. a def instead of two lambdas)"
        )
    return named


def diagnose_model(
    model: nn.Module,
    criterion: Criterion | Sequence[Criterion],
    data: tuple[Tensor, Tensor],
    *,
    geometry: bool = True,
    k: int = 5,
    lanczos_steps: int = 30,
    slq_vectors: int = 2,
    trace_samples: int = 20,
    seed: int = 0,
    tol_residual: float = 1e-3,
    tol_gradient: float = 1e-6,
    tol_ratio: float = 1e-3,
    curvature_tol: float = 1e-3,
    quiet: bool = False,
) -> dict:
    """Where `model` stands on the batch `data` = (x, y), as a JSON-ready dict.

    With `geometry` (the default), the stopping case (sec. 2.2) with its tolerances
    ("stop") and the gradient geometry (whole set, and per-sample quantiles: "geometry"):
    those of MSE's optimality condition (eqs. 4-5), whatever the criterion, so they need
    (N, C) outputs and targets of that shape or int class indices. `geometry=False` leaves
    them out, for models of any output shape ((N,) logits, (N, T, C) sequences).

    For each `criterion` (a deterministic registered loss name, a callable (output, target)
    -> scalar mean loss, or a list of them; see `qmse.curvature.criterion_fn`), under
    "hessian" and its label (`criterion_name`): its value and gradient norm, the
    top-k/bottom-k Hessian Ritz values, the curvature label (meaningful where that gradient
    is ~0), the Hutchinson trace ± standard error and the SLQ nodes/weights (`slq_vectors`
    Lanczos runs of `lanczos_steps` products; the extremes are the first run's Ritz values):
    `qmse.hessian.hessian_summary` of the model in eval mode. For blocks, train mode or a
    typed result, call that directly.

    Shape:
        - data: x of shape (N, *) (whatever the model takes), y of shape (N, C) (float
          targets) or (N,) (int64 class indices); with geometry=False whatever the
          criterion takes.
        - model(x): (N, C); with geometry=False any shape the criterion takes.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from qmse.diagnose import diagnose_model
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(20, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(20, 1, generator=g, dtype=torch.float64)
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> with torch.no_grad():  # the least-squares fit: MSE's gradient is zero, r is not
        ...     _ = model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
        >>> d = diagnose_model(model, "mse", (x, y), k=1, lanczos_steps=3, quiet=True)
        >>> d["stop"]["whole_set_label"], d["hessian"]["mse"]["label"]
        ('null-space', 'minimum')
        >>> round(d["geometry"]["whole_set"]["mse"], 4)  # the mean ½‖r‖² left
        0.3381
        >>> round(d["hessian"]["mse"]["top"][0], 4)  # λ_max of the Hessian xᵀx / N
        1.3958
        >>> round(torch.linalg.eigvalsh(x.T @ x / 20)[-1].item(), 4)
        1.3958
    """
    named = _criteria(criterion)
    x, y = data
    bar = progress(total=int(geometry) + len(named), quiet=quiet, desc="diagnose")
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict = {"n_samples": x.shape[0], "n_params": P}
    if geometry:
        geo = gradient_geometry(model, x, y, seed=seed)
        stop = classify_stop(
            geo, tol_residual=tol_residual, tol_gradient=tol_gradient, tol_ratio=tol_ratio
        )
        bar.update()
        ps, N = geo["per_sample"], geo["n_samples"]
        quantiles = {}
        for name in ("residual_norm", "grad_norm", "ratio", "jacobian_spec", "jacobian_smin"):
            levels = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
            q = torch.quantile(ps[name].double(), levels)
            quantiles[name] = dict(zip(("min", "median", "max"), q.tolist()))
        whole = dict(geo["whole_set"])
        whole["mse"] = 0.5 * whole["residual_norm"] ** 2 / N  # the mean ½‖r‖² on these samples
        whole["mse_grad_norm"] = whole["grad_norm"] / N  # ‖∇ mean ½‖r‖²‖
        out["stop"] = {k_: v for k_, v in stop.items() if k_ != "per_sample_case"}
        out["geometry"] = {"whole_set": whole, "per_sample": quantiles}
    out["hessian"] = {}
    for label, crit in named.items():
        s = hessian_summary(model, crit, (x, y), k=k, lanczos_steps=lanczos_steps,
                            slq_vectors=slq_vectors, trace_samples=trace_samples,
                            seed=seed)  # fmt: skip
        bar.update()
        out["hessian"][label] = {
            "loss": s.loss,
            "grad_norm": s.grad_norm,
            "top": list(s.top),
            "bottom": list(s.bottom),
            "label": label_curvature(s.bottom[0], s.top[0], curvature_tol),
            "curvature_tol": curvature_tol,
            "trace": s.trace,
            "trace_se": s.trace_se,
            "lanczos_steps": s.lanczos_steps,
            "slq": [{"nodes": list(n), "weights": list(w)} for n, w in s.density],
        }
    bar.close()
    return out


def plot_spectra(diagnoses: dict[str, dict], *, loss: str = "mse", sigma: float = 0.0) -> Figure:
    """The SLQ spectral density of the `loss` Hessian of each named diagnosis, on one
    log-scale plot. sigma = 0 picks 1% of the widest spectrum's range."""
    runs = {name: [(torch.tensor(r["nodes"]), torch.tensor(r["weights"]))
                   for r in d["hessian"][loss]["slq"]]
            for name, d in diagnoses.items()}  # fmt: skip
    nodes = torch.cat([n for rs in runs.values() for n, _ in rs])
    lo, hi = nodes.min().item(), nodes.max().item()
    pad = 0.05 * (hi - lo)
    sigma = sigma or 0.01 * (hi - lo)
    grid = torch.linspace(lo - pad, hi + pad, 2000, dtype=torch.float64)
    fig = Figure(figsize=(5, 3), layout="tight")
    ax = fig.subplots()
    for name, rs in runs.items():
        ax.semilogy(grid, density_on_grid(rs, grid, sigma).clamp_min(1e-8), label=name)
    ax.set_xlabel(f"eigenvalue of the {loss} Hessian")
    ax.set_ylabel("density (SLQ)")
    ax.legend(fontsize=8)
    return fig
