"""qmse.escape.matrix_sensing: Zhang et al.'s rank-1 sensing instances against closed forms
and autograd, their RIP constants against closed forms, the certification of the published
spurious point (a degenerate saddle) and of the family's strict minima and saddles, and SGD's
failures: none below δ = 1/2, some on the published instance, all on the invariant line."""

import dataclasses
import math

import pytest
import torch

from qmse.errors import UserError
from qmse.escape.matrix_sensing import (
    DESCENT_LR,
    SUCCESS,
    curve_polynomial,
    hessian,
    isometry_bounds,
    make_instance,
    matrix_sensing_problem,
    objective,
    quartic_descent,
    rip_constant,
    sgd,
    sgd_failure_rate,
    sgd_starts,
    sym_basis,
)
from qmse.escape.population import descend
from qmse.escape.problems import certify, distinct, get_problem, gradient

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def operator(A: torch.Tensor) -> torch.Tensor:
    """𝓗 = Σᵢ Aᵢ ⊗ Aᵢ in the orthonormal basis of Sym(n): (d, d)."""
    coords = torch.einsum("mij,kij->mk", A, sym_basis(A.shape[-1]))
    return coords.T @ coords


def random_symmetric(count: int, n: int, seed: int) -> torch.Tensor:
    X = torch.randn(count, n, n, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return X + X.transpose(1, 2)


def test_the_published_instance_in_closed_form():
    inst = make_instance()
    torch.testing.assert_close(inst.A, inst.A.transpose(1, 2))
    assert inst.z.tolist() == [1.0, 0.0] and inst.spurious.tolist() == [0.0, math.sqrt(0.5)]
    M = random_symmetric(20, 2, 0)
    a, b, c = M[:, 0, 0], M[:, 1, 1], M[:, 0, 1]
    measured = torch.einsum("mij,sij->sm", inst.A, M).pow(2).sum(-1)
    torch.testing.assert_close(measured, a**2 + b**2 + a * b + 3 * c**2)
    X = torch.randn(20, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    x1, x2 = X[:, 0] ** 2, X[:, 1] ** 2
    expected = (x1 - 1) ** 2 + x2**2 + (x1 - 1) * x2 + 3 * x1 * x2
    torch.testing.assert_close(objective(inst, X), expected)


def test_the_family_in_closed_form_in_its_rotated_frame():
    delta = 0.7
    inst = make_instance(delta, n=4, seed=3, m=13)
    assert inst.A.shape == (13, 4, 4)
    Q = torch.stack([inst.z, inst.spurious / math.sqrt(delta)], 1)  # (4, 2): the block's frame
    N = random_symmetric(10, 2, 2)
    M = Q @ N @ Q.T
    a, b, c = N[:, 0, 0], N[:, 1, 1], N[:, 0, 1]
    measured = torch.einsum("mij,sij->sm", inst.A, M).pow(2).sum(-1)
    torch.testing.assert_close(measured, a**2 + b**2 + 2 * delta * a * b + 2 * (1 + delta) * c**2)
    eig = torch.linalg.eigvalsh(operator(inst.A))
    assert eig[0].item() == pytest.approx(1 - delta) and eig[-1].item() == pytest.approx(1 + delta)
    assert objective(inst, torch.zeros(1, 4))[0].item() == pytest.approx(1.0)
    assert objective(inst, inst.z[None])[0].item() == pytest.approx(0.0, abs=1e-24)


def test_gradient_steps_and_hessian_against_autograd():
    inst = make_instance(0.6, n=4, seed=2, m=12)
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    W = X.clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(inst, W).sum(), W)
    step = sgd(inst, X, steps=1, lr=0.01, batch=None, generator=torch.Generator())
    torch.testing.assert_close(step, X - 0.01 * grad)
    for x in X[:2]:
        reference = torch.func.hessian(lambda v: objective(inst, v[None])[0])(x)
        torch.testing.assert_close(hessian(inst, x), reference)


def test_the_stochastic_gradient_is_unbiased():
    inst = make_instance(0.6, n=3, seed=1)
    x = torch.tensor([0.3, -0.7, 0.5], dtype=DT)
    W = x.clone().requires_grad_()
    (full,) = torch.autograd.grad(objective(inst, W[None]).sum(), W)
    copies = 20_000
    after = sgd(inst, x.expand(copies, 3), 1, 1.0, 2, torch.Generator().manual_seed(5))
    G = x - after  # (copies, 3): one stochastic gradient each
    se = G.std(0) / math.sqrt(copies)
    assert ((G.mean(0) - full).abs() < 5 * se).all(), (G.mean(0), full, se)


def test_the_problem_samples_predicts_and_counts_each_sign_once():
    problem = get_problem("matrix-sensing")(delta=0.6, n=3, seed=4)
    inst = make_instance(0.6, n=3, seed=4)
    assert get_problem("matrix-sensing") is matrix_sensing_problem
    assert (problem.shape, problem.outputs, problem.success) == ((3,), 1, SUCCESS)
    assert problem.instance == {"delta": 0.6, "n": 3, "seed": 4, "m": 6, "init_scale": 1.0}
    W = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    every = inst.A.expand(2, -1, -1, -1)  # each start sees every measurement once
    residual = problem.predict(W, every) - inst.b[None, :, None]
    torch.testing.assert_close(residual.pow(2).sum((1, 2)), problem.objective(W))
    x, y = problem.sample(2, 5, torch.Generator().manual_seed(1))
    assert x.shape == (2, 5, 3, 3) and y.shape == (2, 5, 1)
    torch.testing.assert_close(problem.predict(inst.z.expand(2, 3), x), y)  # z fits exactly
    torch.testing.assert_close(problem.init([7, 8])[0], problem.init([7])[0])
    assert gradient(problem, inst.z[None]).abs().max() < 1e-12
    points = torch.stack([inst.spurious, -inst.spurious, inst.z, -inst.z, inst.z + 1e-3])
    assert distinct(problem, points) == [0, 2, 4]


def test_the_rip_constant_of_the_published_instance_is_one_half():
    A = make_instance().A
    low, high = isometry_bounds(A)
    assert (low, high) == (pytest.approx(0.5, abs=1e-9), pytest.approx(1.5, abs=1e-9))
    torch.testing.assert_close(  # n = 2: every symmetric matrix has rank ≤ 2
        torch.linalg.eigvalsh(operator(A)), torch.tensor([0.5, 1.5, 1.5], dtype=DT)
    )
    assert rip_constant(A) == pytest.approx(0.5, abs=1e-9)


def test_the_rip_constant_is_over_rank_two_not_the_full_space():
    """‖𝒜(M)‖² = ‖M‖² + c·tr(M)²: over rank ≤ 2, tr(M)² ≤ 2‖M‖², so the quotients span
    [1, 1 + 2c] and δ = c/(1 + c); over all of Sym(4), [1, 1 + 4c]."""
    c = 0.5
    A = torch.cat([sym_basis(4), math.sqrt(c) * torch.eye(4, dtype=DT)[None]])
    eig = torch.linalg.eigvalsh(operator(A))
    assert (eig[-1] - eig[0]) / (eig[-1] + eig[0]) == pytest.approx(0.5)  # the full space
    assert rip_constant(A, restarts=8) == pytest.approx(c / (1 + c), abs=1e-9)
    assert rip_constant(make_instance(0.3, n=3, seed=2).A, restarts=8) == pytest.approx(
        0.3, abs=1e-9
    )


def test_the_published_spurious_point_is_a_degenerate_saddle():
    inst = make_instance()
    problem = matrix_sensing_problem()
    x = inst.spurious
    (cert,) = certify(problem, x[None])
    assert cert["kind"] == "degenerate" and cert["objective"] == pytest.approx(0.75)
    torch.testing.assert_close(hessian(inst, x), torch.diag(torch.tensor([0.0, 4.0], dtype=DT)))
    e1, e2 = torch.eye(2, dtype=DT)
    line = curve_polynomial(inst, x, e1)
    parabola = curve_polynomial(inst, x, e1, -math.sqrt(2) * e2)
    torch.testing.assert_close(line, torch.tensor([0.75, 0, 0, 0, 1, 0, 0, 0, 0], dtype=DT))
    torch.testing.assert_close(parabola, torch.tensor([0.75, 0, 0, 0, -3, 0, 0, 0, 4], dtype=DT))
    coefficient, v = quartic_descent(inst, x, e1)
    assert coefficient == pytest.approx(-3.0)
    torch.testing.assert_close(v, -math.sqrt(2) * e2)
    t = torch.tensor([0.05, 0.1, 0.3, 0.8], dtype=DT)[:, None]
    on_parabola = objective(inst, x + t * e1 - math.sqrt(2) * t**2 * e2)
    torch.testing.assert_close(on_parabola, 0.75 - 3 * t[:, 0] ** 4 + 4 * t[:, 0] ** 8)
    assert (on_parabola < 0.75).all()  # so not a local minimum
    torch.testing.assert_close(objective(inst, x + t * e1), 0.75 + t[:, 0] ** 4)
    with pytest.raises(UserError, match="critical point"):
        quartic_descent(inst, x + 0.1 * e1, e1)


@pytest.mark.parametrize(
    ("delta", "n", "seed", "kind"),
    [(0.6, 2, None, "strict minimum"), (0.7, 4, 5, "strict minimum"), (0.4, 3, 0, "saddle")],
)
def test_the_family_spurious_point_is_strict_above_one_half(delta, n, seed, kind):
    """Hessian eigenvalues 4(1 + δ)(2δ − 1) along z, 8δ along x*, the rest in
    [4δ(1 − δ), 4δ(1 + δ)]; f(x*) = 1 − δ²."""
    inst = make_instance(delta, n=n, seed=seed)
    x = inst.spurious
    (cert,) = certify(matrix_sensing_problem(delta, n, seed), x[None])
    assert cert["kind"] == kind and cert["objective"] == pytest.approx(1 - delta**2)
    eig = torch.linalg.eigvalsh(hessian(inst, x))
    along_z, along_x = 4 * (1 + delta) * (2 * delta - 1), 8 * delta
    closest = [(eig - value).abs().min().item() for value in (along_z, along_x)]
    assert max(closest) < 1e-9
    rest = eig[(eig - along_z).abs().argsort()[1:]]
    rest = rest[(rest - along_x).abs().argsort()[1:]]
    assert ((rest > 4 * delta * (1 - delta) - 1e-9) & (rest < 4 * delta * (1 + delta) + 1e-9)).all()
    if kind == "strict minimum":  # brute force: every nearby point is higher
        U = torch.randn(500, n, generator=torch.Generator().manual_seed(0), dtype=DT)
        nearby = x + 1e-3 * U / U.norm(dim=1, keepdim=True)
        assert (objective(inst, nearby) > 1 - delta**2).all()


@pytest.mark.parametrize(("delta", "n", "seed"), [(0.4, 3, 0), (0.45, 2, 1), (0.45, 2, None)])
def test_below_one_half_gradient_descent_recovers_z_from_every_start(delta, n, seed):
    inst = make_instance(delta, n=n, seed=seed)
    assert sgd_failure_rate(inst, 2000, 2000, 0.02, None, seed=0) == (0, 2000)


def test_descent_diverges_from_large_starts_at_safran_and_shamirs_step_not_at_its_own():
    """The negative control's gd-population: 0.1 diverges from some N(0, I) starts at n = 4
    (the curvature grows with ‖x‖²); the problem's declared step recovers z from all 300,
    and a diverged start leaves the descent loop at once instead of running to the cap."""
    problem = matrix_sensing_problem(0.45, n=4, seed=1)
    assert problem.descent_lr == DESCENT_LR < 0.1
    assert matrix_sensing_problem(0.45, n=4, seed=1, init_scale=2.0).descent_lr == DESCENT_LR / 4
    W0 = problem.init(range(300))
    calls = 0

    def counted(W):
        nonlocal calls
        calls += 1
        return problem.objective(W)

    fast = dataclasses.replace(problem, objective=counted)
    at_01 = descend(fast, W0, lr=0.1, max_steps=100_000, quiet=True)
    diverged = ~torch.isfinite(at_01["loss"])
    assert diverged.sum() > 0 and (at_01["steps"][diverged] == 100_000).all()
    assert calls < 5_000  # the diverged starts left: 100,000 steps would be 10⁵ calls
    own = descend(problem, W0, lr=problem.descent_lr, max_steps=100_000, quiet=True)
    assert (own["loss"] < SUCCESS).all()


def test_sgd_on_the_published_instance_is_deterministic_and_fails_on_the_line():
    """The eigenbasis measurements keep the line x ⊥ z invariant under SGD too, and one
    measurement per step shrinks ⟨x, z⟩ there geometrically: the failed starts sit on the line
    at f ≥ 3/4 (f = 1 − x₂² + x₂⁴ on it). The mixed realisation of the same operator pushes off
    it and every start recovers z."""
    inst = make_instance()
    short = sgd_failure_rate(inst, 200, 500, 0.01, 1, seed=3)
    assert short == sgd_failure_rate(inst, 200, 500, 0.01, 1, seed=3)
    X, g = sgd_starts(inst, 200, seed=3)
    assert short == ((~(objective(inst, sgd(inst, X, 500, 0.01, 1, g)) < SUCCESS)).sum(), 200)
    X, g = sgd_starts(inst, 1000, seed=3)
    X = sgd(inst, X, 10_000, 0.01, 1, g)
    f = objective(inst, X)
    stuck = ~(f < SUCCESS)
    failures = stuck.sum().item()
    assert 0.03 < failures / 1000 < 0.15
    off = (X[stuck] @ inst.z).abs()
    assert (off < 1e-2).all() and (f[stuck] > 0.75 - 1e-6).all()
    assert (off < 1e-6).sum() > failures / 2
    mixed = make_instance(seed=0)
    assert sgd_failure_rate(mixed, 1000, 10_000, 0.01, 1, seed=3) == (0, 1000)


def test_bad_arguments_say_what_to_fix():
    with pytest.raises(UserError, match="delta"):
        make_instance(1.0)
    with pytest.raises(UserError, match="n must"):
        make_instance(0.5, n=1)
    with pytest.raises(UserError, match="needs a seed"):
        make_instance(0.5, n=2, m=5)
    with pytest.raises(UserError, match="at least"):
        make_instance(0.5, n=3, seed=0, m=4)
    with pytest.raises(UserError, match="batch"):
        sgd_failure_rate(make_instance(), 10, 10, 0.01, 0, seed=0)
