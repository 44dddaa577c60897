"""The interface every sample-based method of the escape benchmark implements, and its registry.

A method is a training loss and an update rule, run on the S starts of one setting at once
(each setting of a sweep is a run of its own, with its own state and stream):

    from qmse.escape import Method, register_method

    def sign_sgd(W, grad, state, t, lr):  # W, grad: (S, n, d); lr: (S, 1, 1)
        return W - lr * grad.sign(), state

    register_method(Method(name="sign-sgd", loss="mse", update=sign_sgd,
                           lr_grid=(1e-3, 2e-3, 4e-3)))

- `loss`: the name of a training loss of `qmse.loss.LOSSES` ("mse", "qmse", "expected-qmse",
  "label-noise", ...) or a callable `loss(input (N, C), target (N, C), *, generator) -> (N,)`
  giving the per-sample loss. The engine averages it over each start's batch and
  differentiates it; a random loss draws its noise from the method's own generator.
- `update(W, grad, state, t, lr) -> (W, state)`: one step at step index t (0, 1, ...). `state`
  is a dict kept across steps. It starts as {"rng": the method's torch.Generator (its own
  stream, never the inputs'), NAME: (S, 1, 1) tensor for each hyperparameter, NAME: float for
  each of `constants`}; a rule keeps its buffers in it.
- `state["grad_at"]`: put in the state before each update (and taken out after the step),
  a function W' (S, n, d) -> the gradient (S, n, d) the update would be given at W' on the
  current step's batch: the same inputs and targets, and for a random loss the same noise
  (QMSE's v, label noise's ξ: the draws the step's own gradient made from the method's
  stream, replayed from a copy, so calling it neither moves that stream nor changes what
  the loss draws later). On a manifold problem it is projected at W' as the step's gradient
  is at W. SAM evaluates it at W + ρ g/‖g‖, homotopy at W + σ_t ε (`qmse.escape.rules`).
  Each call costs one more gradient of the batch, and the engine counts it: a row's cost
  (grad_evals) is the batch gradients its steps took, the step's own and every call's.
- `lr_grid`: the learning rates swept first (a log grid, neighbours at most 2x apart; the
  sweep widens it while its best value is on an edge).
- `hyper`: further hyperparameters, NAME -> grid, swept after lr at the chosen lr (the middle
  value of the grid is used while lr is swept). A hyperparameter named like a parameter of
  the registered loss (label noise's "sigma") also goes to that loss, per sample.
- `upper`: NAME -> the end of a hyperparameter's domain, which no sweep passes (heavy
  ball's 1 − β ≤ 1, a decay floor ≤ 1); without it a sweep may widen a grid 2^8 past its edge.
- hooks, for methods that need more than an update: `init(W, state, run) -> state` before
  the first step; `after_step(W, state, t, lr, run) -> (W, state)` after each step's update
  and divergence check (PGD's kicks, restart's fresh start); `finish(W, state, run) -> W`
  after the last step (restart's choice of segment). `run` is a `Run`.
- `report`: names of (S,) state tensors whose mean goes into the results (PGD's kicks).
- `stackable`: True when the update and hooks draw nothing from state["rng"] and treat
  every start on its own (no mean, no "any" over starts): the engine may then update all
  the settings of a sweep in one call (S rows of every setting, hyperparameters per row),
  which is faster and gives the same numbers. False (the default): one call per setting.
- `parent`: the method this one becomes when its extra hyperparameters go to the bottom of
  their grids (label noise → SGD): its joint search then always tries that limit at the
  parent's chosen settings (`qmse.escape.tuning`).
- `constants`: the fixed numbers a rule reads (momentum's β, PGD's window): NAME -> float,
  put in `state` before the first step. They, the grids and `version` (raise it when you
  change a rule's code) make the method's cache key (`method_key`), not its source text.

Every built-in method (`qmse.escape.rules`) is registered through this same interface.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qmse import plugins
from qmse.errors import QmseError, UserError
from qmse.keys import content_key
from qmse.loss import LOSSES, get_loss
from qmse.teacher_student import Problem, outputs, sample_inputs
from qmse.tuning import Param, Space

GRID_RATIO = 2.0  # neighbouring grid values differ by at most this factor
HELD_OUT = 4096  # fresh samples per start on which `Run.held_out_loss` compares weights
HELD_OUT_CHUNK = 256  # starts per chunk of held-out samples (bounds the memory)
ENGINE_NAMES = ("rng", "lr", "grad_at")  # what the engine puts in `state` or passes itself

Update = Callable[[Tensor, Tensor, dict, int, Tensor], tuple[Tensor, dict]]


@dataclass(frozen=True)
class Run:
    """What a hook may read about the run in progress; the engine makes one per method.

    `diverged` (S,) bool is the engine's divergence flag per start: a diverged start is frozen
    and counted as a failure. A hook that gives a start fresh weights may clear its flag."""

    steps: int  # the step budget
    batch: int  # samples per step and start
    problem: Problem  # the teacher and the student's output layer, float32 on the device
    diverged: Tensor  # (S,) bool

    def held_out_loss(self, W: Tensor, generator: torch.Generator) -> Tensor:
        """MSE of each start on HELD_OUT fresh samples (S,): how a sample-based method
        compares two weight settings without the closed form (float32 samples, each start's
        mean taken in float64)."""
        p, mse = self.problem, LOSSES["mse"]
        out = []
        for chunk in W.split(HELD_OUT_CHUNK):
            S, C = len(chunk), p.outputs
            x = sample_inputs(S, HELD_OUT, p.d, generator=generator).to(W.device)  # (S, N, d)
            with torch.no_grad():
                f = outputs(chunk.float(), p.A_student, x).reshape(-1, C)
                y = outputs(p.V.expand(S, -1, -1), p.A_teacher, x).reshape(-1, C)
                out.append(mse.expected(f, y).view(S, HELD_OUT).double().mean(1))
        return torch.cat(out)

    def fresh_weights(self, count: int, generator: torch.Generator) -> Tensor:
        """A fresh Xavier initialisation N(0, I/d) of `count` students: (count, n, d)."""
        n, d = self.problem.n, self.problem.d
        z = torch.randn(count, n, d, generator=generator, device=generator.device)
        return (z / math.sqrt(d)).to(self.problem.V)


@dataclass(frozen=True)
class Method:
    """One sample-based method (see the module docstring)."""

    name: str
    loss: str | Callable[..., Tensor]
    update: Update
    lr_grid: tuple[float, ...]
    hyper: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    init: Callable[[Tensor, dict, Run], dict] | None = None
    after_step: Callable[[Tensor, dict, int, Tensor, Run], tuple[Tensor, dict]] | None = None
    finish: Callable[[Tensor, dict, Run], Tensor] | None = None
    report: tuple[str, ...] = ()
    constants: Mapping[str, float] = field(default_factory=dict)
    version: str = "1"
    family: str = "other"  # a group the figures draw together (at most 8 methods each)
    parent: str | None = None  # the method this one becomes as its extra hyperparameters → 0
    stackable: bool = False  # update and hooks draw nothing, treat each start on its own
    upper: Mapping[str, float] = field(default_factory=dict)  # hyperparameter -> domain's end
    description: str = ""

    def space(self, exclude: Mapping[str, float] = {}) -> Space:  # noqa: B006 (read only)
        """The method's declared search space: lr over `lr_grid`, then each hyperparameter over
        its grid, each widened by factors of 2 up to 8 values past an edge
        (`qmse.tuning.Param`); the names in `exclude` (values fixed by the user) left out."""
        grids = {"lr": tuple(self.lr_grid), **{k: tuple(v) for k, v in self.hyper.items()}}
        return Space(
            tuple(
                Param(k, g, upper=self.upper.get(k, math.inf))
                for k, g in grids.items()
                if k not in exclude
            )
        )

    def default(self, name: str) -> float:
        """The value of hyperparameter `name` while lr is swept: the middle of its grid."""
        grid = self.hyper[name]
        return grid[len(grid) // 2]

    def loss_params(self) -> tuple[str, ...]:
        """The hyperparameters that also go to the registered loss."""
        if callable(self.loss):
            return ()
        return tuple(h for h in self.hyper if h in get_loss(self.loss).params)


METHODS: dict[str, Method] = {}


def check_grid(what: str, grid: tuple[float, ...]) -> None:
    """A sweep grid: positive, increasing, neighbours at most GRID_RATIO apart."""
    if not grid or any(not (isinstance(v, (int, float)) and v > 0) for v in grid):
        raise UserError(f"{what}={grid!r}: need a non-empty tuple of positive numbers")
    for a, b in zip(grid, grid[1:]):
        if not a < b <= a * GRID_RATIO * (1 + 1e-9):
            raise UserError(
                f"{what}={grid!r}: need increasing values, neighbours at most "
                f"{GRID_RATIO:g}x apart (a log grid such as (0.05, 0.1, 0.2)); {a} -> {b}"
            )


def _name(obj: object) -> str | None:
    """A function's qualified name (None for None): hooks are keyed by name."""
    return None if obj is None else getattr(obj, "__qualname__", repr(obj))


