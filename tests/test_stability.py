"""qmse.stability: the linearised SGD / heavy-ball iteration against independent references —
explicit Kronecker operators over every batch, direct simulation of the linear recursion,
the closed-form thresholds 2(1 + β)/λ, the teacher–student closed-form Hessian and the
losses' output curvatures in closed form."""

import itertools

import numpy as np
import pytest
import torch

from qmse import stability as st
from qmse import teacher_student as ts
from qmse.errors import UserError
from qmse.escape import matrix_sensing as ms
from qmse.escape import problems
from qmse.loss import Loss, get_loss


def random_quadratic(P: int, n: int, seed: int = 0, spread: float = 1.0):
    """n symmetric per-sample Hessians around a positive definite mean, and gradients."""
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(P, P))
    mean = Q @ Q.T / P + 0.2 * np.eye(P)
    S = rng.normal(size=(n, P, P))
    S = S + S.transpose(0, 2, 1)
    S -= S.mean(0)
    return mean + spread * S / np.sqrt(P), rng.normal(size=(n, P))


def explicit_second_moment_radius(Hs, lr, beta, batch):
    """ρ of E[A_b ⊗ A_b] over every ordered batch b of `batch` indices (with replacement)."""
    ops = []
    for b in itertools.product(range(len(Hs)), repeat=batch):
        A = st.iteration_matrix(Hs[list(b)].mean(0), lr, beta)
        ops.append(np.kron(A, A))
    return np.abs(np.linalg.eigvals(np.mean(ops, 0))).max()


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_mean_threshold_is_2_over_lambda_times_1_plus_beta(beta):
    Hs, gs = random_quadratic(4, 6, seed=1)
    lin = st.quadratic(Hs, gs)
    lam = np.linalg.eigvalsh(Hs.mean(0))[-1]
    t = st.thresholds(lin, beta, 1)
    assert t.mean == pytest.approx(2 * (1 + beta) / lam, rel=1e-11) and t.mean_se == 0
    assert st.mean_radius(lin.hessian, t.mean * (1 - 1e-6), beta) < 1
    assert st.mean_radius(lin.hessian, t.mean * (1 + 1e-6), beta) > 1
    assert t.second < t.mean and t.second_se == 0  # noise destabilises first


@pytest.mark.parametrize(
    ("P", "n", "beta", "batch"), [(3, 4, 0.0, 1), (3, 4, 0.5, 2), (3, 4, 0.9, 2), (13, 5, 0.5, 1)]
)
def test_second_moment_radius_equals_the_explicit_kronecker_operator(P, n, beta, batch):
    """P = 13 runs the matrix-free ARPACK path, P = 3 the dense one; lr on both sides of the
    second-moment threshold and past the mean one."""
    Hs, gs = random_quadratic(P, n, seed=P)
    lin = st.quadratic(Hs, gs)
    t = st.thresholds(lin, beta, batch)
    for lr in (0.5 * t.second, 0.999 * t.second, 1.001 * t.second, 1.2 * t.mean):
        s = st.analyse(lin, lr, beta, batch)
        reference = explicit_second_moment_radius(Hs, lr, beta, batch)
        assert s.second_radius == pytest.approx(reference, rel=1e-7)
        assert (s.second_radius < 1) == (lr < t.second)


def test_simulated_mean_square_grows_or_decays_at_the_predicted_rate():
    """20,000 runs of the linear recursion δ ← (I − lr·H_b)δ: E‖δ_t‖² over steps 100–200
    decays just below the second-moment threshold and grows just above it, at ρ(T) per step,
    while the mean map contracts in both (ρ(A)² would predict decay)."""
    Hs, _ = random_quadratic(3, 6, spread=0.03 * np.sqrt(3))
    n, P = len(Hs), 3
    lin = st.quadratic(Hs, np.zeros((n, P)))
    t = st.thresholds(lin, 0.0, 1)
    for lr in (t.second - 0.3 * (t.mean - t.second), t.second + 0.5 * (t.mean - t.second)):
        s = st.analyse(lin, lr, 0.0, 1)
        rng = np.random.default_rng(1)
        d = rng.normal(size=(20_000, P))
        norms = []
        for _ in range(200):
            d = d - lr * np.einsum("rpq,rq->rp", Hs[rng.integers(0, n, len(d))], d)
            norms.append((d * d).sum(1).mean())
        rate = (norms[199] / norms[99]) ** (1 / 100)
        assert s.mean_radius**2 < 0.997
        assert (rate < 1) == (s.second_radius < 1)
        assert rate == pytest.approx(s.second_radius, abs=2e-3)
        assert abs(rate - s.mean_radius**2) > 5e-3


