"""qmse.escape.tuning: the widening rule on hand-made sweeps, and a real sweep that starts
with a grid far too low and widens until its best value lies inside."""

import math

import pytest
import torch

from qmse.escape import METHODS, Method, register_method
from qmse.escape.problems import teacher_student
from qmse.escape.rules import sgd
from qmse.escape.tuning import plan, summarize, tune_methods
from qmse.teacher_student import init_weights
from qmse.tuning import Param

MAX_EXTEND = Param("lr", (1.0,)).max_extend
GRID = (0.1, 0.2, 0.4)
SGD_LIKE = Method("test-tune-sgd", "mse", sgd, GRID)
NOISY = Method("test-tune-noisy", "mse", sgd, GRID, hyper={"sigma": (0.01, 0.02, 0.04)})


def plan3(method, fixed, points):
    """plan's answer as (settings to run, chosen, stages)."""
    found = plan(method, fixed, points)
    return found.need, found.chosen, found.stages


def point(lr, failures, *, diverged=0, log_loss=-3.0, moved=0.5, seeds=10, **hyper):
    return {
        "params": {"lr": lr, **hyper},
        "failures": failures,
        "seeds": seeds,
        "diverged": diverged,
        "median_log10_loss": log_loss,
        "moved": moved,
    }


def test_an_empty_sweep_asks_for_the_whole_grid():
    todo, chosen, _ = plan3(SGD_LIKE, {}, [])
    assert [s["lr"] for s in todo] == list(GRID) and chosen is None


def test_the_grid_widens_while_the_best_value_is_on_its_top_edge():
    points = [point(0.1, 9), point(0.2, 6), point(0.4, 3)]
    todo, chosen, _ = plan3(SGD_LIKE, {}, points)
    assert [s["lr"] for s in todo] == [0.8] and chosen is None
    points.append(point(0.8, 2))
    assert [s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]] == [1.6]
    points.append(point(1.6, 10, diverged=10))
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and chosen == {"lr": 0.8}
    assert stage["interior"] and stage["range"] == [0.1, 1.6]
    assert stage["stopped"] == {"top": "inside", "bottom": "inside"}


def test_the_grid_widens_downwards_until_nothing_moves():
    points = [point(0.1, 3), point(0.2, 5), point(0.4, 9)]
    assert [s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]] == [0.05]
    points.append(point(0.05, 3, moved=1e-4))  # tied with 0.1, and frozen: stop
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and chosen == {"lr": 0.1}  # the tie goes to the value inside
    assert stage["stopped"]["bottom"] == "frozen" and stage["interior"]


def test_when_everything_fails_both_edges_widen_until_their_stops():
    """All fail (a minimum nobody escapes at these values): a larger step might still
    escape, so the top widens until most starts diverge; the bottom until halving changes
    nothing; the choice is inside."""
    points = [point(v, 10, log_loss=-1.7 + i / 25) for i, v in enumerate(GRID)]
    assert sorted(s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]) == [0.05, 0.8]
    points += [point(0.05, 10, log_loss=-1.705), point(0.8, 10, log_loss=-1.5)]
    assert [s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]] == [1.6]
    points.append(point(1.6, 10, diverged=8, log_loss=30.0))
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and stage["stopped"] == {"top": "most diverged", "bottom": "flat"}
    assert stage["interior"] and chosen == {"lr": 0.1}


def test_escapes_beyond_the_top_of_an_all_failing_grid_are_found():
    """Every grid value fails on every start, but a larger step escapes some: the tied top
    edge widens and finds it."""
    points = [point(v, 10, log_loss=-1.7 + i / 25) for i, v in enumerate(GRID)]
    points += [point(0.05, 10, log_loss=-1.705), point(0.8, 10, log_loss=-1.5)]
    points += [point(1.6, 6, log_loss=-2.0), point(3.2, 10, diverged=9, log_loss=30.0)]
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and chosen == {"lr": 1.6} and stage["interior"]


