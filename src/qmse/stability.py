"""Linear stability of SGD and heavy ball at a minimum: can minibatch noise alone make a
minimum unstable, at which step sizes, and how far do the iterates spread around it?

Linearisation. One sample's update field G(w; ξ) (the gradient of its loss; QMSE's is not a
gradient, its Q = (r + v)(r + v)ᵀ being held constant) is, near a point w₀,
G(w₀ + δ; ξ) ≈ g(ξ) + H(ξ)δ, ξ the sample with its loss's draw (QMSE's v, label noise's ξ).
A batch of B i.i.d. samples averages both: g_B, H_B with E[H_B] = H̄, Cov(H_B) = Cov(H)/B.
Heavy ball in PyTorch's convention (b ← βb + G, w ← w − lr·b; SGD is β = 0) on the state
s = (δ, b) is the random affine map

    s' = A_B s + e ⊗ g_B,   A_B = [[I − lr·H_B, −lr·β·I], [H_B, β·I]],   e = (−lr, 1).

Mean: E[s'] = A E[s] (A: H_B → H̄; E[g] = 0 at a stationary w₀). In H̄'s eigenbasis A splits
into 2×2 blocks A_i = [[1 − lr·λᵢ, −lr·β], [λᵢ, β]], stable iff 0 < lr·λᵢ < 2(1 + β): the
deterministic thresholds 2/λ_max (GD) and 2(1 + β)/λ_max (heavy ball).

Second moment (Wu, Ma & E 2018): with the batch independent of s, S = E[ssᵀ] obeys

    S' = T(S) + (eeᵀ) ⊗ Σ/B,   T(S) = A S Aᵀ + (eeᵀ) ⊗ 𝒞(S_δδ)/B,
    𝒞(X) = E[(H − H̄) X (H − H̄)ᵀ],   Σ = Cov(g),

and contracts iff ρ(T) < 1; ρ(T) ≥ ρ(A)², so it fails first. T = 𝒜 + ℬ, both positive maps
(𝒜(S) = A S Aᵀ), and for r > ρ(𝒜): ρ(T) = r iff ρ(ℬ(r − 𝒜)⁻¹) = 1. Read in the δδ block and
H̄'s eigenbasis, (r − 𝒜)⁻¹ applied to eeᵀ ⊗ Y is a Hadamard product K_r ∘ Y with
K_r(i, j) = Σ_{m≥1} r^{−m} [A_i^{m−1} e]_δ [A_j^{m−1} e]_δ (one 4×4 solve per pair of modes;
SGD: lr²/(r − (1 − lr·λᵢ)(1 − lr·λⱼ))). So all runs on P × P matrices, matrix-free: ρ(T) is
the r at which the Perron root of ℒ_r(Y) = 𝒞(K_r ∘ Y)/B crosses 1, and the second moment
contracts iff the mean does and ρ(ℒ₁) < 1. Stationary covariance: E[δδᵀ] = K₁ ∘ Y with
Y = Σ/B + ℒ₁(Y); from the additive noise alone (𝒞 = 0) it is the solution of the discrete
Lyapunov equation S = A S Aᵀ + (eeᵀ) ⊗ Σ/B (scipy.linalg.solve_discrete_lyapunov).

Problems. A finite sum is exact: its expectation is the mean over its terms (a batch draws B
of them with replacement): `quadratic` for quadratic terms, `finite_sum` for MSE on a problem
whose samples are a finite list (rank-1 matrix sensing's measurements), its per-sample
Hessians in full by autograd (outputs curved in w included). For a sampled
`qmse.escape.problems.Problem` (`linearise`)
the outputs f must be piecewise linear in w (teacher–student's f = A relu(Wx)): a sample's
H(ξ) is then JᵀDJ almost everywhere (J = ∂f/∂w, D = ∂q/∂f for the loss's output field
q = ∂ℓ/∂f, by central differences), but E[JᵀDJ] ≠ H̄: differentiating E[Jᵀq] also moves the
ReLU kinks, a term on the hyperplanes wᵢ·x = 0 that vanishes with the residual. H̄ is the
population Hessian: exact for a loss whose mean field is MSE's ("mse", "label-noise": the
problem's closed form); for QMSE and expected-QMSE (mean field: expected-QMSE's, teacher–student
only) MSE's closed form plus Monte Carlo of the difference field's Jacobian, E[Jᵀ(D − I)J] and
its kink term, block i of which is E[δ(wᵢ·x) aᵢᵀ(q − q_mse) x xᵀ] = E[aᵢᵀ(q − q_mse) x xᵀ |
wᵢ·x = 0]/(√(2π)‖wᵢ‖) for x ~ N(0, I) (a Gaussian projected onto the hyperplane); the
difference is small where the residual is, so is its Monte Carlo error. Each sample's kink
term is modelled as deterministic, H(ξ) = JᵀDJ + (H̄ − E[JᵀDJ]); the O(‖δ‖) change of Σ from
samples whose kinks δ crosses is beyond a linear theory. 𝒞 and Σ (and such an H̄) are Monte
Carlo: exact only for a finite sum, with standard errors from independent groups of samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg as sla
import torch
from torch import Tensor

from qmse import teacher_student as ts
from qmse.errors import UserError
from qmse.escape import problems
from qmse.loss import Loss, get_loss

DENSE_UP_TO = 144  # operators on at most this many entries (P² ≤ 144) are built densely


@dataclass(frozen=True)
class Linearisation:
    """The field G(w₀ + δ; ξ) ≈ g(ξ) + H(ξ)δ at a point, through N samples ξ_n.

    hessian: (P, P) H̄ = E[H], symmetric. gradients: (N, P) g(ξ_n). factors (N, R, P) F_n and
    curvatures (N, R, R) D_n: H(ξ_n) = F_nᵀ D_n F_n + H̄ − mean_n F_nᵀ D_n F_n. mean_gradient:
    (P,) E[g], exact where known. groups: the samples form this many contiguous independent
    groups, for standard errors (1: exact, a finite sum); group_hessians (groups, P, P): H̄
    per group when it is Monte Carlo, else None."""

    hessian: np.ndarray
    gradients: np.ndarray
    factors: np.ndarray
    curvatures: np.ndarray
    mean_gradient: np.ndarray
    groups: int = 1
    group_hessians: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.hessian.shape[0]

    @property
    def shift(self) -> float:
        """‖H̄⁻¹E[g]‖: how far the linearised mean dynamics move from the point (a Newton
        step); the analysis is about the point itself, so this should be small."""
        return float(np.linalg.norm(np.linalg.lstsq(self.hessian, self.mean_gradient)[0]))

    def group(self, i: int) -> Linearisation:
        """Group i's samples alone (its own means), with its own H̄ where that is Monte Carlo."""
        rows = np.array_split(np.arange(len(self.gradients)), self.groups)[i]
        H = self.hessian if self.group_hessians is None else self.group_hessians[i]
        g = self.gradients[rows]
        return Linearisation(H, g, self.factors[rows], self.curvatures[rows], g.mean(0))