def test_stationary_covariance_matches_a_long_simulation():
    """40,000 heavy-ball chains (β = 0.5, B = 2) from the minimum after 300 steps: their
    empirical covariance agrees with the predicted one entrywise within 4 standard errors,
    and differs from the additive-noise Lyapunov solution (the multiplicative noise counts)."""
    Hs, gs = random_quadratic(3, 5)
    lin = st.quadratic(Hs, gs)
    beta, batch = 0.5, 2
    lr = 0.7 * st.thresholds(lin, beta, batch).second
    s = st.analyse(lin, lr, beta, batch)
    rng = np.random.default_rng(2)
    d, b = np.zeros((40_000, 3)), np.zeros((40_000, 3))
    for _ in range(300):
        idx = rng.integers(0, len(Hs), size=(len(d), batch))
        field = np.einsum("rpq,rq->rp", Hs[idx].mean(1), d) + lin.gradients[idx].mean(1)
        b = beta * b + field
        d = d - lr * b
    products = d[:, :, None] * d[:, None, :]
    se = products.std(0) / np.sqrt(len(d))
    assert np.abs(products.mean(0) - s.covariance).max() < 4 * se.max()
    assert np.abs(s.additive_covariance - s.covariance).max() > 10 * se.max()
    soft = np.linalg.eigh(lin.hessian)[1][:, 0]
    assert s.spread == pytest.approx(np.sqrt(soft @ s.covariance @ soft), rel=1e-9)


def test_without_multiplicative_noise_the_covariance_is_the_lyapunov_solution():
    """Equal per-sample Hessians: 𝒞 = 0, so the second moment fails with the mean and the
    stationary covariance is the discrete Lyapunov solution."""
    Hs, gs = random_quadratic(4, 5, spread=0.0)
    lin = st.quadratic(Hs, gs)
    t = st.thresholds(lin, 0.9, 3)
    assert t.second == t.mean
    s = st.analyse(lin, 0.5 * t.mean, 0.9, 3)
    np.testing.assert_allclose(s.covariance, s.additive_covariance, rtol=1e-9, atol=1e-12)
    assert s.second_radius == pytest.approx(s.mean_radius**2, rel=1e-9)


def test_teacher_student_mean_threshold_and_gauss_newton_at_the_global_minimum():
    """k = 3 at the teacher: the mean-map threshold is 2(1 + β)/λ_max of the closed-form
    Hessian; there the kinks carry no residual, so E[JᵀJ] is that Hessian (Monte Carlo)."""
    problem = problems.teacher_student(3)
    V = ts.make_problem(3).V
    H = problems.hessian(problem, V).numpy()
    lin = st.linearise(problem, V, "mse", samples=4096)
    lam = np.linalg.eigvalsh(H)[-1]
    for beta in (0.0, 0.9):
        t = st.thresholds(lin, beta, 4)
        assert t.mean == pytest.approx(2 * (1 + beta) / lam, rel=1e-11)
        assert 0 < t.second < t.mean and 0 < t.second_se < 0.1 * t.second
    F = lin.factors.reshape(-1, 9)
    gauss_newton = F.T @ F / 4096
    assert np.abs(gauss_newton - H).max() < 0.06 and np.abs(lin.gradients).max() < 1e-5


def test_the_kink_term_restores_the_closed_form_hessian_away_from_a_minimum():
    """A loss that is twice MSE takes the Monte Carlo path (MSE's Hessian plus the
    difference field's Gauss–Newton and kink terms): at a random point, where the kinks carry
    a quarter of the Hessian, it must give twice the closed form."""
    problem = problems.teacher_student(3)
    w = 2 * ts.init_weights([5], 3, 3)[0]
    H = problems.hessian(problem, w).numpy()
    twice = Loss("twice-mse", lambda x, t, _: ((t - x) ** 2).sum(-1))
    lin = st.linearise(problem, w, twice, samples=4096, seed=3)
    F = lin.factors.reshape(-1, 9)
    assert np.abs(H - F.T @ F / 4096).max() > 0.2  # the kink term is not small here
    assert np.linalg.norm(lin.hessian - 2 * H) < 0.04 * np.linalg.norm(2 * H)
    t = st.thresholds(lin, 0.0, 8)
    assert t.mean == pytest.approx(1 / np.linalg.eigvalsh(H)[-1], rel=0.04)
    assert 0 < t.mean_se < 0.02 * t.mean


