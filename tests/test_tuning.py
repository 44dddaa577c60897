"""qmse.tuning: the one sweep planner — widening past edges, limits, stops, ties, passes
and replay — on hand-made score functions checked by brute force."""

import math

import pytest

from qmse.errors import UserError
from qmse.tuning import Param, Rule, Space, Trial, plan


def run_to_end(space, start, score, rule=None):
    """Feed `plan` the scores it asks for until it decides; return (plan, settings run)."""
    seen = {}

    def lookup(s):
        key = tuple(sorted(s.items()))
        return seen.get(key)

    while True:
        found = plan(space, start, lookup, rule or Rule())
        if not found.need:
            return found, seen
        for s in found.need:
            seen[tuple(sorted(s.items()))] = Trial(score(s))


def bowl(centre):
    return lambda s: (math.log2(s["lr"]) - math.log2(centre)) ** 2


@pytest.mark.parametrize("centre", [0.01, 0.16, 0.00125])
def test_the_choice_is_the_best_value_run_and_lies_inside(centre):
    space = Space((Param("lr", (0.02, 0.04, 0.08)),))
    found, seen = run_to_end(space, {"lr": 0.04}, bowl(centre))
    values = sorted(dict(k)["lr"] for k in seen)
    assert found.chosen == {"lr": min(values, key=lambda v: bowl(centre)({"lr": v}))}
    assert values[0] < found.chosen["lr"] < values[-1] and found.stages[-1]["interior"]
    assert math.isclose(found.chosen["lr"], centre)
    # widened one value at a time past the edge that held the best score
    assert all(b == pytest.approx(2 * a) for a, b in zip(values, values[1:]))


def test_a_best_value_beyond_the_limit_is_bounded_out():
    space = Space((Param("lr", (0.1, 0.2, 0.4), max_extend=2),))
    found, seen = run_to_end(space, {"lr": 0.2}, bowl(100.0))
    assert found.chosen == {"lr": 1.6} and not found.stages[-1]["interior"]
    assert found.stages[-1]["stopped"]["top"] == "limit" and len(seen) == 5


def test_a_stop_rule_ends_the_widening_and_says_why():
    space = Space((Param("lr", (0.1, 0.2, 0.4)),))

    def stop(side, edge, inner):
        return "told to" if side == "top" else None

    found, seen = run_to_end(space, {"lr": 0.2}, bowl(100.0), Rule(stop=stop))
    assert found.chosen == {"lr": 0.4} and found.stages[-1]["stopped"]["top"] == "told to"


def test_ties_go_inside_then_to_the_tiebreak_then_to_the_smaller_value():
    space = Space((Param("lr", (0.1, 0.2, 0.4, 0.8)),))
    trials = {0.1: Trial(1.0), 0.2: Trial(0.0, 2.0), 0.4: Trial(0.0, 1.0), 0.8: Trial(1.0)}
    found = plan(space, {"lr": 0.2}, lambda s: trials.get(s["lr"]))
    assert found.chosen == {"lr": 0.4}  # both inside: the lower tie-break
    trials[0.4] = Trial(0.0, 2.0)
    assert plan(space, {"lr": 0.2}, lambda s: trials.get(s["lr"])).chosen == {"lr": 0.2}


def test_every_value_unusable_chooses_nothing():
    space = Space((Param("lr", (0.1, 0.2, 0.4)),))
    found = plan(space, {"lr": 0.2}, lambda s: Trial(math.inf, diverged=1.0))
    assert found.chosen is None and found.need == [] and found.stages[-1]["chosen"] is None


def test_centred_grids_follow_the_current_value_and_passes_repeat():
    """Two parameters with an optimum that moves lr after σ changes: the coordinate passes
    go on until one changes nothing; each stage's grid is centred on the current value."""
    space = Space(
        (Param("lr", (0.0625, 0.125, 0.25), centred=True), Param("sigma", (1, 2, 4), centred=True))
    )

    def score(s):
        return (math.log2(s["lr"]) - math.log2(s["sigma"]) + 1) ** 2 + math.log2(s["sigma"]) ** 2

    found, _ = run_to_end(space, {"lr": 0.125, "sigma": 2.0}, score)
    assert found.converged and found.chosen == {"lr": 0.5, "sigma": 1.0}
    lr_stages = [s for s in found.stages if s["param"] == "lr"]
    assert [s["chosen"] for s in lr_stages] == [1.0, 0.5, 0.5] and found.passes == 3
    assert lr_stages[1]["others"] == {"sigma": 1.0}
    assert lr_stages[1]["range"] == [0.25, 2.0]  # centred on the current lr 1, then widened


def test_replay_is_a_pure_function_of_the_trials():
    space = Space((Param("lr", (0.1, 0.2, 0.4)),))
    found, seen = run_to_end(space, {"lr": 0.2}, bowl(3.0))
    again = plan(space, {"lr": 0.2}, lambda s: seen.get(tuple(sorted(s.items()))))
    assert again.chosen == found.chosen and again.stages == found.stages
    partial = dict(list(seen.items())[:3])
    assert plan(space, {"lr": 0.2}, lambda s: partial.get(tuple(sorted(s.items())))).need