def quadratic(hessians: np.ndarray, gradients: np.ndarray, w: np.ndarray | None = None):
    """The finite sum ℓ_i(w) = ½ wᵀH_i w + g_iᵀw (hessians (n, P, P) symmetric, gradients
    (n, P)), linearised (exactly) at w, by default at the minimiser of the mean."""
    Hs, gs = np.asarray(hessians, float), np.asarray(gradients, float)
    if not np.allclose(Hs, Hs.transpose(0, 2, 1)):
        raise UserError("quadratic: the per-sample Hessians must be symmetric")
    w = np.linalg.solve(Hs.mean(0), -gs.mean(0)) if w is None else np.asarray(w, float)
    return _exact(Hs, Hs @ w + gs)


def _exact(hessians: np.ndarray, gradients: np.ndarray) -> Linearisation:
    """The linearisation of a finite sum from its terms' Hessians (n, P, P) and gradients
    (n, P) at the point: one group, exact."""
    eye = np.broadcast_to(np.eye(hessians.shape[-1]), hessians.shape)
    return Linearisation(hessians.mean(0), gradients, eye, hessians, gradients.mean(0))


def finite_sum(problem: problems.Problem, w: Tensor, x: Tensor, y: Tensor) -> Linearisation:
    """The exact linearisation of MSE's per-sample field at w (*shape) for a problem whose
    samples are the N pairs (x (N, ...), y (N, C)), a batch drawing B of them uniformly with
    replacement: each term ½‖f(w; xᵢ) − yᵢ‖²'s gradient and Hessian by autograd, so outputs
    curved in w (matrix sensing's ⟨Aᵢ, xxᵀ⟩) are exact too. H̄ is their mean: the Hessian of
    the problem's objective only up to its scale (matrix sensing's f = Σᵢ rᵢ² is 2N times
    the mean)."""
    if problem.project is not None:
        raise UserError(f"problem {problem.name!r} lives on a manifold; linearise a flat one")
    shape = problem.shape
    x, y = x.double(), y.double()

    def term(v: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
        f = problem.predict(v.view(1, *shape), xi.view(1, 1, *xi.shape))[0, 0]
        return 0.5 * ((f - yi) ** 2).sum()

    w = w.detach().double().reshape(-1)
    g = torch.func.vmap(torch.func.grad(term), in_dims=(None, 0, 0))(w, x, y)
    H = torch.func.vmap(torch.func.hessian(term), in_dims=(None, 0, 0))(w, x, y)
    return _exact(0.5 * (H + H.transpose(1, 2)).numpy(), g.numpy())


def linearise(
    problem: problems.Problem,
    w: Tensor,
    loss: str | Loss = "mse",
    *,
    samples: int = 2**14,
    groups: int = 8,
    seed: int = 0,
    **loss_params: float,
) -> Linearisation:
    """The linearisation of `loss`'s per-sample update field at w (*shape) from `samples`
    draws of the problem's inputs (and of the loss's noise, with `loss_params`: label
    noise's sigma), in `groups` groups for standard errors (module docstring). The problem's
    objective must be its population (or full-sum) ½‖r‖², as teacher–student's is: its
    gradient and Hessian are the exact mean field and H̄ of MSE."""
    loss = get_loss(loss)
    if problem.project is not None:
        raise UserError(f"problem {problem.name!r} lives on a manifold; linearise a flat one")
    if samples < 2 * groups or groups < 2:
        raise UserError(f"need groups >= 2 and samples >= 2·groups; got {samples}, {groups}")
    shape, P = problem.shape, problem.size
    w = w.detach().double().reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    x, y = problem.sample(1, samples, gen)
    x, y = x[0].double(), y[0].double()  # (N, ...), (N, C)
    C = y.shape[-1]
    noise = None
    if loss.random:
        noise = loss.draw(samples, C, generator=gen, dtype=torch.float64, **loss_params)

    def one(v: Tensor, xi: Tensor) -> Tensor:  # f of one sample: (C,)
        return problem.predict(v.view(1, *shape), xi.view(1, 1, *xi.shape))[0, 0]

    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0), chunk_size=4096)
    J = jac(w, x)  # (N, C, P)
    u = torch.randn(P, generator=gen, dtype=torch.float64) * 1e-6 * (1 + w.norm()) / P**0.5
    moved = (jac(w + u, x[:64]) - jac(w - u, x[:64])).flatten(1).norm(dim=1)
    if (moved > 1e-9 * (1 + J[:64].flatten(1).norm(dim=1))).float().mean() > 0.5:
        raise UserError(
            f"problem {problem.name!r}: its outputs are curved in w (not piecewise linear), "
            "whose per-sample Hessians need ∇²f; build a Linearisation from them directly"
        )
    f = problem.predict(w.view(1, *shape), x[None])[0]  # (N, C)
    q, D = _output_field(loss, f, y, noise), _output_curvature(loss, f, y, noise)
    g = torch.einsum("ncp,nc->np", J, q)
    mean_loss = get_loss(loss.mean_gradient_loss) if loss.mean_gradient_loss else loss
    H = problems.hessian(problem, w.view(shape)).numpy()
    mean_g = problems.gradient(problem, w.view(1, *shape))[0].reshape(-1).numpy()
    group_H = None
    if mean_loss.name != "mse":  # MSE's exact values plus Monte Carlo of the difference field
        excess_q = _output_field(mean_loss, f, y, None) - _output_field(get_loss("mse"), f, y, None)
        mean_g = mean_g + torch.einsum("ncp,nc->p", J, excess_q).numpy() / samples
        excess = _output_curvature(mean_loss, f, y, None) - torch.eye(C, dtype=f.dtype)
        kinks = _kinks(problem, w, mean_loss, samples, groups, gen)
        group_H = []
        for rows, kink in zip(torch.tensor_split(torch.arange(samples), groups), kinks):
            Jg = J[rows].reshape(-1, P)  # (N_g·C, P)
            smooth = Jg.T @ (excess[rows] @ J[rows]).reshape(-1, P) / len(rows)
            group_H.append(H + (smooth + kink).numpy())
        group_H = np.stack(group_H)
        group_H = 0.5 * (group_H + group_H.transpose(0, 2, 1))
        H = group_H.mean(0)
    return Linearisation(H, g.numpy(), J.numpy(), D.numpy(), mean_g, groups, group_H)


