"""The escape benchmark: does QMSE get out of spurious minima where MSE gets stuck?

Problem: `qmse.teacher_student` (Safran & Shamir, ICML 2018), where "stuck" is decided by the
closed-form population loss, not by a noisy training curve. Every method runs S seeds at
once on (S, n, d) weights.

- `gd_population`: Safran & Shamir's gradient descent on the population loss (the
  reproduction, and the source of certified spurious minima);
- `run_sample_method`: SGD / momentum / Adam / PGD / restart on MSE, QMSE (paper eqs. 6-8,
  via `qmse.loss`) and expected-QMSE (README note 2), fresh samples each step;
- protocols: "random-init" (failure rate from Xavier starts) and "spurious-minima" (escape
  rate from gd-population's stuck end points, the direct test of the paper's claim);
- `tune` picks each method's learning rate per k on tuning seeds disjoint from evaluation;
- `run_benchmark` runs every (k, method, protocol) cell, each cached so a run resumes, and
  writes results.json, table.md (Wilson 95 % intervals) and figure.png.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from scipy.stats import fisher_exact
from torch import Tensor

from qmse.runs import atomic_write, load_json, progress, provenance, save_json, save_torch
from qmse.stats import wilson_interval
from qmse.teacher_student import (
    Problem,
    init_weights,
    make_problem,
    population_grad,
    population_hessian,
    population_loss,
    sample_inputs,
    sample_loss,
)

STUCK_LOSS = 1e-3  # a run fails (is stuck) if its population loss ends ≥ this (S&S 2018)


def gd_population(
    W: Tensor,
    problem: Problem,
    *,
    lr: float = 0.1,
    tol: float = 1e-9,
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
    if lr <= 0 or tol <= 0 or max_steps < 1 or check_every < 1:
        raise ValueError(
            f"need lr > 0, tol > 0, max_steps >= 1 and check_every >= 1; got lr={lr}, "
            f"tol={tol}, max_steps={max_steps}, check_every={check_every}"
        )
    W = W.detach().clone()
    S = W.shape[0]
    steps = torch.full((S,), max_steps, dtype=torch.long, device=W.device)
    active = torch.arange(S, device=W.device)  # (A,) indices still descending
    bar = progress(total=max_steps, quiet=quiet, desc=f"gd-population k={problem.k}")
    for t in range(0, max_steps, check_every):
        Wa = W[active]  # (A, n, d)
        for _ in range(min(check_every, max_steps - t)):
            Wa = Wa - lr * population_grad(Wa, problem)
        W[active] = Wa
        gnorm = population_grad(Wa, problem).norm(dim=-1).amax(-1)  # (A,)
        done = gnorm <= tol
        steps[active[done]] = t + min(check_every, max_steps - t)
        active = active[~done]
        bar.update(min(check_every, max_steps - t))
        bar.set_postfix(active=len(active))
        if len(active) == 0:
            break
    bar.close()
    grad_norm = population_grad(W, problem).norm(dim=-1).amax(-1)
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
) -> dict[str, Tensor]:
    """`gd_population` from the Xavier initialisations of `seeds`, cached in
    out/gd-population/{tag}_k{k}_n{n}_C{C}.pt (a finished file is loaded, not recomputed).

    These runs are both the reproduction of Safran & Shamir and the source of protocol (b)'s
    certified spurious minima."""
    path = Path(out) / "gd-population" / f"{tag}_k{problem.k}_n{problem.n}_C{problem.outputs}.pt"
    seeds = [int(s) for s in seeds]
    if path.exists():
        saved = torch.load(path)
        if saved["seeds"] == seeds and saved["max_steps"] == max_steps:
            return saved
    W0 = init_weights(seeds, problem.n, problem.d, dtype=torch.float64)
    result = gd_population(W0, problem.to(torch.float64), max_steps=max_steps, quiet=quiet)
    result |= {"seeds": seeds, "max_steps": max_steps, "W0": W0}
    save_torch(path, result)
    return result


# Sample-based methods: name → (training loss, update rule). Each step draws a fresh batch.
SAMPLE_METHODS = {
    "sgd": ("mse", "sgd"),
    "momentum": ("mse", "momentum"),
    "adam": ("mse", "adam"),
    "pgd": ("mse", "pgd"),
    "restart": ("mse", "restart"),
    "qmse": ("qmse", "sgd"),
    "qmse-momentum": ("qmse", "momentum"),
    "expected-qmse": ("expected-qmse", "sgd"),
    "expected-qmse-momentum": ("expected-qmse", "momentum"),
}
METHODS = ("gd-population", *SAMPLE_METHODS)
PROTOCOLS = ("random-init", "spurious-minima")  # (a) and (b) of the issue
MOMENTUM = 0.9  # heavy-ball coefficient (PyTorch convention: buf = 0.9·buf + g; W -= lr·buf)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
DIVERGED_NORM = 1e4  # ‖W‖_F beyond this (or non-finite) counts as divergence
PGD_WINDOW = 500  # t_thres: steps between gradient tests / after a perturbation
PGD_GRAD = 0.05  # g_thres on the window-averaged gradient norm
HELD_OUT = 4096  # fresh samples per seed used by `restart` to pick its better segment


def _uniform_ball(shape: tuple[int, ...], radius: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform draws from balls of radius `radius` (S,) in R^{n·d}: shape (S, n, d)."""
    z = torch.randn(shape, generator=generator, dtype=radius.dtype, device=radius.device)
    dim = z[0].numel()
    u = torch.rand(shape[0], generator=generator, dtype=radius.dtype, device=radius.device)
    u = u ** (1 / dim)
    return z / z.flatten(1).norm(dim=1).view(-1, 1, 1) * (u * radius).view(-1, 1, 1)