def test_bad_spaces_are_refused():
    with pytest.raises(UserError, match="at most 2x apart"):
        Param("lr", (0.1, 0.5))
    with pytest.raises(UserError, match="positive"):
        Param("lr", (0.0, 0.1))
    with pytest.raises(UserError, match="twice"):
        Space((Param("lr", (0.1,)), Param("lr", (0.2,))))
    with pytest.raises(UserError, match="no start value"):
        plan(Space((Param("lr", (0.1,)),)), {}, lambda s: None)


def feed(space, fixed, score, **kw):
    """`search` fed the scores it asks for until it decides; (plan, settings run)."""
    from qmse.tuning import search

    seen = {}
    while True:
        found = search(space, fixed, lambda s: seen.get(tuple(sorted(s.items()))), **kw)
        if not found.need:
            return found, seen
        for s in found.need:
            seen[tuple(sorted(s.items()))] = Trial(score(s))


SIGMAS = tuple(0.8 / 2**k for k in range(10, -1, -1))  # 0.00078 … 0.8
NOISY = Space((Param("lr", (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)), Param("sigma", SIGMAS)))


def works(s):
    """A method that escapes (score 0) only at large steps lr in [0.2, 0.8] with moderate
    noise σ in [0.025, 0.2]; everywhere else every start fails (score 1): no single
    coordinate sees a slope, and a tie-break picks small values."""
    return 0.0 if 0.2 <= s["lr"] <= 0.8 and 0.025 <= s["sigma"] <= 0.2 else 1.0


def flat(side, edge, inner):
    """Stop widening where the score does not change (the escape benchmark's "flat")."""
    return "flat" if inner is not None and edge.score == inner.score else None


def test_the_joint_search_finds_an_optimum_that_the_coordinate_passes_miss():
    start = {"lr": 0.1, "sigma": SIGMAS[4]}
    coordinate, _ = run_to_end(NOISY, start, works, Rule(stop=flat))
    assert works(coordinate.chosen) == 1.0  # every pass ties at 1: an arbitrary choice
    joint, seen = feed(NOISY, {}, works, budget=24, seed=0, rule=Rule(stop=flat))
    assert works(joint.chosen) == 0.0 and len(seen) == 24  # the whole budget, no more


def test_the_joint_search_spends_exactly_its_budget_and_replays():
    from qmse.tuning import search

    def bowl2(s):
        return (math.log2(s["lr"] / 0.3)) ** 2 + (math.log2(s["sigma"] / 0.01)) ** 2

    for budget in (1, 7, 16, 30):
        found, seen = feed(NOISY, {"batch": 64}, bowl2, budget=budget, seed=3)
        assert len(seen) == budget and found.chosen["batch"] == 64
        assert found.chosen == dict(min(seen, key=lambda k: (seen[k].score, k)))
        trials = dict(seen)

        def lookup(s, trials=trials):
            return trials.get(tuple(sorted(s.items())))

        again = search(NOISY, {"batch": 64}, lookup, budget=budget, seed=3)
        assert again.chosen == found.chosen and again.stages == found.stages
    found, _ = feed(NOISY, {}, bowl2, budget=30, seed=3)
    assert abs(math.log2(found.chosen["lr"] / 0.3)) <= 0.5  # refined near the optimum


def test_the_joint_search_widens_past_a_limit_the_best_touches():
    space = Space((Param("lr", (0.01, 0.02, 0.04)),))
    found, seen = feed(space, {}, lambda s: -math.log(s["lr"]), budget=12, seed=1)
    assert max(dict(k)["lr"] for k in seen) > 0.04 * 1.9  # went past the grid's top
    assert found.chosen["lr"] == max(dict(k)["lr"] for k in seen)


def test_the_sweep_figure_draws_coordinate_and_joint_stages(tmp_path):
    from qmse.tuningplot import Sweep, plot_sweeps

    coordinate, _ = run_to_end(Space((Param("lr", (0.1, 0.2, 0.4)),)), {"lr": 0.2}, bowl(0.8))
    joint, _ = feed(NOISY, {}, works, budget=8, seed=0)
    sweeps = [Sweep("row", "coordinate", coordinate.stages), Sweep("row", "joint", joint.stages)]
    assert plot_sweeps(sweeps, tmp_path / "s.png", ylabel="score", log_y=False)
    assert (tmp_path / "s.png").stat().st_size > 0
    assert not plot_sweeps([Sweep("row", "none", [])], tmp_path / "none.png", ylabel="", log_y=True)
    assert not (tmp_path / "none.png").exists()


def test_the_joint_search_breaks_ties_towards_the_inside():
    """A plateau of equal scores that reaches an edge (here every trial ties): the choice lies
    inside the values tried in every parameter, the tie-break deciding only among those."""
    found, seen = feed(NOISY, {}, lambda s: 1.0, budget=16, seed=0)
    for name in ("lr", "sigma"):
        values = [dict(k)[name] for k in seen]
        assert min(values) < found.chosen[name] < max(values)
    # a strict optimum on an edge is still chosen there (see the widening test above)
    found, seen = feed(NOISY, {}, lambda s: 0.0 if s["lr"] >= 0.5 else 1.0, budget=16, seed=0)
    assert found.chosen["lr"] >= 0.5
