"""The escape benchmark's engine: methods trained in lockstep on the same starts with common
random numbers, judged on the problem's exact objective.

Problems. Any registered `qmse.escape.problems.Problem` trains by the generic path: one
step's samples from `problem.sample`, the outputs `problem.predict(W, x)` (N, C) fed to the
method's loss, the gradient by autograd (`problem_gradient`), projected onto the tangent
space before the update and the update retracted onto the manifold after it where the
problem has `project` and `retract` (part of the problem, not of each method); success is
`problem.objective` below `problem.success`. The teacher–student problem (a
`qmse.teacher_student.Problem`, or a registered Problem whose `native` is one) keeps its
hand-written path (`job_gradient`, about 1.5x faster) judged on the closed-form population
loss below STUCK_LOSS; both give the same gradients to rounding and draw the same noise.

Common random numbers. One input stream per run: at every step one batch (x, y) is drawn
for the m starts, and every method and every parameter setting of the run trains on it
(start i sees the same samples at step t whatever trains it). Method randomness (QMSE's v,
label and gradient noise, PGD's kicks, restart's fresh start) comes from a second stream:
each job gets its own torch.Generator seeded with `method_seed`. So a method's results do not
depend on which other methods run beside it, and two methods with the same loss, update and
step size give identical results. Sharing the draw is also the speed-up: the batch (and the
teacher's outputs on it) is drawn once per step for all methods. An update that asks for the
gradient at other weights (`state["grad_at"]`, SAM's and homotopy's) gets it on the step's
batch with the step's loss noise, replayed from a copy of the method's stream (`_gradient_at`),
so asking does not move the stream.

A job's G settings are stacked as rows g·m + i (setting g, start i) and share one forward and
backward pass, but each setting is a run of its own: its own copy of the method's stream
(seeded `method_seed`, like every job: common random numbers across settings too), its own
state, hooks and divergence flags (`_Lane`), its loss noise drawn from its own stream
(`_lane_losses`), and its rows' products computed as a job of that setting alone computes
them (one batch entry (n × d)(d × B) per row). So a setting's numbers are, bit for bit,
those it gets run alone, whatever is stacked beside it, and a start's do not depend on the
other starts' weights, but for PGD's, whose kicks are drawn when any start of the setting
needs one (tests/test_escape_engine.py). The loss (read from `qmse.loss` or the method's
callable) is differentiated by autograd with respect to the outputs f.

The first evaluated step (every `eval_every`) below the success threshold is recorded (the
rows of every job that have not yet succeeded, EVAL_CHUNK at a time). A
start whose weights become non-finite or exceed ‖W‖_F = DIVERGED_NORM is frozen at its last
finite point and counted as a diverged failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape import problems
from qmse.escape.methods import (
    HELD_OUT,
    HELD_OUT_CHUNK,
    Method,
    Run,
    check_step,
    get_method,
    plugin_errors,
)
from qmse.loss import LOSSES, get_loss
from qmse.runs import progress
from qmse.teacher_student import Problem, population_loss, sample_inputs

STUCK_LOSS = 1e-3  # a run fails (is stuck) if its population loss ends ≥ this (S&S 2018)
DIVERGED_NORM = 1e4  # ‖W‖_F beyond this (or non-finite) counts as divergence
EVAL_EVERY = 50  # steps between evaluations of the closed-form loss
EVAL_CHUNK = 1024  # rows per call of the exact objective (the closed form's fastest size)
# How a job stacks its settings: each its own run, bit for bit its numbers alone (module
# docstring). Only sweeps stack settings, so it is part of their keys, not of the rows'.
STACKING = "settings as runs of their own"


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
            raise UserError(
                f"{method.name}: need lr > 0 and hyperparameters >= 0; {name}={v.tolist()}"
            )
    tensors = {k: v.expand(G).clone() for k, v in tensors.items()}
    return Job(method, tensors.pop("lr"), tensors)


def teacher_outputs(x: Tensor, problem: Problem) -> Tensor:
    """The teacher's outputs A_t relu(V x): x (m, B, d) -> (m, B, C) (one matmul: V is
    shared by every start)."""
    hidden = torch.relu(problem.V @ x.transpose(1, 2))  # (m, k, B): wide products are fast
    return (problem.A_teacher @ hidden).transpose(1, 2)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _lane_losses(
    method: Method, f: Tensor, y: Tensor, rngs: Generators, hyper: Mapping[str, Tensor]
) -> Tensor:
    """The sum over settings and starts of each start's training loss averaged over its
    batch: its gradient with respect to f is every row's own. f: (G, m, B, C) outputs, rows
    g·m + i; y: (m, B, C) targets; rngs: one generator per setting (or one for every setting
    in turn, or None for a deterministic loss); hyper: the job's values (G,) each, those the
    registered loss takes go to its draw, per sample. A random loss draws each setting's
    noise from that setting's generator (`Loss.draw`, then one `Loss.per_sample` for every
    setting: what `Loss.__call__` does for one), so that each setting draws the noise it
    would draw alone; a callable is called once per setting, on its generator."""
    G, m, B, C = f.shape
    rngs = [rngs] * G if rngs is None or isinstance(rngs, torch.Generator) else list(rngs)
    target = y.to(f).unsqueeze(0).expand(G, m, B, C)
    if callable(method.loss):
        per_sample = torch.cat(
            [method.loss(f[g].reshape(-1, C), target[g].reshape(-1, C), generator=rngs[g])
             for g in range(G)]
        )  # fmt: skip
    else:
        loss, noise = get_loss(method.loss), None
        if loss.random:
            noise = torch.cat(
                [loss.draw(m * B, C, generator=rngs[g], device=f.device, dtype=f.dtype,
                           **{h: hyper[h][g : g + 1].to(f).view(1, 1).expand(m * B, 1)
                              for h in method.loss_params()})
                 for g in range(G)]
            )  # fmt: skip
        per_sample = loss.per_sample(f.reshape(-1, C), target.reshape(-1, C), noise)
    return per_sample.view(G, m, B).mean(2).sum()


def job_gradient(
    job: Job, W: Tensor, x: Tensor, y: Tensor, problem: Problem, rngs: Generators
) -> Tensor:
    """The gradient of each of the job's rows: its loss averaged over its start's batch,
    differentiated by autograd with respect to the outputs f (`_lane_losses`) and by hand
    through f = A relu(W x). W: (G·m, n, d), rows g·m + i; x: (m, B, d), or already
    repeated for every setting (G·m, B, d) (`_repeated`); y: (m, B, C); rngs: one generator
    per setting (`_lane_losses`) -> (G·m, n, d).

    Every row's products are one batch entry, (n × d)(d × B) forward and (n × B)(B × d)
    backward, as in a job of its setting alone (a batched matmul's rows are not independent
    of how many share a product: stacking the settings in one (G·n × d) product per start
    changes the last bits in some shapes); a batch entry's numbers do not depend on the
    number of entries. With one output and all-ones output weights (Safran & Shamir's) the
    multiplications by A are left out: exact either way."""
    n, C, G = problem.n, problem.outputs, job.settings
    m, B = y.shape[0], x.shape[1]
    xs = _repeated(x, G, m)  # (G·m, B, d): row g·m + i sees start i's batch
    A = problem.A_student  # (C, n)
    weighted = C > 1 or not bool((A == 1).all())
    pre = torch.bmm(W, xs.transpose(1, 2)).view(G, m, n, B)  # rows g·m + i
    hidden = torch.relu(pre)
    if C == 1:  # a weighted sum over the neurons: a one-row matmul is slow on the CPU
        f = (hidden * A.view(n, 1) if weighted else hidden).sum(2, keepdim=True)
    else:
        f = A @ hidden  # (G, m, C, B)
    f = f.transpose(2, 3).contiguous().requires_grad_()  # (G, m, B, C)
    (grad_f,) = torch.autograd.grad(_lane_losses(job.method, f, y, rngs, job.hyper), f)
    # ∂f/∂h = A; for a scalar output it is applied after the matmul, on the (n, d) gradients
    grad_f = grad_f.transpose(2, 3)  # (G, m, C, B)
    grad_h = grad_f.expand(G, m, n, B) if C == 1 else A.T @ grad_f  # (G, m, n, B)
    grad_pre = torch.ops.aten.threshold_backward(grad_h, pre, 0)  # relu'
    grad = torch.bmm(grad_pre.view(G * m, n, B), xs)
    return grad * A.view(n, 1) if C == 1 and weighted else grad


def _repeated(x: Tensor, G: int, m: int) -> Tensor:
    """Each start's batch x (m, B, ...) for the rows g·m + i of G settings: (G·m, B, ...);
    x itself where it is that already (the engine repeats a step's batch once for all its
    jobs: the first G·m rows of it)."""
    return x if len(x) == G * m else x.repeat(G, *(1,) * (x.dim() - 1))


def method_view(shape: Sequence[int]) -> tuple[int, int]:
    """How the methods see one start's parameters of `shape`: as a matrix (n, d), the method
    interface's (S, n, d) per start; (a, b, ...) as (a, b·...), a vector (a,) as (a, 1)."""
    return (shape[0], math.prod(shape[1:]))


@dataclass(frozen=True)
class ProblemRun(Run):
    """`Run` for a registered `qmse.escape.problems.Problem` trained by the generic path:
    held-out samples and fresh starts come from the problem's own `sample` and `init`;
    weights in and out are the methods' view (S, n, d) (`method_view`)."""

    problem: problems.Problem

    def held_out_loss(self, W: Tensor, generator: torch.Generator) -> Tensor:
        """MSE ½‖f − y‖² of each start on HELD_OUT fresh samples of the problem (S,)."""
        p, mse, out = self.problem, LOSSES["mse"], []
        for chunk in W.split(HELD_OUT_CHUNK):
            x, y = p.sample(len(chunk), HELD_OUT, generator)  # (S, N, ...), (S, N, C)
            with torch.no_grad():
                f = p.predict(chunk.float().reshape(-1, *p.shape), x.to(W.device))
                f = f.reshape(-1, p.outputs)
                y = y.to(f).reshape(-1, p.outputs)
                out.append(mse.expected(f, y).view(len(chunk), HELD_OUT).double().mean(1))
        return torch.cat(out)

    def fresh_weights(self, count: int, generator: torch.Generator) -> Tensor:
        """`count` fresh starts from the problem's initial distribution, their seeds drawn
        from `generator`: (count, *shape) float32."""
        seeds = torch.randint(2**62, (count,), generator=generator, device=generator.device)
        W = self.problem.init(seeds.tolist()).to(torch.float32)
        return W.reshape(count, *method_view(self.problem.shape))


@dataclass(frozen=True)
class _Path:
    """How the lockstep loop trains one kind of problem: one step's shared draw, a job's
    gradients, the exact objective and its success threshold, a Run for the hooks, and the
    tangent projection and retraction of a problem on a manifold; each function takes and
    returns the parameters in `view`, (rows, n, d)."""

    shape: tuple[int, ...]  # one start's parameters, as the problem has them
    view: tuple[int, int]  # ... and as the methods see them, (n, d)
    draw: Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]
    gradient: Callable[[Job, Tensor, Tensor, Tensor, Generators], Tensor]
    objective: Callable[[Tensor], Tensor]
    success: float
    run: Callable[[int, int, Tensor], Run]
    project: Callable[[Tensor, Tensor], Tensor] | None = None
    retract: Callable[[Tensor], Tensor] | None = None