def _held_out_loss(W: Tensor, problem: Problem, gen: torch.Generator) -> Tensor:
    """MSE of each seed on HELD_OUT fresh samples (S,): how sample-based methods compare
    two weight settings without the closed form."""
    x = sample_inputs(W.shape[0], HELD_OUT, problem.d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        return sample_loss(W.double(), problem, x)


def _pgd_window(
    W: Tensor,
    anchor: Tensor,
    saved: Tensor,
    saved_loss: Tensor,
    lr: Tensor,
    radius: Tensor,
    diverged: Tensor,
    perturbations: Tensor,
    problem: Problem,
    gen: torch.Generator,
    *,
    last: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """PGD's end-of-window test (Jin et al. 2017, Alg. 1 with its "return the point before
    the perturbation unless the descent after it decreased f" rule, applied as a revert).

    A seed kicked at the previous window end keeps its new point only if its held-out loss
    fell below the loss before the kick; otherwise it goes back. Then seeds whose gradient
    averaged over the window (‖W − anchor‖ / (lr·PGD_WINDOW)) is ≤ PGD_GRAD get a kick
    uniform in the ball of radius `radius`·‖W‖_F, unless `last` (no window left to descend).
    Updates `perturbations` in place; returns (W, saved point, its held-out loss)."""
    pending = torch.isfinite(saved_loss)
    if pending.any():
        now = _held_out_loss(W, problem, gen)
        revert = pending & ~(now < saved_loss)
        W = torch.where(revert.view(-1, 1, 1), saved.to(W), W)
        saved_loss = torch.full_like(saved_loss, float("inf"))
    if last:
        return W, saved, saved_loss
    mean_grad = (anchor - W).flatten(1).norm(dim=1) / (lr.flatten() * PGD_WINDOW)
    kick = (mean_grad <= PGD_GRAD) & ~pending & ~diverged
    if kick.any():
        saved = W.clone()
        saved_loss = torch.where(kick, _held_out_loss(W, problem, gen), saved_loss)
        r = radius * W.flatten(1).norm(dim=1)
        W = W + kick.view(-1, 1, 1) * _uniform_ball(tuple(W.shape), r, gen)
        perturbations += kick.long()
    return W, saved, saved_loss


def run_sample_method(
    method: str,
    W: Tensor,
    problem: Problem,
    *,
    steps: int,
    lr: float | Tensor,
    batch: int = 64,
    radius: float | Tensor = 0.1,
    seed: int = 0,
    eval_every: int = 50,
    quiet: bool = False,
) -> dict[str, Tensor]:
    """Train S students at once with a sample-based method; judge them on the closed form.

    method: a key of SAMPLE_METHODS. W: (S, n, d) starting weights. lr (and PGD's `radius`,
    a fraction of ‖W‖_F) may be a float or an (S,) tensor, so one call runs a whole tuning
    grid. Every step draws a fresh batch of `batch` Gaussian inputs per seed (and, for QMSE,
    one v per sample). Notes 2, 6 and 7 of the project README define the comparisons:
      - pgd (Jin et al. 2017): plain SGD; when the gradient averaged over the last
        PGD_WINDOW steps (displacement / (lr·PGD_WINDOW): one minibatch gradient at a
        minimum is all noise) is ≤ PGD_GRAD and no perturbation happened in that window,
        add a perturbation uniform in the ball of radius `radius`·‖W‖_F; a kick whose
        window of descent does not lower the held-out loss is undone (`_pgd_window`);
      - restart: SGD for steps/2 from W, then SGD for steps/2 from a fresh Xavier
        initialisation; keep whichever end point has the lower MSE on HELD_OUT fresh samples.
    Returns float64 loss (S,) (population loss at the end), first_success (S,) (first
    evaluated step with loss < STUCK_LOSS, −1 if none), diverged (S,) bool,
    perturbations (S,) and W (S, n, d)."""
    if method not in SAMPLE_METHODS:
        raise ValueError(
            f"method={method!r} is not sample-based; expected one of {tuple(SAMPLE_METHODS)}"
        )
    if steps < 1 or batch < 1 or eval_every < 1:
        raise ValueError(f"need steps, batch, eval_every >= 1; got {steps}, {batch}, {eval_every}")
    loss_name, rule = SAMPLE_METHODS[method]
    S = W.shape[0]
    dtype = torch.float32
    p32, p64 = problem.to(dtype, W.device), problem.to(torch.float64, W.device)
    lr_t = torch.as_tensor(lr, dtype=dtype, device=W.device).expand(S).reshape(S, 1, 1).clone()
    radius_t = torch.as_tensor(radius, dtype=dtype, device=W.device).expand(S).clone()
    if (lr_t <= 0).any() or (radius_t < 0).any():
        raise ValueError(f"need lr > 0 and radius >= 0, got lr={lr}, radius={radius}")
    dev = W.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    W = W.detach().to(dtype).clone()
    buf = torch.zeros_like(W)  # momentum / Adam first moment
    sq = torch.zeros_like(W)  # Adam second moment
    diverged = torch.zeros(S, dtype=torch.bool, device=dev)
    first = torch.full((S,), -1, dtype=torch.long, device=dev)
    perturbations = torch.zeros(S, dtype=torch.long, device=dev)
    anchor = W.clone()  # PGD: weights PGD_WINDOW steps ago
    saved = W.clone()
    saved_loss = torch.full((S,), float("inf"), dtype=torch.float64, device=dev)
    first_half = None
    bar = progress(range(steps), quiet=quiet, desc=f"{method} k={problem.k}")
    for t in bar:
        if rule == "restart" and t == steps // 2:
            first_half, first_diverged = W.clone(), diverged.clone()
            fresh = torch.randn(W.shape, generator=gen, dtype=dtype, device=dev)
            W = fresh / problem.d**0.5  # a fresh Xavier initialisation N(0, I/d)
            diverged = torch.zeros_like(diverged)
        x = sample_inputs(S, batch, problem.d, generator=gen, dtype=dtype)  # (S, B, d)
        Wg = W.clone().requires_grad_()
        total = sample_loss(Wg, p32, x, loss_name, generator=gen).sum()
        (g,) = torch.autograd.grad(total, Wg)  # (S, n, d) per-seed gradients
        if rule == "momentum":
            buf = MOMENTUM * buf + g
            step = buf
        elif rule == "adam":
            b1, b2 = ADAM_BETAS
            buf = b1 * buf + (1 - b1) * g
            sq = b2 * sq + (1 - b2) * g * g
            step = (buf / (1 - b1 ** (t + 1))) / ((sq / (1 - b2 ** (t + 1))).sqrt() + ADAM_EPS)
        else:
            step = g
        new = W - lr_t * step
        if rule == "pgd" and (t + 1) % PGD_WINDOW == 0:
            new, saved, saved_loss = _pgd_window(
                new,
                anchor,
                saved,
                saved_loss,
                lr_t,
                radius_t,
                diverged,
                perturbations,
                p64,
                gen,
                last=t + 1 + PGD_WINDOW > steps,
            )
            anchor = new.clone()
        bad = ~torch.isfinite(new).all(dim=(1, 2)) | (new.flatten(1).norm(dim=1) > DIVERGED_NORM)
        diverged |= bad
        W = torch.where(diverged.view(-1, 1, 1), W, new)
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            loss = population_loss(W.double(), p64)
            hit = (loss < STUCK_LOSS) & ~diverged & (first < 0)
            first[hit] = t + 1
            bar.set_postfix(success=f"{((loss < STUCK_LOSS) & ~diverged).float().mean():.3f}")
    if rule == "restart":
        better = _held_out_loss(first_half, p64, gen) < _held_out_loss(W, p64, gen)
        keep_first = ~first_diverged & (better | diverged)
        W = torch.where(keep_first.view(-1, 1, 1), first_half, W)
        diverged = torch.where(keep_first, first_diverged, diverged)
    loss = population_loss(W.double(), p64)
    loss[diverged] = float("inf")
    return {
        "W": W,
        "loss": loss,
        "first_success": first,
        "diverged": diverged,
        "perturbations": perturbations,
    }


# Tuning grids (chosen on tuning seeds, disjoint from evaluation seeds). QMSE's gradient
# grows like ‖r‖³ (README note 3), so its grid reaches lower; momentum's effective step is
# lr/(1 − 0.9).
LR_GRIDS = {
    "sgd": (0.03, 0.1, 0.3, 0.6),
    "momentum": (0.003, 0.01, 0.03, 0.1),
    "adam": (0.001, 0.003, 0.01, 0.03),
    "qmse": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3),
    "qmse-momentum": (0.001, 0.003, 0.01, 0.03, 0.1),
    "expected-qmse": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3),
    "expected-qmse-momentum": (0.001, 0.003, 0.01, 0.03, 0.1),
}
RADIUS_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # PGD radius as a fraction of ‖W‖_F (note 7)
TUNE_SEEDS = 10**6  # tuning initialisations: seeds 10⁶ + i (evaluation seeds are 0 … S−1)
PUBLISHED = {6: 0.003, 8: 0.126, 10: 0.346, 12: 0.585, 16: 0.851, 20: 0.949}  # S&S 2018, n = k


