"""Problems with certified spurious minima, as plug-ins: the interface the escape benchmark
reads, and its registry.

A `Problem` is a workload (AlgoPerf's word): the shape of one start's parameters and their
initial distribution; the draw of one step's samples (inputs and targets, so that every
registered training loss applies to the problem's outputs); the exact objective (a
population loss in closed form, or a finite sum) that decides whether a start succeeded;
its Hessian, to certify a stuck point; a canonical form modulo the problem's symmetries
(hidden-unit permutations, signs or rotations of a factorisation), so that minima are counted
once; and, for a problem on a manifold (Burer–Monteiro's product of spheres), the projection
of a gradient onto the tangent space and the retraction back onto the manifold, which are
part of the problem, not of each method.

Write one with `Problem(...)` and add it with `register_problem`; `certify` and `distinct`
work on any problem:

    from qmse.escape.problems import Problem, register_problem

    def make_quadratic_well(width: int, shift: float = 1.0) -> Problem: ...
    register_problem("my-problem", make_quadratic_well, size="width")  # a factory

`qmse escape --problem my-problem --problem-args shift=2 --teacher-widths 4,8` then runs one
cell per width (`size`; without one, a single cell) with the factory's other arguments from
`--problem-args`; `--plugin FILE.py` imports a file that registers problems. The engine
trains any problem by autograd through `predict` (`qmse.escape.engine`); `native` names a
problem's own object where the engine has a hand-written path (teacher–student).

Shapes: W is (S, *shape) for S starts; x is (S, B, ...) and y (S, B, C) for B samples per
start; `predict` returns (S, B, C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qmse import teacher_student as ts
from qmse.errors import UserError

Factory = Callable[..., "Problem"]


def _same(W: Tensor) -> Tensor:
    return W


@dataclass(frozen=True)
class Problem:
    """One instance of a problem (see the module docstring).

    name: the problem's registered name; `instance` what defines this instance (sizes,
    seeds, constants: JSON-able, it goes into cache keys and tables).
    shape: one start's parameter shape; outputs: C, the size of the residual y − f.
    init(seeds) -> (S, *shape) float64: the starts of random initialisation.
    sample(m, B, generator) -> (x (m, B, ...), y (m, B, C)): one step's samples for m starts.
    predict(W (S, *shape), x (S, B, ...)) -> (S, B, C): the outputs the training loss sees;
        differentiable by autograd.
    objective(W) -> (S,) float64: the exact loss that decides success (< `success`) and
        whether a start is stuck.
    optimum: the objective's global minimum (0 for a realisable regression; f* for
        Burer–Monteiro's cost): the sweeps score a start by its objective above it.
    hessian(w (*shape)) -> (P, P) float64: its Hessian at one point (on a manifold: the
        Riemannian Hessian on the tangent space, in ambient coordinates); None: autograd of
        the objective.
    canonical(W) -> (S, ...): a representative modulo the symmetries (any shape: the Gram
        matrix YYᵀ of a factorisation, say), equal for two points the symmetries map onto
        each other.
    stuck(W) -> (S,) bool: whether a start ended at the spurious point, where that is not
        "objective ≥ success" (a minimum that is not isolated, decided by its value); None:
        every start that did not succeed.
    descent_lr: the step of gradient descent on the objective (gd-population and the
        descent that finds the minima); Safran & Shamir's 0.1 unless a problem declares a
        smaller one (a quartic's curvature grows with the weights, so a fixed step diverges
        from large starts).
    project(W, G) -> G on the tangent space at W, and retract(W) -> W on the manifold, for a
        problem on a manifold; None for a flat one.
    native: the problem's own object where the engine has a hand-written path for it
        (teacher–student's `qmse.teacher_student.Problem`, about 1.5x faster than autograd
        through `predict`); None: the engine's generic path.
    """

    name: str
    instance: Mapping[str, Any]
    shape: tuple[int, ...]
    outputs: int
    init: Callable[[Sequence[int]], Tensor]
    sample: Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]
    predict: Callable[[Tensor, Tensor], Tensor]
    objective: Callable[[Tensor], Tensor]
    success: float
    optimum: float = 0.0
    descent_lr: float = 0.1
    hessian: Callable[[Tensor], Tensor] | None = None
    canonical: Callable[[Tensor], Tensor] = _same
    project: Callable[[Tensor, Tensor], Tensor] | None = None
    retract: Callable[[Tensor], Tensor] | None = None
    stuck: Callable[[Tensor], Tensor] | None = None
    description: str = field(default="", compare=False)
    native: Any = field(default=None, compare=False)

    @property
    def size(self) -> int:
        """P: the number of parameters of one start."""
        return math.prod(self.shape)


def gradient(problem: Problem, W: Tensor) -> Tensor:
    """The objective's gradient at each start (S, *shape), by autograd, projected onto the
    tangent space on a manifold (the Riemannian gradient)."""
    W = W.detach().double().requires_grad_()
    (g,) = torch.autograd.grad(problem.objective(W).sum(), W)
    return g if problem.project is None else problem.project(W.detach(), g)


def hessian(problem: Problem, w: Tensor) -> Tensor:
    """The objective's Hessian at one point w (*shape): (P, P) float64."""
    w = w.detach().double()
    if problem.hessian is not None:
        return problem.hessian(w)
    flat = torch.func.hessian(lambda v: problem.objective(v.view(1, *problem.shape))[0])
    return flat(w.reshape(-1)).reshape(problem.size, problem.size)


