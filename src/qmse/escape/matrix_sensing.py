"""Rank-1 matrix sensing (Zhang, Josz, Sojoudi & Lavaei, NeurIPS 2018, "How much restricted
isometry is needed in nonconvex matrix recovery?") as a problem of the escape benchmark.

Recover M* = zzᵀ from m linear measurements bᵢ = ⟨Aᵢ, zzᵀ⟩ by minimising

    f(x) = Σᵢ (⟨Aᵢ, xxᵀ⟩ − bᵢ)² = ⟨M, 𝓗 M⟩,   M = xxᵀ − zzᵀ,   𝓗 = Σᵢ Aᵢ ⊗ Aᵢ,

the plain sum over measurements (no 1/m). The operator satisfies RIP with constant δ when
(1 − δ)‖M‖²_F ≤ γ‖𝒜(M)‖² ≤ (1 + δ)‖M‖²_F for every symmetric M of rank ≤ 2 and some scaling
γ > 0, so δ = (U − L)/(U + L) for the extreme quotients U, L of ‖𝒜(M)‖²/‖M‖²_F over rank ≤ 2.

From the paper (its abstract, the only part of the NeurIPS text readable here) and from its
journal sequel (Zhang, Sojoudi & Lavaei, JMLR 20(114), 2019, abstract): for a rank-1 ground
truth, δ < 1/2 leaves no spurious local minimum and is sharp; "one specific counterexample has
RIP constant δ = 1/2, but causes randomly initialized stochastic gradient descent (SGD) to fail
12 % of the time" (`PUBLISHED_FAILURE`). The body (the instance as printed, the SGD protocol)
could not be read.

The instance (a reconstruction, checked here): for n = 2, z = e₁, the smallest RIP constant at
which some x ≠ ±z is a second-order critical point is 1/2, reached only at x ⊥ z with
‖x‖² = ‖z‖²/2, where the operator is unique up to scale:
‖𝒜(M)‖² = M₁₁² + M₂₂² + M₁₁M₂₂ + 3M₁₂² (eigenvalues 1/2, 3/2, 3/2). Checked: δ comes out 1/2
(`rip_constant`), x = e₂/√2 is critical with a positive semidefinite Hessian (`certify`); a
penalised Nelder–Mead search over the 3×3 operators (a one-off check, not shipped) found no
smaller δ at that point and the same operator there, and δ > 1/2 at the other angles and
norms of x it tried (‖x‖² ∈ {0.3, 0.5, 0.7}, angle to z ∈ {0.8, 1.2, π/2}).

Choices of this module (not the paper's):
- A family through it, `make_instance(delta, n, seed)`: on the block span{E₁₁, E₂₂, E₁₂}
  ‖𝒜(M)‖² = M₁₁² + M₂₂² + 2δ M₁₁M₂₂ + 2(1 + δ) M₁₂², which is (1 − 2δ)·I + 2δ·(the published
  operator), eigenvalues 1 − δ, 1 + δ, 1 + δ; on the rest of Sym(n) the identity (seed None)
  or eigenvalues uniform in [1 − δ, 1 + δ] in random eigenvectors; so the RIP constant over
  rank ≤ 2 is δ exactly, with γ = 1, and f(0) = 1. The point x* = √δ·e₂ (‖x*‖² = δ, x* ⊥ z)
  is critical with f(x*) = 1 − δ² and Hessian eigenvalues 4(1 + δ)(2δ − 1) (along z), 8δ
  (along x*) and, for n > 2, some in [4δ(1 − δ), 4δ(1 + δ)]. So δ > 1/2: a strict spurious
  minimum; δ < 1/2: a strict saddle (the negative control: no spurious minimum by the
  theorem); δ = 1/2: the published instance. A seed draws a random rotation of Rⁿ (z = Qe₁,
  x* = Q√δe₂), the complement and the measurements.
- The measurements realising 𝓗: seed None, its eigenbasis, m = n(n+1)/2 matrices √λₖ·Bₖ; for
  δ = 1/2, n = 2: A₁ = ½·diag(1, −1), A₂ = (√3/2)·I, A₃ = (√3/2)·[[0, 1], [1, 0]]. A seed
  mixes them, Aᵢ = Σₖ Vᵢₖ√λₖBₖ with V (m × d) random orthonormal columns (same 𝓗, same f).
  The choice matters to SGD, not to f: with the eigenbasis every measurement's gradient at a
  point x ⊥ z is ⊥ z, so the set x ⊥ z (a line for n = 2) is invariant under SGD as under
  gradient descent, while a mixed realisation's noise pushes off it.
- SGD (`sgd`): x ← x − lr·(m/B)·Σ_{i∈batch} ∇(⟨Aᵢ, xxᵀ⟩ − bᵢ)², B indices uniform with
  replacement, fresh per start and step: an unbiased estimate of ∇f, so lr means the same for
  gradient descent (batch None). Starts x₀ ~ N(0, init_scale²·Iₙ). A start fails when
  f(x) ≥ `SUCCESS` (= 1e-6·f(0); f ≥ (1 − δ)‖xxᵀ − zzᵀ‖²_F, so success means
  ‖xxᵀ − zzᵀ‖_F < 1.5e-3 at δ = 1/2) or is not finite after `steps` steps. In the problem's
  own units (`sample`/`predict`, one residual per measurement, mean of ½r² over the batch)
  the same step is lr·2m.
- The RIP constant (`isometry_bounds`): M = U S Uᵀ (U n × 2, S symmetric 2 × 2) covers every
  symmetric matrix of rank ≤ 2; the Rayleigh quotient ‖𝒜(M)‖²/‖M‖²_F is maximised and
  minimised by L-BFGS from `restarts` Gaussian starts (U re-orthonormalised between rounds),
  the best of each kept. A lower bound on δ in general; exact to 1e-9 on the tests'
  closed forms (n = 2, where rank ≤ 2 is all of Sym(2); and ‖M‖² + c·tr(M)² at n = 4, where
  rank ≤ 2 gives c/(1 + c), not the full space's).

The published point x* = e₂/√2 (δ = 1/2, z = e₁), certified (`qmse.escape.problems.certify`):
gradient 0, f(x*) = 3/4, Hessian diag(0, 4): "degenerate", the null direction u = e₁ = z.
Exactly (`curve_polynomial`), f(x* + t e₁) = 3/4 + t⁴, a quartic minimum along the line; but
along the parabola x* + t e₁ − √2 t² e₂, f = 3/4 − 3t⁴ + 4t⁸ < 3/4 for 0 < |t| < √3/2
(−3 is the smallest t⁴ coefficient over parabolas, `quartic_descent`; the curve
x₂² = (1 − 4x₁²)/2 on which f = 3/4 − 3x₁⁴ exactly). So x* is a second-order critical point
but not a local minimum: a degenerate saddle, left at fourth order. Gradient descent still
stalls near it: the line x ⊥ z is invariant and attracts (f = 1 − x₂² + x₂⁴ on it, minimal at
x*), and near the curve above ⟨x, z⟩ obeys d⟨x, z⟩/dτ = 12⟨x, z⟩³ under gradient flow, so
leaving from ⟨x, z⟩ = t₀ takes about 1/(24·lr·t₀²) steps of gradient descent (41,900 measured
against 41,667 predicted at t₀ = 0.01, lr = 0.01).

Shapes: X is (S, n) for S points; A (m, n, n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape.problems import Problem, register_problem

DT = torch.float64
PUBLISHED_DELTA = 0.5
PUBLISHED_FAILURE = 0.12  # the paper's abstract: randomly initialised SGD fails 12 % of the time
SUCCESS = 1e-6  # a start succeeded when f(x) < SUCCESS·f(0); every instance here has f(0) = 1
# Gradient descent's step on f from N(0, I) starts (gd-population): Safran & Shamir's 0.1
# diverged from 105, 209, 368 of 1,000 starts at n = 2, 3, 4 (δ = 0.45, seed 1, tuning seeds
# 10⁶ + i), 0.05 from 13, 41, 80, 0.02 from none (each converging within 800 steps).
DESCENT_LR = 0.02


@dataclass(frozen=True, eq=False)
class Instance:
    """A rank-1 sensing instance: ground truth z (n,), measurement matrices A (m, n, n),
    targets b = ⟨Aᵢ, zzᵀ⟩ (m,), its RIP constant by construction `delta` and the constructed
    critical point `spurious` x* (n,); `spec` what made it (JSON-able)."""

    z: Tensor
    A: Tensor
    delta: float
    spurious: Tensor
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.z.shape[0]

    @property
    def m(self) -> int:
        return self.A.shape[0]

    @property
    def b(self) -> Tensor:
        return torch.einsum("mij,i,j->m", self.A, self.z, self.z)


def sym_basis(n: int) -> Tensor:
    """An orthonormal basis of the symmetric n × n matrices (Frobenius inner product),
    E₁₁, E₂₂, (E₁₂ + E₂₁)/√2 first, then the other diagonal and off-diagonal ones: (d, n, n),
    d = n(n+1)/2."""
    pairs = [(0, 0), (1, 1), (0, 1)]
    pairs += [(i, i) for i in range(2, n)]
    pairs += [(i, j) for i in range(n) for j in range(i + 1, n) if (i, j) != (0, 1)]
    B = torch.zeros(len(pairs), n, n, dtype=DT)
    for k, (i, j) in enumerate(pairs):
        if i == j:
            B[k, i, i] = 1.0
        else:
            B[k, i, j] = B[k, j, i] = 1 / math.sqrt(2)
    return B


def _orthogonal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    """A Haar-random (rows, cols) matrix with orthonormal columns."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=DT))
    return Q * torch.sign(torch.diagonal(R))