@dataclass
class EscapeConfig:
    """Everything that defines one benchmark directory (saved as config.json)."""

    ks: list[int]
    n_extra: int = 0
    outputs: int = 1  # C; > 1 is the vector-output variant y = A relu(Vx)
    seeds: int = 1000  # gd-population initialisations per k (the reproduction)
    sample_seeds: int = 100  # seeds (protocol a) / minima (protocol b) per sample-based run
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    protocols: list[str] = field(default_factory=lambda: ["random-init", "spurious-minima"])
    steps: int = 3000  # shared step budget of every sample-based method
    batch: int = 64
    tune_k: int | None = None  # tune lr / radius at this k for every k; None: at each k
    tune_seeds: int = 32  # per grid point
    tune_pool: int = 400  # gd-population tuning seeds searched for protocol (b) minima
    max_gd_steps: int = 100_000
    problem_seed: int = 0  # draws A for outputs > 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods {bad} unknown; choose from {METHODS}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"protocols {bad} unknown; choose from {PROTOCOLS}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks={self.ks}: need at least one k >= 1")
        if self.n_extra < 0:
            raise ValueError(f"n_extra={self.n_extra}: need >= 0 (n = k + n_extra)")
        for name in ("seeds", "sample_seeds", "steps", "batch", "tune_seeds", "tune_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: need >= 1")


