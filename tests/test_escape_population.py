"""qmse.escape.population: gradient descent on the closed form, its keyed cache, and the
cache's refusal of files that are not plain tensors."""

import pytest
import torch

from qmse.escape import STUCK_LOSS, certify_minima, gd_population, population_runs, run_method
from qmse.escape.population import stuck_points
from qmse.teacher_student import init_weights, make_problem, population_grad


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
    assert len(stuck_points(out)) == 0


def test_population_runs_are_cached_under_the_key_of_their_inputs(tmp_path):
    problem = make_problem(3)
    a = population_runs(tmp_path, problem, range(3), max_steps=200, quiet=True)
    path = tmp_path / "gd-population" / "eval_k3_n3_C1.pt"
    stamp = path.stat().st_mtime_ns
    b = population_runs(tmp_path, problem, range(3), max_steps=200, quiet=True)
    assert path.stat().st_mtime_ns == stamp and torch.equal(a["W"], b["W"])
    c = population_runs(tmp_path, problem, range(3), max_steps=100, quiet=True)  # other cap
    assert c["max_steps"] == 100 and (c["steps"] <= 100).all() and c["key"] != a["key"]
    d = population_runs(tmp_path, problem, range(1, 4), max_steps=100, quiet=True)  # other seeds
    assert d["seeds"] == [1, 2, 3]
    assert torch.equal(d["W0"][0], c["W0"][1])


class _Planted:
    def __reduce__(self):
        return (print, ("a planted cache file ran code",))


def test_a_planted_cache_file_is_refused_even_when_torch_is_told_to_trust_files(
    tmp_path, monkeypatch, capsys
):
    """torch.load with weights_only=True: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 does not make a
    crafted gd-population file run its code; the error names the file."""
    path = tmp_path / "gd-population" / "eval_k3_n3_C1.pt"
    path.parent.mkdir()
    torch.save({"key": "x", "W": _Planted()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="eval_k3_n3_C1.pt"):
        population_runs(tmp_path, make_problem(3), range(2), max_steps=10, quiet=True)
    assert "ran code" not in capsys.readouterr().out
    population_runs(tmp_path / "ok", make_problem(3), range(2), max_steps=10, quiet=True)
    whole = (tmp_path / "ok" / "gd-population" / "eval_k3_n3_C1.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # a truncated file
    with pytest.raises(ValueError, match="eval_k3_n3_C1.pt"):
        population_runs(tmp_path, make_problem(3), range(2), max_steps=10, quiet=True)


@pytest.mark.slow
def test_stuck_seed_is_a_certified_minimum_that_sgd_does_not_leave():
    """Seed 0 at k = n = 8 ends in a spurious minimum (loss ≈ 0.0215): gradient ≤ 1e-9,
    smallest Hessian eigenvalue > 0; SGD started there stays."""
    problem = make_problem(8)
    out = gd_population(init_weights([0], 8, 8), problem, max_steps=30_000, quiet=True)
    assert out["converged"].all() and out["loss"].item() >= STUCK_LOSS
    assert min(certify_minima(out["W"], problem)) > 0
    sgd = run_method("sgd", out["W"], problem, steps=500, lr=0.1, quiet=True)
    assert sgd["loss"].item() >= STUCK_LOSS


def test_newton_finishes_a_capped_descent_at_the_minimum_it_was_creeping_to(tmp_path):
    """k = 3, C = 3: seeds 0, 6 and 22 take gradient descent 4,400-5,500 steps to reach two
    spurious minima. Capped at 1,000 steps, Newton's method finishes all three at the very
    points the uncapped descent reaches (to its 1e-9 tolerance); the reproduction's numbers
    stay gradient descent's (not converged at the cap)."""
    problem = make_problem(3, outputs=3)
    full = population_runs(tmp_path / "a", problem, [0, 6, 22], max_steps=20_000, quiet=True)
    assert full["converged"].all() and (full["steps"] > 4000).all()
    capped = population_runs(tmp_path / "b", problem, [0, 6, 22], max_steps=1000, quiet=True)
    assert not capped["converged"].any() and capped["newton"].all()
    assert capped["end_stuck"].all() and not torch.equal(capped["W"], capped["end"])
    torch.testing.assert_close(stuck_points(capped), stuck_points(full), rtol=0, atol=1e-7)
    assert (capped["loss"] > full["loss"]).all()  # the reproduction's losses: descent's own
