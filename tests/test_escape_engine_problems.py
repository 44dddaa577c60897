"""qmse.escape.engine's generic path, on registered problems: the teacher–student problem
through it gives the hand-written path's gradients and rows; a problem on a manifold is
trained by projected, retracted steps (checked against one step written out); the held-out
loss of a hook is the population loss within Monte Carlo error; runs are seeded."""

import dataclasses

import pytest
import torch

from qmse import teacher_student as ts
from qmse.escape import get_problem, make_job, run_methods
from qmse.escape.engine import ProblemRun, job_gradient, problem_gradient, teacher_outputs

DT = torch.float64


def generic(problem):
    """The same problem without its hand-written path."""
    return dataclasses.replace(problem, native=None)


@pytest.mark.parametrize("n, outputs", [(5, 1), (4, 3)])
def test_the_generic_gradient_is_the_hand_written_one(n, outputs):
    """Autograd through `predict` and the hand-written backward pass agree row by row, for
    a deterministic loss, two settings of one job, and random losses (same noise drawn)."""
    problem = get_problem("teacher-student")(3, n, outputs=outputs, seed=2)
    native = problem.native.to(DT)
    m, B = 3, 7
    x = ts.sample_inputs(m, B, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    y = teacher_outputs(x, native)
    for job in (make_job("sgd", [0.1, 0.2]), make_job("qmse", 0.1), make_job("label-noise", 0.1)):
        W = torch.randn(
            job.settings * m, n, 3, dtype=DT, generator=torch.Generator().manual_seed(1)
        )
        fast = job_gradient(job, W, x, y, native, torch.Generator().manual_seed(5))
        auto = problem_gradient(job, W, x, y, problem, torch.Generator().manual_seed(5))
        torch.testing.assert_close(auto, fast, rtol=1e-10, atol=1e-12)


def test_the_generic_path_gives_the_hand_written_paths_rows():
    """Same starts, seeds and settings: the same successes, first successes and divergences,
    final losses equal to float32 rounding (restart's fresh start differs by construction:
    the generic path draws it from the problem's `init`, by seeds)."""
    problem = get_problem("teacher-student")(4)
    W0 = problem.init(range(6))
    kw = {"steps": 300, "batch": 16, "seed": 7, "method_seed": 9, "quiet": True}
    settings = (("sgd", 0.2), ("momentum", 0.02), ("qmse", 0.05), ("pgd", 0.2))
    jobs = [make_job(name, lr) for name, lr in settings] + [make_job("label-noise", 0.2)]
    fast = run_methods(jobs, W0, problem, **kw)
    auto = run_methods(jobs, W0, generic(problem), **kw)
    assert fast[0]["success"].any() and not fast[0]["success"].all()  # the test can fail
    for a, b in zip(fast, auto):
        for key in ("success", "first_success", "diverged"):
            assert torch.equal(a[key], b[key])
        finite = torch.isfinite(a["loss"])
        assert torch.equal(finite, torch.isfinite(b["loss"]))
        torch.testing.assert_close(a["loss"][finite], b["loss"][finite], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a["W"], b["W"], rtol=1e-4, atol=1e-5)


def test_a_problem_on_a_manifold_takes_projected_retracted_steps():
    """Burer–Monteiro on the product of spheres: one SGD step is W ← retract(W − lr·P_W ∇),
    ∇ the gradient of the batch's mean ½‖f − y‖² from the run's own draw; rows stay unit."""
    problem = get_problem("burer-monteiro")(2)
    W0 = problem.init(range(4))
    lr, B, seed = 0.05, 8, 3
    (one,) = run_methods([make_job("sgd", lr)], W0, problem, steps=1, batch=B, seed=seed,
                         method_seed=0, quiet=True)  # fmt: skip
    x, y = problem.sample(4, B, torch.Generator().manual_seed(seed))
    W = W0.float().requires_grad_()
    loss = 0.5 * ((problem.predict(W, x) - y) ** 2).sum(-1).mean(-1).sum()
    (grad,) = torch.autograd.grad(loss, W)
    expected = problem.retract(W.detach() - lr * problem.project(W.detach(), grad))
    torch.testing.assert_close(one["W"], expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected, W0.float(), atol=1e-3)  # the step moved
    (many,) = run_methods([make_job("momentum", 0.01)], W0, problem, steps=200, batch=B,
                          seed=seed, method_seed=0, quiet=True)  # fmt: skip
    torch.testing.assert_close(many["W"].norm(dim=-1), torch.ones(4, 4), rtol=0, atol=1e-6)
    torch.testing.assert_close(many["loss"], problem.objective(many["W"].double()))
    assert torch.equal(many["success"], many["loss"] < problem.success)


def test_matrix_sensing_trains_and_its_hooks_read_the_problem():
    """A vector-parameter problem (x (n,)) at δ = 0.7, where √δ·e₂ rotated is a strict
    spurious minimum with f = 1 − δ²: SGD ends at the global minimum or there; every
    built-in method's hooks run on it (PGD's held-out loss, restart's fresh start); results
    are its objective at its weights; the same call gives the same results (seeded)."""
    problem = get_problem("matrix-sensing")(delta=0.7, n=3, seed=1)
    W0 = problem.init(range(8))
    jobs = [make_job(name, 0.1) for name in ("sgd", "qmse", "pgd", "restart")]
    kw = {"steps": 400, "batch": 8, "seed": 1, "method_seed": 2, "quiet": True}
    first = run_methods(jobs, W0, problem, **kw)
    again = run_methods(jobs, W0, problem, **kw)
    for a, b in zip(first, again):
        assert a["W"].shape == (8, 3)
        for key in ("W", "loss", "success", "first_success", "diverged"):
            assert torch.equal(a[key], b[key])
        done = ~a["diverged"]
        torch.testing.assert_close(a["loss"][done], problem.objective(a["W"].double())[done])
    sgd = first[0]
    assert sgd["success"].any() and not sgd["success"].all()  # one start stuck at f = 1 − δ²
    assert ((sgd["loss"] < problem.success) | ((sgd["loss"] - 0.51).abs() < 0.02)).all()


def test_a_hooks_held_out_loss_is_the_population_loss_within_monte_carlo_error():
    problem = get_problem("teacher-student")(3, 4, outputs=2, seed=1)
    W = problem.init(range(5)).float()
    run = ProblemRun(10, 4, problem, torch.zeros(5, dtype=torch.bool))
    held = run.held_out_loss(W, torch.Generator().manual_seed(0))
    exact = problem.objective(W.double())
    g = torch.Generator().manual_seed(1)  # the spread of one sample's ½‖r‖², per start
    x, y = problem.sample(5, 4096, g)
    r2 = 0.5 * ((problem.predict(W, x) - y) ** 2).sum(-1).double()  # (5, 4096)
    se = r2.std(1) / 4096**0.5
    assert ((held - exact).abs() < 5 * se).all()
    fresh = run.fresh_weights(3, torch.Generator().manual_seed(2))
    assert fresh.shape == (3, 4, 3) and fresh.dtype == torch.float32


def test_qmse_noise_with_vector_outputs_averages_to_the_expected_loss():
    """C = 3: QMSE's v is uniform on the unit sphere of R³ (one per sample), so over many
    samples the engine's QMSE gradient approaches the gradient of its expectation
    ¼‖r‖⁴ + ‖r‖²/(2C) (expected-qmse), within a few Monte Carlo standard errors; a v that
    were a sign (C = 1's) or of another norm would miss it."""
    problem = get_problem("teacher-student")(3, outputs=3, seed=1)
    W = problem.init([4]).float()
    x, y = problem.sample(1, 20000, torch.Generator().manual_seed(0))
    exact = problem_gradient(make_job("expected-qmse", 0.1), W, x, y, problem, None)
    draws = torch.stack([
        problem_gradient(make_job("qmse", 0.1), W, x[:, i::10], y[:, i::10], problem,
                         torch.Generator().manual_seed(i))
        for i in range(10)
    ])  # fmt: skip
    mean, se = draws.mean(0), draws.std(0) / 10**0.5
    assert ((mean - exact).abs() < 4 * se + 1e-3 * exact.abs().max()).all()
    assert (se < 0.2 * exact.abs().max()).all()  # the check has power
