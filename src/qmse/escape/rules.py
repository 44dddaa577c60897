"""The built-in methods of the escape benchmark, registered through the plug-in interface.

Update rules (W, grad: (S, n, d); lr and hyperparameters: (S, 1, 1); draws from state["rng"]):
- `sgd`: W ← W − lr·g;
- `momentum`: heavy ball, PyTorch's convention: b ← β·b + g, W ← W − lr·b, with β searched
  as the hyperparameter one_minus_beta = 1 − β (a log grid around 0.1: β = 0.9);
- `adam`: Adam (0.9, 0.999, eps 1e-8) with bias correction;
- `gradient_noise` (+ momentum): g + σ·z, z ~ N(0, I) fresh at every step, in place of g;
- `anticorrelated` (+ momentum): W ← W − lr·g + (ξ_{t+1} − ξ_t), ξ_t ~ N(0, σ²I) i.i.d.
  (Orvieto et al. 2022, "Anticorrelated noise injection for improved generalization"):
  the perturbations are anti-correlated, so they do not accumulate into a random walk;
- PGD (Jin et al. 2017) and restart: SGD plus hooks (`pgd_after_step`, `restart_after_step`);
- `sgd_decay`: SGD with the step cosine-decayed from lr to floor·lr over the budget T:
  lr_t = lr·(f + (1 − f)·c_t), c_t = ½(1 + cos(π t/T));
- `sam` (Foret et al. 2021, "Sharpness-aware minimization"): W' = W + ρ g/(‖g‖ + 10⁻¹²), the
  norm over each start's parameters, then W ← W − lr·∇L(W') on the same batch
  (`state["grad_at"]`, two gradients per step);
- `homotopy` (continuation, Mobahi 2016, "Training recurrent neural networks by
  diffusion"): W ← W − lr·∇L(W + σ_t ε), one ε ~ N(0, I) per step from the method's stream, a
  one-draw estimate of the gradient of the loss smoothed by N(0, σ_t²I) weight noise, with
  σ_t = σ_0·c_t annealed to 0 over the budget (the engine's gradient at W goes unused, so a
  step costs two batch gradients, as SAM's does; the rows count both).

The rules that draw nothing and treat every start on their own (all but the noise rules,
PGD, restart and homotopy) are `stackable`: a sweep updates all their settings at once.

Label-noise SGD is plain SGD on the registered "label-noise" loss (targets y + ξ,
ξ ~ N(0, σ²) fresh at every step), its σ a hyperparameter of the method. docs/theory.md
("Fair baselines for escaping", "QMSE's noise against label noise") says why these baselines.

`BUILTIN_METHODS` are the methods a benchmark runs by default (the committed benchmarks'
commands); `EXTRA_METHODS` (step decay, SAM, homotopy) are registered beside them and run
when named with `--methods`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qmse.escape.methods import Method, Run, register_method

# Each rule reads its constants from `state` (declared in `Method.constants`, part of the key)
BETA_GAP = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)  # 1 − β of heavy ball: β 0.9875 … 0.6; middle 0.9
HEAVY_BALL = {"one_minus_beta": BETA_GAP}  # b ← β·b + g; W ← W − lr·b
BETA_DOMAIN = {"one_minus_beta": 1.0}  # the search never passes β = 0
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
PGD = {"window": 500, "grad_threshold": 0.05}  # t_thres steps; g_thres on the window's gradient
SAM = {"eps": 1e-12}  # added to ‖g‖ (Foret et al.'s code), so that g = 0 gives W' = W


def _normal(W: Tensor, state: dict) -> Tensor:
    """z ~ N(0, I) of W's shape from the method's own stream."""
    rng = state["rng"]
    return torch.randn(W.shape, generator=rng, device=rng.device, dtype=W.dtype).to(W.device)


def sgd(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor) -> tuple[Tensor, dict]:
    """W ← W − lr·g."""
    return W - lr * grad, state


def _heavy_ball(grad: Tensor, state: dict) -> Tensor:
    """The heavy-ball buffer b ← β·b + g (b = 0 before the first step), kept in state["buf"]."""
    state["buf"] = (1 - state["one_minus_beta"]) * state["buf"] + grad if "buf" in state else grad
    return state["buf"]


def momentum(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor) -> tuple[Tensor, dict]:
    """Heavy ball: b ← β·b + g (b = 0 before the first step), W ← W − lr·b."""
    return W - lr * _heavy_ball(grad, state), state


def adam(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor) -> tuple[Tensor, dict]:
    """Adam with bias correction at step t + 1."""
    b1, b2 = state["beta1"], state["beta2"]
    m = state.get("m", torch.zeros_like(W))
    v = state.get("v", torch.zeros_like(W))
    state["m"] = b1 * m + (1 - b1) * grad
    state["v"] = b2 * v + (1 - b2) * grad * grad
    m_hat = state["m"] / (1 - b1 ** (t + 1))
    v_hat = state["v"] / (1 - b2 ** (t + 1))
    return W - lr * m_hat / (v_hat.sqrt() + state["eps"]), state


def _noisy(W: Tensor, grad: Tensor, state: dict) -> Tensor:
    """g + σz, z ~ N(0, I) drawn at every step."""
    return grad + state["sigma"] * _normal(W, state)


def gradient_noise(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """W ← W − lr·(g + σz), z ~ N(0, I) drawn at every step."""
    return sgd(W, _noisy(W, grad, state), state, t, lr)


def gradient_noise_momentum(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """Heavy ball on g + σz, z ~ N(0, I) drawn at every step."""
    return momentum(W, _noisy(W, grad, state), state, t, lr)


def _anticorrelated(W: Tensor, step: Tensor, state: dict) -> tuple[Tensor, dict]:
    """W − step + (ξ_{t+1} − ξ_t); ξ_0 is drawn before the first step, then ξ_{t+1}."""
    if "xi" not in state:
        state["xi"] = state["sigma"] * _normal(W, state)
    xi = state["sigma"] * _normal(W, state)
    W = W - step + (xi - state["xi"])
    state["xi"] = xi
    return W, state


def anticorrelated(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """Anti-PGD (Orvieto et al. 2022): W ← W − lr·g + (ξ_{t+1} − ξ_t), ξ ~ N(0, σ²I)."""
    return _anticorrelated(W, lr * grad, state)


def anticorrelated_momentum(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """Heavy ball b ← β·b + g, W ← W − lr·b + (ξ_{t+1} − ξ_t)."""
    return _anticorrelated(W, lr * _heavy_ball(grad, state), state)


def uniform_ball(shape: tuple[int, ...], radius: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform draws from balls of radius `radius` (S,) in R^{n·d}: shape (S, n, d)."""
    z = torch.randn(shape, generator=generator, dtype=radius.dtype, device=generator.device)
    u = torch.rand(shape[0], generator=generator, dtype=radius.dtype, device=generator.device)
    z, u = z.to(radius.device), u.to(radius.device) ** (1 / z[0].numel())
    return z / z.flatten(1).norm(dim=1).view(-1, 1, 1) * (u * radius).view(-1, 1, 1)