def certify(problem: Problem, W: Tensor, *, grad_tol: float = 1e-6) -> list[dict[str, Any]]:
    """What each point of W (S, *shape) is: its objective, gradient norm and the smallest
    eigenvalue of its Hessian (on a manifold: of the Riemannian Hessian restricted to the
    tangent space, `tangent_hessian`). "strict minimum": gradient norm ≤ grad_tol and
    smallest eigenvalue > 0; "degenerate": gradient ≤ grad_tol and the smallest eigenvalue
    zero to rounding (|λ| ≤ 1e-8·max(1, max |λ|)); "saddle": a negative one; else "not
    stationary"."""
    values = problem.objective(W.double())
    norms = gradient(problem, W).flatten(1).norm(dim=1)
    out = []
    for w, value, norm in zip(W, values.tolist(), norms.tolist()):
        eig = torch.linalg.eigvalsh(tangent_hessian(problem, w))
        scale = 1e-8 * max(1.0, eig.abs().max().item())
        smallest = eig[0].item()
        if norm > grad_tol:
            kind = "not stationary"
        elif smallest > scale:
            kind = "strict minimum"
        elif smallest >= -scale:
            kind = "degenerate"
        else:
            kind = "saddle"
        out.append(
            {"objective": value, "grad_norm": norm, "min_eigenvalue": smallest, "kind": kind}
        )
    return out


def tangent_hessian(problem: Problem, w: Tensor) -> Tensor:
    """The Hessian at w in an orthonormal basis of the directions a start can move in: all
    of R^P for a flat problem; the tangent space (the range of `project` at w) on a
    manifold, where `problem.hessian` gives the Riemannian Hessian. (t, t) float64."""
    H = hessian(problem, w)
    if problem.project is None:
        return H
    P = problem.size
    basis = torch.eye(P, dtype=torch.float64).view(P, *problem.shape)
    projected = problem.project(w.double().expand(P, *problem.shape), basis).reshape(P, P)
    U, S, _ = torch.linalg.svd(projected.T)  # its columns span the tangent space
    B = U[:, 1e-9 * S.max() < S]  # (P, t)
    return B.T @ H @ B


def distinct(problem: Problem, W: Tensor, *, tol: float = 1e-6) -> list[int]:
    """The index of the first point of each class of W (S, *shape) that coincides modulo
    the problem's symmetries: canonical forms within `tol` (max-abs) of each other. In order
    of first appearance."""
    forms = problem.canonical(W.double()).flatten(1)
    kept: list[int] = []
    for i in range(len(forms)):
        if all((forms[i] - forms[j]).abs().max().item() > tol for j in kept):
            kept.append(i)
    return kept


PROBLEMS: dict[str, Factory] = {}
SIZES: dict[str, str | None] = {}  # problem -> the factory argument a benchmark's cells vary


def register_problem(name: str, factory: Factory, *, size: str | None = None) -> Factory:
    """Add a factory of instances under `name` (`qmse escape --problem NAME` and plug-in
    files read the registry); registering the same factory again is a no-op. `size`: the
    factory's argument that the benchmark's cells vary (`EscapeConfig.ks`: teacher–student's
    teacher width k; `problem_args` may not name it); None: a problem whose benchmark has
    one cell, its instance given by `EscapeConfig.problem_args` alone."""
    if not name or set(name) & set(",= \t\n"):
        raise UserError(f"problem name {name!r}: need a non-empty name without , = or spaces")
    if PROBLEMS.get(name, factory) is not factory:
        raise UserError(f"a different problem named {name!r} is already registered")
    PROBLEMS[name] = factory
    SIZES[name] = size
    return factory


