"""qmse.escape.phase: the lr grid's spacing, the confusion tables against a hand count, the
certified minima against `problems.certify`, the families' mean fields against the engine's
gradient over every sample, the measured outcomes against the mean-map threshold (the
population gradient is deterministic: it leaves the minimum exactly past 2(1 + β)/λ_max) and
against a step too small to move, and the finishing descent against the end-of-budget rule
on a run stopped short of the teacher."""

import dataclasses

import numpy as np
import pytest
import torch

from qmse import stability as st
from qmse import teacher_student as ts
from qmse.errors import UserError
from qmse.escape import matrix_sensing as ms
from qmse.escape import phase, problems
from qmse.escape.engine import make_job, problem_gradient

SEED_STUCK_AT_K8 = 0  # gd-population from Xavier seed 0 at k = 8 ends at the spurious minimum
SENSING = (0.75, 2, 0, 8)  # the committed matrix-sensing instance: δ, n, seed, m


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared machine: two threads can be 30 times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(one_thread):
    """Teacher–student k = 8, its minima from seed 0 alone; 2048 Monte Carlo inputs."""
    return phase.teacher_student(8, seeds=1, samples=2048)


@pytest.fixture(scope="module")
def sensing(one_thread):
    return phase.matrix_sensing(*SENSING, seeds=8)


def test_lr_grid_is_2_to_the_eighth_apart_around_both_edges():
    lrs = phase.lr_grid(0.1, 0.13, 3, 2)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, 2 ** (1 / 8), rtol=1e-5)
    assert lrs[3] == pytest.approx(0.1) and lrs[0] == pytest.approx(0.1 * 2 ** (-3 / 8))
    assert lrs[-3] >= 0.13 > lrs[-4]  # the first point at or past the upper edge, then 2
    assert phase.lr_grid(0.1, 0.1, 0, 0) == [0.1]


def synthetic() -> dict:
    """One minimum (λ_max 2), global λ_max 4, β = 0.5; second-moment thresholds 0.2 and 0.3."""
    pred = {"minimum": {"second": 0.2, "second_se": 0.0},
            "global_minimum": {"second": 0.3, "second_se": 0.0}}  # fmt: skip
    return {
        "title": "a test",
        "protocol": {"steps": 10},
        "minima": [{"eigenvalues": [0.1, 2.0]}],
        "global_minimum": {"eigenvalues": [0.1, 4.0]},
        "panels": [
            {
                "minimum": 0,
                "beta": 0.5,
                "batch": 16,
                "starts": 4,
                "predicted": pred,
                "lrs": [0.1, 0.2, 0.3, 0.6, 1.5, 2.0],
                "escaped": [0, 3, 1, 0, 0, 0],
                "diverged": [0, 0, 3, 2, 4, 1],
                "moved": [0, 0, 0, 0, 0, 2],
                "stuck": [4, 1, 0, 2, 0, 1],
                "seconds": {"prediction": 1.0, "measurement": 2.5},
            }
        ],
    }


def test_confusion_counts_the_cells_by_hand():
    """Measured: stuck, left (escaped), left (diverged), stuck (2 of 4 is not a majority),
    left (diverged), left (1 diverged + 2 moved; outcome moved). Second moment (0.2, 0.3):
    stable, unstable ×5; mean map 2(1 + β)/λ = (1.5, 0.75): unstable at 1.5 and 2; lr/(1 − β)
    vs 2/λ: 2(1 − β)/λ = (0.5, 0.25)."""
    data = synthetic()
    assert phase.thresholds(data, data["panels"][0], "mean map") == (1.5, 0.75)
    assert phase.thresholds(data, data["panels"][0], "lr/(1-β)") == (0.5, 0.25)
    second = phase.confusion(data, "second moment")
    assert {k: second[k] for k in ("unstable/left", "unstable/stuck", "stable/left",
                                   "stable/stuck")} == {
        "unstable/left": 4, "unstable/stuck": 1, "stable/left": 0, "stable/stuck": 1,
    }  # fmt: skip
    # outcomes stuck, escaped, diverged, diverged (a 2:2 tie with stuck goes to diverged),
    # diverged, moved: the last is predicted diverged, while 0.6 is an error of the 2 × 2 table
    assert second["outcome_accuracy"] == 5 / 6 and second["accuracy"] == 5 / 6
    mean = phase.confusion(data, "mean map")
    assert (mean["unstable/left"], mean["stable/left"], mean["stable/stuck"]) == (2, 2, 2)
    simple = phase.confusion(data, "lr/(1-β)")
    assert simple["unstable/left"] == 2 and simple["unstable/stuck"] == 1
    assert phase.measured_edges(data["panels"][0]) == {
        "escaped": 0.2, "left": 0.2, "diverged": 0.3,
    }  # fmt: skip
    assert phase.seconds(data) == {"prediction": 1.0, "measurement": 2.5}
    with pytest.raises(ValueError, match="rule"):
        phase.thresholds(data, data["panels"][0], "sharpness")


