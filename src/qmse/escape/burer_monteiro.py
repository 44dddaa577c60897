"""A Burer–Monteiro factorisation with a spurious minimum, as a problem of the escape benchmark
("burer-monteiro"), and the rerun of its published perturbation experiment.

The instance. O'Carroll, Srinivas & Vijayaraghavan (NeurIPS 2022), "The Burer–Monteiro SDP
method can fail even above the Barvinok–Pataki bound", construct (their repository
vaidehi8913/burer-monteiro, experiments/experiment.m) for each rank p the cost

    C = [[M, M], [M, M]]  (n × n, n = 2p),  M = (1 + a)·I − a·11ᵀ,  a = 1/(p − 1.5),

and minimise f(Y) = ⟨C, YYᵀ⟩ over Y ∈ R^{n×p} with unit-norm rows (a product of n spheres),
from near Y₀ = [I; −I]. Write Y = [Y₁; Y₂] and Z = Y₁ + Y₂: then f(Y) = ⟨M, ZZᵀ⟩ (M has
eigenvalues 1 + a, p − 1 times, and −0.5·a on 1).

The optimum (closed form; `optimum` returns the primal–dual pair): f* = n·λ_min(C) =
−2p/(p − 1.5), −8 at p = 2, −50/23.5 = −2.1277 at p = 25. Lower bound: f(Y) = ⟨C, X⟩ ≥
λ_min(C)·tr X = n·λ_min(C) for any X = YYᵀ with unit diagonal (the dual point y = λ_min·1);
attained by every row equal to one unit vector (rank one). Their runs that escape end within
5e-10 of these values. The success threshold is `success = f* + TOL·|f*|` (TOL = 1e-3).

What the spurious point is (certified by `qmse.escape.problems.certify`, the numbers are
checked by the tests). Y₀ has cost 0 and zero Riemannian gradient, and lies on the manifold

    N = {Y : Y₂ = −Y₁}  (Z = 0, so f ≡ 0 and the gradient 2CY = 0 on all of it),

of dimension p(p − 1) (Y₁'s rows anywhere on their spheres). The Riemannian Hessian at Y₀ on
the 2p(p − 1)-dimensional tangent space is the form 4⟨M, VVᵀ⟩ of the "sum" coordinates
V = (Ẏ₁ + Ẏ₂)/√2 (rows ⟂ eᵢ), 0 on the "difference" ones: its eigenvalues are

    eigenvalue              multiplicity   p = 2     p = 25
    0                       p(p − 1)       0 ×2      0 ×600
    2/(p − 1.5)             p              4 ×2      0.0851 ×25
    4(p − 0.5)/(p − 1.5)    p(p − 2)       none      4.170 ×575

so `certify` says "degenerate". Of the p(p − 1) zero eigenvalues, p(p − 1)/2 are the rotation
symmetry Y₀ ↦ Y₀Q (tangent Y₀Ω, Ω skew); the other p(p − 1)/2 are not explained by any
symmetry: they are the tangent of N along symmetric tilts (Y₁ = rows of I + tD, D symmetric
with zero diagonal), where the cost stays exactly 0 while the Gram matrix changes. Nothing
else is zero. Near Y₀, f(Y) ≥ c‖Z‖² with c → 0.5/(p − 1.5) (Z's rows lie within O(‖Y − Y₀‖)
of eᵢ^⊥, where ⟨M, ZZᵀ⟩ ≥ 0.5/(p − 1.5)·‖Z‖²), so Y₀ is a local minimum, not isolated: a
Morse–Bott manifold of spurious minima around it, all at cost exactly 0. (Far from Y₀, N also
holds saddles: all rows of Y₁ equal gives a negative direction.) Hence "stuck" is decided by
the cost, not by a distance to Y₀: a run is at the spurious set when |f(Y) − 0| ≤ TOL·|f*|
(8e-3 at p = 2), at the optimum when f(Y) − f* ≤ TOL·|f*| (`classify`). Their raw outcomes
are bimodal: stuck runs end within 2e-9 of 0, the others within 5e-10 of f* (all four sizes).

Their summary's rule is not this: experiment.m counts a run spurious when its final cost is
≥ 0, and 594 of their 6,000 runs at p = 2 end at −8.9e-16 … −1.1e-16 (their "potential"
‖Y₁ + Y₂‖² ≤ 5e-16 there: on N) and are counted as escapes. Recounted by the cost's distance
to 0, p = 2 has 636, 669, 665, 681, 689, 703 stuck runs in 1,000 at perturbation 0.30 … 0.25,
not their 546, 575, 556, 574, 605, 593 (`PUBLISHED`, `RAW_STUCK`); p = 25, 100, 500 are
unaffected (no run ends at a negative rounding error there).

Their experiment (`perturbation_experiment`): starts Y = rows normalised of Y₀ + t·G/√p,
G (n, p) standard Gaussian (Manopt's retraction of an unprojected ambient step), t from
0.30 down to 0.25; optimiser Manopt's Riemannian trust-regions with default options (truncated
CG, Δ̄ = π√n, Δ₀ = Δ̄/8, gradient tolerance 1e-6, at most 1,000 outer iterations), the
Hessian left to Manopt's finite differences of the gradient — and their Euclidean gradient is
CY, half of f's 2CY, so their whole model (gradient and Hessian) is f's halved while ρ's
numerator uses f itself. `trust_regions` is our own rewrite of that method, vectorised over
starts; by default it runs theirs (the halved model, `model_scale=0.5`, and Manopt's
finite-difference Hessian, `fd_hess_vec`); `model_scale=1.0` is the consistent model and
`exact_hessian=True` the exact Riemannian Hessian. `riemannian_gd` is the benchmark's
baseline: Y ← retract(Y − lr·grad f(Y)).

The rerun (`benchmarks/burer_monteiro_perturb.py`; 10,000 starts per scale at p = 2, 100 at
p = 25, the same starts for every optimiser): their method returns 64.2–72.7 % of the runs
at p = 2 (their raw outcomes recounted: 63.6–70.3 %; each of our six shares lies inside their
Wilson 95 % interval) and 32–88 % at p = 25 (theirs: 26–90 %). The consistent model makes
about 3 points more return at p = 2, the exact Hessian about 1 (no measurable change at
p = 25). Riemannian gradient descent returns far more often at p = 2: 91–97 %, whatever the
stable step (0.01–0.1); 42–92 % at p = 25.

The stochastic version (`sample`/`predict`): since ⟨D, YYᵀ⟩ = tr D is constant on the
manifold for diagonal D, f(Y) − f* = ⟨C − λ_min I, YYᵀ⟩ = E‖xᵀY‖² for Gaussian inputs
x ~ N(0, C − λ_min I). A sample is such an x (n,), the output xᵀY (p,) and the target 0, so
MSE's population loss is E ½‖0 − xᵀY‖² = ½(f(Y) − f*): a realisable regression through the
origin (every residual is exactly 0 at the optimum, since (C − λ_min I)Y* = 0) whose spurious
minima are those of f, at population MSE ½|f*| = p/(p − 1.5).

`init` draws their perturbed starts at the instance's `perturbation` (default 0.25, where
most of theirs stay stuck); `canonical` is the Gram matrix YYᵀ (n, n), a complete invariant
of Y modulo Y ↦ YQ, Q ∈ O(p).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape.problems import Problem, register_problem

DT = torch.float64
_CHECK_EVERY = 25  # riemannian_gd drops converged starts this often
TOL = 1e-3  # a run is at a value v when |f − v| ≤ TOL·|f*|
SIZES = (2, 25)  # their smallest rank, and the next (their ranks: 2, 25, 100, 500)
PERTURBATIONS = (0.3, 0.29, 0.28, 0.27, 0.26, 0.25)  # experiment.m's `perturbs`
TRIALS = {2: 1000, 25: 100, 100: 100, 500: 50}  # experiment.m's `trials_chart`
# Their experiments/results/summary.txt: runs counted spurious (final cost ≥ 0) per
# perturbation in PERTURBATIONS' order, out of TRIALS[p].
PUBLISHED = {
    2: (546, 575, 556, 574, 605, 593),
    25: (26, 35, 58, 73, 81, 90),
    100: (0, 2, 15, 32, 75, 93),
    500: (0, 0, 3, 35, 50, 50),
}
# Their raw outcomes (experiments/results/outcomes-p*.csv, first TRIALS[p] rows) recounted
# by `classify`: runs whose final cost is within TOL·|f*| of 0. Every other run ends within
# TOL·|f*| of f*.
RAW_STUCK = {
    2: (636, 669, 665, 681, 689, 703),
    25: (26, 35, 58, 73, 81, 90),
    100: (0, 2, 15, 32, 75, 93),
    500: (0, 0, 3, 35, 50, 50),
}


def _check_rank(p: int) -> None:
    if not isinstance(p, int) or p < 2:
        raise UserError(f"Burer–Monteiro rank p={p!r}: need an integer p >= 2 (n = 2p rows)")


def cost_matrix(p: int) -> Tensor:
    """Their cost C = [[M, M], [M, M]], M = (1 + a)I − a·11ᵀ, a = 1/(p − 1.5): (2p, 2p)."""
    _check_rank(p)
    a = 1.0 / (p - 1.5)
    M = (1 + a) * torch.eye(p, dtype=DT) - a * torch.ones(p, p, dtype=DT)
    return torch.cat([torch.cat([M, M], 1), torch.cat([M, M], 1)], 0)


def spurious_point(p: int) -> Tensor:
    """Their Y₀ = [I; −I]: (2p, p), cost 0."""
    _check_rank(p)
    eye = torch.eye(p, dtype=DT)
    return torch.cat([eye, -eye], 0)


def optimum(p: int) -> tuple[float, Tensor]:
    """The SDP's optimal value f* = n·λ_min(C) and a rank-one optimal Y (every row e₁).

    n·λ_min(C) is the dual bound (⟨C, X⟩ ≥ λ_min·tr X for X ⪰ 0 with unit diagonal); the
    rank-one point attains it (the tests check the zero duality gap), so both are optimal."""
    C = cost_matrix(p)
    Y = torch.zeros(2 * p, p, dtype=DT)
    Y[:, 0] = 1.0
    return C.shape[0] * torch.linalg.eigvalsh(C)[0].item(), Y


def objective(C: Tensor, W: Tensor) -> Tensor:
    """f(Y) = ⟨C, YYᵀ⟩ = Σ Y ⊙ CY for each start: W (S, n, p) → (S,)."""
    return (W * (C.to(W) @ W)).sum((-2, -1))


def project(W: Tensor, G: Tensor) -> Tensor:
    """G on the tangent space at W: each row's radial part removed. (S, n, p)."""
    return G - (G * W).sum(-1, keepdim=True) * W