def make_instance(
    delta: float = PUBLISHED_DELTA, n: int = 2, seed: int | None = None, m: int | None = None
) -> Instance:
    """The instance of RIP constant `delta` in the family through the published one (module
    docstring): delta = 1/2, n = 2, seed None is the published instance; delta > 1/2 puts a
    strict spurious minimum at √δ·e₂ (rotated), delta < 1/2 leaves none. A seed draws the
    rotation, the operator off the 3-dimensional block and m ≥ n(n+1)/2 mixed measurements
    (default n(n+1)/2); without one the frame is canonical and the measurements the
    operator's eigenbasis."""
    if not 0 < delta < 1:
        raise UserError(f"delta must lie in (0, 1): got {delta}")
    if n < 2:
        raise UserError(f"n must be at least 2 (z and a spurious point orthogonal to it): got {n}")
    d = n * (n + 1) // 2
    if seed is None and m not in (None, d):
        raise UserError(f"m = {m} needs a seed to draw the mixed measurements (or leave m unset)")
    if m is not None and m < d:
        raise UserError(f"m must be at least n(n+1)/2 = {d} to realise the operator: got {m}")
    B = sym_basis(n)  # (d, n, n)
    s = 1 / math.sqrt(2)
    # rows: the block's eigenvectors in the basis (E11, E22, E12), eigenvalues 1 - δ, 1 + δ, 1 + δ
    E = torch.eye(d, dtype=DT)
    E[:3, :3] = torch.tensor([[s, -s, 0.0], [s, s, 0.0], [0.0, 0.0, 1.0]], dtype=DT)
    lam = torch.ones(d, dtype=DT)
    lam[:3] = torch.tensor([1 - delta, 1 + delta, 1 + delta], dtype=DT)
    Q = torch.eye(n, dtype=DT)
    root = lam.sqrt()[:, None] * E  # (d, d): root^T root = the operator in the basis B
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        Q = _orthogonal(n, n, g)
        if d > 3:
            W = _orthogonal(d - 3, d - 3, g)
            lam[3:] = 1 - delta + 2 * delta * torch.rand(d - 3, generator=g, dtype=DT)
            root = lam.sqrt()[:, None] * torch.block_diag(E[:3, :3], W.T)
        root = _orthogonal(m or d, d, g) @ root  # (m, d)
    B = torch.einsum("ia,kab,jb->kij", Q, B, Q)  # the basis in the rotated frame
    A = torch.einsum("mk,kij->mij", root, B)
    return Instance(
        z=Q[:, 0].clone(),
        A=A,
        delta=float(delta),
        spurious=math.sqrt(delta) * Q[:, 1],
        spec={"delta": float(delta), "n": n, "seed": seed, "m": A.shape[0]},
    )