def test_markdown_and_plot(tmp_path):
    data = synthetic()
    text = phase.markdown(data)
    assert "| 0.5 | 16 | 0.2 | 0.3 | 0.2 | 0.2 | 0.3 | 0.5 | 1.5 |" in text
    assert "| second moment | 4 | 1 | 0 | 1 | 83% | 83% |" in text
    phase.plot(data, tmp_path / "phase.png")
    assert (tmp_path / "phase.png").stat().st_size > 10_000


def test_certified_minima_are_strict_spurious_minima(family, sensing):
    (seed,) = family.seeds
    assert seed == SEED_STUCK_AT_K8
    for fam in (family, sensing):
        for cert in problems.certify(fam.problem, fam.minima):
            assert cert["kind"] == "strict minimum" and cert["grad_norm"] < 1e-8
            assert cert["objective"] >= fam.problem.success
    # matrix sensing's minima are its constructed point √δ·e₂ (rotated), up to sign
    x = ms.make_instance(*SENSING).spurious
    for w in sensing.minima:
        assert min((w - x).abs().max(), (w + x).abs().max()) < 1e-8
    assert phase.matrix_sensing(*SENSING, seeds=8).seeds == sensing.seeds  # deterministic
    with pytest.raises(UserError, match="no certified spurious minimum"):
        phase.matrix_sensing(0.4, 2, 0, 8, seeds=4)  # δ < 1/2: no spurious minimum


def test_the_mean_fields_are_the_engines_gradient_over_every_sample(family, sensing):
    """The engine's MSE gradient with each of sensing's m measurements once is the family's
    field (∇f/(2m)) and the finite sum's H̄ its Hessian (the closed form over 2m); for
    teacher–student the field is the closed-form population gradient (a large batch agrees)."""
    inst = ms.make_instance(*SENSING)
    W = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    job = make_job("sgd", 0.1)
    x, y = inst.A[None].expand(3, -1, -1, -1), inst.b[None, :, None].expand(3, -1, 1)
    engine = problem_gradient(job, W, x, y, sensing.problem, torch.Generator())
    torch.testing.assert_close(engine, sensing.field(W), rtol=1e-10, atol=1e-12)
    lin = sensing.linearise(W[0], "mse")
    np.testing.assert_allclose(lin.hessian, ms.hessian(inst, W[0]).numpy() / 16, rtol=1e-10)
    np.testing.assert_allclose(lin.mean_gradient, sensing.field(W[:1])[0].numpy(), rtol=1e-10)
    p = ts.make_problem(8)
    g = torch.Generator().manual_seed(2)
    xs = ts.sample_inputs(1, 2**17, 8, generator=g).double()
    big = problem_gradient(job, family.minima[:1], xs, ts.outputs(p.V[None], p.A_teacher, xs),
                           problems.teacher_student(8), g)  # fmt: skip
    exact = family.field(family.minima[:1])
    assert exact.norm() < 1e-8 and (big - exact).norm() < 0.02 * big.norm() + 0.01


def test_the_population_gradient_leaves_exactly_past_the_mean_threshold(family):
    """From the minimum, heavy ball on the closed form stays (its loss unchanged) 5 % below
    2(1 + β)/λ_max and leaves 5 % above it: it diverges, escapes, or ends in an oscillation of
    higher loss about the minimum (at β = 0 a 2-cycle, which the finishing descent returns to
    the minimum: counted stuck, its end-of-budget loss far from the minimum's)."""
    (minimum,) = family.minima
    H = family.hessian(minimum).numpy()
    lam = np.linalg.eigvalsh(H)[-1]
    loss = float(family.problem.objective(minimum[None]))
    for beta in (0.0, 0.9):
        edge = 2 * (1 + beta) / lam
        assert st.mean_threshold(H, beta) == pytest.approx(edge, rel=1e-10)
        out = phase.measure(family, minimum[None], [0.95 * edge, 1.05 * edge], beta, None,
                            steps=600)  # fmt: skip
        assert out["stuck"][0] == 1 and out["stuck_loss"][0] == pytest.approx(loss, rel=1e-9)
        assert out["stuck"][1] == 0 or abs(out["stuck_loss"][1] - loss) > 0.5 * loss


