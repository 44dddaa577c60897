"""Safran & Shamir's gradient descent on the population loss: the reproduction, and the source
of the certified spurious minima the escape protocol starts from.

Problem: `qmse.teacher_student` (`gd_population`, `population_runs`: the closed-form
gradient, "stuck" decided by the closed-form population loss), or any registered
`qmse.escape.problems.Problem` (`descend`, `problem_runs`: gradient descent on its exact
objective by autograd, Riemannian on a manifold, "stuck" decided by its `stuck` or its
`success`).

Where gradient descent creeps (a minimum whose smallest Hessian eigenvalue is 10⁻³ takes it
some 10⁵ steps of 0.1 to reach the 10⁻⁹ tolerance), the cached runs finish the starts it
left at the step cap short of success by Newton's method on the exact Hessian (`finish`,
flat problems): a start counts as stuck there when Newton reaches, within NEWTON_STEPS, a
point with gradient ≤ the tolerance, a positive definite Hessian and no higher objective
(the minimum its descent was creeping to). The reproduction's numbers (`gd_population`'s
end points, losses and step counts) are gradient descent's alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape import problems
from qmse.escape.engine import STUCK_LOSS
from qmse.keys import content_key
from qmse.runs import load_torch, progress, save_torch
from qmse.teacher_student import (
    Problem,
    init_weights,
    population_grad,
    population_hessian,
    population_loss,
)

GD_LR, GD_TOL = 0.1, 1e-9  # Safran & Shamir's step and stopping tolerance
NEWTON_STEPS = 20  # Newton iterations that may finish a start gradient descent left capped
# Safran & Shamir (ICML 2018), Table 1: share of gradient-descent runs from Xavier starts that
# end in a spurious minimum, student width n = k, 1,000 runs per k.
PUBLISHED = {6: 0.003, 8: 0.126, 10: 0.346, 12: 0.585, 16: 0.851, 20: 0.949}


def _check(lr: float, tol: float, max_steps: int, check_every: int) -> None:
    if lr <= 0 or tol <= 0 or max_steps < 1 or check_every < 1:
        raise UserError(
            f"need lr > 0, tol > 0, max_steps >= 1 and check_every >= 1; got lr={lr}, "
            f"tol={tol}, max_steps={max_steps}, check_every={check_every}"
        )


def _until_converged(
    W: Tensor,
    step: Callable[[Tensor], Tensor],
    grad_norm: Callable[[Tensor], Tensor],
    *,
    tol: float,
    max_steps: int,
    check_every: int,
    desc: str,
    quiet: bool,
) -> tuple[Tensor, Tensor]:
    """The loop of `gd_population` and `descend`: W ← step(W) for every start until its
    grad_norm is ≤ tol (or max_steps); every `check_every` steps the converged starts leave
    the batch, and so do the diverged ones (gradient not finite), so the cost follows the
    slow ones. W: (S, ...), a copy is stepped. Returns the end points (S, ...) and the steps
    each took (S,) long (max_steps where it never converged)."""
    W = W.clone()
    S = W.shape[0]
    steps = torch.full((S,), max_steps, dtype=torch.long, device=W.device)
    active = torch.arange(S, device=W.device)  # (A,) indices still descending
    bar = progress(total=max_steps, quiet=quiet, desc=desc)
    for t in range(0, max_steps, check_every):
        Wa = W[active]  # (A, ...)
        for _ in range(min(check_every, max_steps - t)):
            Wa = step(Wa)
        W[active] = Wa
        norms = grad_norm(Wa)  # (A,)
        done = norms <= tol
        steps[active[done]] = t + min(check_every, max_steps - t)
        active = active[~done & torch.isfinite(norms)]  # a diverged start leaves, capped
        bar.update(min(check_every, max_steps - t))
        bar.set_postfix(active=len(active))
        if len(active) == 0:
            break
    bar.close()
    return W, steps


def gd_population(
    W: Tensor,
    problem: Problem,
    *,
    lr: float = GD_LR,
    tol: float = GD_TOL,
    max_steps: int = 100_000,
    check_every: int = 50,
    quiet: bool = False,
) -> dict[str, Tensor]:
    """Safran & Shamir's method: gradient descent on the closed-form population loss with
    step `lr` until every neuron's gradient norm is ≤ `tol` (or `max_steps`).

    W: (S, n, d) starting weights, float64 advised (the 1e-9 test needs it). Seeds that have
    converged are dropped from the batch every `check_every` steps, so the cost follows the
    slow seeds. Returns W (S, n, d), loss (S,), grad_norm (S,) (largest per-neuron norm),
    steps (S,) (steps taken) and converged (S,) bool."""
    _check(lr, tol, max_steps, check_every)

    def neuron_norm(V: Tensor) -> Tensor:  # (A, n, d) -> (A,)
        return population_grad(V, problem).norm(dim=-1).amax(-1)

    W, steps = _until_converged(
        W.detach(),
        lambda V: V - lr * population_grad(V, problem),
        neuron_norm,
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        desc=f"gd-population k={problem.k}",
        quiet=quiet,
    )
    grad_norm = neuron_norm(W)
    return {
        "W": W,
        "loss": population_loss(W, problem),
        "grad_norm": grad_norm,
        "steps": steps,
        "converged": grad_norm <= tol,
    }


def population_runs(
    out: str | os.PathLike,
    problem: Problem,
    seeds: Sequence[int],
    *,
    tag: str = "eval",
    max_steps: int = 100_000,
    quiet: bool = False,
) -> dict:
    """`gd_population` from the Xavier initialisations of `seeds`, cached in
    out/gd-population/{tag}_k{k}_n{n}_C{C}.pt under the key of what it was computed from
    (problem, seeds, step cap, step size, tolerance, Newton's iterations); a file with
    another key is recomputed. Capped starts are finished by `finish`.

    These runs are both the reproduction of Safran & Shamir and the source of the
    spurious-minima protocol's certified starts."""
    path = Path(out) / "gd-population" / f"{tag}_k{problem.k}_n{problem.n}_C{problem.outputs}.pt"
    seeds = [int(s) for s in seeds]
    p64 = problem.to(torch.float64, "cpu")
    key = content_key("gd-population", p64.V, p64.A_teacher, p64.A_student, seeds, max_steps)
    key = content_key(key, GD_LR, GD_TOL, NEWTON_STEPS)
    if path.exists():
        saved = load_torch(path)  # weights_only=True: a planted file cannot run code
        if saved.get("key") == key:
            return saved
    W0 = init_weights(seeds, problem.n, problem.d, dtype=torch.float64)
    started = time.perf_counter()
    result = gd_population(W0, p64, max_steps=max_steps, quiet=quiet)
    result |= finish(
        result,
        lambda w: population_grad(w, p64),
        lambda w: population_hessian(w, p64),
        lambda W: population_loss(W, p64),
        lambda W: population_loss(W, p64) >= STUCK_LOSS,
    )
    seconds = round(time.perf_counter() - started, 3)
    result |= {"seeds": seeds, "max_steps": max_steps, "W0": W0, "key": key, "seconds": seconds}
    save_torch(path, result)
    return result


def stuck_points(result: dict) -> Tensor:
    """The stuck end points of a `population_runs` or `problem_runs` result: its finished
    ones (`finish`: converged, by gradient descent or Newton's method, and not a success);
    for a result without them, those with gradient ≤ tolerance and loss ≥ STUCK_LOSS (or
    the result's own "stuck" flags). (M, *shape) float64, in seed order."""
    if "end" in result:
        return result["end"][result["end_stuck"]]
    stuck = result["stuck"] if "stuck" in result else result["loss"] >= STUCK_LOSS
    return result["W"][result["converged"] & stuck]


def finish(
    result: dict,
    grad: Callable[[Tensor], Tensor],
    hess: Callable[[Tensor], Tensor],
    objective: Callable[[Tensor], Tensor],
    stuck: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """The end points of a descent `result` (W (S, *shape), converged (S,)) with the capped
    starts that are not a success (`stuck`) finished by Newton's method (`newton`): end
    (S, *shape), newton (S,) bool (finished so), end_stuck (S,) bool (converged by either,
    and `stuck` at the end point). grad(w) and hess(w) take one point (*shape), objective
    and stuck a batch (S, *shape) -> (S,)."""
    W, converged = result["W"], result["converged"]
    end, newton = W.clone(), torch.zeros(len(W), dtype=torch.bool)
    for i in (~converged & stuck(W)).nonzero().flatten().tolist():
        point = _newton(W[i], grad, hess, objective)
        if point is not None:
            end[i], newton[i] = point, True
    return {"end": end, "newton": newton, "end_stuck": (converged | newton) & stuck(end)}


def _newton(
    w: Tensor,
    grad: Callable[[Tensor], Tensor],
    hess: Callable[[Tensor], Tensor],
    objective: Callable[[Tensor], Tensor],
) -> Tensor | None:
    """Newton's method from w (*shape): the point it reaches within NEWTON_STEPS when its
    gradient is ≤ GD_TOL, its Hessian positive definite and its objective not above w's
    (a strict minimum downhill of w); else None."""
    start = objective(w[None])[0]
    for _ in range(NEWTON_STEPS):
        g = grad(w)
        if g.norm() <= GD_TOL:
            break
        try:
            w = w - torch.linalg.solve(hess(w), g.reshape(-1)).view_as(w)
        except torch.linalg.LinAlgError:  # a singular Hessian: no Newton step
            return None
        if not torch.isfinite(w).all():
            return None
    if grad(w).norm() > GD_TOL or objective(w[None])[0] > start:
        return None
    return w if torch.linalg.eigvalsh(hess(w))[0] > 0 else None


def descend(
    problem: problems.Problem,
    W: Tensor,
    *,
    lr: float = GD_LR,
    tol: float = GD_TOL,
    max_steps: int = 100_000,
    check_every: int = 50,
    quiet: bool = False,
) -> dict[str, Tensor]:
    """`gd_population` for any registered problem: W ← retract(W − lr·∇f(W)) on its exact
    objective f (the Riemannian gradient on a manifold, `problems.gradient`) until the
    gradient's norm is ≤ `tol` (or `max_steps`); converged starts leave the batch every
    `check_every` steps. W: (S, *shape) float64. Returns W, loss (S,), grad_norm (S,),
    steps (S,), converged (S,) and stuck (S,) bool (the problem's `stuck`, else loss ≥
    its `success`)."""
    _check(lr, tol, max_steps, check_every)

    def step(V: Tensor) -> Tensor:
        V = V - lr * problems.gradient(problem, V)
        return V if problem.retract is None else problem.retract(V)

    def grad_norm(V: Tensor) -> Tensor:  # (A, *shape) -> (A,)
        return problems.gradient(problem, V).flatten(1).norm(dim=1)

    W, steps = _until_converged(
        W.detach().double(),
        step,
        grad_norm,
        tol=tol,
        max_steps=max_steps,
        check_every=check_every,
        desc=f"descend {problem.name}",
        quiet=quiet,
    )
    loss = problem.objective(W).double()
    norms = grad_norm(W)
    stuck = problem.stuck(W) if problem.stuck is not None else ~(loss < problem.success)
    return {
        "W": W,
        "loss": loss,
        "grad_norm": norms,
        "steps": steps,
        "converged": norms <= tol,
        "stuck": stuck.bool(),
    }


def problem_runs(
    out: str | os.PathLike,
    problem: problems.Problem,
    seeds: Sequence[int],
    *,
    tag: str,
    cell: str,
    max_steps: int = 100_000,
    quiet: bool = False,
) -> dict:
    """`descend` at the problem's `descent_lr` from its starts `problem.init(seeds)`, cached in
    out/gd-population/{tag}_{cell}.pt under the key of the problem (name and instance),
    seeds, step cap, step size, tolerance and Newton's iterations, like `population_runs`;
    capped starts of a flat problem are finished by `finish` (on a manifold, where a Newton
    step would need the retraction, the end points are gradient descent's)."""
    path = Path(out) / "gd-population" / f"{tag}_{cell}.pt"
    seeds = [int(s) for s in seeds]
    key = content_key("descend", problem.name, dict(problem.instance), seeds, max_steps)
    key = content_key(key, problem.descent_lr, GD_TOL, NEWTON_STEPS)
    if path.exists():
        saved = load_torch(path)
        if saved.get("key") == key:
            return saved
    W0 = problem.init(seeds).double()
    started = time.perf_counter()
    result = descend(problem, W0, lr=problem.descent_lr, max_steps=max_steps, quiet=quiet)
    if problem.project is None:
        result |= finish(
            result,
            lambda w: problems.gradient(problem, w[None])[0],
            lambda w: problems.hessian(problem, w),
            problem.objective,
            lambda W: (
                problem.stuck(W)
                if problem.stuck is not None
                else ~(problem.objective(W) < problem.success)
            ),
        )
    seconds = round(time.perf_counter() - started, 3)
    result |= {"seeds": seeds, "max_steps": max_steps, "W0": W0, "key": key, "seconds": seconds}
    save_torch(path, result)
    return result


def certify_minima(W: Tensor, problem: Problem) -> list[float]:
    """Smallest Hessian eigenvalue (float64 autograd of the closed form) at each point of
    W (M, n, d): all > 0 means strict local minima, not saddles."""
    p = problem.to(torch.float64)
    return [torch.linalg.eigvalsh(population_hessian(w.double(), p))[0].item() for w in W]