def test_a_grid_where_everything_diverges_widens_downwards():
    """Diverged starts all score alike (log₁₀ loss 30), which is not "nothing moves": the
    grid widens down until a value does not diverge."""
    points = [point(v, 10, diverged=10, log_loss=30.0, moved=1e3) for v in GRID]
    assert [s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]] == [0.05]
    points.append(point(0.05, 10, diverged=10, log_loss=30.0, moved=1e3))
    assert [s["lr"] for s in plan3(SGD_LIKE, {}, points)[0]] == [0.025]
    points += [point(0.025, 4), point(0.0125, 7)]
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and chosen == {"lr": 0.025} and stage["interior"]


def test_the_widening_stops_at_its_cap():
    points = [point(v, 19 - i, seeds=20) for i, v in enumerate(GRID)]
    v = GRID[-1]
    for i in range(MAX_EXTEND):
        v *= 2
        points.append(point(v, 16 - i, seeds=20))  # always better: the edge keeps winning
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and stage["stopped"]["top"] == "limit" and chosen["lr"] == v
    assert not stage["interior"]  # recorded, and marked in the table


def test_hyperparameters_are_swept_after_lr_at_the_chosen_lr():
    points = [point(0.1, 5, sigma=0.02), point(0.2, 2, sigma=0.02), point(0.4, 6, sigma=0.02)]
    todo, _, stages = plan3(NOISY, {}, points)
    assert [s["param"] for s in stages] == ["lr"]
    assert todo == [{"lr": 0.2, "sigma": 0.01}, {"lr": 0.2, "sigma": 0.04}]  # 0.02 is done
    points += [point(0.2, 4, sigma=0.01), point(0.2, 1, sigma=0.04)]
    assert plan3(NOISY, {}, points)[0] == [{"lr": 0.2, "sigma": 0.08}]
    points.append(point(0.2, 3, sigma=0.08))
    todo, chosen, stages = plan3(NOISY, {}, points)  # a second pass: lr again at σ = 0.04
    assert todo == [{"lr": 0.1, "sigma": 0.04}, {"lr": 0.4, "sigma": 0.04}]
    points += [point(0.1, 3, sigma=0.04), point(0.4, 6, sigma=0.04)]
    todo, chosen, stages = plan3(NOISY, {}, points)
    assert todo == [] and chosen == {"lr": 0.2, "sigma": 0.04}  # nothing changed: done
    assert [(s["param"], s["pass"]) for s in stages] == [
        ("lr", 1),
        ("sigma", 1),
        ("lr", 2),
        ("sigma", 2),
    ]


def test_a_second_pass_retunes_lr_chosen_at_a_poor_default():
    """At the default σ every lr fails (too much noise); σ is then chosen small at that lr,
    and the second pass moves lr to where the method works."""
    points = [point(v, 10, log_loss=-1.5 - i / 10, sigma=0.02) for i, v in enumerate(GRID)]
    points += [point(0.05, 10, log_loss=-1.5, moved=1e-4, sigma=0.02)]  # frozen below
    points += [point(0.8, 10, diverged=9, sigma=0.02)]
    todo, _, stages = plan3(NOISY, {}, points)
    lr1 = stages[0]["chosen"]
    assert [s["sigma"] for s in todo] == [0.01, 0.04] and {s["lr"] for s in todo} == {lr1}
    points += [point(lr1, 6, sigma=0.01), point(lr1, 10, sigma=0.04)]
    todo = plan3(NOISY, {}, points)[0]
    assert [s["sigma"] for s in todo] == [0.005]  # the best σ is on the low edge: widen
    points.append(point(lr1, 6, log_loss=-3.0, sigma=0.005, moved=0.3))  # = 0.01: flat, stop
    todo = plan3(NOISY, {}, points)[0]
    assert {s["sigma"] for s in todo} == {0.01} and lr1 not in {s["lr"] for s in todo}
    points += [point(s["lr"], 1 if s["lr"] == 0.2 else 8, sigma=0.01) for s in todo]
    todo, chosen, stages = plan3(NOISY, {}, points)
    while todo:  # the σ stage at the new lr
        points += [point(s["lr"], 2, sigma=s["sigma"]) for s in todo]
        todo, chosen, stages = plan3(NOISY, {}, points)
    assert chosen["lr"] == 0.2 and stages[-1]["pass"] >= 2
    # a fixed lr is not swept; nor is anything when everything is fixed
    assert [s["lr"] for s in plan3(NOISY, {"lr": 0.3}, [])[0]] == [0.3, 0.3, 0.3]
    assert plan3(NOISY, {"lr": 0.3, "sigma": 0.1}, []) == ([], {"lr": 0.3, "sigma": 0.1}, [])