def retract(W: Tensor) -> Tensor:
    """Rows normalised to unit length (the retraction R_Y(V) = retract(Y + V)). (S, n, p)."""
    return W / W.norm(dim=-1, keepdim=True)


def riemannian_grad(C: Tensor, W: Tensor) -> Tensor:
    """grad f(Y) = P_Y(2CY): (S, n, p)."""
    return project(W, 2 * (C.to(W) @ W))


def hess_vec(C: Tensor, W: Tensor, U: Tensor) -> Tensor:
    """Hess f(Y)[U] = P_Y(2CU) − U·diag(⟨yᵢ, (2CY)ᵢ⟩) for tangent U: (S, n, p)."""
    C = C.to(W)
    lam = (W * (2 * (C @ W))).sum(-1, keepdim=True)  # (S, n, 1)
    return project(W, 2 * (C @ U)) - lam * U


def riemannian_hessian(C: Tensor, w: Tensor) -> Tensor:
    """The Riemannian Hessian at one point w (n, p) in ambient coordinates, (np, np):
    P(2C⊗I − diag(⟨yᵢ, (2Cw)ᵢ⟩)⊗I)P with P = blockdiag(I − yᵢyᵢᵀ); on the tangent space it
    acts as `hess_vec`, on the normal directions as 0."""
    n, p = w.shape
    eye = torch.eye(p, dtype=DT)
    lam = (w * (2 * (C @ w))).sum(-1)  # (n,)
    P = torch.block_diag(*(eye - torch.outer(y, y) for y in w))  # (np, np)
    H = torch.kron(2 * C, eye) - torch.kron(torch.diag(lam), eye)
    return P @ H @ P