def _output_field(loss: Loss, f: Tensor, y: Tensor, noise: Tensor | None) -> Tensor:
    """q = ∂ℓ/∂f of each sample at the outputs f (N, C), QMSE's Q held constant: (N, C)."""
    f = f.detach().requires_grad_()
    return torch.autograd.grad(loss.per_sample(f, y, noise).sum(), f)[0]


def _output_curvature(loss: Loss, f: Tensor, y: Tensor, noise: Tensor | None) -> Tensor:
    """D = ∂q/∂f by central differences (q is re-evaluated, QMSE's Q with it): (N, C, C),
    D[n, a, c] = ∂q_a/∂f_c."""
    h = 1e-4
    steps = torch.eye(f.shape[-1], dtype=f.dtype) * h
    return torch.stack(
        [(_output_field(loss, f + e, y, noise) - _output_field(loss, f - e, y, noise)) / (2 * h)
         for e in steps], -1)  # fmt: skip


def _teacher_student(problem: problems.Problem) -> ts.Problem:
    """The `qmse.teacher_student` instance behind a "teacher-student" Problem."""
    if problem.name != "teacher-student":
        raise UserError(
            f"problem {problem.name!r}: only teacher-student has the ReLU kinks this module "
            "integrates (a non-MSE mean field, a default global minimum)"
        )
    inst = problem.instance
    keys = ("outputs", "seed", "teacher")
    return ts.make_problem(inst["k"], inst["n"], **{k: inst[k] for k in keys})


