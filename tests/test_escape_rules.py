"""qmse.escape.rules: each built-in update against a step written out by hand on a tiny case
(the engine's input stream and the method's own stream redrawn here), PGD's ball, PGD and
restart at a global minimum, and QMSE's gradient against label noise of scale 2r²."""

import math

import pytest
import torch

from qmse.escape import METHODS, STUCK_LOSS, Method, make_job, run_method
from qmse.escape.engine import job_gradient, teacher_outputs
from qmse.escape.rules import sgd, uniform_ball
from qmse.loss import get_loss, sample_directions
from qmse.teacher_student import init_weights, make_problem, outputs

MOMENTUM = 1 - METHODS["momentum"].default("one_minus_beta")  # β at the grid's middle: 0.9
K, M, B, LR, SEED, METHOD_SEED = 3, 2, 5, 0.05, 11, 12


def _streams():
    """The engine's streams: inputs (M, B, d) per step from SEED; method draws from
    METHOD_SEED."""
    return torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(METHOD_SEED)


def _mse_grad(W, x, problem, label_noise=None):
    """∇_W of the mean over the batch of ½(y + ξ − f)², by autograd on the formula."""
    W = W.clone().requires_grad_()
    f = outputs(W, problem.A_student, x)  # (M, B, 1)
    y = outputs(problem.V.expand(len(W), -1, -1), problem.A_teacher, x)
    target = y if label_noise is None else y + label_noise
    loss = (0.5 * (target - f) ** 2).sum(-1).mean(-1).sum()
    return torch.autograd.grad(loss, W)[0]


def _run(name, steps, **hyper):
    problem = make_problem(K)
    W0 = init_weights(range(M), K, K).float()
    r = run_method(
        name, W0, problem, steps=steps, lr=LR, hyper=hyper, batch=B, seed=SEED,
        method_seed=METHOD_SEED, quiet=True,
    )  # fmt: skip
    return W0, problem.to(torch.float32), r["W"]


def _x(gx):
    return torch.randn(M, B, K, generator=gx)


@pytest.mark.parametrize("with_momentum", [False, True])
def test_label_noise_is_sgd_on_freshly_noised_targets(with_momentum):
    sigma = 0.3
    name = "label-noise-momentum" if with_momentum else "label-noise"
    W, problem, out = _run(name, 2, sigma=sigma)
    gx, gm = _streams()
    buf = None
    for _ in range(2):
        x = _x(gx)
        xi = sigma * torch.randn(M * B, 1, generator=gm)  # one ξ per sample, (start, sample)
        g = _mse_grad(W, x, problem, xi.view(M, B, 1))
        buf = g if buf is None or not with_momentum else MOMENTUM * buf + g
        W = W - LR * buf
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_momentum", [False, True])
def test_gradient_noise_adds_isotropic_gaussian_noise_to_the_gradient(with_momentum):
    sigma = 0.2
    name = "gradient-noise-momentum" if with_momentum else "gradient-noise"
    W, problem, out = _run(name, 2, sigma=sigma)
    gx, gm = _streams()
    buf = None
    for _ in range(2):
        g = _mse_grad(W, _x(gx), problem) + sigma * torch.randn(M, K, K, generator=gm)
        buf = g if buf is None or not with_momentum else MOMENTUM * buf + g
        W = W - LR * buf
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_momentum", [False, True])
def test_anticorrelated_adds_the_difference_of_consecutive_perturbations(with_momentum):
    """W_{t+1} = W_t − lr·step + ξ_{t+1} − ξ_t (Orvieto et al. 2022); ξ_0 first."""
    sigma = 0.01
    name = "anticorrelated-momentum" if with_momentum else "anticorrelated"
    W, problem, out = _run(name, 3, sigma=sigma)
    gx, gm = _streams()
    xi = sigma * torch.randn(M, K, K, generator=gm)
    buf, perturbations = None, torch.zeros(M, K, K)
    for _ in range(3):
        g = _mse_grad(W, _x(gx), problem)
        buf = g if buf is None or not with_momentum else MOMENTUM * buf + g
        new_xi = sigma * torch.randn(M, K, K, generator=gm)
        W = W - LR * buf + (new_xi - xi)
        perturbations += new_xi - xi
        xi = new_xi
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)
    # the perturbations telescope: their sum is ξ_3 − ξ_0, not a random walk
    assert perturbations.norm() < 4 * sigma * math.sqrt(2 * M * K * K)


def test_adam_matches_its_definition():
    W, problem, out = _run("adam", 2)
    gx, _ = _streams()
    m = v = torch.zeros_like(W)
    for t in range(2):
        g = _mse_grad(W, _x(gx), problem)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        W = W - LR * (m / (1 - 0.9 ** (t + 1))) / ((v / (1 - 0.999 ** (t + 1))).sqrt() + 1e-8)
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)