def get_problem(name: str) -> Factory:
    """A registered problem's factory by name."""
    if name not in PROBLEMS:
        raise UserError(
            f"problem {name!r} is not registered; expected one of {tuple(PROBLEMS)} (or load a "
            f"plug-in that registers it: qmse escape --plugin FILE.py)"
        )
    return PROBLEMS[name]


def _lexsort_rows(X: Tensor, *, grid: float = 1e-6) -> Tensor:
    """The rows of X (..., r, c) in lexicographic order of their values rounded to `grid`
    (rows equal up to rounding keep their order: stable passes from the last column)."""
    keys = torch.round(X / grid)
    order = torch.arange(X.shape[-2], device=X.device).expand(X.shape[:-1])  # (..., r)
    for j in range(X.shape[-1] - 1, -1, -1):
        column = torch.gather(keys[..., j], -1, order)
        order = torch.gather(order, -1, torch.argsort(column, dim=-1, stable=True))
    return torch.gather(X, -2, order.unsqueeze(-1).expand_as(X))


def permutation_invariant(U: Tensor) -> Tensor:
    """A fingerprint of U (..., n, k) modulo permutations of its rows and of its columns:
    each row's values sorted, the rows in lexicographic order; the same for the columns;
    and the eigenvalues of UᵀU. (..., 2nk + k). Equal for U and P U Q (P, Q permutations);
    two points that differ modulo the permutations differ in it unless their rows and
    columns have the same multisets of values and the same spectrum."""
    rows = _lexsort_rows(torch.sort(U, dim=-1).values)  # (..., n, k)
    cols = _lexsort_rows(torch.sort(U.mT, dim=-1).values)  # (..., k, n)
    spectrum = torch.linalg.eigvalsh(U.mT @ U)  # (..., k)
    return torch.cat([rows.flatten(-2), cols.flatten(-2), spectrum], -1)


def teacher_student(
    k: int, n: int | None = None, *, outputs: int = 1, seed: int = 0, teacher: str = "identity"
) -> Problem:
    """Safran & Shamir's teacher–student problem (`qmse.teacher_student`) as a `Problem`: W
    (n, d), Gaussian inputs, the closed-form population loss, stuck at 10⁻³ or above; the
    engine trains it by its hand-written path (`native`).

    Symmetries: with a scalar output every student unit is interchangeable (rows of W) and
    so is every teacher unit, with the input coordinates that the teacher's V maps onto
    them (columns of W Vᵀ; the input distribution is rotation invariant): the canonical form
    is `permutation_invariant(W Vᵀ)`. With vector outputs the output columns of the student
    (and the teacher) differ, so no permutation is a symmetry: a point is its own canonical
    form."""
    p = ts.make_problem(k, n, outputs=outputs, seed=seed, teacher=teacher)
    p32 = p.to(torch.float32)

    def sample(m: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = ts.sample_inputs(m, batch, p.d, generator=generator)  # (m, B, d)
        return x, ts.outputs(p32.V.to(x.device).expand(m, -1, -1), p32.A_teacher.to(x.device), x)

    def canonical(W: Tensor) -> Tensor:
        if outputs > 1:
            return W
        return permutation_invariant(W @ p.V.to(W).T)

    return Problem(
        name="teacher-student",
        instance={"k": k, "n": p.n, "outputs": outputs, "seed": seed, "teacher": teacher},
        shape=(p.n, p.d),
        outputs=outputs,
        init=lambda seeds: ts.init_weights(seeds, p.n, p.d),
        sample=sample,
        predict=lambda W, x: ts.outputs(W, p.A_student.to(W), x.to(W)),
        objective=lambda W: ts.population_loss(W.double(), p),
        success=1e-3,
        hessian=lambda w: ts.population_hessian(w.double(), p),
        canonical=canonical,
        description="Safran & Shamir (2018): a student ReLU net fitting a teacher",
        native=p,
    )


register_problem("teacher-student", teacher_student, size="k")