def _kinks(problem, w: Tensor, loss: Loss, samples: int, groups: int, gen) -> Tensor:
    """Per group, the kink term of the Jacobian of E[Jᵀ(q − q_mse)] (module docstring) for
    teacher–student: block i is E[δ(wᵢ·x) aᵢᵀ(q − q_mse) x xᵀ] = E[… | wᵢ·x = 0]/(√(2π)‖wᵢ‖),
    x ~ N(0, I) projected onto the hyperplane: (groups, P, P)."""
    p = _teacher_student(problem)
    n, d = p.n, p.d
    W = w.view(n, d)
    out = torch.zeros(groups, n * d, n * d, dtype=torch.float64)
    for i in range(n):
        z = torch.randn(samples, d, generator=gen, dtype=torch.float64)
        u = W[i] / W[i].norm().clamp_min(1e-300)
        x = z - (z @ u)[:, None] * u  # (N, d), on wᵢ·x = 0
        f = ts.outputs(W[None], p.A_student, x[None])[0]  # (N, C)
        y = ts.outputs(p.V[None], p.A_teacher, x[None])[0]
        s = (_output_field(loss, f, y, None) - (f - y)) @ p.A_student[:, i]  # (N,)
        scale = math.sqrt(2 * math.pi) * float(W[i].norm())
        for j, rows in enumerate(torch.tensor_split(torch.arange(samples), groups)):
            block = (s[rows, None] * x[rows]).T @ x[rows] / (len(rows) * scale)
            out[j, i * d : (i + 1) * d, i * d : (i + 1) * d] = block
    return out