def _problem(cfg: EscapeConfig, k: int) -> Problem:
    return make_problem(k, k + cfg.n_extra, outputs=cfg.outputs, seed=cfg.problem_seed)


def _run_id(*parts: object) -> int:
    """A deterministic integer seed from small integers (never Python's salted hash)."""
    out = 0
    for p in parts:
        out = out * 1_000_003 + int(p)
    return out % 2**62


def spurious_minima(
    out: str | os.PathLike, cfg: EscapeConfig, k: int, *, tag: str, quiet: bool = False
) -> Tensor:
    """The certified stuck end points of gd-population (gradient ≤ 1e-9, loss ≥ 1e-3):
    (M, n, d) float64, from the evaluation seeds (tag "eval") or the tuning pool ("tune")."""
    problem = _problem(cfg, k)
    seeds = range(cfg.seeds) if tag == "eval" else range(TUNE_SEEDS, TUNE_SEEDS + cfg.tune_pool)
    r = population_runs(out, problem, seeds, tag=tag, max_steps=cfg.max_gd_steps, quiet=quiet)
    stuck = r["converged"] & (r["loss"] >= STUCK_LOSS)
    return r["W"][stuck]


def certify_minima(W: Tensor, problem: Problem) -> list[float]:
    """Smallest Hessian eigenvalue (float64 autograd of the closed form) at each point of
    W (M, n, d): all > 0 means strict local minima, not saddles."""
    p = problem.to(torch.float64)
    return [torch.linalg.eigvalsh(population_hessian(w.double(), p))[0].item() for w in W]


