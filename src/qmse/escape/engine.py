"""The escape benchmark's engine: methods trained in lockstep on the same starts with common
random numbers, judged on the closed-form population loss.

Common random numbers. One input stream per run: at every step one batch x (m, B, d) is
drawn for the m starts, and every method and every parameter setting of the run trains on it
(start i sees the same inputs at step t whatever trains it). Method randomness (QMSE's v,
label and gradient noise, PGD's kicks, restart's fresh start) comes from a second stream:
each job gets its own torch.Generator seeded with `method_seed`. So a method's results do not
depend on which other methods run beside it, and two methods with the same loss, update and
step size give identical results. Sharing the draw is also the speed-up: the batch (and the
teacher's outputs on it) is drawn once per step for all methods.

A job's G settings are stacked per start, so its forward pass is one batched matmul
x (m, B, d) @ (m, d, G·n) and its backward pass one more; its loss (read from `qmse.loss` or
the method's callable) is differentiated by autograd with respect to the outputs f.

Success means closed-form population loss < STUCK_LOSS at the end; the first evaluated step
(every `eval_every`) below it is recorded. A start whose weights become non-finite or exceed
‖W‖_F = DIVERGED_NORM is frozen at its last finite point and counted as a diverged failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape.methods import HELD_OUT, Method, Run, check_step, get_method, plugin_errors
from qmse.loss import get_loss
from qmse.runs import progress
from qmse.teacher_student import Problem, population_loss, sample_inputs

STUCK_LOSS = 1e-3  # a run fails (is stuck) if its population loss ends ≥ this (S&S 2018)
DIVERGED_NORM = 1e4  # ‖W‖_F beyond this (or non-finite) counts as divergence
EVAL_EVERY = 50  # steps between evaluations of the closed-form loss


def engine_key() -> dict[str, float]:
    """The thresholds that judge every row and sweep: part of their cache keys."""
    return {
        "stuck_loss": STUCK_LOSS,
        "diverged_norm": DIVERGED_NORM,
        "eval_every": EVAL_EVERY,
        "held_out": HELD_OUT,
    }


@dataclass(frozen=True)
class Job:
    """One method at G parameter settings on the m starts: its rows are g·m + i (setting g,
    start i). lr: (G,); hyper: every hyperparameter of the method, (G,) each."""

    method: Method
    lr: Tensor
    hyper: Mapping[str, Tensor]

    @property
    def settings(self) -> int:
        return len(self.lr)


def make_job(
    method: str | Method,
    lr: float | Sequence[float],
    hyper: Mapping[str, float | Sequence[float]] | None = None,
) -> Job:
    """A Job from scalars or length-G sequences (scalars are repeated); a hyperparameter not
    given takes the method's default (the middle of its grid)."""
    method = get_method(method) if isinstance(method, str) else method
    hyper = dict(hyper or {})
    if unknown := set(hyper) - set(method.hyper):
        raise UserError(
            f"method {method.name!r} has no hyperparameter {sorted(unknown)}; it has "
            f"{sorted(method.hyper) or 'none'}"
        )
    values = {"lr": lr} | {h: hyper.get(h, method.default(h)) for h in method.hyper}
    tensors = {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for k, v in values.items()}
    G = max(len(v) for v in tensors.values())
    for name, v in tensors.items():
        if len(v) not in (1, G):
            raise UserError(f"{name}: {len(v)} values where the others have {G}")
        if not torch.isfinite(v).all() or (v < 0).any() or (name == "lr" and (v <= 0).any()):
            raise UserError(f"{method.name}: need lr > 0 and hyperparameters >= 0; {name}={v}")
    tensors = {k: v.expand(G).clone() for k, v in tensors.items()}
    return Job(method, tensors.pop("lr"), tensors)


def teacher_outputs(x: Tensor, problem: Problem) -> Tensor:
    """The teacher's outputs A_t relu(V x): x (m, B, d) -> (m, B, C) (one matmul: V is
    shared by every start)."""
    hidden = torch.relu(problem.V @ x.transpose(1, 2))  # (m, k, B): wide products are fast
    return (problem.A_teacher @ hidden).transpose(1, 2)