def test_output_curvatures_are_the_losses_closed_forms():
    """D = ∂q/∂f with C = 2: MSE I; label noise I; expected-QMSE ‖r‖²I + 2rrᵀ + I/C; QMSE
    (‖r‖² + ⟨v, r⟩)I + (r + v)(2r + v)ᵀ (Q recomputed, not held), r = y − f."""
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(50, 2, generator=g)
    y = y.double()
    r, eye = y - f, torch.eye(2, dtype=torch.float64)
    v = get_loss("qmse").draw(50, 2, generator=g, dtype=torch.float64)
    sq = (r * r).sum(-1)[:, None, None]
    expected = {
        "mse": (None, eye.expand(50, 2, 2)),
        "label-noise": (0.3 * torch.randn(50, 2, generator=g, dtype=torch.float64), eye),
        "expected-qmse": (None, sq * eye + 2 * r[:, :, None] * r[:, None, :] + eye / 2),
        "qmse": (v, (sq + (v * r).sum(-1)[:, None, None]) * eye
                 + (r + v)[:, :, None] * (2 * r + v)[:, None, :]),
    }  # fmt: skip
    for name, (noise, D) in expected.items():
        got = st._output_curvature(get_loss(name), f, y, noise)
        torch.testing.assert_close(got, D.expand(50, 2, 2), rtol=1e-7, atol=1e-7)


def test_stability_report_prints_the_bands_of_escape_band():
    """At 0.7 times the teacher (a saddle: unstable at every lr) the band is [0, ·)."""
    problem = problems.teacher_student(3)
    V = ts.make_problem(3).V
    text = st.stability_report(
        "teacher-student", 0.7 * V, [0.9], [8], instance={"k": 3}, samples=2048
    )
    lin = st.linearise(problem, 0.7 * V, samples=2048)
    band = st.escape_band(lin, st.linearise(problem, V, samples=2048), 0.9, 8)
    lo, hi = band.interval
    assert lo == 0 and hi == band.global_minimum.second
    assert f"{band.minimum.second:9.4g}" in text and f"{band.global_minimum.mean:12.4g}" in text
    assert f"[{lo:.4g}, {hi:.4g})" in text
    with pytest.raises(UserError, match="shape"):
        st.stability_report(problem, V[:2], [0.0], [8])


def test_finite_sum_is_matrix_sensings_per_measurement_closed_form():
    """Each measurement's term ½rᵢ², rᵢ = xᵀAᵢx − bᵢ: gradient 2rᵢAᵢx and Hessian
    4(Aᵢx)(Aᵢx)ᵀ + 2rᵢAᵢ; their mean's Hessian is the closed-form ∇²f over 2m. With m = 3
    measurements, the second-moment radius equals the explicit Kronecker operator over every
    batch of two."""
    inst = ms.make_instance(0.75, 2, seed=0, m=3)
    problem = ms.matrix_sensing_problem(0.75, 2, seed=0, m=3)
    x = torch.tensor([0.3, -0.8], dtype=torch.float64)
    lin = st.finite_sum(problem, x, inst.A, inst.b[:, None])
    Ax = inst.A @ x
    r = Ax @ x - inst.b
    Hs = 4 * Ax[:, :, None] * Ax[:, None, :] + 2 * r[:, None, None] * inst.A
    np.testing.assert_allclose(lin.gradients, (2 * r[:, None] * Ax).numpy(), rtol=1e-12)
    np.testing.assert_allclose(lin.curvatures, Hs.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(lin.hessian, ms.hessian(inst, x).numpy() / 6, rtol=1e-12)
    assert lin.groups == 1 and lin.group_hessians is None
    at_min = st.finite_sum(problem, inst.spurious, inst.A, inst.b[:, None])
    t = st.thresholds(at_min, 0.5, 2)
    assert t.second_se == 0 and 0 < t.second < t.mean
    Hmin = at_min.curvatures
    for lr in (0.9 * t.second, 1.1 * t.second):
        s = st.analyse(at_min, lr, 0.5, 2)
        reference = explicit_second_moment_radius(Hmin, lr, 0.5, 2)
        assert s.second_radius == pytest.approx(reference, rel=1e-7)