def test_summarize_counts_failures_and_divergence():
    """Failures are the starts without success (the engine's verdict, not a loss threshold);
    the median log₁₀ loss is measured above the problem's optimum."""
    loss = torch.tensor([1e-5, 0.02, float("inf"), 5e-4], dtype=torch.float64)
    success = torch.tensor([True, False, False, True])
    s = summarize(loss, success, torch.tensor([False, False, True, False]), torch.ones(4), 0.0)
    assert (s["failures"], s["diverged"], s["seeds"]) == (2, 1, 4)
    assert s["median_log10_loss"] == pytest.approx(math.log10(5e-4))  # torch: the lower middle
    shifted = summarize(loss - 8, success, torch.zeros(4, dtype=torch.bool), torch.ones(4), -8.0)
    assert shifted["median_log10_loss"] == pytest.approx(s["median_log10_loss"], abs=1e-9)


def test_a_sweep_that_starts_far_too_low_widens_until_its_best_value_is_inside(tmp_path):
    """SGD on k = 3 from Xavier starts, 150 steps: lr 0.01-0.02 barely moves; the grid
    widens upward past the values that converge until larger steps do worse."""
    low = register_method(Method("test-low-grid", "mse", sgd, (0.0125, 0.025)))
    problem = teacher_student(3)
    W0 = init_weights(range(10**6, 10**6 + 6), 3, 3)
    kw = dict(steps=150, batch=16, seed=1, method_seed=2, quiet=True)
    path = lambda name: tmp_path / f"{name}.json"  # noqa: E731
    record = tune_methods([low, METHODS["sgd"]], {}, W0, problem, path=path, **kw)["test-low-grid"]
    (stage,) = record["stages"]
    assert stage["interior"], stage
    assert stage["range"][1] >= 0.2 and record["chosen"]["lr"] > 0.025
    assert len(record["points"]) > 2 and max(p["round"] for p in record["points"]) > 1
    stamp = path("test-low-grid").stat().st_mtime_ns
    again = tune_methods([low], {}, W0, problem, path=path, **kw)["test-low-grid"]
    assert again == record and path("test-low-grid").stat().st_mtime_ns == stamp  # resumed
    other = tune_methods([low], {}, W0, problem, path=path, **(kw | {"steps": 100}))
    assert other["test-low-grid"]["key"] != record["key"]  # another budget: recomputed


def test_tuning_is_independent_of_the_other_methods_swept(tmp_path):
    problem = teacher_student(3)
    W0 = init_weights(range(10**6, 10**6 + 4), 3, 3)
    kw = dict(steps=60, batch=8, seed=1, method_seed=2, quiet=True)
    alone = tune_methods([METHODS["sgd"]], {}, W0, problem, path=lambda n: tmp_path / n, **kw)
    both = tune_methods(
        [METHODS["momentum"], METHODS["sgd"]], {}, W0, problem,
        path=lambda n: tmp_path / "both" / n, **kw,
    )  # fmt: skip
    assert alone["sgd"]["points"] == both["sgd"]["points"]


def test_bad_fixed_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lr > 0"):
        tune_methods(
            [NOISY], {NOISY.name: {"lr": -1.0}}, init_weights(range(2), 3, 3), teacher_student(3),
            path=lambda n: tmp_path / n, steps=5, batch=2, seed=0, method_seed=0, quiet=True,
        )  # fmt: skip


def test_a_flat_high_side_stops_the_widening():
    """Every value succeeds alike (e.g. PGD's radius where no start needs a kick): doubling
    and halving change nothing, so both sides stop; the choice is inside."""
    points = [point(v, 0, log_loss=loss) for v, loss in zip(GRID, (-5.1, -5.105, -5.11))]
    todo, chosen, (stage,) = plan3(SGD_LIKE, {}, points)
    assert todo == [] and stage["stopped"] == {"top": "flat", "bottom": "flat"}
    assert chosen == {"lr": 0.2}