def objective(instance: Instance, X: Tensor) -> Tensor:
    """f at each point of X (S, n): (S,) float64, differentiable."""
    X = X.to(DT)
    r = torch.einsum("mij,si,sj->sm", instance.A, X, X) - instance.b  # (S, m)
    return (r**2).sum(-1)


def hessian(instance: Instance, x: Tensor) -> Tensor:
    """∇²f(x) = 8 Σᵢ (Aᵢx)(Aᵢx)ᵀ + 4 Σᵢ rᵢ Aᵢ, rᵢ = ⟨Aᵢ, xxᵀ⟩ − bᵢ: (n, n)."""
    x = x.to(DT)
    Ax = instance.A @ x  # (m, n)
    r = Ax @ x - instance.b
    return 8 * Ax.T @ Ax + 4 * torch.einsum("m,mij->ij", r, instance.A)


def _quotients(A: Tensor, U: Tensor, S: Tensor) -> Tensor:
    """‖𝒜(M)‖²/‖M‖²_F for M = U S Uᵀ, S = [[S₀, S₂], [S₂, S₁]]: A (m, n, n), U (..., n, 2),
    S (..., 3) -> (...)."""
    M = U @ S[..., [0, 2, 2, 1]].unflatten(-1, (2, 2)) @ U.transpose(-1, -2)  # (..., n, n)
    M = M.flatten(-2)
    return (M @ A.flatten(1).T).pow(2).sum(-1) / M.pow(2).sum(-1)