def _per_sample_loss(
    method: Method, f: Tensor, y: Tensor, rng: torch.Generator, params: dict[str, Tensor]
) -> Tensor:
    """The method's per-sample training loss: f, y (N, C) -> (N,)."""
    if callable(method.loss):
        return method.loss(f, y, generator=rng)
    return get_loss(method.loss)(f, y, generator=rng, reduction="none", **params)


def job_gradient(
    job: Job, W: Tensor, x: Tensor, y: Tensor, problem: Problem, rng: torch.Generator
) -> Tensor:
    """The gradient of each of the job's rows: its loss averaged over its start's batch,
    differentiated by autograd with respect to the outputs f and by hand through
    f = A relu(W x) (one batched matmul forward, one backward for all the job's settings).
    W: (G·m, n, d); x: (m, B, d); y: (m, B, C) -> (G·m, n, d).

    Each job is computed on its own, so its results never depend on what else runs in the
    same lockstep (bit for bit: the same shapes take the same kernels). The products are
    (G·n × d)(d × B) per start: wide in B, which the CPU's batched matmul prefers."""
    m, B, d = x.shape
    n, C, G = problem.n, problem.outputs, job.settings
    A = problem.A_student  # (C, n)
    Ws = W.view(G, m, n, d).transpose(0, 1).reshape(m, G * n, d)  # per start: (G·n, d)
    pre = torch.bmm(Ws, x.transpose(1, 2)).view(m, G, n, B)  # (m, G, n, B)
    hidden = torch.relu(pre)
    # a scalar output as a weighted sum over the neurons: a one-row matmul is slow on the CPU
    f = (hidden * A.view(n, 1)).sum(2, keepdim=True) if C == 1 else A @ hidden  # (m, G, C, B)
    f = f.transpose(2, 3).contiguous().requires_grad_()  # (m, G, B, C)
    target = y.unsqueeze(1).expand(m, G, B, C).reshape(-1, C)  # samples (i, g, b)
    params = {
        h: job.hyper[h].to(f).view(1, G, 1).expand(m, G, B).reshape(-1, 1)
        for h in job.method.loss_params()
    }
    per_sample = _per_sample_loss(job.method, f.view(-1, C), target, rng, params)  # (m·G·B,)
    (grad_f,) = torch.autograd.grad(per_sample.view(m, G, B).mean(2).sum(), f)
    # ∂f/∂h = A; for a scalar output it is applied after the matmul, on the (n, d) gradients
    grad_f = grad_f.transpose(2, 3)  # (m, G, C, B)
    grad_h = grad_f.expand(m, G, n, B) if C == 1 else A.T @ grad_f  # (m, G, n, B)
    grad_pre = torch.ops.aten.threshold_backward(grad_h, pre, 0)  # relu'
    grad = torch.bmm(grad_pre.view(m, G * n, B), x).view(m, G, n, d)
    if C == 1:
        grad = grad * A.view(n, 1)
    return grad.transpose(0, 1).reshape(G * m, n, d)