def perturb(p: int, scale: float, seeds: Sequence[int]) -> Tensor:
    """Their perturbed starts: rows normalised of Y₀ + scale·G/√p, G (2p, p) standard Gaussian
    from one generator per seed (seed s gives the same G whatever the batch or the scale).
    Returns (S, 2p, p) float64."""
    if not scale >= 0:
        raise UserError(f"perturbation scale {scale!r}: need a number >= 0")
    G = torch.zeros(len(seeds), 2 * p, p, dtype=DT)
    for i, s in enumerate(seeds):
        G[i] = torch.randn(2 * p, p, generator=torch.Generator().manual_seed(int(s)), dtype=DT)
    return retract(spurious_point(p) + scale * G / math.sqrt(p))


def classify(p: int, values: Tensor) -> list[str]:
    """Each final cost's verdict: "spurious" (|f| ≤ TOL·|f*|, on the spurious set's value 0),
    "optimal" (f − f* ≤ TOL·|f*|) or "other"."""
    fstar = optimum(p)[0]
    tol = TOL * abs(fstar)
    return [
        "spurious" if abs(v) <= tol else "optimal" if v - fstar <= tol else "other"
        for v in values.tolist()
    ]


def riemannian_gd(
    C: Tensor, W: Tensor, *, lr: float, tol: float = 1e-6, max_steps: int = 20_000
) -> dict[str, Tensor]:
    """Riemannian gradient descent Y ← retract(Y − lr·grad f(Y)) on every start until its
    gradient norm is ≤ tol (or max_steps). W (S, n, p). Returns W, cost (S,), grad_norm (S,),
    steps (S,) (steps taken)."""
    if lr <= 0 or tol <= 0 or max_steps < 1:
        raise UserError(f"need lr > 0, tol > 0, max_steps >= 1; got {lr}, {tol}, {max_steps}")
    W = W.detach().to(DT).clone()
    steps = torch.full((len(W),), max_steps, dtype=torch.long)
    active = torch.arange(len(W))  # (A,) starts still descending
    for t in range(0, max_steps, _CHECK_EVERY):
        Wa = W[active]
        finished = torch.full((len(active),), -1, dtype=torch.long)  # step it converged at
        for i in range(min(_CHECK_EVERY, max_steps - t)):
            g = riemannian_grad(C, Wa)
            done = g.flatten(1).norm(dim=1) <= tol  # a converged start stays where it is
            finished[done & (finished < 0)] = t + i
            Wa = torch.where(done[:, None, None], Wa, retract(Wa - lr * g))
        W[active] = Wa
        steps[active[finished >= 0]] = finished[finished >= 0]
        active = active[finished < 0]
        if len(active) == 0:
            break
    return {
        "W": W,
        "cost": objective(C, W),
        "grad_norm": riemannian_grad(C, W).flatten(1).norm(dim=1),
        "steps": steps,
    }