def _native_path(problem: Problem, dev: torch.device) -> _Path:
    """The teacher–student problem's hand-written path: `job_gradient`, judged on the
    closed-form population loss below STUCK_LOSS."""
    p32, p64 = problem.to(torch.float32, dev), problem.to(torch.float64, dev)

    def draw(m: int, batch: int, inputs: torch.Generator) -> tuple[Tensor, Tensor]:
        x = sample_inputs(m, batch, problem.d, generator=inputs).to(dev)  # (m, B, d)
        return x, teacher_outputs(x, p32)  # (m, B, C)

    return _Path(
        shape=(problem.n, problem.d),
        view=(problem.n, problem.d),
        draw=draw,
        gradient=lambda job, W, x, y, rngs: job_gradient(job, W, x, y, p32, rngs),
        objective=lambda W: population_loss(W.double(), p64),
        success=STUCK_LOSS,
        run=lambda steps, batch, diverged: Run(steps, batch, p32, diverged),
    )


def problem_gradient(
    job: Job, W: Tensor, x: Tensor, y: Tensor, problem: problems.Problem, rngs: Generators
) -> Tensor:
    """The generic path's gradient of each of the job's rows: its loss on the problem's
    outputs `predict(W, x)`, averaged over its start's batch, by autograd (the Euclidean
    gradient; the engine projects it on a manifold). W: (G·m, *shape), rows g·m + i;
    x: (m, B, ...) or (G·m, B, ...) (`_repeated`); y: (m, B, C); rngs: one generator per
    setting (`_lane_losses`) -> (G·m, *shape). Each setting's samples reach the loss as in
    `job_gradient`, so a random loss draws the same noise."""
    m, B, C, G = y.shape[0], x.shape[1], problem.outputs, job.settings
    xs = _repeated(x, G, m)  # row g·m + i sees start i's batch
    W = W.detach().requires_grad_()
    f = problem.predict(W, xs).view(G, m, B, C)
    (grad,) = torch.autograd.grad(_lane_losses(job.method, f, y.to(f), rngs, job.hyper), W)
    return grad