def run_methods(
    jobs: Sequence[Job],
    W0: Tensor,
    problem: Problem,
    *,
    steps: int,
    batch: int,
    seed: int,
    method_seed: int,
    eval_every: int = EVAL_EVERY,
    quiet: bool = False,
    desc: str = "escape",
) -> list[dict[str, Tensor]]:
    """Train every job from the m starts W0 (m, n, d) for `steps` steps of `batch` fresh
    samples per start, in lockstep with common random numbers (module docstring): inputs
    from `seed`, each job's own randomness from `method_seed`. Runs on W0's device.

    Returns, per job, tensors over its G·m rows (g·m + i): loss (float64 population loss at
    the end, inf if diverged), first_success (first evaluated step with loss < STUCK_LOSS,
    −1 if none), diverged (bool), moved (‖W_T − W_0‖_F / ‖W_0‖_F), W (float32), and the
    state tensors the method names in `report`."""
    if steps < 1 or batch < 1 or eval_every < 1:
        raise UserError(f"need steps, batch, eval_every >= 1; got {steps}, {batch}, {eval_every}")
    if W0.dim() != 3 or tuple(W0.shape[1:]) != (problem.n, problem.d):
        raise UserError(
            f"W0 has shape {tuple(W0.shape)}; expected (m, {problem.n}, {problem.d}) starts"
        )
    dev, m = W0.device, W0.shape[0]
    p32, p64 = problem.to(torch.float32, dev), problem.to(torch.float64, dev)
    inputs = torch.Generator(device=dev).manual_seed(seed)
    start = W0.detach().to(torch.float32)
    Ws, lrs, states, runs, rngs, firsts = [], [], [], [], [], []
    for job in jobs:
        rows = job.settings * m
        rng = torch.Generator(device=dev).manual_seed(method_seed)
        per_row = {h: v.to(dev, torch.float32).repeat_interleave(m) for h, v in job.hyper.items()}
        state = {"rng": rng} | dict(job.method.constants)
        state |= {h: v.view(-1, 1, 1) for h, v in per_row.items()}
        run = Run(steps, batch, p32, torch.zeros(rows, dtype=torch.bool, device=dev))
        W = start.repeat(job.settings, 1, 1)  # (G·m, n, d)
        if job.method.init is not None:
            with plugin_errors(job.method, "in init"):
                state = job.method.init(W, state, run)
        Ws.append(W)
        lrs.append(job.lr.to(dev, torch.float32).repeat_interleave(m).view(-1, 1, 1))
        states.append(state)
        runs.append(run)
        rngs.append(rng)
        firsts.append(torch.full((rows,), -1, dtype=torch.long, device=dev))
    for t in progress(range(steps), quiet=quiet, desc=desc):
        x = sample_inputs(m, batch, problem.d, generator=inputs).to(dev)  # (m, B, d)
        y = teacher_outputs(x, p32)  # (m, B, C)
        evaluate = (t + 1) % eval_every == 0 or t + 1 == steps
        for j, job in enumerate(jobs):
            run = runs[j]
            with plugin_errors(job.method, f"at step {t}"):
                grad = job_gradient(job, Ws[j], x, y, p32, rngs[j])
                out = job.method.update(Ws[j], grad, states[j], t, lrs[j])
                # at the first step a plug-in's mistake is an error, never broadcast
                new, states[j] = check_step(job.method, "update", out, Ws[j]) if t == 0 else out
                run.diverged.logical_or_(~(new.flatten(1).norm(dim=1) <= DIVERGED_NORM))  # or NaN
                Ws[j] = torch.where(run.diverged.view(-1, 1, 1), Ws[j], new)
                if job.method.after_step is not None:
                    out = job.method.after_step(Ws[j], states[j], t, lrs[j], run)
                    if t == 0:
                        out = check_step(job.method, "after_step", out, Ws[j])
                    Ws[j], states[j] = out
            if evaluate:
                loss = population_loss(Ws[j].double(), p64)
                hit = (loss < STUCK_LOSS) & ~run.diverged & (firsts[j] < 0)
                firsts[j][hit] = t + 1
    results = []
    for j, job in enumerate(jobs):
        run, W = runs[j], Ws[j]
        if job.method.finish is not None:
            with plugin_errors(job.method, "in finish"):
                W = job.method.finish(W, states[j], run)
        W0_rows = start.repeat(job.settings, 1, 1)
        loss = population_loss(W.double(), p64)
        loss[run.diverged] = float("inf")
        moved = (W - W0_rows).flatten(1).norm(dim=1) / W0_rows.flatten(1).norm(dim=1)
        results.append(
            {
                "W": W,
                "loss": loss,
                "first_success": firsts[j],
                "diverged": run.diverged,
                "moved": moved,
                **{name: states[j][name] for name in job.method.report},
            }
        )
    return results


def run_method(
    method: str | Method,
    W0: Tensor,
    problem: Problem,
    *,
    steps: int,
    lr: float | Sequence[float],
    hyper: Mapping[str, float | Sequence[float]] | None = None,
    batch: int = 64,
    seed: int = 0,
    method_seed: int | None = None,
    eval_every: int = EVAL_EVERY,
    quiet: bool = False,
) -> dict[str, Tensor]:
    """One method (a registered name or a Method) from the m starts W0 at G settings (lr and
    hyperparameters: scalars or length-G sequences); rows g·m + i. `method_seed` defaults to
    seed + 2³²."""
    job = make_job(method, lr, hyper)
    (result,) = run_methods(
        [job],
        W0,
        problem,
        steps=steps,
        batch=batch,
        seed=seed,
        method_seed=seed + 2**32 if method_seed is None else method_seed,
        eval_every=eval_every,
        quiet=quiet,
        desc=job.method.name,
    )
    return result
