"""The teacher–student ReLU problem of Safran & Shamir (ICML 2018), batched over seeds.

Inputs x ~ N(0, I_d). Teacher f*(x) = A_t relu(V x), student f(x) = A_s relu(W x), with
V = I_k (or a seeded random rotation; d = k), W (n, d) trainable and the output layers fixed.
Scalar output (C = 1): A_t = 1ᵀ_k, A_s = 1ᵀ_n, Safran & Shamir's setting. Vector output
(C > 1, `make_problem`): A_t a seeded random C×k matrix with unit-norm rows, A_s = [A_t, B]
for n ≥ k students (B's columns random unit vectors), so the student can fit the teacher.
QMSE's random direction v is uniform on the unit sphere of R^C: with C = 1 it is a sign ±1,
so only C > 1 tests the paper's method in its own form.

The population loss ½E‖f − f*‖² has a closed form through the arc-cosine kernel
(Cho & Saul 2009)

    K(w, u) = E[relu(w·x) relu(u·x)] = ‖w‖‖u‖ (sin θ + (π − θ) cos θ) / (2π),

θ the angle between w and u. With M = A_sᵀA_s, N = A_sᵀA_t, P = A_tᵀA_t,

    L(W) = ½ Σᵢⱼ Mᵢⱼ K(wᵢ, wⱼ) − Σᵢⱼ Nᵢⱼ K(wᵢ, vⱼ) + ½ Σᵢⱼ Pᵢⱼ K(vᵢ, vⱼ).

Writing K = (‖w‖‖u‖ sin θ + (π − θ) w·u)/(2π), the derivative in θ at fixed ‖w‖ and w·u
is ‖w‖‖u‖ cos θ − w·u = 0, so the gradient has no arccos singularity:

    ∇_w K(w, u) = (‖u‖ sin θ ŵ + (π − θ) u) / (2π),        ŵ = w/‖w‖,

and ∇_{wᵢ} L = Σⱼ Mᵢⱼ ∇_w K(wᵢ, wⱼ) − Σⱼ Nᵢⱼ ∇_w K(wᵢ, vⱼ) (the diagonal term gives Mᵢᵢ wᵢ/2,
half the derivative of Mᵢᵢ‖wᵢ‖²/4 counted once on each side).

Near θ = 0 or π, arccos of a rounded cosine is off by up to √ε ≈ 1e-8 (half the digits of a
small angle); those pairs use Kahan's θ = 2 atan2(‖â − b̂‖, ‖â + b̂‖), with
sin θ = ½‖â − b̂‖‖â + b̂‖ and cos θ = (‖â + b̂‖² − ‖â − b̂‖²)/4.

Every function takes weights of shape (..., n, d), typically (S, n, d) for S seeds at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.loss import compute_loss


@dataclass(frozen=True)
class Problem:
    """One teacher and the student's fixed output layer."""

    V: Tensor  # (k, d) teacher hidden weights
    A_teacher: Tensor  # (C, k) teacher output weights
    A_student: Tensor  # (C, n) student output weights (fixed)

    @property
    def k(self) -> int:
        return self.V.shape[0]

    @property
    def d(self) -> int:
        return self.V.shape[1]

    @property
    def n(self) -> int:
        return self.A_student.shape[1]

    @property
    def outputs(self) -> int:
        return self.A_student.shape[0]

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Problem:
        return Problem(
            *(t.to(device=device, dtype=dtype) for t in (self.V, self.A_teacher, self.A_student))
        )