def test_small_steps_stay_and_large_ones_diverge(family):
    W0 = family.minima.expand(4, 8, 8)
    out = phase.measure(family, W0, [1e-3, 5.0], 0.9, 16, steps=200)
    assert out["stuck"] == [4, 0] and out["diverged"] == [0, 4] and out["escaped"] == [0, 0]
    loss = float(ts.population_loss(family.minima[0], ts.make_problem(8)))
    assert out["stuck_loss"][0] == pytest.approx(loss, rel=0.05) and out["stuck_loss"][1] is None
    assert out["unfinished"] == [0, 0] and out["moved"] == [0, 0]


def test_the_finish_decides_the_basin_not_the_budget(family):
    """A start just off the teacher (population loss above the success threshold) that takes
    5 tiny steps still sits above it: the end-of-budget rule calls it stuck, the finishing
    descent escaped. And a finish that lands on another spurious value counts as moved."""
    p = ts.make_problem(8)
    g = torch.Generator().manual_seed(3)
    W0 = p.V + 0.08 * torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    assert (ts.population_loss(W0, p) > 2e-3).all()
    out = phase.measure(family, W0, [1e-4], 0.0, 16, steps=5)
    assert out["end_escaped"] == [0] and out["escaped"] == [2]

    def higher(W):
        return 1.5 * family.problem.objective(W), torch.ones(len(W), dtype=torch.bool)

    elsewhere = dataclasses.replace(family, finish=higher)
    out = phase.measure(elsewhere, family.minima, [1e-4], 0.0, None, steps=5)
    assert out["moved"] == [1] and out["moved_loss"][0] == pytest.approx(
        1.5 * float(family.problem.objective(family.minima)), rel=1e-6
    )


def test_phase_diagram_resumes_from_its_file(sensing, tmp_path):
    """Sensing at β = 0.9, B = 4 and the population: a second call with one more panel keeps
    the first's panels (bit for bit) and computes only the new one; another protocol is
    refused. The predicted thresholds are the finite sum's (exact: no standard error)."""
    path = tmp_path / "phase.json"
    kw = dict(starts=4, steps=50, below=1, above=1, path=path, quiet=True)
    first = phase.phase_diagram(sensing, [0.9], [4], **kw)
    (panel,) = first["panels"]
    lin = sensing.linearise(sensing.minima[0], "mse")
    band = st.escape_band(lin, sensing.linearise(sensing.global_minimum, "mse"), 0.9, 4)
    assert panel["predicted"]["minimum"]["second"] == band.minimum.second
    assert panel["predicted"]["minimum"]["second_se"] == 0
    assert panel["lrs"][1] == float(f"{min(band.minimum.second, band.global_minimum.second):.6g}")
    again = phase.phase_diagram(sensing, [0.9], [4, None], **kw)
    assert again["panels"][0] == panel and again["panels"][1]["batch"] is None
    assert [p["batch"] for p in phase.load_json(path)["panels"]] == [4, None]
    with pytest.raises(UserError, match="another protocol"):
        phase.phase_diagram(sensing, [0.9], [4], **(kw | {"steps": 60}))


def test_other_losses_start_from_mses_minima_with_their_own_prediction(family, sensing):
    """Expected-QMSE (¼r⁴ + r²/2 at C = 1) has MSE's curvature where r = 0: its Monte Carlo H̄
    at the teacher is MSE's closed form. At MSE's minimum it is not stationary (a Newton
    shift), and the diagram's thresholds and λ_max are its own linearisation's. No
    population panel and no matrix sensing for it."""
    V = family.global_minimum
    H = family.linearise(V, "expected-qmse").hessian
    exact = family.hessian(V).numpy()
    assert np.linalg.norm(H - exact) < 0.05 * np.linalg.norm(exact)
    data = phase.phase_diagram(family, [0.9], [16], starts=2, steps=20, below=0, above=0,
                               loss="expected-qmse", quiet=True)  # fmt: skip
    (minimum,), (panel,) = data["minima"], data["panels"]
    lin = family.linearise(family.minima[0], "expected-qmse")
    band = st.escape_band(lin, family.linearise(V, "expected-qmse"), 0.9, 16)
    assert panel["predicted"]["minimum"]["second"] == band.minimum.second
    assert minimum["eigenvalues"][1] == pytest.approx(np.linalg.eigvalsh(lin.hessian)[-1])
    assert minimum["newton_shift"] == pytest.approx(lin.shift) and lin.shift > 1e-3
    assert data["protocol"]["loss"] == "expected-qmse" and "expected-qmse" in data["title"]
    with pytest.raises(UserError, match="population"):
        phase.phase_diagram(family, [0.9], [None], loss="qmse", quiet=True)
    with pytest.raises(UserError, match="MSE's only"):
        sensing.linearise(sensing.minima[0], "qmse")
    with pytest.raises(UserError, match="expected one of"):
        phase.measure(family, family.minima, [1e-3], 0.0, 16, steps=1, loss="adam")