def _starts(cfg: EscapeConfig, out: Path, k: int, protocol: str, tuning: bool, quiet: bool):
    """Starting weights for a run: Xavier initialisations (random-init) or gd-population's
    spurious minima (spurious-minima); tuning draws from seeds disjoint from evaluation."""
    problem = _problem(cfg, k)
    count = cfg.tune_seeds if tuning else cfg.sample_seeds
    if protocol == "random-init":
        first = TUNE_SEEDS if tuning else 0
        return init_weights(range(first, first + count), problem.n, problem.d)
    return spurious_minima(out, cfg, k, tag="tune" if tuning else "eval", quiet=quiet)[:count]


def _score(loss: Tensor) -> tuple[int, float]:
    """Tuning criterion: fewest failures, then the lowest median log₁₀ final loss."""
    fails = int((~(loss < STUCK_LOSS)).sum())
    return fails, float(torch.log10(loss.clamp_min(1e-30)).nan_to_num(posinf=30).median())


def tune(
    out: str | os.PathLike,
    cfg: EscapeConfig,
    method: str,
    protocol: str,
    k: int,
    *,
    quiet: bool = False,
) -> dict:
    """Choose `method`'s learning rate on the tuning seeds at this k (or cfg.tune_k if set),
    one batched run for the whole grid. The scalar teacher's output grows with k, so does
    the curvature, and a learning rate tuned at one k diverges at a larger one. PGD and
    restart descend with SGD's learning rate tuned from random initialisations (descending is
    what they use it for; tuned on minima, where every lr fails, the tie-break would pick a
    crawl); PGD's radius is tuned per protocol. Cached in out/tuning/."""
    out = Path(out)
    k = cfg.tune_k or k
    path = out / "tuning" / f"{protocol}_{method}_k{k}.json"
    if path.exists():
        return load_json(path)
    if method in ("pgd", "restart"):
        sgd_lr = tune(out, cfg, "sgd", "random-init", k, quiet=quiet)["lr"]
        if method == "restart":
            result = {"lr": sgd_lr, "radius": None, "grid": [], "k": k, "note": "SGD's lr"}
            save_json(path, result)
            return result
        grid = [(sgd_lr, r) for r in RADIUS_GRID]
    else:
        grid = [(lr, None) for lr in LR_GRIDS[method]]
    W0 = _starts(cfg, out, k, protocol, tuning=True, quiet=quiet)
    m = W0.shape[0]
    if m == 0:
        raise RuntimeError(
            f"no spurious minima among {cfg.tune_pool} tuning seeds at k={k}; raise "
            f"--tune-pool or --tune-k"
        )
    lr = torch.tensor([g[0] for g in grid]).repeat_interleave(m)
    radius = torch.tensor([g[1] or 0.0 for g in grid]).repeat_interleave(m)
    r = run_sample_method(
        method,
        W0.repeat(len(grid), 1, 1).to(cfg.device),
        _problem(cfg, k),
        steps=cfg.steps,
        lr=lr,
        radius=radius,
        batch=cfg.batch,
        seed=_run_id(1, METHODS.index(method), PROTOCOLS.index(protocol), k),
        quiet=quiet,
    )
    rows = []
    for i, (g_lr, g_radius) in enumerate(grid):
        loss = r["loss"][i * m : (i + 1) * m].cpu()
        fails, med = _score(loss)
        rows.append(
            {
                "lr": g_lr,
                "radius": g_radius,
                "failures": fails,
                "seeds": m,
                "diverged": int(r["diverged"][i * m : (i + 1) * m].sum()),
                "median_log10_loss": med,
            }
        )
    best = min(rows, key=lambda row: (row["failures"], row["median_log10_loss"]))
    result = {"lr": best["lr"], "radius": best["radius"], "grid": rows, "k": k}
    save_json(path, result)
    return result