def pgd_init(W: Tensor, state: dict, run: Run) -> dict:
    """PGD's bookkeeping: the window's anchor, the point before a kick and its loss."""
    state["anchor"] = W.clone()  # weights one window ago
    state["saved"] = W.clone()  # the point before the last kick
    state["saved_loss"] = torch.full(
        (W.shape[0],), float("inf"), dtype=torch.float64, device=W.device
    )
    state["perturbations"] = torch.zeros(W.shape[0], dtype=torch.long, device=W.device)
    return state


def pgd_after_step(W: Tensor, state: dict, t: int, lr: Tensor, run: Run):
    """PGD's end-of-window test (Jin et al. 2017, Alg. 1 with its "return the point before
    the perturbation unless the descent after it decreased f" rule, applied as a revert).

    Every state["window"] steps: a start kicked at the previous window's end keeps its new point
    only if its held-out loss fell below the loss before the kick; otherwise it goes back.
    Then starts whose gradient averaged over the window (‖W − anchor‖ / (lr·window): a
    single minibatch gradient at a minimum is all noise) is ≤ state["grad_threshold"] get a
    kick uniform in the ball of radius state["radius"]·‖W‖_F, unless no full window is left
    to descend."""
    window = int(state["window"])
    if (t + 1) % window:
        return W, state
    rng = state["rng"]
    saved_loss = state["saved_loss"]
    pending = torch.isfinite(saved_loss)
    if pending.any():
        now = run.held_out_loss(W, rng)
        revert = pending & ~(now < saved_loss)
        W = torch.where(revert.view(-1, 1, 1), state["saved"], W)
        saved_loss = torch.full_like(saved_loss, float("inf"))
    if t + 1 + window <= run.steps:
        mean_grad = (state["anchor"] - W).flatten(1).norm(dim=1) / (lr.flatten() * window)
        kick = (mean_grad <= state["grad_threshold"]) & ~pending & ~run.diverged
        if kick.any():
            state["saved"] = W.clone()
            saved_loss = torch.where(kick, run.held_out_loss(W, rng), saved_loss)
            radius = state["radius"].flatten() * W.flatten(1).norm(dim=1)
            W = W + kick.view(-1, 1, 1) * uniform_ball(tuple(W.shape), radius, rng)
            state["perturbations"] += kick.long()
    state["saved_loss"] = saved_loss
    state["anchor"] = W.clone()
    return W, state


