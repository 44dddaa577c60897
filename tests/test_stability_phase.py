"""qmse.escape.phase: the lr grid's spacing, the confusion tables against a hand count, the
certified minima against `problems.certify`, and the measured outcomes against the mean-map
threshold (the population gradient is deterministic: it leaves the minimum exactly past
2(1 + β)/λ_max) and against a step too small to move."""

import json

import numpy as np
import pytest
import torch

from qmse import stability as st
from qmse import teacher_student as ts
from qmse.escape import phase, problems

SEED_STUCK_AT_K8 = 0  # gd-population from Xavier seed 0 at k = 8 ends at the spurious minimum


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors on a shared machine: two threads can be 30 times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minimum(one_thread):
    W, seeds = phase.certified_minima(8, [SEED_STUCK_AT_K8, 1])
    assert seeds == [SEED_STUCK_AT_K8]  # seed 1 reaches the global minimum
    return W[0]


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
        "protocol": {"k": 8, "steps": 10},
        "minima": [{"eigenvalues": [0.1, 2.0]}],
        "global_minimum": {"eigenvalues": [0.1, 4.0]},
        "panels": [
            {
                "minimum": 0,
                "beta": 0.5,
                "batch": 16,
                "starts": 4,
                "predicted": pred,
                "lrs": [0.1, 0.2, 0.3, 0.6, 1.5],
                "escaped": [0, 3, 1, 0, 0],
                "diverged": [0, 0, 3, 2, 4],
                "stuck": [4, 1, 0, 2, 0],
                "stuck_loss": [0.02, 0.03, None, 0.5, None],
            }
        ],  # fmt: skip
    }


def test_confusion_counts_the_cells_by_hand():
    """Measured: stuck, left (escaped), left (diverged), stuck (2 of 4 is not a majority),
    left (diverged). Second moment (0.2, 0.3): stable, unstable ×4; mean map 2(1 + β)/λ =
    (1.5, 0.75): unstable only at 1.5; lr/(1 − β) vs 2/λ: 2(1 − β)/λ = (0.5, 0.25)."""
    data = synthetic()
    assert phase.thresholds(data, data["panels"][0], "mean map") == (1.5, 0.75)
    assert phase.thresholds(data, data["panels"][0], "lr/(1-β)") == (0.5, 0.25)
    second = phase.confusion(data, "second moment")
    assert {k: second[k] for k in ("unstable/left", "unstable/stuck", "stable/left",
                                   "stable/stuck")} == {
        "unstable/left": 3, "unstable/stuck": 1, "stable/left": 0, "stable/stuck": 1,
    }  # fmt: skip
    # outcomes stuck, escaped, diverged, diverged (a 2:2 tie with stuck goes to diverged),
    # diverged: each the predicted one, while 0.6 is an error of the 2 × 2 table
    assert second["outcome_accuracy"] == 1.0 and second["accuracy"] == 0.8
    mean = phase.confusion(data, "mean map")
    assert (mean["unstable/left"], mean["stable/left"], mean["stable/stuck"]) == (1, 2, 2)
    simple = phase.confusion(data, "lr/(1-β)")
    assert simple["unstable/left"] == simple["unstable/stuck"] == 1 and simple["stable/left"] == 2
    assert phase.measured_edges(data["panels"][0]) == {
        "escaped": 0.2, "left": 0.2, "diverged": 0.3,
    }  # fmt: skip
    with pytest.raises(ValueError, match="rule"):
        phase.thresholds(data, data["panels"][0], "sharpness")


def test_markdown_and_write(tmp_path):
    data = synthetic()
    text = phase.markdown(data)
    assert "| 0.5 | 16 | 0.2 | 0.3 | 0.2 | 0.3 | 0.5 | 1.5 |" in text
    assert "| second moment | 3 | 1 | 0 | 1 | 80% | 100% |" in text
    json_path, png = phase.write(data, tmp_path, "phase")
    assert json.loads(json_path.read_text()) == data and png.stat().st_size > 10_000


def test_certified_minima_are_strict_spurious_minima(minimum):
    problem = problems.teacher_student(8)
    (cert,) = problems.certify(problem, minimum[None])
    assert cert["kind"] == "strict minimum" and cert["objective"] > 1e-3
    assert cert["grad_norm"] < 1e-8


def test_the_population_gradient_leaves_exactly_past_the_mean_threshold(minimum):
    """From the minimum, heavy ball on the closed form stays (its loss unchanged) 5 % below
    2(1 + β)/λ_max and leaves 5 % above it (diverges, or ends elsewhere: at β = 0 it may
    settle into a cycle of higher loss, counted stuck by the escape rule)."""
    p = ts.make_problem(8)
    H = ts.population_hessian(minimum, p).numpy()
    lam = np.linalg.eigvalsh(H)[-1]
    loss = float(ts.population_loss(minimum, p))
    for beta in (0.0, 0.9):
        edge = 2 * (1 + beta) / lam
        assert st.mean_threshold(H, beta) == pytest.approx(edge, rel=1e-10)
        out = phase.measure(minimum[None], 8, [0.95 * edge, 1.05 * edge], beta, None, steps=600)
        assert out["stuck"][0] == 1 and out["stuck_loss"][0] == pytest.approx(loss, rel=1e-9)
        assert out["stuck"][1] == 0 or abs(out["stuck_loss"][1] - loss) > 0.5 * loss


def test_small_steps_stay_and_large_ones_diverge(minimum):
    W0 = minimum.expand(4, 8, 8)
    out = phase.measure(W0, 8, [1e-3, 5.0], 0.9, 16, steps=200)
    assert out["stuck"] == [4, 0] and out["diverged"] == [0, 4] and out["escaped"] == [0, 0]
    loss = float(ts.population_loss(minimum, ts.make_problem(8)))
    assert out["stuck_loss"][0] == pytest.approx(loss, rel=0.05) and out["stuck_loss"][1] is None
    torch.testing.assert_close(phase.measure(W0, 8, [1e-3], 0.0, 16, steps=5)["stuck"], [4])
