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