def test_a_noise_baseline_always_tries_its_parent_limit(tmp_path):
    """Label noise's joint search first tries SGD's chosen lr with the least noise of its
    space (its noise-free limit), within the same budget; its parent is searched first."""
    problem = teacher_student(3)
    W0 = init_weights(range(10**6, 10**6 + 4), 3, 3)
    kw = dict(steps=60, batch=8, seed=1, method_seed=2, quiet=True, budget=6)
    records = tune_methods([METHODS["label-noise"], METHODS["sgd"]], {}, W0, problem,
                           path=lambda n: tmp_path / n, **kw)  # fmt: skip
    sgd, noisy = records["sgd"], records["label-noise"]
    anchor = {"lr": sgd["chosen"]["lr"], "sigma": METHODS["label-noise"].hyper["sigma"][0]}
    assert noisy["anchors"] == [anchor] and noisy["points"][0]["params"] == anchor
    assert len(noisy["points"]) == len(sgd["points"]) == 6  # equal budgets, anchor included
    assert sgd["anchors"] == []


def test_search_tries_its_anchors_first_within_the_budget():
    from qmse.tuning import Param, Space, Trial, search

    space = Space((Param("lr", (0.1, 0.2, 0.4)), Param("sigma", (0.01, 0.02))))
    seen = {}
    anchor = {"lr": 0.3, "sigma": 0.01}

    def lookup(s, seen=seen):
        return seen.get(tuple(sorted(s.items())))

    while (found := search(space, {}, lookup, budget=5, anchors=[anchor])).need:
        if not seen:
            assert found.need == [anchor]  # first, alone
        seen |= {tuple(sorted(s.items())): Trial(s["lr"]) for s in found.need}
    assert len(seen) == 5 and tuple(sorted(anchor.items())) in seen


def test_a_sweep_on_burer_monteiro_counts_failures_by_the_problems_own_rule(tmp_path):
    """Burer–Monteiro at p = 2 (cost ⟨C, YYᵀ⟩ ≤ 0: the optimum −8, the spurious set 0, so a
    loss threshold of 10⁻³ would call every start a success): each swept point's failures
    are the starts that do not end at the optimum, the count a row of the same run makes;
    the record names its problem and the sweep chooses a value where some starts escape."""
    from qmse.escape import run_method
    from qmse.escape.burer_monteiro import burer_monteiro, classify

    problem = burer_monteiro(2)
    W0 = problem.init(range(10**6, 10**6 + 8))
    kw = dict(steps=200, batch=8, seed=1, method_seed=2, quiet=True)
    record = tune_methods([METHODS["sgd"]], {}, W0, problem, path=lambda n: tmp_path / n, **kw)
    record = record["sgd"]
    assert (record["problem"], record["instances"]) == ("burer-monteiro", [problem.instance])
    failures = {}
    for p in record["points"]:
        row = run_method("sgd", W0, problem, lr=p["params"]["lr"], **kw)
        assert p["failures"] == int((~row["success"]).sum())
        verdicts = classify(2, problem.objective(row["W"].double()))
        assert p["failures"] == sum(v != "optimal" for v in verdicts)
        failures[p["params"]["lr"]] = p["failures"]
    assert max(failures.values()) == 8 and failures[record["chosen"]["lr"]] < 8


def test_pooled_starts_train_on_their_own_teachers_as_runs_of_their_own():
    """Starts of two teachers in one call (owners 0, 1, 0, not sorted), two settings: each
    start's row is what run_methods gives it on its own teacher's starts alone."""
    from qmse.escape import make_job, run_methods
    from qmse.escape.tuning import run_pooled

    teachers = [teacher_student(3, outputs=3, seed=s) for s in (0, 1)]
    W0 = init_weights(range(3), 3, 3)
    owner = torch.tensor([0, 1, 0])
    jobs = [make_job("sgd", [0.1, 0.2]), make_job("qmse", 0.05)]
    kw = dict(steps=20, batch=4, seed=3, method_seed=4, quiet=True)
    pooled = run_pooled(jobs, W0, teachers, owner, **kw)
    for t, index in ((0, [0, 2]), (1, [1])):
        alone = run_methods(jobs, W0[index], teachers[t], **kw)
        for job, mine, theirs in zip(jobs, pooled, alone):
            for name, value in theirs.items():
                rows = [g * 3 + i for g in range(job.settings) for i in index]
                assert torch.equal(mine[name][rows], value), name