def _generic_path(problem: problems.Problem, dev: torch.device) -> _Path:
    """Any registered problem: autograd through `predict`, judged by its `objective` below
    its `success`; the methods see `method_view` of its parameters."""
    shape = tuple(problem.shape)
    view = method_view(shape)

    def own(W: Tensor) -> Tensor:  # (rows, *view) -> (rows, *shape)
        return W.reshape(-1, *shape)

    def back(W: Tensor) -> Tensor:  # (rows, *shape) -> (rows, *view)
        return W.reshape(-1, *view)

    def draw(m: int, batch: int, inputs: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = problem.sample(m, batch, inputs)  # (m, B, ...), (m, B, C)
        return x.to(dev), y.to(dev, torch.float32)

    def gradient(job: Job, W: Tensor, x: Tensor, y: Tensor, rngs: Generators) -> Tensor:
        return back(problem_gradient(job, own(W), x, y, problem, rngs))

    project, retract = problem.project, problem.retract
    return _Path(
        shape=shape,
        view=view,
        draw=draw,
        gradient=gradient,
        objective=lambda W: problem.objective(own(W).double()).double(),
        success=problem.success,
        run=lambda steps, batch, diverged: ProblemRun(steps, batch, problem, diverged),
        project=None if project is None else lambda W, G: back(project(own(W), own(G))),
        retract=None if retract is None else lambda W: back(retract(own(W))),
    )


@dataclass
class _Lane:
    """Settings of a job on the m starts trained as a run of their own (module docstring):
    one setting, or all of a `Method.stackable` method's (its update and hooks treat every
    start on its own and draw nothing, so one call updates them all and gives the same
    numbers). Its rows of the job's weights, its step sizes (rows, 1, 1), its state, its
    `Run` (divergence flags: a view of the job's), its settings as a job (what `grad_at`
    differentiates) and their generators, one per setting (state["rng"] is the first)."""

    job: Job
    rows: slice
    lr: Tensor
    rngs: list[torch.Generator]
    state: dict
    run: Run
    gradients: int = 0  # batch gradients per start so far: the engine's and grad_at's


def _random(method: Method) -> bool:
    """Whether a method's loss draws noise (a callable may)."""
    return callable(method.loss) or get_loss(method.loss).random


def _gradient_at(
    path: _Path, lane: _Lane, W: Tensor, x: Tensor, y: Tensor
) -> Callable[[Tensor], Tensor]:
    """`state["grad_at"]` of one step (`qmse.escape.methods`): W' shaped like the lane's
    weights W (rows, n, d) -> the gradient the update is given, at W', on this step's batch
    x, y with the loss noise the step's gradient drew. Made before the step's gradient is
    computed: for a random loss it replays copies of the lane's streams from that point, so
    every call draws the same noise and the streams themselves do not advance. Each call is
    counted."""
    replays = [rng.get_state() for rng in lane.rngs] if _random(lane.job.method) else None

    def grad_at(V: Tensor) -> Tensor:
        if not isinstance(V, Tensor) or (V.shape, V.dtype) != (W.shape, W.dtype):
            got = f"{tuple(V.shape)}, {V.dtype}" if isinstance(V, Tensor) else type(V).__name__
            raise UserError(
                f"method {lane.job.method.name!r}: state['grad_at'] takes weights like W "
                f"({tuple(W.shape)}, {W.dtype}); got {got}"
            )
        lane.gradients += 1
        rngs = None
        if replays is not None:
            rngs = [torch.Generator(device=V.device).set_state(r) for r in replays]
        grad = path.gradient(lane.job, V, x, y, rngs)
        return grad if path.project is None else path.project(V, grad)

    return grad_at


def _lanes(
    job: Job, path: _Path, start: Tensor, steps: int, batch: int, method_seed: int, diverged: Tensor
) -> list[_Lane]:
    """The job's settings as lanes (`_Lane`) on the m starts `start` (m, n, d), each
    initialised (`Method.init`); `diverged` (G·m,) holds their flags."""
    m, dev, method = start.shape[0], start.device, job.method
    groups = [range(job.settings)] if method.stackable else [[g] for g in range(job.settings)]
    lanes = []
    for settings in groups:
        index = torch.tensor(list(settings))
        rows = slice(settings[0] * m, (settings[-1] + 1) * m)
        mine = Job(method, job.lr[index], {h: v[index] for h, v in job.hyper.items()})

        def per_row(v: Tensor) -> Tensor:  # (S,) -> (S·m, 1, 1), rows s·m + i
            return v.to(dev, torch.float32).repeat_interleave(m).view(-1, 1, 1)

        rngs = [torch.Generator(device=dev).manual_seed(method_seed) for _ in settings]
        state = {"rng": rngs[0]} | dict(method.constants)
        state |= {h: per_row(v) for h, v in mine.hyper.items()}
        run = path.run(steps, batch, diverged[rows])
        if method.init is not None:
            with plugin_errors(method, "in init"):
                state = method.init(start.repeat(len(settings), 1, 1), state, run)
        lanes.append(_Lane(mine, rows, per_row(mine.lr), rngs, state, run))
    return lanes


def _joined(parts: list[Tensor]) -> Tensor:
    """A job's weights (G·m, n, d) from its lanes' (m, n, d)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _retract(path: _Path, W: Tensor) -> Tensor:
    return W if path.retract is None else path.retract(W)


def _step(
    path: _Path,
    job: Job,
    lanes: list[_Lane],
    W: Tensor,
    diverged: Tensor,
    x: Tensor,
    y: Tensor,
    t: int,
) -> Tensor:
    """Step t of a job from its weights W (G·m, n, d) on the step's batch x (at least G·m
    rows, `_repeated`) and y (m, B, C): every lane's gradient at once, then
    each lane's update and `after_step` on its own rows; a row that diverges (its flag in
    `diverged` (G·m,) set in place) is frozen at its last finite point. Returns the new
    weights."""
    method, x = job.method, x[: len(W)]  # the first G·m rows of the step's repeated batch
    for lane in lanes:
        rows = lane.rows.stop - lane.rows.start
        lane.state["grad_at"] = _gradient_at(path, lane, W[lane.rows], x[:rows], y)
        lane.gradients += 1
    grad = path.gradient(job, W, x, y, [rng for lane in lanes for rng in lane.rngs])
    if path.project is not None:
        grad = path.project(W, grad)
    news = []
    for lane in lanes:
        out = method.update(W[lane.rows], grad[lane.rows], lane.state, t, lane.lr)
        # at the first step a plug-in's mistake is an error, never broadcast
        new, lane.state = check_step(method, "update", out, W[lane.rows]) if t == 0 else out
        news.append(new)
    new = _retract(path, _joined(news))
    diverged.logical_or_(~(new.flatten(1).norm(dim=1) <= DIVERGED_NORM))  # or NaN
    W = torch.where(diverged.view(-1, 1, 1), W, new) if diverged.any() else new
    if method.after_step is not None:
        news = []
        for lane in lanes:
            out = method.after_step(W[lane.rows], lane.state, t, lane.lr, lane.run)
            new, lane.state = check_step(method, "after_step", out, W[lane.rows]) if t == 0 else out
            news.append(new)
        W = _retract(path, _joined(news))
    for lane in lanes:
        lane.state.pop("grad_at", None)  # it holds the step's batch
    return W


def run_methods(
    jobs: Sequence[Job],
    W0: Tensor,
    problem: Problem | problems.Problem,
    *,
    steps: int,
    batch: int,
    seed: int,
    method_seed: int,
    eval_every: int = EVAL_EVERY,
    quiet: bool = False,
    desc: str = "escape",
) -> list[dict[str, Tensor]]:
    """Train every job from the m starts W0 (m, *shape) for `steps` steps of `batch` fresh
    samples per start, in lockstep with common random numbers (module docstring): inputs
    from `seed`, each setting's own randomness from `method_seed`. Runs on W0's device.

    `problem`: the teacher–student `qmse.teacher_student.Problem`, or a registered
    `qmse.escape.problems.Problem` (one with a `native` teacher–student problem takes its
    hand-written path; any other the generic path, module docstring).

    Returns, per job, tensors over its G·m rows (g·m + i): loss (float64 exact objective at
    the end, inf if diverged), success (bool: loss below the problem's success threshold),
    first_success (first evaluated step with loss below it, −1 if none), diverged (bool),
    moved (‖W_T − W_0‖_F / ‖W_0‖_F), W (float32), gradients (long: the batch gradients each
    start's training computed, the engine's one per step and each `grad_at` call), and the
    state tensors the method names in `report`."""
    if steps < 1 or batch < 1 or eval_every < 1:
        raise UserError(f"need steps, batch, eval_every >= 1; got {steps}, {batch}, {eval_every}")
    dev, m = W0.device, W0.shape[0]
    if isinstance(problem, problems.Problem) and problem.native is None:
        path = _generic_path(problem, dev)
    else:
        native = problem.native if isinstance(problem, problems.Problem) else problem
        path = _native_path(native, dev)
    if tuple(W0.shape[1:]) != path.shape:
        raise UserError(
            f"W0 has shape {tuple(W0.shape)}; expected (m, {', '.join(map(str, path.shape))}) "
            f"starts"
        )
    inputs = torch.Generator(device=dev).manual_seed(seed)
    start = W0.detach().to(torch.float32).reshape(m, *path.view)  # (m, n, d)
    sizes = [job.settings * m for job in jobs]
    diverged = torch.zeros(sum(sizes), dtype=torch.bool, device=dev)  # every job's rows
    firsts = torch.full((sum(sizes),), -1, dtype=torch.long, device=dev)
    flags = diverged.split(sizes)  # views, per job
    Ws = [start.repeat(job.settings, 1, 1) for job in jobs]  # (G·m, n, d) each
    lanes = [
        _lanes(job, path, start, steps, batch, method_seed, flags[j]) for j, job in enumerate(jobs)
    ]
    most = max((job.settings for job in jobs), default=1)
    for t in progress(range(steps), quiet=quiet, desc=desc):
        x, y = path.draw(m, batch, inputs)  # one draw for every job: (m, B, ...), (m, B, C)
        x = _repeated(x, most, m)  # once for every job: (most·m, B, ...)
        for j, job in enumerate(jobs):
            with plugin_errors(job.method, f"at step {t}"):
                Ws[j] = _step(path, job, lanes[j], Ws[j], flags[j], x, y, t)
        if (t + 1) % eval_every == 0 or t + 1 == steps:  # every job's open rows at once
            todo = ((firsts < 0) & ~diverged).nonzero().flatten()
            if len(todo):
                every = torch.cat(Ws)
                for rows in todo.split(EVAL_CHUNK):
                    firsts[rows[path.objective(every[rows]) < path.success]] = t + 1
    results = []
    for j, (job, first) in enumerate(zip(jobs, firsts.split(sizes))):
        W = Ws[j]
        if job.method.finish is not None:
            with plugin_errors(job.method, "in finish"):
                parts = [job.method.finish(W[lane.rows], lane.state, lane.run) for lane in lanes[j]]
                W = _retract(path, _joined(parts))
        W0_rows = start.repeat(job.settings, 1, 1)
        loss = path.objective(W)
        loss[flags[j]] = float("inf")
        moved = (W - W0_rows).flatten(1).norm(dim=1) / W0_rows.flatten(1).norm(dim=1)
        counts = [(lane.gradients, lane.rows.stop - lane.rows.start) for lane in lanes[j]]
        counted = torch.cat([torch.full((rows,), c, device=dev) for c, rows in counts])
        results.append(
            {
                "W": W.reshape(-1, *path.shape),
                "loss": loss,
                "success": loss < path.success,
                "first_success": first.clone(),
                "diverged": flags[j].clone(),
                "moved": moved,
                "gradients": counted,
                **{
                    name: torch.cat([lane.state[name] for lane in lanes[j]])
                    for name in job.method.report
                },
            }
        )
    return results


def run_method(
    method: str | Method,
    W0: Tensor,
    problem: Problem | problems.Problem,
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
    """One method (a registered name or a Method) from the m starts W0 (m, *shape) of
    `problem` (as `run_methods`) at G settings (lr and hyperparameters: scalars or length-G
    sequences); rows g·m + i. `method_seed` defaults to seed + 2³²."""
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