def fd_hess_vec(C: Tensor, W: Tensor, U: Tensor) -> Tensor:
    """Manopt's finite-difference Hessian (approxhessianFD): (P_Y grad f(R_Y(cU)) − grad f(Y))/c
    with c = 2⁻¹⁴/‖U‖ (per start; 0 where U = 0). Nonlinear in U, O(2⁻¹⁴)-close to `hess_vec`.
    (S, n, p)."""
    norm = U.flatten(1).norm(dim=1)[:, None, None]  # (S, 1, 1)
    c = 2.0**-14 / norm.clamp(min=torch.finfo(DT).tiny)
    moved = project(W, riemannian_grad(C, retract(W + c * U)))
    return torch.where(norm > 0, (moved - riemannian_grad(C, W)) / c, torch.zeros_like(U))


def _dot(U: Tensor, V: Tensor) -> Tensor:
    return (U * V).sum((-2, -1))  # (S,)


def _tcg(
    hv: Callable[[Tensor], Tensor],
    W: Tensor,
    g: Tensor,
    delta: Tensor,
    maxinner: int,
    kappa: float = 0.1,
    theta: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Steihaug–Toint truncated CG on the model ⟨g, η⟩ + ½⟨η, Hη⟩ within ‖η‖ ≤ Δ, one per
    start (Manopt's trs_tCG, no preconditioner): stops at the boundary (negative curvature or
    leaving the region), when the model would increase, or when the residual falls below
    ‖r₀‖·min(‖r₀‖^θ, κ). Returns η, Hη (S, n, p) and limited_by_TR (S,) bool."""

    def col(x: Tensor) -> Tensor:
        return x[:, None, None]

    eta, Heta = torch.zeros_like(g), torch.zeros_like(g)
    r, mdelta = g, g  # mdelta = −δ
    z_r = _dot(r, r)
    norm_r0 = z_r.sqrt()
    d_Pd, e_Pd, e_Pe, model = z_r, torch.zeros_like(z_r), torch.zeros_like(z_r), 0 * z_r
    limited = torch.zeros(len(g), dtype=torch.bool)
    running = torch.ones(len(g), dtype=torch.bool)
    for _ in range(maxinner):
        Hm = hv(mdelta)
        d_Hd = _dot(mdelta, Hm)
        alpha = z_r / d_Hd
        e_Pe_new = e_Pe + 2 * alpha * e_Pd + alpha**2 * d_Pd
        edge = running & ((d_Hd <= 0) | (e_Pe_new >= delta**2))
        tau = (-e_Pd + (e_Pd**2 + d_Pd * (delta**2 - e_Pe)).sqrt()) / d_Pd
        eta = torch.where(col(edge), eta - col(tau) * mdelta, eta)
        Heta = torch.where(col(edge), Heta - col(tau) * Hm, Heta)
        limited |= edge
        running &= ~edge
        new_eta, new_Heta = eta - col(alpha) * mdelta, Heta - col(alpha) * Hm
        new_model = _dot(new_eta, g) + 0.5 * _dot(new_eta, new_Heta)
        running &= new_model < model
        eta = torch.where(col(running), new_eta, eta)
        Heta = torch.where(col(running), new_Heta, Heta)
        model = torch.where(running, new_model, model)
        e_Pe = torch.where(running, e_Pe_new, e_Pe)
        r = torch.where(col(running), r - col(alpha) * Hm, r)
        norm_r = _dot(r, r).sqrt()
        running &= norm_r > norm_r0 * torch.clamp(norm_r0**theta, max=kappa)
        if not running.any():
            break
        z_r_old, z_r = z_r, _dot(r, r)
        beta = z_r / z_r_old
        mdelta = torch.where(col(running), project(W, r + col(beta) * mdelta), mdelta)
        e_Pd = torch.where(running, beta * (e_Pd + alpha * d_Pd), e_Pd)
        d_Pd = torch.where(running, z_r + beta**2 * d_Pd, d_Pd)
    return eta, Heta, limited


def trust_regions(
    C: Tensor,
    W: Tensor,
    *,
    model_scale: float = 0.5,
    exact_hessian: bool = False,
    tol: float = 1e-6,
    max_iter: int = 1000,
) -> dict[str, Tensor]:
    """Riemannian trust-regions (Absil, Baker & Gallivan 2007) as Manopt's `trustregions` runs
    it with default options on the oblique manifold, vectorised over the starts W (S, n, p):
    truncated CG with at most dim = n(p − 1) inner steps, Δ̄ = π√n, Δ₀ = Δ̄/8, Δ/4 when
    ρ < 1/4, min(2Δ, Δ̄) when ρ > 3/4 at the boundary, accept when ρ > 0.1, ρ regularised by
    1e3·eps·max(1, |f|); a start stops when its model gradient norm is < tol, or after
    max_iter outer iterations. The model is model_scale·(grad f, H) with H Manopt's
    finite-difference Hessian (`fd_hess_vec`), or the exact one (`hess_vec`) with
    exact_hessian: model_scale 0.5 is their script's (its gradient CY is half of f's), 1.0
    the consistent one.

    Returns W, cost (S,), grad_norm (S,) (of f, unscaled), iterations (S,)."""
    if model_scale <= 0 or tol <= 0 or max_iter < 1:
        raise UserError(
            f"need model_scale > 0, tol > 0, max_iter >= 1; got {model_scale}, {tol}, {max_iter}"
        )
    hv = hess_vec if exact_hessian else fd_hess_vec
    W = W.detach().to(DT).clone()
    S, n, p = W.shape
    delta_bar = math.pi * math.sqrt(n)
    delta = torch.full((S,), delta_bar / 8, dtype=DT)
    iterations = torch.full((S,), max_iter, dtype=torch.long)
    eps = torch.finfo(DT).eps
    active = torch.arange(S)
    for k in range(max_iter + 1):
        Wa = W[active]
        fa, ga = objective(C, Wa), model_scale * riemannian_grad(C, Wa)
        done = ga.flatten(1).norm(dim=1) < tol
        iterations[active[done]] = k
        active, Wa, fa, ga = active[~done], Wa[~done], fa[~done], ga[~done]
        if len(active) == 0 or k == max_iter:
            break
        eta, Heta, limited = _tcg(
            lambda U, Wa=Wa: model_scale * hv(C, Wa, U), Wa, ga, delta[active], n * (p - 1)
        )
        proposal = retract(Wa + eta)
        reg = fa.abs().clamp(min=1) * eps * 1e3
        rhonum = fa - objective(C, proposal) + reg
        rhoden = -_dot(eta, ga + 0.5 * Heta) + reg
        rho = rhonum / rhoden
        decreased = rhoden >= 0
        da = delta[active]
        shrink = (rho < 0.25) | ~decreased | rho.isnan()
        grow = ~shrink & (rho > 0.75) & limited
        delta[active] = torch.where(
            shrink, da / 4, torch.where(grow, (2 * da).clamp(max=delta_bar), da)
        )
        accept = decreased & (rho > 0.1)
        W[active] = torch.where(accept[:, None, None], proposal, Wa)
    return {
        "W": W,
        "cost": objective(C, W),
        "grad_norm": riemannian_grad(C, W).flatten(1).norm(dim=1),
        "iterations": iterations,
    }


def perturbation_experiment(
    p: int,
    *,
    trials: int,
    scales: Sequence[float] = PERTURBATIONS,
    method: str = "trust-regions",
    first_seed: int = 0,
    **options: float | bool,
) -> dict[float, dict[str, int]]:
    """Their experiment rerun: `trials` starts `perturb`ed from Y₀ at each scale (seeds
    first_seed … first_seed + trials − 1, the same Gaussian draws at every scale), run by
    `trust_regions` (method "trust-regions", by default theirs) or `riemannian_gd` ("gd",
    options lr=…), and counted by `classify`. All scales run as one batch. Returns
    {scale: {"spurious": …, "optimal": …, "other": …, "trials": …}}."""
    runners = {"trust-regions": trust_regions, "gd": riemannian_gd}
    if method not in runners:
        raise UserError(f"method {method!r}: expected one of {tuple(runners)}")
    if trials < 1:
        raise UserError(f"trials={trials}: need at least one start per scale")
    seeds = range(first_seed, first_seed + trials)
    starts = torch.cat([perturb(p, s, seeds) for s in scales])  # (len(scales)·trials, n, p)
    result = runners[method](cost_matrix(p), starts, **options)
    verdicts = classify(p, result["cost"])
    out = {}
    for i, scale in enumerate(scales):
        mine = verdicts[i * trials : (i + 1) * trials]
        out[scale] = {k: mine.count(k) for k in ("spurious", "optimal", "other")}
        out[scale]["trials"] = trials
    return out


def burer_monteiro(p: int = 2, perturbation: float = 0.25) -> Problem:
    """Their instance at rank p (n = 2p) as a `Problem` (see the module docstring): starts
    perturbed from Y₀ at `perturbation`, objective ⟨C, YYᵀ⟩, success below f* + TOL·|f*|,
    samples x ~ N(0, C − λ_min I) with target 0 (population MSE ½(f − f*)). Its spurious
    minima are not isolated (the manifold N), so `stuck` decides by the cost, |f| ≤ TOL·|f*|
    (`classify`'s "spurious"), and the benchmark keeps the degenerate points it certifies
    there. Registered with size p: `qmse escape --problem burer-monteiro --teacher-widths
    2,25` runs one cell per rank."""
    _check_rank(p)
    if not perturbation >= 0:
        raise UserError(f"perturbation={perturbation!r}: need a number >= 0")
    n = 2 * p
    C = cost_matrix(p)
    fstar = optimum(p)[0]
    lam, V = torch.linalg.eigh(C - fstar / n * torch.eye(n, dtype=DT))
    root = lam.clamp(min=0).sqrt()[:, None] * V.T  # (n, n): rootᵀroot = C − λ_min I

    def sample(m: int, B: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        g = torch.randn(m, B, n, generator=generator, device=generator.device)
        return g @ root.to(g), torch.zeros(m, B, p, device=g.device)

    return Problem(
        name="burer-monteiro",
        instance={"p": p, "n": n, "perturbation": perturbation},
        shape=(n, p),
        outputs=p,
        init=lambda seeds: perturb(p, perturbation, seeds),
        sample=sample,
        predict=lambda W, x: x.to(W) @ W,  # (S, B, n) @ (S, n, p) → (S, B, p)
        objective=lambda W: objective(C, W),
        success=fstar + TOL * abs(fstar),
        optimum=fstar,
        hessian=lambda w: riemannian_hessian(C, w),
        canonical=lambda W: W @ W.mT,  # (S, n, n) Gram matrices
        project=project,
        retract=retract,
        stuck=lambda W: objective(C, W).abs() <= TOL * abs(fstar),
        description=f"Burer–Monteiro, O'Carroll et al.'s cost at rank p={p} (n={n})",
    )


register_problem("burer-monteiro", burer_monteiro, size="p")