def _source(obj: object) -> str | None:
    """A function's source text (its name where there is none): what tells two definitions
    registered under one name apart."""
    try:
        return None if obj is None else inspect.getsource(obj)
    except (OSError, TypeError):
        return _name(obj)


def _same(a: Method, b: Method) -> bool:
    """Whether two registrations define the same method: the same key and the same code."""
    hooks = ("loss", "update", "init", "after_step", "finish")
    return method_key(a) == method_key(b) and all(
        _source(getattr(a, h)) == _source(getattr(b, h)) for h in hooks
    )


def method_key(method: Method) -> str:
    """The key of everything a method declares: its name, loss (a registered name, or a
    callable's qualified name), update and hooks (by qualified name), grids, constants and
    `version`. Not its source text: a rule reads its constants from `Method.constants`, so a
    changed constant changes the key; change `version` when you change a rule's code.
    Cached rows and sweeps store it (with the engine's thresholds, `engine.ENGINE`)."""
    loss = method.loss if isinstance(method.loss, str) else _name(method.loss)
    hooks = [_name(h) for h in (method.update, method.init, method.after_step, method.finish)]
    return content_key(
        "method",
        method.name,
        loss,
        hooks,
        list(method.lr_grid),
        {k: list(v) for k, v in method.hyper.items()},
        dict(method.constants),
        list(method.report),
        method.version,
        *([dict(method.upper)] if method.upper else []),  # keys of methods without one unchanged
    )