def test_sgd_decay_follows_the_cosine_schedule_to_its_floor():
    """lr_t = lr·(f + (1 − f)·½(1 + cos(π t/T))) over a budget of T steps."""
    floor, steps = 0.25, 4
    W, problem, out = _run("sgd-decay", steps, floor=floor)
    gx, _ = _streams()
    factors = [
        1.0,
        0.25 + 0.75 * (2 + math.sqrt(2)) / 4,
        0.25 + 0.75 / 2,
        0.25 + 0.75 * (2 - math.sqrt(2)) / 4,
    ]
    for t in range(steps):
        W = W - LR * factors[t] * _mse_grad(W, _x(gx), problem)
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)


def test_sam_steps_with_the_gradient_at_the_ascent_point_of_the_same_batch():
    """Foret et al. 2021: g = ∇L(W), W' = W + ρ g/‖g‖ (per start), W ← W − lr·∇L(W') with
    the same batch; both gradients by autograd of the sample loss."""
    rho = 0.3
    W, problem, out = _run("sam", 3, rho=rho)
    gx, _ = _streams()
    for _ in range(3):
        x = _x(gx)
        g = _mse_grad(W, x, problem)
        ascent = W + rho * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
        W = W - LR * _mse_grad(ascent, x, problem)
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)
    assert (out - _run("sgd", 3)[2]).abs().max() > 1e-3  # the ascent point matters here


def test_homotopy_steps_with_the_gradient_at_a_gaussian_perturbation_annealed_to_zero():
    """Mobahi 2016: W ← W − lr·∇L(W + σ_t ε), one ε ~ N(0, I) per step from the method's
    stream, σ_t = σ_0·½(1 + cos(π t/T)): σ_0 at the first step of T = 2, σ_0/2 at the
    second."""
    sigma0, steps = 0.2, 2
    W, problem, out = _run("homotopy", steps, sigma0=sigma0)
    gx, gm = _streams()
    for sigma in (sigma0, sigma0 / 2):
        x, eps = _x(gx), torch.randn(M, K, K, generator=gm)
        W = W - LR * _mse_grad(W + sigma * eps, x, problem)
    torch.testing.assert_close(out, W, rtol=1e-5, atol=1e-6)
    assert (out - _run("sgd", steps)[2]).abs().max() > 1e-3  # the perturbation matters here


def test_qmse_gradient_is_label_noise_of_scale_2r2_on_the_expected_qmse_landscape():
    """Scalar output, v = ±1: L = ½⟨r + v, r⟩² with (r + v) held constant has
    ∂L/∂f = −(r + v)² r = −(r³ + r) − 2v r², so ∇QMSE − ∇expected-QMSE equals
    ∇label-noise(ξ = 2v r²) − ∇MSE on the same inputs and the same v."""
    problem = make_problem(4).to(torch.float64)
    m, b = 3, 16
    W = init_weights(range(m), 4, 4)
    x = torch.randn(m, b, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = teacher_outputs(x, problem)

    def grad(method):
        job = make_job(method, 0.1)
        return job_gradient(job, W, x, y, problem, torch.Generator().manual_seed(5))

    v = sample_directions(m * b, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert set(v.flatten().tolist()) <= {-1.0, 1.0}
    r = (y - outputs(W, problem.A_student, x)).reshape(-1, 1)  # (m·b, 1), samples (i, b)
    xi = 2 * v * r**2
    tied = Method(
        "test-tied-label-noise",
        lambda f, target, generator: get_loss("label-noise")(f, target, noise=xi, reduction="none"),
        sgd,
        (0.1,),
    )
    noise_qmse = grad("qmse") - grad("expected-qmse")
    noise_label = grad(tied) - grad("sgd")  # sgd trains on "mse"
    torch.testing.assert_close(noise_qmse, noise_label, rtol=1e-10, atol=1e-12)
    assert noise_qmse.abs().max() > 1e-3  # the noise is there, not zero on both sides


def test_uniform_ball_radius_and_volume():
    r = torch.tensor([0.5, 2.0]).repeat_interleave(2000)
    z = uniform_ball((4000, 3, 2), r, torch.Generator().manual_seed(0))
    norms = z.flatten(1).norm(dim=1)
    assert (norms <= r + 1e-6).all()
    u = (norms / r) ** 6  # uniform in a 6-ball: (‖z‖/r)^6 is uniform on [0, 1]
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01


@pytest.mark.parametrize("method", ["pgd", "restart"])
def test_perturbing_methods_keep_a_global_minimum(method):
    """From the global minimum PGD's kick (radius = ‖W‖) is undone unless descent recovers,
    and restart keeps the better of its two segments: both end at loss < 1e-3."""
    problem = make_problem(3)
    W0 = problem.V[[1, 2, 0]].unsqueeze(0).repeat(4, 1, 1)  # (4, 3, 3)
    hyper = {"radius": 1.0} if method == "pgd" else {}
    out = run_method(
        method, W0, problem, steps=1000, lr=0.1, hyper=hyper, batch=32, seed=2, quiet=True
    )
    assert (out["loss"] < STUCK_LOSS).all()
    if method == "pgd":
        assert (out["perturbations"] == 1).all()  # one kick at 500, none in the last window