def iteration_matrix(hessian: np.ndarray, lr: float, beta: float) -> np.ndarray:
    """A, the mean map of heavy ball on (δ, b) (module docstring): (2P, 2P)."""
    H = np.asarray(hessian, float)
    eye = np.eye(len(H))
    return np.block([[eye - lr * H, -lr * beta * eye], [H, beta * eye]])


def mean_radius(hessian: np.ndarray, lr: float, beta: float) -> float:
    """ρ(A): the mean contracts iff it is below 1."""
    return float(np.abs(np.linalg.eigvals(iteration_matrix(hessian, lr, beta))).max())


def _kernel(lam: np.ndarray, lr: float, beta: float, r: float) -> np.ndarray:
    """K_r(i, j) = Σ_{m≥1} r^{−m} [A_i^{m−1}e]_δ [A_j^{m−1}e]_δ for the modes λ (P,): (P, P)."""
    one = np.ones_like(lam)
    A = np.stack(
        [np.stack([1 - lr * lam, -lr * beta * one], -1), np.stack([lam, beta * one], -1)], -2
    )
    P = len(lam)
    AA = np.einsum("iab,jcd->ijacbd", A, A).reshape(P, P, 4, 4)  # vec(A_i X A_jᵀ), row-major
    rhs = np.broadcast_to(np.array([lr * lr, -lr, -lr, 1.0])[:, None], (P, P, 4, 1))
    return np.linalg.solve(r * np.eye(4) - AA, rhs)[..., 0, 0]


class _Operator:
    """𝒞 in H̄'s eigenbasis U (module docstring), matrix-free: X (P, P) → 𝒞(X)."""

    def __init__(self, lin: Linearisation):
        self.lam, self.U = np.linalg.eigh(lin.hessian)
        self.F = lin.factors @ self.U  # (N, R, P)
        self.M = lin.curvatures @ self.F  # (N, R, P): H_n = F_nᵀ M_n in the eigenbasis
        self.G = np.einsum("nrp,nrq->pq", self.F, self.M) / len(self.F)
        self.sigma = self.U.T @ np.atleast_2d(np.cov(lin.gradients.T, bias=True)) @ self.U
        self.zero = not np.abs(self.noise(np.eye(len(self.U)))).max() > 0

    def noise(self, X: np.ndarray) -> np.ndarray:
        N, R, P = self.M.shape
        MX = (self.M.reshape(N * R, P) @ X).reshape(N, R, P)
        inner = MX @ self.M.transpose(0, 2, 1)  # (N, R, R): M X Mᵀ
        out = self.F.reshape(N * R, P).T @ (inner @ self.F).reshape(N * R, P) / N
        return out - self.G @ X @ self.G.T


def _perron(apply: Callable[[np.ndarray], np.ndarray], P: int, start=None):
    """Spectral radius of a positive linear map on P × P matrices, and its eigenvector."""
    n = P * P
    if n <= DENSE_UP_TO:
        M = np.stack([apply(e.reshape(P, P)).ravel() for e in np.eye(n)], 1)
        vals, vecs = np.linalg.eig(M)
        i = np.argmax(np.abs(vals))
        return float(np.abs(vals[i])), np.real(vecs[:, i])
    op = sla.LinearOperator((n, n), matvec=lambda v: apply(v.reshape(P, P)).ravel(), dtype=float)
    v0 = np.eye(P).ravel() if start is None else start
    vals, vecs = sla.eigs(op, k=1, which="LM", v0=v0, ncv=min(n - 1, 12), tol=1e-9)
    return float(np.abs(vals[0])), np.real(vecs[:, 0])


def _loop(op: _Operator, lr: float, beta: float, batch: int, r: float, start=None):
    """ρ(ℒ_r), ℒ_r(Y) = 𝒞(K_r ∘ Y)/B, and its eigenvector."""
    if op.zero:
        return 0.0, None
    K = _kernel(op.lam, lr, beta, r)
    return _perron(lambda Y: op.noise(K * Y) / batch, len(op.lam), start)