def _refine(A: Tensor, U: Tensor, S: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """One round of L-BFGS on Σ sign·quotient from M = U S Uᵀ, U first re-orthonormalised
    (the same M)."""
    U, R = torch.linalg.qr(U)
    S2 = R @ S[..., [0, 2, 2, 1]].unflatten(-1, (2, 2)) @ R.transpose(-1, -2)
    S = torch.stack([S2[..., 0, 0], S2[..., 1, 1], S2[..., 0, 1]], -1)
    U, S = U.contiguous().requires_grad_(), S.contiguous().requires_grad_()
    opt = torch.optim.LBFGS(
        [U, S],
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = (sign * _quotients(A, U, S)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return U.detach(), S.detach()


def isometry_bounds(A: Tensor, *, restarts: int = 32, seed: int = 0) -> tuple[float, float]:
    """(L, U): the smallest and largest ‖𝒜(M)‖²/‖M‖²_F over symmetric M of rank ≤ 2, for
    measurement matrices A (m, n, n); by L-BFGS from `restarts` random starts, four rounds
    (module docstring), so L is an upper and U a lower bound of the true values."""
    g = torch.Generator().manual_seed(seed)
    n = A.shape[-1]
    U = torch.randn(2, restarts, n, 2, generator=g, dtype=DT)  # [0]: maximise, [1]: minimise
    S = torch.randn(2, restarts, 3, generator=g, dtype=DT)
    sign = torch.tensor([-1.0, 1.0], dtype=DT)[:, None]
    for _ in range(4):
        U, S = _refine(A.to(DT), U, S, sign)
    q = _quotients(A.to(DT), U, S)
    return q[1].min().item(), q[0].max().item()


def rip_constant(A: Tensor, *, restarts: int = 32, seed: int = 0) -> float:
    """δ = (U − L)/(U + L) over rank ≤ 2 (the best scaling γ = 2/(U + L)), for measurement
    matrices A (m, n, n); see `isometry_bounds`."""
    low, high = isometry_bounds(A, restarts=restarts, seed=seed)
    return (high - low) / (high + low)


def curve_polynomial(instance: Instance, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
    """The exact coefficients of f(x + t u + t² v) in powers t⁰ … t⁸ (v None: the line):
    (9,)."""
    x, u = x.to(DT), u.to(DT)
    v = torch.zeros_like(x) if v is None else v.to(DT)
    A = instance.A

    def form(p: Tensor, q: Tensor) -> Tensor:
        return torch.einsum("i,mij,j->m", p, A, q)

    c = torch.stack(  # (m, 5): each residual ⟨Aᵢ, x(t)x(t)ᵀ⟩ − bᵢ as a quartic in t
        [
            form(x, x) - instance.b,
            2 * form(u, x),
            form(u, u) + 2 * form(v, x),
            2 * form(u, v),
            form(v, v),
        ],
        -1,
    )
    outer = c.T @ c  # (5, 5)
    return torch.stack([outer.flip(1).diagonal(4 - j).sum() for j in range(9)])


def quartic_descent(
    instance: Instance, x: Tensor, u: Tensor, *, tol: float = 1e-9
) -> tuple[float, Tensor]:
    """At a critical point x whose Hessian has u in its null space and whose cubic term along
    u vanishes: (c, v), the smallest coefficient c of t⁴ in f(x + t u + t² v) − f(x) over v,
    and the v of least norm attaining it. c < 0: x is not a local minimum (f falls like c·t⁴
    along that parabola); c > 0: no parabola through x along u descends at fourth order.
    The t⁴ coefficient is vᵀ(½∇²f)v + 2pᵀv + Σᵢ(uᵀAᵢu)², p = Σᵢ 2(uᵀAᵢu)Aᵢx + 4(uᵀAᵢx)Aᵢu."""
    x, u = x.to(DT), u.to(DT)
    line = curve_polynomial(instance, x, u)
    if line[1:4].abs().max() > tol * max(1.0, line.abs().max().item()):
        raise UserError(
            "the quartic test needs a critical point x, u in its Hessian's null space and no "
            f"cubic term along u; f(x + t u) has t, t², t³ coefficients {line[1:4].tolist()}"
        )
    A = instance.A
    Ax, Au = A @ x, A @ u  # (m, n)
    a, c1 = Au @ u, 2 * (Au @ x)
    p = 2 * (a[:, None] * Ax).sum(0) + 2 * (c1[:, None] * Au).sum(0)
    v = -torch.linalg.pinv(hessian(instance, x) / 2, hermitian=True, rtol=1e-10) @ p
    return (line[4] + p @ v).item(), v


def sgd(
    instance: Instance,
    X: Tensor,
    steps: int,
    lr: float,
    batch: int | None,
    generator: torch.Generator,
) -> Tensor:
    """`steps` steps of SGD from each start of X (S, n): x ← x − lr·(m/B)·Σ_{i∈batch}
    ∇(⟨Aᵢ, xxᵀ⟩ − bᵢ)², B = batch indices uniform with replacement, per start and step
    (batch None: the full gradient, gradient descent). Returns (S, n); a diverged start holds
    inf or nan."""
    if batch is not None and batch < 1:
        raise UserError(f"batch must be a positive number of measurements or None: got {batch}")
    if not lr > 0 or steps < 0:
        raise UserError(f"need lr > 0 and steps ≥ 0: got lr={lr}, steps={steps}")
    A, b, m = instance.A, instance.b, instance.m
    X = X.to(DT).clone()
    if batch is not None:
        ones = torch.full((X.shape[0], batch), m / batch, dtype=DT)
    for _ in range(steps):
        AX = torch.einsum("mij,sj->smi", A, X)  # (S, m, n)
        r = (AX * X[:, None]).sum(-1) - b  # (S, m)
        if batch is not None:
            idx = torch.randint(m, (X.shape[0], batch), generator=generator)
            r = r * torch.zeros_like(r).scatter_add_(1, idx, ones)
        X = X - 4 * lr * (r[..., None] * AX).sum(1)
    return X


def sgd_starts(instance: Instance, starts: int, seed: int, init_scale: float = 1.0):
    """The random starts of `sgd_failure_rate` and the generator that then draws the
    batches: ((starts, n) ~ N(0, init_scale²·I), generator)."""
    g = torch.Generator().manual_seed(seed)
    return init_scale * torch.randn(starts, instance.n, generator=g, dtype=DT), g


def sgd_failure_rate(
    instance: Instance,
    starts: int,
    steps: int,
    lr: float,
    batch: int | None,
    seed: int,
    init_scale: float = 1.0,
) -> tuple[int, int]:
    """(failures, starts): SGD (`sgd`) from `starts` random starts x₀ ~ N(0, init_scale²·I)
    for `steps` steps; a start fails when f ≥ SUCCESS (f(0) = 1) or it diverged.
    Deterministic in `seed`."""
    X, g = sgd_starts(instance, starts, seed, init_scale)
    final = objective(instance, sgd(instance, X, steps, lr, batch, g))
    return int((~(final < SUCCESS)).sum()), starts


def _canonical(W: Tensor) -> Tensor:
    """x and −x are the same point: xxᵀ, (S, n) -> (S, n, n)."""
    return W[..., :, None] * W[..., None, :]


def matrix_sensing_problem(
    delta: float = PUBLISHED_DELTA,
    n: int = 2,
    seed: int | None = None,
    m: int | None = None,
    init_scale: float = 1.0,
) -> Problem:
    """The `Problem` of `make_instance(delta, n, seed, m)`: parameters x (n,); one sample is
    a measurement Aᵢ (n, n) drawn uniformly with its target bᵢ (1 output); predict ⟨Aᵢ, xxᵀ⟩;
    objective f (the full sum); success f < SUCCESS; starts N(0, init_scale²·I), one
    generator per seed; gradient descent's step DESCENT_LR / init_scale² (the curvature
    grows with ‖x‖²); canonical form xxᵀ (x ↔ −x); stuck: every start that did not
    succeed. Registered with size n: `qmse escape --problem matrix-sensing --problem-args
    delta=0.7,seed=1 --teacher-widths 2,3` runs one cell per dimension."""
    inst = make_instance(delta, n, seed, m)
    A, b = inst.A, inst.b

    def init(seeds) -> Tensor:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return torch.stack([init_scale * torch.randn(n, generator=g, dtype=DT) for g in gens])

    def sample(starts: int, B: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(inst.m, (starts, B), generator=generator)
        return A[idx], b[idx][..., None]  # (starts, B, n, n), (starts, B, 1)

    def predict(W: Tensor, x: Tensor) -> Tensor:
        return torch.einsum("sbij,si,sj->sb", x.to(W.dtype), W, W)[..., None]  # (S, B, 1)

    return Problem(
        name="matrix-sensing",
        instance={**inst.spec, "init_scale": init_scale},
        shape=(n,),
        outputs=1,
        init=init,
        sample=sample,
        predict=predict,
        objective=lambda W: objective(inst, W),
        success=SUCCESS,
        descent_lr=DESCENT_LR / init_scale**2,
        hessian=lambda w: hessian(inst, w),
        canonical=_canonical,
        description=(
            f"rank-1 matrix sensing, n={n}, RIP δ={delta}: spurious critical point √δ·e₂ "
            f"({'strict minimum' if delta > 0.5 else 'degenerate' if delta == 0.5 else 'saddle'})"
        ),
    )


register_problem("matrix-sensing", matrix_sensing_problem, size="n")
