"""qmse.escape: the methods against plain reference loops and known minima, the benchmark's
bookkeeping (rows, intervals, resume) on tiny problems."""

import json
import math

import pytest
import torch

from qmse.cli import main
from qmse.escape import (
    STUCK_LOSS,
    _uniform_ball,
    certify_minima,
    gd_population,
    run_sample_method,
)
from qmse.stats import wilson_interval
from qmse.teacher_student import (
    init_weights,
    make_problem,
    population_grad,
    population_loss,
)


def test_gd_population_is_plain_gradient_descent():
    """With an unreachable tolerance it is exactly W ← W − 0.1 ∇L, whatever the batching."""
    problem = make_problem(4, 5)
    W0 = init_weights(range(3), 5, 4)
    out = gd_population(W0, problem, tol=1e-300, max_steps=120, check_every=50, quiet=True)
    W = W0.clone()
    for _ in range(120):
        W = W - 0.1 * population_grad(W, problem)
    torch.testing.assert_close(out["W"], W, rtol=0, atol=1e-14)
    assert not out["converged"].any() and (out["steps"] == 120).all()


def test_gd_population_converges_to_tolerance_on_small_k():
    """k = 3 has no spurious minima from Xavier starts: every seed reaches ‖∇‖ ≤ 1e-9."""
    problem = make_problem(3)
    out = gd_population(init_weights(range(3), 3, 3), problem, max_steps=20_000, quiet=True)
    assert out["converged"].all()
    assert (out["grad_norm"] <= 1e-9).all() and (out["loss"] < 1e-12).all()
    assert (population_grad(out["W"], problem).norm(dim=-1).amax(-1) <= 1e-9).all()


def test_uniform_ball_radius_and_volume():
    r = torch.tensor([0.5, 2.0]).repeat_interleave(2000)
    z = _uniform_ball((4000, 3, 2), r, torch.Generator().manual_seed(0))
    norms = z.flatten(1).norm(dim=1)
    assert (norms <= r + 1e-6).all()
    # uniform in a 6-ball: (‖z‖/r)^6 is uniform on [0, 1]
    u = (norms / r) ** 6
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01


def test_sgd_learns_small_teacher_and_is_seeded():
    problem = make_problem(3)
    W0 = init_weights(range(6), 3, 3)
    a = run_sample_method("sgd", W0, problem, steps=800, lr=0.3, batch=32, seed=1, quiet=True)
    b = run_sample_method("sgd", W0, problem, steps=800, lr=0.3, batch=32, seed=1, quiet=True)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    assert (a["loss"] < STUCK_LOSS).all()
    assert ((a["first_success"] > 0) & (a["first_success"] <= 800)).all()
    torch.testing.assert_close(a["loss"], population_loss(a["W"].double(), problem))


def test_divergence_is_recorded_as_failure():
    problem = make_problem(3)
    W0 = init_weights(range(4), 3, 3) * 3
    out = run_sample_method("qmse", W0, problem, steps=50, lr=50.0, batch=16, quiet=True)
    assert out["diverged"].all() and torch.isinf(out["loss"]).all()
    assert (out["first_success"] == -1).all()


@pytest.mark.parametrize("method", ["pgd", "restart"])
def test_perturbing_methods_keep_a_global_minimum(method):
    """From the global minimum PGD's kick (radius = ‖W‖) is undone unless descent recovers,
    and restart keeps the better of its two segments: both end at loss < 1e-3."""
    problem = make_problem(3)
    W0 = problem.V[[1, 2, 0]].unsqueeze(0).repeat(4, 1, 1)  # (4, 3, 3)
    out = run_sample_method(
        method, W0, problem, steps=1000, lr=0.1, radius=1.0, batch=32, seed=2, quiet=True
    )
    assert (out["loss"] < STUCK_LOSS).all()
    if method == "pgd":
        assert (out["perturbations"] == 1).all()  # one kick at 500, none in the last window


def test_bad_method_and_arguments_raise():
    problem = make_problem(3)
    W0 = init_weights(range(2), 3, 3)
    with pytest.raises(ValueError, match="not sample-based"):
        run_sample_method("gd-population", W0, problem, steps=10, lr=0.1)
    with pytest.raises(ValueError, match="lr > 0"):
        run_sample_method("sgd", W0, problem, steps=10, lr=-0.1)


def test_cli_writes_rows_table_figure_and_resumes(tmp_path):
    out = tmp_path / "esc"
    argv = [
        "escape", "--k", "3,4", "--seeds", "6", "--sample-seeds", "4", "--steps", "60",
        "--methods", "gd-population,sgd,qmse", "--protocols", "random-init",
        "--tune-k", "3", "--tune-seeds", "2", "--max-gd-steps", "3000", "--batch", "16",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {(r["k"], r["method"]) for r in rows} == {
        (k, m) for k in (3, 4) for m in ("gd-population", "sgd", "qmse")
    }
    for r in rows:
        assert {"k", "n", "method", "protocol", "seeds", "failures", "failure_rate"} <= set(r)
        assert (r["ci95_low"], r["ci95_high"]) == pytest.approx(
            wilson_interval(r["failures"], r["seeds"])
        )
        assert math.isclose(r["failure_rate"], r["failures"] / r["seeds"])
    assert next(r for r in rows if r["method"] == "gd-population")["seeds"] == 6
    tuned = json.loads((out / "tuning" / "random-init_qmse_k3.json").read_text())
    assert tuned["lr"] in [g["lr"] for g in tuned["grid"]]
    assert (out / "table.md").read_text().count("| qmse |") == 1
    assert (out / "figure.png").stat().st_size > 0
    assert {"git_commit", "torch", "device"} <= set(
        json.loads((out / "provenance.json").read_text())
    )
    stamp = (out / "rows" / "random-init_sgd_k4_n4_C1.json").stat().st_mtime_ns
    assert main(argv) == 0  # every cell cached: nothing recomputed
    assert (out / "rows" / "random-init_sgd_k4_n4_C1.json").stat().st_mtime_ns == stamp
    assert main([*argv, "--batch", "8"]) == 2  # a different configuration is refused


@pytest.mark.slow
def test_stuck_seed_is_a_certified_minimum_that_sgd_does_not_leave():
    """Seed 0 at k = n = 8 ends in a spurious minimum (loss ≈ 0.0215): gradient ≤ 1e-9,
    smallest Hessian eigenvalue > 0; SGD started there stays."""
    problem = make_problem(8)
    out = gd_population(init_weights([0], 8, 8), problem, max_steps=30_000, quiet=True)
    assert out["converged"].all() and out["loss"].item() >= STUCK_LOSS
    assert min(certify_minima(out["W"], problem)) > 0
    sgd = run_sample_method("sgd", out["W"], problem, steps=500, lr=0.1, quiet=True)
    assert sgd["loss"].item() >= STUCK_LOSS