@dataclass(frozen=True)
class Stability:
    """The linearised iteration at one (lr, β, B). mean_radius ρ(A), second_radius ρ(T);
    covariance: the stationary E[δδᵀ] (P, P) with the multiplicative noise, additive_covariance
    the discrete Lyapunov solution from the additive noise Σ/B alone (None where unstable);
    spread, additive_spread: their root along H̄'s softest direction."""

    lr: float
    beta: float
    batch: int
    mean_radius: float
    second_radius: float
    covariance: np.ndarray | None
    additive_covariance: np.ndarray | None
    spread: float
    additive_spread: float


def analyse(lin: Linearisation, lr: float, beta: float, batch: int) -> Stability:
    """Mean and second-moment spectral radii and the stationary covariance (module docstring)."""
    op = _Operator(lin)
    rho_mean = mean_radius(lin.hessian, lr, beta)
    r0 = max(rho_mean**2, 1e-12)
    phi = lambda r: _loop(op, lr, beta, batch, r)[0] - 1  # noqa: E731
    rho_second = r0
    if phi(r0 * (1 + 1e-10)) > 0:
        hi = 2 * r0
        while phi(hi) > 0:
            hi *= 2
        rho_second = scipy.optimize.brentq(phi, r0 * (1 + 1e-10), hi, rtol=1e-10)
    if rho_second >= 1:
        nan = float("nan")
        return Stability(lr, beta, batch, rho_mean, rho_second, None, None, nan, nan)
    P = lin.size
    A = iteration_matrix(lin.hessian, lr, beta)
    e = np.array([[lr * lr, -lr], [-lr, 1.0]])
    Sigma = op.U @ op.sigma @ op.U.T
    additive = scipy.linalg.solve_discrete_lyapunov(A, np.kron(e, Sigma / batch))[:P, :P]
    K = _kernel(op.lam, lr, beta, 1.0)
    step = lambda v: v - (op.noise(K * v.reshape(P, P)) / batch).ravel()  # noqa: E731
    Y, info = sla.gmres(sla.LinearOperator((P * P, P * P), matvec=step), (op.sigma / batch).ravel(),
                        rtol=1e-12, atol=0.0, restart=min(P * P, 60), maxiter=200)  # fmt: skip
    if info != 0:
        raise RuntimeError(f"stationary covariance: GMRES did not converge (info={info})")
    full = op.U @ (K * Y.reshape(P, P)) @ op.U.T
    soft = op.U[:, 0]
    spread = math.sqrt(max(soft @ full @ soft, 0.0))
    return Stability(lr, beta, batch, rho_mean, rho_second, 0.5 * (full + full.T),
                     0.5 * (additive + additive.T), spread,
                     math.sqrt(max(soft @ additive @ soft, 0.0)))  # fmt: skip


def mean_threshold(hessian: np.ndarray, beta: float) -> float:
    """The smallest lr with ρ(A) ≥ 1, by bisection on the mean map (0: unstable at every lr)."""
    lo, hi = 0.0, 1.0 / max(np.abs(hessian).sum(1).max(), 1e-300)
    if np.linalg.eigvalsh(hessian)[0] <= 0:
        return 0.0
    while mean_radius(hessian, hi, beta) < 1:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_radius(hessian, mid, beta) < 1 else (lo, mid)
    return float(hi)


@dataclass(frozen=True)
class Thresholds:
    """Step sizes at which a point stops being linearly stable for (β, B): mean (ρ(A) = 1;
    2(1 + β)/λ_max) and second (the second moment, ≤ mean), with Monte Carlo standard
    errors (0 where exact)."""

    beta: float
    batch: int
    mean: float
    mean_se: float
    second: float
    second_se: float