def _row(cfg, k, n, method, protocol, loss, diverged, lr, radius, extra) -> dict:
    seeds = int(loss.numel())
    failures = int((~(loss < STUCK_LOSS)).sum())
    lo, hi = wilson_interval(failures, seeds)
    return {
        "k": k,
        "n": n,
        "outputs": cfg.outputs,
        "method": method,
        "protocol": protocol,
        "seeds": seeds,
        "failures": failures,
        "failure_rate": failures / seeds if seeds else float("nan"),
        "ci95_low": lo,
        "ci95_high": hi,
        "diverged": int(diverged),
        "lr": lr,
        "radius": radius,
        "batch": None if method == "gd-population" else cfg.batch,
        "steps": None if method == "gd-population" else cfg.steps,
        "median_loss": float(loss.median()) if seeds else float("nan"),
        **extra,
    }


def run_cell(
    out: str | os.PathLike,
    cfg: EscapeConfig,
    k: int,
    method: str,
    protocol: str,
    *,
    quiet: bool = False,
) -> dict | None:
    """One (k, method, protocol) cell of the benchmark, cached in out/rows/. Returns its
    results row, or None where the cell does not exist (gd-population under protocol (b):
    it is the method that defined the minima)."""
    out = Path(out)
    problem = _problem(cfg, k)
    path = out / "rows" / f"{protocol}_{method}_k{k}_n{problem.n}_C{cfg.outputs}.json"
    if path.exists():
        return load_json(path)
    if method == "gd-population":
        if protocol != "random-init":
            return None
        seeds = range(cfg.seeds)
        r = population_runs(out, problem, seeds, max_steps=cfg.max_gd_steps, quiet=quiet)
        fails = int((r["loss"] >= STUCK_LOSS).sum())
        extra = {
            "capped": int((~r["converged"]).sum()),
            "median_gd_steps": float(r["steps"].double().median()),
            "max_gd_steps": int(r["steps"].max()),
        }
        published = PUBLISHED.get(k) if cfg.n_extra == 0 and cfg.outputs == 1 else None
        if published is not None:
            pub_fails = round(published * 1000)
            table = [[fails, cfg.seeds - fails], [pub_fails, 1000 - pub_fails]]
            extra |= {
                "published_rate": published,
                "published_in_ci95": None,
                "fisher_p_vs_published": float(fisher_exact(table)[1]),
            }
        row = _row(cfg, k, problem.n, method, protocol, r["loss"], 0, 0.1, None, extra)
        if published is not None:
            row["published_in_ci95"] = bool(row["ci95_low"] <= published <= row["ci95_high"])
    else:
        W0 = _starts(cfg, out, k, protocol, tuning=False, quiet=quiet)
        if W0.shape[0] == 0:
            row = _row(cfg, k, problem.n, method, protocol, torch.zeros(0), 0, None, None, {})
        else:
            tuned = tune(out, cfg, method, protocol, k, quiet=quiet)
            r = run_sample_method(
                method,
                W0.to(cfg.device),
                problem,
                steps=cfg.steps,
                lr=tuned["lr"],
                radius=tuned["radius"] or 0.0,
                batch=cfg.batch,
                seed=_run_id(2, METHODS.index(method), PROTOCOLS.index(protocol), k),
                quiet=quiet,
            )
            ok = r["first_success"][r["loss"].cpu() < STUCK_LOSS].double()
            extra = {
                "median_first_success": float(ok.median()) if len(ok) else None,
                "mean_perturbations": float(r["perturbations"].double().mean()),
            }
            loss = r["loss"].cpu()
            row = _row(
                cfg,
                k,
                problem.n,
                method,
                protocol,
                loss,
                int(r["diverged"].sum()),
                tuned["lr"],
                tuned["radius"],
                extra,
            )
    save_json(path, row)
    return row


