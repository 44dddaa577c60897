"""qmse.stepsize: the sweep rule against brute force on known score functions (the chosen
value is the best of the final grid and never on its edge unless bounded out), replay from
partial scores, divergence, coordinate passes over lr and σ, and the yardstick per loss."""

import math

import pytest
from conftest import tiny_config

from qmse.stepsize import Tuning, sweep_name, tune, yardstick


def bowl(centre_k: float, knob: str = "lr", start: float = 0.01):
    """A score with its minimum at start·2^centre_k, quadratic in log2 of the knob."""

    def score(cfg):
        value = cfg.lr if knob == "lr" else cfg.loss_params[knob]
        return (math.log2(value / start) - centre_k) ** 2

    return score


def run_to_end(base, score, tuning):
    """tune, feeding it the scores of the runs it asks for until it decides: what a grid
    does round by round. Returns (answer, every config it asked for)."""
    known, asked = {}, []
    while True:
        answer = tune(base, lambda c: known.get(sweep_name(c)), tuning)
        if not answer.need:
            return answer, asked
        for c in answer.need:
            known[sweep_name(c)] = score(c)
            asked.append(c)


@pytest.mark.parametrize("centre", [-3, -1, 0, 2, 4])
def test_the_choice_is_the_best_point_inside_the_grid(centre):
    base = tiny_config(loss="mse", lr=0.01, seed=0)
    answer, asked = run_to_end(base, bowl(centre), Tuning(seed=7, max_extend=4))
    assert answer.chosen.lr == 0.01 * 2.0**centre and answer.chosen.seed == 7
    assert {c.seed for c in asked} == {7}
    tried = sorted(c.lr for c in asked)
    # brute force over what was run: the chosen value is the best, with a neighbour each side
    assert (
        min(tried, key=lambda lr: bowl(centre)(tiny_config(loss="mse", lr=lr)))
        == 0.01 * 2.0**centre
    )
    assert tried[0] < answer.chosen.lr < tried[-1]
    assert tried == [0.01 * 2.0**k for k in range(min(centre, 0) - 1, max(centre, 0) + 2)]
    (sweep,) = answer.stages
    assert sweep["interior"] and answer.converged


def test_a_best_value_past_the_allowed_range_is_bounded_out():
    base = tiny_config(loss="mse", lr=0.01)
    answer, asked = run_to_end(base, bowl(10), Tuning(max_extend=2))
    assert answer.chosen.lr == 0.01 * 2.0**3  # 1 + max_extend points above the start
    assert not answer.stages[-1]["interior"] and len(asked) == 3 + 2


def test_diverged_runs_are_worst_and_all_diverged_chooses_nothing():
    base = tiny_config(loss="mse", lr=0.01)

    def score(cfg):  # diverges above 0.02, else better the larger
        return math.inf if cfg.lr > 0.02 else -cfg.lr

    answer, _ = run_to_end(base, score, Tuning())
    assert answer.chosen.lr == 0.02 and answer.stages[-1]["interior"]
    answer, asked = run_to_end(base, lambda c: math.inf, Tuning())
    assert answer.chosen is None and answer.need == [] and len(asked) == 3


def test_replay_asks_only_for_what_is_missing():
    base = tiny_config(loss="mse", lr=0.01)
    first = tune(base, lambda c: None, Tuning())
    assert sorted(c.lr for c in first.need) == [0.005, 0.01, 0.02]
    scores = {0.005: 3.0, 0.01: 2.0}  # 0.02 still running: asked again, nothing else
    again = tune(base, lambda c: scores.get(c.lr), Tuning())
    assert [c.lr for c in again.need] == [0.02] and again.chosen is None


def test_label_noise_sweeps_lr_then_sigma_until_a_pass_changes_nothing():
    base = tiny_config(loss="label-noise", loss_params={"sigma": 0.1}, lr=0.01)

    def score(cfg):  # separable bowl: best lr 0.04, best sigma 0.025
        return bowl(2)(cfg) + bowl(-2, "sigma", 0.1)(cfg)

    answer, asked = run_to_end(base, score, Tuning())
    assert answer.chosen.lr == 0.04 and answer.chosen.loss_params == {"sigma": 0.025}
    assert [s["param"] for s in answer.stages] == ["lr", "sigma", "lr", "sigma"]
    assert answer.converged and answer.passes == 2
    assert len({sweep_name(c) for c in asked}) == len(asked)  # no run asked twice
    assert sweep_name(answer.chosen) == "label-noise-m0.9-s100-lr0.04-sigma0.025"


def test_yardstick_is_half_r_squared_for_losses_minimised_at_the_targets():
    assert [yardstick(x) for x in ("mse", "qmse", "expected-qmse", "label-noise")] == [
        "train_mse"
    ] * 4
    assert yardstick("ce") == "train_loss"


def test_a_knob_that_always_wants_less_stops_at_its_floor_and_the_passes_end():
    """Label noise judged on ½‖r‖²: less noise is always better here, so σ runs to the
    bottom of its fixed range (bounded out) and the lr is still chosen inside its grid."""
    base = tiny_config(loss="label-noise", loss_params={"sigma": 0.1}, lr=0.01)

    def score(cfg):
        return bowl(1)(cfg) + cfg.loss_params["sigma"]

    answer, asked = run_to_end(base, score, Tuning(max_extend=2))
    assert answer.converged and answer.chosen.lr == 0.02
    assert answer.chosen.loss_params == {"sigma": 0.1 * 2.0**-3}
    last = {s["param"]: s for s in answer.stages}
    assert not last["sigma"]["interior"] and last["lr"]["interior"]
    assert min(c.loss_params["sigma"] for c in asked) == 0.1 * 2.0**-3  # never below the range


def test_sweeps_can_start_at_one_step_for_both_momenta():
    """start_step 0.1: lr 0.01 with momentum 0.9, lr 0.1 without (0.1·(1 − 0.9) read as 0.01,
    the value a grid's common lr has, not 0.009999…)."""
    tuning = Tuning(start_step=0.1)
    for momentum, lr in ((0.9, 0.01), (0.0, 0.1)):
        base = tiny_config(loss="mse", lr=0.05, momentum=momentum)
        assert tuning.start(base).lr == lr
        answer, _ = run_to_end(base, bowl(1, start=lr), tuning)
        assert answer.chosen.lr == 2 * lr