def _se(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def thresholds(lin: Linearisation, beta: float, batch: int) -> Thresholds:
    """The mean threshold by bisection, the second-moment one by root-finding on ρ(ℒ₁) = 1
    below it (halving lr until stable, then Brent), their standard errors from the groups
    (the second by the delta method: the spread of ρ(ℒ₁) over groups at the threshold over
    its slope in lr)."""
    mean = mean_threshold(lin.hessian, beta)
    mean_se = 0.0
    if lin.group_hessians is not None:
        mean_se = _se([mean_threshold(Hg, beta) for Hg in lin.group_hessians])
    op, start = _Operator(lin), None
    if mean == 0 or op.zero:
        return Thresholds(beta, batch, mean, mean_se, mean, mean_se)

    def phi(lr: float) -> float:
        nonlocal start
        rho, start = _loop(op, lr, beta, batch, 1.0, start)
        return rho - 1

    hi = mean * (1 - 1e-9)
    if phi(hi) < 0:
        return Thresholds(beta, batch, mean, mean_se, mean, mean_se)
    lo = hi / 2
    while phi(lo) >= 0:
        if lo < 1e-12 * mean:
            return Thresholds(beta, batch, mean, mean_se, 0.0, 0.0)
        hi, lo = lo, lo / 2
    second = scipy.optimize.brentq(phi, lo, hi, rtol=1e-7)
    second_se = 0.0
    if lin.groups > 1:
        eps = 1e-3 * min(second, mean - second) / second
        slope = (phi(second * (1 + eps)) - phi(second * (1 - eps))) / (2 * eps * second)
        groups = [
            _loop(_Operator(lin.group(i)), second, beta, batch, 1.0)[0] for i in range(lin.groups)
        ]
        second_se = _se(groups) / abs(slope)
    return Thresholds(beta, batch, mean, mean_se, second, second_se)


@dataclass(frozen=True)
class Band:
    """The predicted escape band for (β, B): lr in [minimum.second, global_minimum.second),
    where the minimum is linearly unstable and the global minimum stable (empty when the
    first is not below the second); `deterministic`: the same for the mean map alone."""

    minimum: Thresholds
    global_minimum: Thresholds

    @property
    def interval(self) -> tuple[float, float] | None:
        lo, hi = self.minimum.second, self.global_minimum.second
        return (lo, hi) if lo < hi else None

    @property
    def deterministic(self) -> tuple[float, float] | None:
        lo, hi = self.minimum.mean, self.global_minimum.mean
        return (lo, hi) if lo < hi else None


def escape_band(lin: Linearisation, glob: Linearisation, beta: float, batch: int) -> Band:
    """`thresholds` at the minimum and at the global minimum."""
    return Band(thresholds(lin, beta, batch), thresholds(glob, beta, batch))


def _global_minimum(problem: problems.Problem) -> Tensor:
    p = _teacher_student(problem)
    if p.n != p.k:
        raise UserError(f"teacher-student with n = {p.n} != k = {p.k}: pass global_minimum=")
    return p.V


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def stability_data(
    problem: str | problems.Problem,
    w: Tensor,
    betas: Sequence[float],
    batches: Sequence[int],
    *,
    loss: str = "mse",
    instance: Mapping[str, object] | None = None,
    global_minimum: Tensor | None = None,
    samples: int = 2**14,
    groups: int = 8,
    seed: int = 0,
    lrs: Sequence[float] = (),
    **loss_params: float,
) -> dict:
    """The predicted escape band of `loss` with heavy ball at the minimum w (*shape) for every
    (β, B), as plain data (JSON-ready; an undefined number is None): both points' thresholds
    (± one standard error), the band, and the stationary spread along the minimum's softest
    direction at half and 0.9 of the onset (and at `lrs`). problem: a Problem, or a
    registered name built with `instance` (e.g. {"k": 8}); global_minimum defaults to the
    teacher's weights for teacher-student, n = k."""
    if isinstance(problem, str):
        problem = problems.get_problem(problem)(**dict(instance or {}))
    w = w.detach().double()
    if tuple(w.shape) != problem.shape:
        raise UserError(f"w has shape {tuple(w.shape)}; the problem's is {problem.shape}")
    g = _global_minimum(problem) if global_minimum is None else global_minimum
    kw = dict(samples=samples, groups=groups, seed=seed, **loss_params)
    lin, glob = linearise(problem, w, loss, **kw), linearise(problem, g.double(), loss, **kw)
    lam, lam_g = np.linalg.eigvalsh(lin.hessian), np.linalg.eigvalsh(glob.hessian)
    bands, spreads = [], []
    for beta in betas:
        for batch in batches:
            band = escape_band(lin, glob, beta, batch)
            bands.append({
                "beta": beta, "batch": batch,
                "minimum": dataclasses.asdict(band.minimum),
                "global_minimum": dataclasses.asdict(band.global_minimum),
                "band": band.interval, "deterministic": band.deterministic,
            })  # fmt: skip
            m = band.minimum
            for lr in (*((0.5 * m.second, 0.9 * m.second) if m.second > 0 else ()), *lrs):
                s = analyse(lin, lr, beta, batch)
                spreads.append({
                    "beta": beta, "batch": batch, "lr": lr,
                    "mean_radius_squared": s.mean_radius**2, "second_radius": s.second_radius,
                    "additive_spread": _finite(s.additive_spread), "spread": _finite(s.spread),
                })  # fmt: skip
    return {
        "problem": problem.name,
        "instance": dict(problem.instance),
        "loss": loss if isinstance(loss, str) else loss.name,
        "loss_params": dict(loss_params),
        "samples": samples,
        "groups": groups,
        "seed": seed,
        "mean_hessian": "exact" if lin.group_hessians is None else "MSE's plus Monte Carlo",
        "minimum": {
            "objective": float(problem.objective(w[None])[0]),
            "eigenvalues": [float(lam[0]), float(lam[-1])],
            "newton_shift": lin.shift,
        },
        "global_minimum": {
            "objective": float(problem.objective(g.double()[None])[0]),
            "eigenvalues": [float(lam_g[0]), float(lam_g[-1])],
        },
        "bands": bands,
        "spreads": spreads,
    }


def format_report(data: Mapping) -> str:
    """`stability_data`'s result as text: one row per (β, B), then the spreads."""
    m, g = data["minimum"], data["global_minimum"]
    lines = [
        f"Linear stability of heavy ball (b ← βb + g, w ← w − lr·b) on {data['loss']!r}, "
        f"problem {data['problem']} {data['instance']}",
        f"minimum: objective {m['objective']:.6g}, H̄ eigenvalues [{m['eigenvalues'][0]:.4g}, "
        f"{m['eigenvalues'][1]:.4g}], Newton shift {m['newton_shift']:.2g}; global minimum: "
        f"[{g['eigenvalues'][0]:.4g}, {g['eigenvalues'][1]:.4g}]",
        f"{data['samples']} samples in {data['groups']} groups (± one standard error); mean "
        f"Hessian {data['mean_hessian']}",
        "",
        f"{'beta':>5} {'B':>5} | {'min: mean':>10} {'second':>17} | {'global: mean':>12} "
        f"{'second':>17} | predicted band | deterministic band",
    ]
    for row in data["bands"]:
        m, gm = row["minimum"], row["global_minimum"]
        text = [f"[{iv[0]:.4g}, {iv[1]:.4g})" if iv else "empty"
                for iv in (row["band"], row["deterministic"])]  # fmt: skip
        lines.append(
            f"{row['beta']:5.3g} {row['batch']:5d} | {m['mean']:10.4g} {m['second']:9.4g} ± "
            f"{m['second_se']:<5.2g} | {gm['mean']:12.4g} {gm['second']:9.4g} ± "
            f"{gm['second_se']:<5.2g} | {text[0]} | {text[1]}"
        )
    nan = float("nan")
    lines += [
        "",
        "at the minimum: ρ(A)² (the mean square without noise), ρ(T), and the stationary "
        "spread along H̄'s softest direction from the additive noise (Lyapunov) and with the "
        "multiplicative noise",
        f"{'beta':>5} {'B':>5} {'lr':>9} {'rho(A)^2':>9} {'rho(T)':>8} {'additive':>10} "
        f"{'full':>10}",
        *(
            f"{s['beta']:5.3g} {s['batch']:5d} {s['lr']:9.4g} {s['mean_radius_squared']:9.5f} "
            f"{s['second_radius']:8.5f} {_or(s['additive_spread'], nan):10.3g} "
            f"{_or(s['spread'], nan):10.3g}"
            for s in data["spreads"]
        ),
    ]
    return "\n".join(lines)


def _or(x: float | None, default: float) -> float:
    return default if x is None else x


def stability_report(problem: str | problems.Problem, w: Tensor, betas: Sequence[float],
                     batches: Sequence[int], **kwargs) -> str:  # fmt: skip
    """`format_report` of `stability_data` (same arguments)."""
    return format_report(stability_data(problem, w, betas, batches, **kwargs))