def minima_report(
    out: str | os.PathLike, cfg: EscapeConfig, k: int, *, check: int = 3, quiet: bool = False
) -> dict:
    """Protocol (b)'s starting points at k: how many, their losses, and the smallest Hessian
    eigenvalue at the first `check` of them. Cached in out/minima/k{k}.json."""
    out = Path(out)
    problem = _problem(cfg, k)
    path = out / "minima" / f"k{k}_n{problem.n}_C{cfg.outputs}.json"
    if path.exists():
        return load_json(path)
    W = spurious_minima(out, cfg, k, tag="eval", quiet=quiet)
    losses = population_loss(W, problem).tolist() if len(W) else []
    report = {
        "k": k,
        "n": problem.n,
        "count": len(W),
        "of_seeds": cfg.seeds,
        "distinct_losses": sorted({round(v, 6) for v in losses}),
        "min_hessian_eigenvalues": certify_minima(W[:check], problem),
    }
    save_json(path, report)
    return report


def write_table(rows: list[dict], path: str | os.PathLike) -> str:
    """Markdown: failure rate with Wilson 95 % interval (and divergences), method × k, one
    table per protocol."""
    lines = []
    for protocol in PROTOCOLS:
        sel = [r for r in rows if r["protocol"] == protocol]
        if not sel:
            continue
        ks = sorted({r["k"] for r in sel})
        methods = [m for m in METHODS if any(r["method"] == m for r in sel)]
        what = "failure rate" if protocol == "random-init" else "failure to escape"
        lines += [f"### Protocol {protocol}: {what} [Wilson 95 %] (diverged)", ""]
        lines.append("| method | lr per k | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---" * (len(ks) + 2) + "|")
        for m in methods:
            cells, lrs = [], []
            for k in ks:
                r = next((r for r in sel if r["method"] == m and r["k"] == k), None)
                if r is None or r["seeds"] == 0:
                    cells.append("–" if r is None else "no minima")
                    continue
                lrs.append(f"{r['lr']:g}" + (f" (r={r['radius']:g}‖W‖)" if r["radius"] else ""))
                cells.append(
                    f"{r['failures']}/{r['seeds']} = {r['failure_rate']:.3f} "
                    f"[{r['ci95_low']:.3f}, {r['ci95_high']:.3f}]"
                    + (f" ({r['diverged']})" if r["diverged"] else "")
                )
            lines.append(f"| {m} | {' / '.join(lrs)} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    atomic_write(path, text)
    return text


def plot_results(rows: list[dict], path: str | os.PathLike) -> None:
    """Failure rate vs k, one line per method with Wilson 95 % error bars; one panel per
    protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in PROTOCOLS if any(r["protocol"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols, strict=True):
        sel = [r for r in rows if r["protocol"] == protocol and r["seeds"] > 0]
        for m in (m for m in METHODS if any(r["method"] == m for r in sel)):
            i = METHODS.index(m)  # fixed colour and offset per method across panels
            pts = sorted((r for r in sel if r["method"] == m), key=lambda r: r["k"])
            ks = [r["k"] + 0.06 * (i - 4.5) for r in pts]
            rate = [r["failure_rate"] for r in pts]
            err = [
                [max(0.0, r["failure_rate"] - r["ci95_low"]) for r in pts],
                [max(0.0, r["ci95_high"] - r["failure_rate"]) for r in pts],
            ]
            ax.errorbar(ks, rate, yerr=err, marker="o", ms=4, capsize=3, label=m, color=f"C{i}")
        if protocol == "random-init":
            pub = [(k, p) for k, p in PUBLISHED.items() if any(r["k"] == k for r in sel)]
            if pub:
                ax.plot(*zip(*pub, strict=True), "k*", ms=10, label="Safran & Shamir 2018")
        ax.set_xlabel("k (teacher width; student width n = k + n_extra)")
        ax.set_ylabel("failure rate" if protocol == "random-init" else "failure to escape")
        ax.set_title(f"protocol: {protocol}")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        if sel:  # a protocol with no finished seeds yet has nothing to label
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _remote_phases(out: Path, cfg: EscapeConfig) -> Iterator[list[tuple]]:
    """The benchmark's cached pieces in dependency order, for Ray (each phase is finished
    before the next is asked for): gd-population runs and SGD's random-init tuning (which
    PGD and restart reuse); the tuning pools' runs where protocol (b) has minima to start
    from; the cells and minima reports. Cells that share a tuning (a fixed tune_k) form one
    task, so no two tasks of a phase compute the same file."""
    sample = [m for m in cfg.methods if m != "gd-population"]
    minima = "spurious-minima" in cfg.protocols
    tune_ks = sorted({cfg.tune_k or k for k in cfg.ks})
    first = [("population", k, "eval") for k in cfg.ks if minima or "gd-population" in cfg.methods]
    if {"pgd", "restart"} & set(sample) or ("sgd" in sample and "random-init" in cfg.protocols):
        first += [("tune", "sgd", "random-init", k) for k in tune_ks]
    yield first
    if minima and sample:
        found = [k for k in cfg.ks if len(spurious_minima(out, cfg, k, tag="eval", quiet=True))]
        yield [("population", k, "tune") for k in sorted({cfg.tune_k or k for k in found})]
    cells: dict[tuple, list] = {}  # (protocol, method, tuning k) -> cells
    for protocol in cfg.protocols:
        for method in cfg.methods:
            for k in cfg.ks:
                key = (protocol, method, k if method == "gd-population" else cfg.tune_k or k)
                cells.setdefault(key, []).append((k, method, protocol))
    yield [("cells", *group) for group in cells.values()] + [
        ("minima", k) for k in cfg.ks if minima
    ]


def _remote_task(task: tuple) -> None:
    """One piece of `_remote_phases` (a Ray task): it fills the cache files that
    run_benchmark's loop then reads."""
    out, cfg, kind, *args = task
    if kind == "population":
        spurious_minima(out, cfg, args[0], tag=args[1], quiet=True)
    elif kind == "tune":
        tune(out, cfg, *args, quiet=True)
    elif kind == "minima":
        minima_report(out, cfg, args[0], quiet=True)
    else:
        for k, method, protocol in args:
            run_cell(out, cfg, k, method, protocol, quiet=True)