def make_problem(
    k: int,
    n: int | None = None,
    *,
    outputs: int = 1,
    seed: int = 0,
    teacher: str = "identity",
    dtype: torch.dtype = torch.float64,
) -> Problem:
    """A teacher of k hidden units on d = k inputs and the student's output layer.

    teacher="identity": V = I_k (Safran & Shamir); "random": V a random orthogonal matrix
    drawn from `seed` (the same problem in another basis when the output layer is all ones;
    with vector outputs, a different one). Output layers: all ones for outputs = 1 (Safran &
    Shamir: every hidden unit of the student is interchangeable); for outputs = C > 1, a random
    C×k matrix A_t with unit-norm rows (from `seed`) for the teacher, and for a student of
    n ≥ k units A_s = [A_t, B] with B's n − k columns random unit vectors, so that the student
    can still fit the teacher exactly (its extra units switched off)."""
    n = k if n is None else n
    if k < 1:
        raise UserError(f"k={k}: the teacher needs at least one hidden unit")
    if n < 1:
        raise UserError(f"n={n}: the student needs at least one hidden unit")
    if outputs < 1:
        raise UserError(f"outputs={outputs}: need C >= 1 outputs")
    if teacher not in ("identity", "random"):
        raise UserError(f"teacher={teacher!r}: expected 'identity' or 'random'")
    g = torch.Generator().manual_seed(seed)
    V = torch.eye(k, dtype=torch.float64)
    if teacher == "random":  # Q of a Gaussian matrix, signs fixed: uniform on O(k)
        q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        V = q * torch.sign(torch.diagonal(r))
    V = V.to(dtype)
    if outputs == 1:
        return Problem(V, torch.ones(1, k, dtype=dtype), torch.ones(1, n, dtype=dtype))
    if n < k:
        raise UserError(
            f"the vector-output variant (outputs={outputs}) keeps the teacher's output "
            f"columns in the student's, so it needs n >= k; got n={n}, k={k}"
        )
    A = torch.randn(outputs, k, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    B = torch.randn(outputs, n - k, generator=g, dtype=torch.float64)
    B = B / B.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return Problem(V, A.to(dtype), torch.cat([A, B], 1).to(dtype))


def init_weights(
    seeds: Sequence[int], n: int, d: int, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Xavier-style initialisation wᵢ ~ N(0, I_d/d), one generator per seed so that seed s
    gives the same weights whatever else is in the batch. Returns (S, n, d)."""
    rows = [
        torch.randn(n, d, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
        for s in seeds
    ]
    return (torch.stack(rows) / math.sqrt(d)).to(dtype)  # (S, n, d)


_KAHAN_BELOW = 0.99  # |cos θ| above this: angle terms from Kahan's formula


def _norm(x: Tensor) -> Tensor:
    """Euclidean norm over the last axis, with a zero-safe gradient (0 at x = 0, not NaN)."""
    return (x * x).sum(-1).clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def _angles(W: Tensor, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Norms and angle terms between the rows of W (..., n, d) and U (..., m, d).

    Returns ‖w‖ (..., n, 1), ŵ (..., n, d), θ, sin θ, cos θ (..., n, m). The cosine comes from
    a matrix product; the few nearly (anti-)parallel pairs, where arccos loses precision, are
    recomputed by Kahan's formula from ‖ŵ − û‖ and ‖ŵ + û‖."""
    w_norm, u_norm = _norm(W).unsqueeze(-1), _norm(U).unsqueeze(-1)
    w_hat, u_hat = W / w_norm, U / u_norm
    cos = (w_hat @ u_hat.transpose(-2, -1)).clamp(-1.0, 1.0)  # (..., n, m)
    near = cos.detach().abs() > _KAHAN_BELOW
    safe = torch.where(near, torch.zeros_like(cos), cos)  # keeps arccos' gradient finite
    theta, sin = torch.acos(safe), (1 - safe * safe).sqrt()
    if near.any():
        shape = torch.broadcast_shapes(cos.shape[:-2], U.shape[:-2])
        n, m, d = W.shape[-2], U.shape[-2], W.shape[-1]
        a = w_hat.expand(*shape, n, d).reshape(-1, n, d)  # (S, n, d)
        b = u_hat.expand(*shape, m, d).reshape(-1, m, d)  # (S, m, d)
        s, i, j = near.expand(*shape, n, m).reshape(-1, n, m).nonzero(as_tuple=True)
        minus, plus = _norm(a[s, i] - b[s, j]), _norm(a[s, i] + b[s, j])  # (P,) each
        index = (s, i, j)
        flat = (*shape, n, m)
        theta = theta.expand(flat).reshape(-1, n, m).index_put(index, 2 * torch.atan2(minus, plus))
        sin = sin.expand(flat).reshape(-1, n, m).index_put(index, 0.5 * minus * plus)
        cos = cos.expand(flat).reshape(-1, n, m)
        cos = cos.index_put(index, 0.25 * (plus * plus - minus * minus))
        theta, sin, cos = (t.reshape(flat) for t in (theta, sin, cos))
    return w_norm, w_hat, theta, sin, cos


def arc_cosine_kernel(W: Tensor, U: Tensor) -> Tensor:
    """K(wᵢ, uⱼ) = E[relu(wᵢ·x) relu(uⱼ·x)], x ~ N(0, I): (..., n, d), (..., m, d) → (..., n, m)."""
    w_norm, _, theta, sin, cos = _angles(W, U)
    u_norm = _norm(U).unsqueeze(-2)  # (..., 1, m)
    return w_norm * u_norm * (sin + (math.pi - theta) * cos) / (2 * math.pi)


def _kernel_grad(W: Tensor, U: Tensor, weights: Tensor) -> Tensor:
    """Σⱼ weightsᵢⱼ ∇_w K(wᵢ, uⱼ) = Σⱼ weightsᵢⱼ (‖uⱼ‖ sin θᵢⱼ ŵᵢ + (π − θᵢⱼ) uⱼ)/(2π).

    W (..., n, d), U (..., m, d), weights (n, m) → (..., n, d)."""
    _, w_hat, theta, sin, _ = _angles(W, U)
    u_norm = _norm(U).unsqueeze(-2)  # (..., 1, m)
    radial = (weights * u_norm * sin).sum(-1, keepdim=True)  # (..., n, 1)
    return (radial * w_hat + (weights * (math.pi - theta)) @ U) / (2 * math.pi)


def _check_weights(W: Tensor, problem: Problem) -> None:
    if not isinstance(W, Tensor) or not W.is_floating_point():
        raise TypeError(f"W must be a floating-point tensor of shape (S, n, d), got {type(W)}")
    if W.dim() < 2 or tuple(W.shape[-2:]) != (problem.n, problem.d):
        raise UserError(
            f"W has shape {tuple(W.shape)}; expected (..., n, d) = (..., {problem.n}, "
            f"{problem.d}) for this problem"
        )


def population_loss(W: Tensor, problem: Problem) -> Tensor:
    """Closed-form ½E‖A_s relu(Wx) − A_t relu(Vx)‖² for x ~ N(0, I_d). (..., n, d) → (...)."""
    _check_weights(W, problem)
    p = problem.to(dtype=W.dtype, device=W.device)
    M = p.A_student.T @ p.A_student  # (n, n)
    N = p.A_student.T @ p.A_teacher  # (n, k)
    P = p.A_teacher.T @ p.A_teacher  # (k, k)
    ww = (M * arc_cosine_kernel(W, W)).sum((-2, -1))
    wv = (N * arc_cosine_kernel(W, p.V)).sum((-2, -1))
    vv = (P * arc_cosine_kernel(p.V, p.V)).sum()
    return 0.5 * ww - wv + 0.5 * vv


def population_grad(W: Tensor, problem: Problem) -> Tensor:
    """Closed-form ∇_W of `population_loss` (see the module docstring). (..., n, d) → same."""
    _check_weights(W, problem)
    p = problem.to(dtype=W.dtype, device=W.device)
    M = p.A_student.T @ p.A_student  # (n, n)
    N = p.A_student.T @ p.A_teacher  # (n, k)
    return _kernel_grad(W, W, M) - _kernel_grad(W, p.V, N)


def population_hessian(W: Tensor, problem: Problem) -> Tensor:
    """Hessian of `population_loss` at one point W (n, d), as an (n·d, n·d) matrix, by
    autograd (Jacobian of the closed-form gradient); use float64."""
    if W.dim() != 2:
        raise UserError(f"W must be one point of shape (n, d), got {tuple(W.shape)}")
    nd = W.numel()
    H = torch.autograd.functional.jacobian(lambda w: population_grad(w, problem), W)
    H = H.reshape(nd, nd)
    return 0.5 * (H + H.T)


def sample_inputs(
    seeds: int, batch: int, d: int, *, generator: torch.Generator, dtype=torch.float32
) -> Tensor:
    """Fresh Gaussian inputs, an independent batch per seed: (S, B, d), on the generator's
    device."""
    return torch.randn(seeds, batch, d, generator=generator, dtype=dtype, device=generator.device)


def outputs(W: Tensor, A: Tensor, x: Tensor) -> Tensor:
    """A relu(W x) for each seed: W (S, n, d), A (C, n), x (S, B, d) → (S, B, C).

    Computed as (n × d)(d × B) products per seed, wide in B, which the CPU's batched matmul
    runs several times faster than the (B × d)(d × n) ones."""
    hidden = torch.relu(W @ x.transpose(-2, -1))  # (S, n, B)
    return (A @ hidden).transpose(-2, -1)


def sample_loss(
    W: Tensor,
    problem: Problem,
    x: Tensor,
    loss: str = "mse",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-seed mean training loss on the batch x: (S, B, d) → (S,).

    `loss` is a `qmse.loss.compute_loss` name: "mse" (½‖r‖²), "qmse" (one v per sample, v = ±1
    for C = 1) or "expected-qmse"; its mean over the B samples of each seed."""
    _check_weights(W, problem)
    p = problem.to(dtype=W.dtype, device=W.device)
    S, B, _ = x.shape
    f = outputs(W, p.A_student, x.to(W))  # (S, B, C)
    with torch.no_grad():
        y = outputs(p.V.expand(S, -1, -1), p.A_teacher, x.to(W))  # (S, B, C)
    per_sample = compute_loss(
        loss, f.reshape(S * B, -1), y.reshape(S * B, -1), generator=generator, reduction="none"
    )
    return per_sample.reshape(S, B).mean(-1)