def restart_after_step(W: Tensor, state: dict, t: int, lr: Tensor, run: Run):
    """Halfway through the budget, keep the first segment's end point and start again from a
    fresh Xavier initialisation."""
    if t + 1 != run.steps // 2:
        return W, state
    state["first"], state["first_diverged"] = W.clone(), run.diverged.clone()
    run.diverged.zero_()
    return run.fresh_weights(W.shape[0], state["rng"]), state


def restart_finish(W: Tensor, state: dict, run: Run) -> Tensor:
    """Keep whichever segment's end point has the lower MSE on HELD_OUT fresh samples (a
    diverged segment never wins)."""
    if "first" not in state:  # a budget of one step has no second segment
        return W
    first, first_diverged = state["first"], state["first_diverged"]
    better = run.held_out_loss(first, state["rng"]) < run.held_out_loss(W, state["rng"])
    keep_first = ~first_diverged & (better.to(W.device) | run.diverged)
    run.diverged.copy_(torch.where(keep_first, first_diverged, run.diverged))
    return torch.where(keep_first.view(-1, 1, 1), first, W)


def remember_budget(W: Tensor, state: dict, run: Run) -> dict:
    """Before the first step: the step budget T in state["steps"], for the schedules."""
    state["steps"] = run.steps
    return state


def cosine(t: int, steps: int) -> float:
    """c_t = ½(1 + cos(π t/T)): 1 at the first step, falling to 0 at the end of the budget."""
    return 0.5 * (1 + math.cos(math.pi * t / steps))


def sgd_decay(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """W ← W − lr·(f + (1 − f)·c_t)·g: the step cosine-decayed from lr to the floor f·lr."""
    floor = state["floor"]
    return W - lr * (floor + (1 - floor) * cosine(t, state["steps"])) * grad, state


def sam(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """SAM: the gradient at W + ρ g/(‖g‖ + eps), ‖g‖ per start, on the step's batch."""
    norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1)  # (S, 1, 1)
    return W - lr * state["grad_at"](W + state["rho"] * grad / (norm + state["eps"])), state


def homotopy(W: Tensor, grad: Tensor, state: dict, t: int, lr: Tensor):
    """W ← W − lr·∇L(W + σ_t ε), ε ~ N(0, I) drawn at every step, σ_t = σ_0·c_t."""
    sigma = state["sigma0"] * cosine(t, state["steps"])
    return W - lr * state["grad_at"](W + sigma * _normal(W, state)), state


# Initial grids: log grids (neighbours 2x apart) around the values earlier sweeps chose; the
# sweep widens a grid whose best value lies on an edge. QMSE's gradient grows like ‖r‖³
# (docs/theory.md, "Scale: the ‖r‖³ growth"), so its grids reach lower; momentum's
# effective step is lr/(1 − 0.9).
SGD_LR = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
MOMENTUM_LR = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
QMSE_LR = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
QMSE_MOMENTUM_LR = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)
# Noise scales reach 2⁻⁹ of their largest value, so that every noise baseline's search
# covers its noise-free parent (σ → 0) as well as noise of the size of the residuals.
LABEL_SIGMA = tuple(0.8 / 2**k for k in range(9, -1, -1))  # residuals at the minima ≈ 0.2
GRAD_SIGMA = tuple(0.16 / 2**k for k in range(9, -1, -1))
ANTI_SIGMA = tuple(0.016 / 2**k for k in range(9, -1, -1))
PGD_RADIUS = tuple(2.0 / 2**k for k in range(7, -1, -1))  # fractions of ‖W‖_F, 1/64 … 2
DECAY_FLOOR = tuple(1 / 2**k for k in range(9, -1, -1))  # final step / lr: 1/512 … 1 (SGD)
SAM_RHO = tuple(0.5 / 2**k for k in range(9, -1, -1))  # ‖W' − W‖; ‖W‖_F ≈ √n near the minima
HOMOTOPY_SIGMA = tuple(0.2 / 2**k for k in range(9, -1, -1))  # σ_0 per weight; rows ≈ unit