def run_benchmark(
    out: str | os.PathLike,
    cfg: EscapeConfig,
    *,
    backend: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float = 0,
    quiet: bool = False,
) -> list[dict]:
    """Every (k, method, protocol) cell, each cached so an interrupted run resumes; then
    results.json, table.md and figure.png. A directory keeps one configuration: rerunning
    with a different one is refused rather than mixed.

    `backend="ray"` computes the cells as Ray tasks (`qmse.sweep.run_tasks`: the cluster at
    `address`, else a local one; `cpus_per_task` CPUs and `gpus_per_task` GPUs each; a task
    whose worker dies is retried) in dependency order; the same files result."""
    out = Path(out)
    config = asdict(cfg)
    saved = out / "config.json"
    if saved.exists():
        old = load_json(saved)
        keep = ("ks", "methods", "protocols")  # cells may be added; everything else must match
        if {a: b for a, b in old.items() if a not in keep} != {
            a: b for a, b in config.items() if a not in keep
        }:
            raise ValueError(
                f"{out} holds results of a different configuration ({saved}); use another --out"
            )
    save_json(saved, config)
    save_json(out / "provenance.json", provenance(cfg.device))
    if backend != "local":  # fill the caches on Ray; the loop below then only reads them
        from qmse.sweep import ray_session, run_tasks

        kw = {"num_cpus_per_task": cpus_per_task, "num_gpus_per_task": gpus_per_task}
        with ray_session(address, quiet=quiet):
            for i, phase in enumerate(_remote_phases(out, cfg)):
                tasks = [(str(out), cfg, *task) for task in phase]
                run_tasks(
                    _remote_task, tasks, backend=backend, quiet=quiet, desc=f"phase {i + 1}", **kw
                )
    rows = []
    for protocol in cfg.protocols:
        for k in cfg.ks:
            if protocol == "spurious-minima":
                minima_report(out, cfg, k, quiet=quiet)
            for method in cfg.methods:
                row = run_cell(out, cfg, k, method, protocol, quiet=quiet)
                if row is not None:
                    rows.append(row)
    save_json(out / "results.json", rows)
    write_table(rows, out / "table.md")
    plot_results(rows, out / "figure.png")
    return rows