def register_method(method: Method) -> Method:
    """Add `method` to the registry `qmse escape --methods` reads. Registering the same
    definition again (a plug-in imported twice) is a no-op; another definition under a taken
    name is an error."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a qmse.escape.Method, got {type(method).__name__}")
    if not method.name or set(method.name) & set(",= \t\n"):
        raise UserError(f"method name {method.name!r}: need a non-empty name without , = or spaces")
    if method.name == "gd-population":
        raise UserError("'gd-population' is the reproduction's name; choose another")
    if not callable(method.update):
        raise TypeError(f"method {method.name!r}: update must be callable (W, grad, state, t, lr)")
    if isinstance(method.loss, str):
        if method.loss not in LOSSES:
            raise UserError(
                f"method {method.name!r}: loss {method.loss!r} is not registered in qmse.loss "
                f"(one of {tuple(LOSSES)}), nor a callable"
            )
    elif not callable(method.loss):
        raise TypeError(f"method {method.name!r}: loss must be a registered name or a callable")
    check_grid(f"{method.name}: lr_grid", tuple(method.lr_grid))
    for name, grid in method.hyper.items():
        if name in ENGINE_NAMES:
            raise UserError(f"method {method.name!r}: a hyperparameter may not be named {name!r}")
        check_grid(f"{method.name}: hyper[{name!r}]", tuple(grid))
    if clash := set(method.constants) & (set(ENGINE_NAMES) | set(method.hyper)):
        raise UserError(
            f"method {method.name!r}: constants {sorted(clash)} clash with a hyperparameter "
            f"or a name the engine uses ({', '.join(ENGINE_NAMES)}); rename them"
        )
    if unknown := set(method.upper) - set(method.hyper):
        raise UserError(
            f"method {method.name!r}: upper names {sorted(unknown)}, not hyperparameters"
        )
    method.space()  # a grid past its declared upper end is refused here
    old = METHODS.get(method.name)
    if old is not None and not _same(old, method):
        raise UserError(f"a different method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """A registered method by name."""
    if name not in METHODS:
        raise UserError(
            f"method {name!r} is not registered; expected one of {tuple(METHODS)} "
            f"(or load a plug-in that registers it: qmse escape --plugin FILE.py)"
        )
    return METHODS[name]


def check_step(method: Method, hook: str, out: object, W: Tensor) -> tuple[Tensor, dict]:
    """What a method's `update` or `after_step` returned on the first step, checked: a pair
    (W, state) with W of the input's shape, dtype and device and finite, state a dict. A
    wrong return is a UserError naming the method, never broadcast into a result."""
    where = f"method {method.name!r}: {hook} returned"
    if not (isinstance(out, tuple) and len(out) == 2):
        got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple) else "")
        raise UserError(f"{where} {got}; it must return the pair (W, state)")
    new, state = out
    if not isinstance(new, Tensor) or not isinstance(state, dict):
        raise UserError(
            f"{where} ({type(new).__name__}, {type(state).__name__}); it must return "
            f"(W: Tensor, state: dict)"
        )
    if (new.shape, new.dtype, new.device) != (W.shape, W.dtype, W.device):
        raise UserError(
            f"{where} W of shape {tuple(new.shape)}, {new.dtype} on {new.device}; it must "
            f"match the weights it was given: {tuple(W.shape)}, {W.dtype} on {W.device}"
        )
    if not bool(torch.isfinite(new).all()):
        raise UserError(f"{where} non-finite weights at the first step (NaN or inf)")
    return new, state


def load_plugin(path: str | os.PathLike) -> list[str]:
    """Import the Python file `path`, which registers methods with `register_method`; return
    the names it added. The same file content is imported once per process. A file that fails
    to import (a syntax error, a failed import, an exception) is a UserError of one line
    naming the file and the line; what it registered before failing is removed again (the
    traceback stays in the error's __cause__). The loader is `qmse.plugins.load_plugin`, the
    one the loss plug-ins go through."""
    return plugins.load_plugin(path, METHODS)


@contextlib.contextmanager
def plugin_errors(method: Method, when: str) -> Iterator[None]:
    """An exception raised in a plug-in file's code within the block becomes a UserError of
    one line naming the method, the file and the line (the traceback kept as __cause__); an
    exception of qmse's own code (a bug) passes through with its traceback."""
    try:
        yield
    except QmseError:
        raise
    except Exception as e:
        frames = [
            f for f in traceback.extract_tb(e.__traceback__) if plugins.is_plugin_file(f.filename)
        ]
        if not frames:
            raise
        raise UserError(
            f"method {method.name!r} ({frames[-1].filename}, line {frames[-1].lineno}) raised "
            f"{type(e).__name__}: {e} {when}"
        ) from e