BUILTIN_METHODS = tuple(
    register_method(m).name
    for m in (
        Method(
            "sgd",
            "mse",
            sgd,
            SGD_LR,
            family="MSE optimisers",
            description="SGD on ½(f − y)²",
            stackable=True,
        ),
        Method(
            "momentum",
            "mse",
            momentum,
            MOMENTUM_LR,
            hyper=HEAVY_BALL,
            upper=BETA_DOMAIN,
            family="MSE optimisers",
            description="heavy ball on MSE",
            stackable=True,
        ),
        Method(
            "adam",
            "mse",
            adam,
            (0.001, 0.002, 0.004, 0.008, 0.016, 0.032),
            constants=ADAM,
            family="MSE optimisers",
            description="Adam on MSE",
            stackable=True,
        ),
        Method(
            "pgd",
            "mse",
            sgd,
            SGD_LR,
            hyper={"radius": PGD_RADIUS},
            init=pgd_init,
            after_step=pgd_after_step,
            report=("perturbations",),
            constants=PGD,
            family="perturb or restart",
            parent="sgd",
            description="SGD plus perturbations of radius r·‖W‖ (Jin et al. 2017)",
        ),
        Method(
            "restart",
            "mse",
            sgd,
            SGD_LR,
            after_step=restart_after_step,
            finish=restart_finish,
            family="perturb or restart",
            description="SGD for half the budget, then from a fresh start; keep the better",
        ),
        Method(
            "qmse",
            "qmse",
            sgd,
            QMSE_LR,
            family="QMSE",
            description="SGD on QMSE (paper eqs. 6-8)",
            stackable=True,
        ),
        Method(
            "qmse-momentum",
            "qmse",
            momentum,
            QMSE_MOMENTUM_LR,
            hyper=HEAVY_BALL,
            upper=BETA_DOMAIN,
            family="QMSE",
            description="heavy ball on QMSE",
            stackable=True,
        ),
        Method(
            "expected-qmse",
            "expected-qmse",
            sgd,
            QMSE_LR,
            family="QMSE",
            description="QMSE's landscape, no noise",
            stackable=True,
        ),
        Method(
            "expected-qmse-momentum",
            "expected-qmse",
            momentum,
            QMSE_MOMENTUM_LR,
            hyper=HEAVY_BALL,
            upper=BETA_DOMAIN,
            family="QMSE",
            description="heavy ball on expected-QMSE",
            stackable=True,
        ),
        Method(
            "label-noise",
            "label-noise",
            sgd,
            SGD_LR,
            hyper={"sigma": LABEL_SIGMA},
            family="noise baselines",
            parent="sgd",
            description="SGD on targets y + ξ, ξ ~ N(0, σ²) fresh each step",
            stackable=True,
        ),
        Method(
            "label-noise-momentum",
            "label-noise",
            momentum,
            MOMENTUM_LR,
            hyper={"sigma": LABEL_SIGMA, **HEAVY_BALL},
            upper=BETA_DOMAIN,
            family="noise baselines",
            parent="momentum",
            description="heavy ball on label-noise targets",
            stackable=True,
        ),
        Method(
            "gradient-noise",
            "mse",
            gradient_noise,
            SGD_LR,
            hyper={"sigma": GRAD_SIGMA},
            family="noise baselines",
            parent="sgd",
            description="SGD on g + σz, z ~ N(0, I)",
        ),
        Method(
            "gradient-noise-momentum",
            "mse",
            gradient_noise_momentum,
            MOMENTUM_LR,
            hyper={"sigma": GRAD_SIGMA, **HEAVY_BALL},
            upper=BETA_DOMAIN,
            family="noise baselines",
            parent="momentum",
            description="heavy ball on g + σz",
        ),
        Method(
            "anticorrelated",
            "mse",
            anticorrelated,
            SGD_LR,
            hyper={"sigma": ANTI_SIGMA},
            family="noise baselines",
            parent="sgd",
            description="SGD plus ξ_{t+1} − ξ_t, ξ ~ N(0, σ²I) (Orvieto et al. 2022)",
        ),
        Method(
            "anticorrelated-momentum",
            "mse",
            anticorrelated_momentum,
            MOMENTUM_LR,
            hyper={"sigma": ANTI_SIGMA, **HEAVY_BALL},
            upper=BETA_DOMAIN,
            family="noise baselines",
            parent="momentum",
            description="heavy ball plus ξ_{t+1} − ξ_t",
        ),
    )
)

EXTRA_METHODS = tuple(
    register_method(m).name
    for m in (
        Method(
            "sgd-decay",
            "mse",
            sgd_decay,
            SGD_LR,
            hyper={"floor": DECAY_FLOOR},
            upper={"floor": 1.0},  # a floor above 1 would raise the step
            init=remember_budget,
            family="MSE optimisers",
            description="SGD, step cosine-decayed from lr to floor·lr over the budget",
            stackable=True,
        ),
        Method(
            "sam",
            "mse",
            sam,
            SGD_LR,
            hyper={"rho": SAM_RHO},
            constants=SAM,
            family="sharpness and smoothing",
            parent="sgd",
            description="SAM: SGD with the gradient at W + ρ g/‖g‖ (Foret et al. 2021)",
            stackable=True,
        ),
        Method(
            "homotopy",
            "mse",
            homotopy,
            SGD_LR,
            hyper={"sigma0": HOMOTOPY_SIGMA},
            init=remember_budget,
            family="sharpness and smoothing",
            parent="sgd",
            description="SGD with the gradient at W + σ_t ε, σ_t = σ_0 → 0 (Mobahi 2016)",
        ),
    )
)
