"""qmse.escape.burer_monteiro: O'Carroll, Srinivas & Vijayaraghavan's instance (checked
against the numbers of their repository, vaidehi8913/burer-monteiro), its optimum (a zero
duality gap), the objective's Riemannian gradient and Hessian (against autograd and finite
differences on the manifold), the certification of the spurious point (its spectrum in closed
form, the zero eigenvalues split into symmetry and a manifold of minima), the stochastic
version (Monte Carlo), and the rerun of their perturbation experiment (within standard
errors of their raw outcomes)."""

import math

import pytest
import torch

from qmse.errors import UserError
from qmse.escape.burer_monteiro import (
    PUBLISHED,
    RAW_STUCK,
    TRIALS,
    burer_monteiro,
    classify,
    cost_matrix,
    fd_hess_vec,
    hess_vec,
    objective,
    optimum,
    perturb,
    perturbation_experiment,
    project,
    retract,
    riemannian_gd,
    riemannian_grad,
    spurious_point,
    trust_regions,
)
from qmse.escape.problems import certify, distinct, get_problem, gradient, tangent_hessian

DT = torch.float64


def random_points(p: int, S: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return retract(torch.randn(S, 2 * p, p, generator=g, dtype=DT))


def tangent(W: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return project(W, torch.randn(W.shape, generator=g, dtype=DT))


def test_the_instance_is_theirs():
    # experiment.m at p = 2: Mbad = 1 on the diagonal, -1/(p - 1.5) = -2 off it;
    # A = [Mbad, Mbad; Mbad, Mbad]; Yaxial = [eye(p); -eye(p)].
    M = [[1.0, -2.0], [-2.0, 1.0]]
    expected = torch.tensor([r + r for r in M] * 2, dtype=DT)
    torch.testing.assert_close(cost_matrix(2), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        spurious_point(2), torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=DT)
    )
    assert cost_matrix(25)[0, 1].item() == pytest.approx(-1 / 23.5, abs=1e-16)
    assert objective(cost_matrix(25), spurious_point(25)[None]).item() == 0.0
    with pytest.raises(UserError, match="p >= 2"):
        cost_matrix(1)


@pytest.mark.parametrize("p", [2, 25, 100])
def test_the_optimum_is_a_primal_dual_pair_and_their_runs_reach_it(p):
    value, Y = optimum(p)
    assert objective(cost_matrix(p), Y[None]).item() == pytest.approx(value, rel=1e-14)
    assert value == pytest.approx(-2 * p / (p - 1.5), rel=1e-14)
    # Their runs that escaped reach it: -8 (outcomes-p2.csv), -2.12765957446808
    # (outcomes-p25.csv, first row), -2.03045685279229 (outcomes-p100.csv, the lowest).
    theirs = {2: -8.0, 25: -2.12765957446808, 100: -2.03045685279229}[p]
    assert value == pytest.approx(theirs, abs=1e-9)
    # No feasible point does better: the dual bound at random points.
    W = random_points(p, 200, seed=p)
    assert (objective(cost_matrix(p), W) >= value - 1e-12).all()


def test_objective_by_its_sum_over_pairs():
    C, W = cost_matrix(3), random_points(3, 2, seed=1)
    brute = [sum(C[i, j] * (w[i] @ w[j]) for i in range(6) for j in range(6)).item() for w in W]
    torch.testing.assert_close(objective(C, W), torch.tensor(brute, dtype=DT))


@pytest.mark.parametrize("p", [2, 3])
def test_riemannian_gradient_against_autograd_and_finite_differences(p):
    C, W = cost_matrix(p), random_points(p, 4, seed=2)
    G = riemannian_grad(C, W)
    torch.testing.assert_close(gradient(burer_monteiro(p), W), G)  # autograd, projected
    torch.testing.assert_close((G * W).sum(-1), torch.zeros(4, 2 * p, dtype=DT))
    U, h = tangent(W, seed=3), 1e-6
    fd = (objective(C, retract(W + h * U)) - objective(C, retract(W - h * U))) / (2 * h)
    torch.testing.assert_close(fd, (G * U).sum((-2, -1)), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("p", [2, 3])
def test_riemannian_hessian_against_autograd_and_finite_differences(p):
    """The row normalisation is a second-order retraction, so the Hessian of f∘R_W at 0 on
    the tangent space is the Riemannian Hessian, at any point (not only critical ones)."""
    problem, C = burer_monteiro(p), cost_matrix(p)
    for w in random_points(p, 3, seed=4):
        H = tangent_hessian(problem, w)  # from problem.hessian, in a tangent basis
        pullback = torch.func.hessian(lambda v, w=w: objective(C, retract(w + v)[None])[0])
        Hp = pullback(torch.zeros_like(w)).reshape(w.numel(), w.numel())
        P = w.numel()
        basis = project(w.expand(P, *w.shape), torch.eye(P, dtype=DT).view(P, *w.shape))
        U, S, _ = torch.linalg.svd(basis.reshape(P, P).T)
        B = U[:, S > 1e-9]  # the same orthonormal tangent basis tangent_hessian uses
        torch.testing.assert_close(H, B.T @ Hp @ B)
        u = tangent(w[None], seed=5)
        h = 1e-4
        f = lambda t, w=w, u=u: objective(C, retract(w + t * u))  # noqa: E731
        fd = (f(h) - 2 * f(0.0) + f(-h)) / h**2
        exact = (u * hess_vec(C, w[None], u)).sum()
        torch.testing.assert_close(fd[0], exact, rtol=1e-5, atol=1e-6)
        # Manopt's finite-difference Hessian (their optimiser's) is O(2⁻¹⁴)-close.
        Hu = hess_vec(C, w[None], u)
        torch.testing.assert_close(fd_hess_vec(C, w[None], u), Hu, rtol=0, atol=1e-3)
        torch.testing.assert_close(fd_hess_vec(C, w[None], 0 * u), 0 * u)


def test_retraction_keeps_rows_unit_norm_and_projection_is_onto_the_tangent_space():
    W = random_points(3, 5, seed=6)
    V = torch.randn(W.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    R = retract(W + 3 * V)
    torch.testing.assert_close(R.norm(dim=-1), torch.ones(5, 6, dtype=DT))
    T = project(W, V)
    torch.testing.assert_close(project(W, T), T)  # idempotent
    torch.testing.assert_close((T * W).sum(-1), torch.zeros(5, 6, dtype=DT))


@pytest.mark.parametrize("p", [2, 10])
def test_the_spurious_point_is_a_degenerate_minimum_with_the_closed_form_spectrum(p):
    problem = burer_monteiro(p)
    Y0 = spurious_point(p)
    (c,) = certify(problem, Y0[None])
    assert (c["kind"], c["objective"], c["grad_norm"]) == ("degenerate", 0.0, 0.0)
    eig = torch.linalg.eigvalsh(tangent_hessian(problem, Y0))
    assert len(eig) == 2 * p * (p - 1)
    zero, small, large = 0.0, 2 / (p - 1.5), 4 * (p - 0.5) / (p - 1.5)
    counts = [int((eig - v).abs().lt(1e-9).sum()) for v in (zero, small, large)]
    assert counts == [p * (p - 1), p, p * (p - 2)]


def test_the_spurious_point_of_the_larger_size_is_certified_degenerate():
    p, n = 25, 50
    problem = burer_monteiro(p)
    (c,) = certify(problem, spurious_point(p)[None])
    assert (c["kind"], c["objective"], c["grad_norm"]) == ("degenerate", 0.0, 0.0)
    # The ambient Hessian adds a zero per row (its normal direction) to the tangent spectrum.
    eig = torch.linalg.eigvalsh(problem.hessian(spurious_point(p)))
    counts = [int((eig - v).abs().lt(1e-9).sum()) for v in (0.0, 2 / 23.5, 4 * 24.5 / 23.5)]
    assert counts == [600 + n, 25, 575]


def test_the_zero_eigenvalues_are_the_rotations_and_a_manifold_of_minima():
    """At p = 3: the Hessian's kernel is {(D, −D): D with zero diagonal}, 6-dimensional;
    the skew D (3) are the rotations Y₀Ω; along a symmetric D the cost stays 0 while the Gram
    matrix moves, so those points are other minima, not images of Y₀."""
    p = 3
    problem, C, Y0 = burer_monteiro(p), cost_matrix(p), spurious_point(p)
    H = problem.hessian(Y0)  # (np, np) ambient
    Dsym = torch.tensor([[0, 1, 2], [1, 0, -1], [2, -1, 0]], dtype=DT)
    Dskew = torch.tensor([[0, 1, 2], [-1, 0, -1], [-2, 1, 0]], dtype=DT)
    for D in (Dsym, Dskew):
        v = torch.cat([D, -D]).reshape(-1)
        torch.testing.assert_close(H @ v, torch.zeros_like(v))
    kernel = torch.linalg.eigvalsh(tangent_hessian(problem, Y0)).abs().lt(1e-9).sum()
    assert kernel == p * (p - 1)
    for t in (1e-3, 0.1, 0.3):
        Y1 = retract((torch.eye(p, dtype=DT) + t * Dsym)[None])[0]
        Yt = torch.cat([Y1, -Y1])
        assert abs(objective(C, Yt[None]).item()) < 1e-14
        assert riemannian_grad(C, Yt[None]).abs().max() < 1e-14
        gap = (problem.canonical(Yt[None]) - problem.canonical(Y0[None])).abs().max()
        assert gap > t / 2  # the Gram matrix, a complete invariant of Y ↦ YQ, moved
    # Far from Y₀ the same manifold holds saddles: every row of Y₁ equal.
    Y1 = torch.zeros(p, p, dtype=DT)
    Y1[:, 0] = 1
    assert certify(problem, torch.cat([Y1, -Y1])[None])[0]["kind"] == "saddle"


@pytest.mark.parametrize("p", [2, 25])
def test_near_the_spurious_point_the_cost_grows_with_the_distance_to_the_manifold(p):
    """f(Y) ≥ c‖Y₁ + Y₂‖² near Y₀ with c → 0.5/(p − 1.5): a local minimum, not only
    second-order critical; the cost is 0 exactly on Y₂ = −Y₁."""
    C, Y0 = cost_matrix(p), spurious_point(p)
    G = torch.randn(2000, 2 * p, p, generator=torch.Generator().manual_seed(8), dtype=DT)
    Y = retract(Y0 + 1e-3 * G / G.flatten(1).norm(dim=1)[:, None, None])
    Z2 = (Y[:, :p] + Y[:, p:]).pow(2).sum((-2, -1))
    ratio = objective(C, Y) / Z2
    assert ratio.min() > 0.95 * 0.5 / (p - 1.5)


def test_canonical_form_identifies_rotations_and_only_them():
    problem = burer_monteiro(3)
    W = random_points(3, 4, seed=9)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(10)))
    Q = Q.double()
    Q[:, 0] *= -1  # a reflection too
    WQ = W @ Q
    torch.testing.assert_close(problem.canonical(WQ), problem.canonical(W))
    assert distinct(problem, torch.cat([W, WQ])) == [0, 1, 2, 3]


def test_stochastic_version_is_unbiased_for_half_the_optimality_gap():
    """E ½‖0 − xᵀY‖² = ½(f(Y) − f*), within 4 standard errors; residuals vanish at the
    optimum."""
    p = 2
    problem = burer_monteiro(p)
    W = torch.cat([spurious_point(p)[None], random_points(p, 2, seed=11)])
    x, y = problem.sample(3, 200_000, torch.Generator().manual_seed(12))
    assert x.shape == (3, 200_000, 4) and y.shape == (3, 200_000, 2)
    per_sample = 0.5 * (y.double() - problem.predict(W, x)).pow(2).sum(-1)  # (3, B)
    mean, se = per_sample.mean(1), per_sample.std(1) / math.sqrt(per_sample.shape[1])
    expected = 0.5 * (problem.objective(W) - optimum(p)[0])
    assert ((mean - expected).abs() < 4 * se).all(), (mean, expected, se)
    at_optimum = problem.predict(optimum(p)[1][None], x[:1])
    assert at_optimum.abs().max() < 1e-5


def test_problem_is_registered_with_their_start_distribution_and_deterministic():
    assert get_problem("burer-monteiro") is burer_monteiro
    problem = burer_monteiro(2, perturbation=0.3)
    assert problem.shape == (4, 2) and problem.outputs == 2 and problem.size == 8
    assert problem.success == pytest.approx(-8 + 8e-3)
    W = problem.init([3, 4, 5])
    torch.testing.assert_close(W, problem.init([3, 4, 5]), rtol=0, atol=0)
    torch.testing.assert_close(W[1:2], problem.init([4]), rtol=0, atol=0)
    torch.testing.assert_close(W, perturb(2, 0.3, [3, 4, 5]), rtol=0, atol=0)
    # rows normalised of Y₀ + 0.3·G/√p, G standard Gaussian
    G = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(W[0], retract(spurious_point(2) + 0.3 * G / math.sqrt(2)))
    with pytest.raises(UserError, match="perturbation"):
        burer_monteiro(2, perturbation=-1.0)


def test_their_summary_undercounts_the_stuck_runs_only_at_p2():
    for p, counts in PUBLISHED.items():
        assert len(counts) == len(RAW_STUCK[p]) == 6
        assert all(c <= TRIALS[p] for c in RAW_STUCK[p])
        if p != 2:
            assert counts == RAW_STUCK[p]
    assert sum(RAW_STUCK[2]) - sum(PUBLISHED[2]) == 594  # runs ending at cost -1e-16
    # The verdicts on values like theirs: -1.1e-16 is stuck, -7.99999999999997 optimal.
    assert classify(2, torch.tensor([-1.1e-16, 8.3e-12, -7.99999999999997, -4.0])) == [
        "spurious",
        "spurious",
        "optimal",
        "other",
    ]


def test_trust_regions_and_gd_converge_to_one_of_the_two_values():
    C = cost_matrix(2)
    W = perturb(2, 0.25, range(200))
    for result in (trust_regions(C, W), riemannian_gd(C, W, lr=0.05)):
        assert (result["grad_norm"] < 3e-6).all()
        assert (result["W"].norm(dim=-1) - 1).abs().max() < 1e-12
        assert set(classify(2, result["cost"])) <= {"spurious", "optimal"}
    again = trust_regions(C, W)
    torch.testing.assert_close(again["W"], trust_regions(C, W)["W"], rtol=0, atol=0)


def test_the_rerun_agrees_with_their_raw_outcomes_within_standard_errors():
    """Their p = 2 runs at perturbation 0.25: 703 of 1,000 end at the spurious set (their raw
    outcomes recounted). 2,000 reruns of their method must agree within 4 standard errors of
    the difference; gradient descent returns far more often."""
    n = 2000
    ours = perturbation_experiment(2, trials=n, scales=(0.25,))[0.25]
    theirs = RAW_STUCK[2][-1] / TRIALS[2]
    share = ours["spurious"] / n
    se = math.sqrt(theirs * (1 - theirs) / TRIALS[2] + share * (1 - share) / n)
    assert abs(share - theirs) < 4 * se, (share, theirs, se)
    assert ours["other"] == 0
    gd = perturbation_experiment(2, trials=500, scales=(0.25,), method="gd", lr=0.05)[0.25]
    assert gd["spurious"] / 500 > theirs + 0.1
    with pytest.raises(UserError, match="method"):
        perturbation_experiment(2, trials=1, method="newton")
