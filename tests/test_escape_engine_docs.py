"""docs/escape.md's opening and its description of the problem, the engine and the protocol
(from "The teacher–student problem" to "Problems beyond teacher–student") against the code
it describes: every number there is a constant, a default, a grid or a threshold of the code
(or a tolerance of the test it names), read here and quoted as the section writes it. What
is left is the formulas' own digits and the cited papers' years, on a short list."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from collections import Counter
from pathlib import Path

import torch
from conftest import Doc, superscript
from conftest import escape_row as row

from qmse import stats
from qmse.escape import cells, engine, figures, population, problems, report, rules
from qmse.escape import tuning as widening
from qmse.escape.config import DISTINCT_TOL, TUNE_SEEDS, EscapeConfig
from qmse.escape.methods import GRID_RATIO, HELD_OUT, METHODS, get_method
from qmse.escape.rows import Row
from qmse.tuning import Param, Space, _local

TESTS = Path(__file__).resolve().parent
INTRO = ("# The escape benchmark", "## The third edition")  # cites papers: years alone
SPAN = ("## The teacher–student problem", "## Problems beyond teacher–student")


def defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(EscapeConfig)}


def function_source(test_file: str, name: str) -> tuple[str, ast.FunctionDef]:
    text = (TESTS / test_file).read_text()
    (fn,) = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef)
             and n.name == name]  # fmt: skip
    return ast.get_source_segment(text, fn), fn


def tolerances(test_file: str, name: str) -> list[dict[str, float]]:
    """The rtol/atol of every `assert_close` in one test function, in order."""
    _, fn = function_source(test_file, name)
    return [
        {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        for call in ast.walk(fn)
        if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "assert_close"
    ]


def literal(fn, pattern: str) -> float:
    """The number `pattern`'s group matches in `fn`'s source (a threshold written inline)."""
    (value,) = re.findall(pattern, inspect.getsource(fn))
    return float(value)


def frac(x: float) -> str:
    """1/64 for 0.015625, 2 for 2.0."""
    return f"{x:g}" if x >= 1 else f"1/{round(1 / x)}"


def teacher_student() -> list[str]:
    loss, grad = tolerances(
        "test_teacher_student.py", "test_loss_and_grad_match_bruteforce_autograd"
    )
    assert loss["rtol"] == loss["atol"] and grad["atol"] < grad["rtol"]
    mc, _ = function_source("test_teacher_student.py", "test_loss_matches_monte_carlo")
    draws = int(re.search(r"10\*\*(\d+)", mc)[1])
    ses = int(re.search(r"< (\d+) \* se", mc)[1])
    return [
        f"(to {superscript(loss['atol'])} in the loss, {superscript(grad['rtol'])} relative "
        "in the gradient)",
        f"{superscript(10**draws)}-sample Monte Carlo (within {ses} standard errors)",
    ]


def engine_rules() -> list[str]:
    strict = literal(problems.certify, r"scale = ([\d.e-]+) \* max\(1\.0, eig\.abs\(\)\.max")
    return [
        f"population loss < {superscript(engine.STUCK_LOSS)} at the end",
        f"(every {engine.EVAL_EVERY})",
        f"‖W‖_F = {superscript(engine.DIVERGED_NORM)}",
        f"(gradient ≤ {superscript(population.GD_TOL)}, loss ≥ {superscript(engine.STUCK_LOSS)})",
        f"(canonical forms equal to {superscript(DISTINCT_TOL)})",
        f"(gradient ≤ {superscript(problems.certify.__kwdefaults__['grad_tol'])},",
        f"smallest Hessian eigenvalue above {superscript(strict)} of the largest in magnitude",
    ]


def methods_table() -> list[str]:
    beta = 1 - get_method("momentum").default("one_minus_beta")
    adam = rules.ADAM
    window, threshold = rules.PGD["window"], rules.PGD["grad_threshold"]
    return [
        f"step {population.GD_LR:g}, to ‖∇‖ ≤ {superscript(population.GD_TOL)}",
        f"b ← {beta:g}·b + g",
        f"Adam ({adam['beta1']:g}, {adam['beta2']:g}, {superscript(adam['eps'])})",
        f"SGD; every {window} steps,",
        f"(lr·{window})) is ≤ {threshold:g}",
        f"the next {window} steps",
        f"on {HELD_OUT:,} fresh samples (Jin",
        f"lower loss on {HELD_OUT:,} fresh samples",
        f"differ by at most {GRID_RATIO:g}×",
    ]


def tuning_rules() -> list[str]:
    d = defaults()
    param = Param("lr", (1.0, 2.0))
    stop = widening.summarize(
        torch.tensor([math.inf]), torch.tensor([False]), torch.tensor([True]),
        torch.tensor([0.0]), 0.0,
    )  # fmt: skip
    return [
        f"(Xavier seeds {superscript(TUNE_SEEDS)} + i;",
        f"on seeds {superscript(TUNE_SEEDS)} … {superscript(TUNE_SEEDS)} + {d['tune_pool'] - 1}), "
        f"{d['tune_seeds']} per value by default",
        f"(at most {widening.MAX_PASSES} passes)",
        f"by a factor of {param.factor:g} and the new value is run",
        f"or {param.max_extend} values have been added on that side (a factor "
        f"{round(param.factor**param.max_extend)})",
        f"(a diverged start counts as {superscript(10 ** stop['median_log10_loss'])})",
    ]


def nested_items() -> list[str]:
    """Snippets of the tuning rule's nested list items, which `prose` reads as code (they are
    indented): checked against the raw text, their numbers among those the guard skips."""
    return [
        f"‖W_T − W_0‖_F / ‖W_0‖_F is below {superscript(widening.FROZEN)}",
        f"the median log₁₀ final loss by more than {widening.FLAT_LOG10:g}",
    ]


def statistics() -> list[str]:
    d = defaults()
    wilson = inspect.signature(stats.wilson).parameters["confidence"].default
    newcombe = inspect.signature(stats.paired_rate_difference).parameters["confidence"].default
    alpha = inspect.signature(stats.tost_rates).parameters["alpha"].default
    holm = literal(cells.declared_tests, r"if p < ([\d.]+):")
    bold = literal(report._paired_cell, r"value < ([\d.]+) else p")
    margin = d["equivalence_margin"]
    pct = lambda x: f"{round(100 * x)} %"  # noqa: E731
    return [
        f"Wilson {pct(wilson)} intervals",
        f"bold below {bold:g}.",
        f"Newcombe's hybrid score {pct(newcombe)} interval",
        f"({margin:g}: equivalent when the {pct(1 - 2 * alpha)} interval of the difference lies "
        f"within ±{margin:g}, two one-sided tests at {pct(alpha)})",
        f"where the Holm p is below {holm:g}",
        f'"equivalent within ±{margin:g}"',
    ]


def protocol() -> list[str]:
    d = defaults()
    gap = rules.BETA_GAP
    noises = (rules.LABEL_SIGMA, rules.GRAD_SIGMA, rules.ANTI_SIGMA)
    (reach,) = {round(math.log2(g[0] / g[-1])) for g in noises}
    assert all(g[0] / g[-1] == 2.0**reach for g in noises)
    space = Space((Param("lr", (1.0, 2.0)),))
    ratios = sorted(p["lr"] for p in _local(space, {"lr": 1.0}))
    quarters = sorted({round(4 * math.log2(r)) for r in ratios})
    assert quarters == [-2, -1, 1, 2]
    return [
        f"on a log grid from {gap[0]:g} to {gap[-1]:g} (β {1 - gap[0]:g} to {1 - gap[-1]:g})",
        f"reach 2{str(reach).translate(str.maketrans('-0123456789', '⁻⁰¹²³⁴⁵⁶⁷⁸⁹'))} of their "
        "largest value",
        f"runs from {frac(rules.PGD_RADIUS[0])} to {frac(rules.PGD_RADIUS[-1])} of ‖W‖_F",
        f"({d['tune_budget']}): a joint search",
        f"(within {Param('lr', (1.0,)).max_extend} doublings of the grid",
        "2^(±1/4) and 2^(±1/2)",
    ]


def figures_and_profiles() -> list[str]:
    per_family = Counter(m.family for m in METHODS.values())
    assert (
        max(per_family.values()) <= 8
        and figures.MARKERS
        and "i % 8" in inspect.getsource(figures._draw_method)
    )
    # a profile's rate is (failures + ½)/(starts + 1): B with 1 failure of 9 is 3× A's 0
    rows = [row("a", 6, "0" * 9), row("b", 6, "1" + "0" * 8)]
    profile = figures.performance_profile(rows, [2.99, 3.01])
    assert profile["b"] == [0.0, 1.0]
    return ["at most 8 methods a panel", "(failures + ½)/(starts + 1)"]


def noise_and_widths() -> list[str]:
    (tol,) = tolerances(
        "test_escape_rules.py",
        "test_qmse_gradient_is_label_noise_of_scale_2r2_on_the_expected_qmse_landscape",
    )
    ks = sorted(population.PUBLISHED)
    runs = re.search(r"([\d,]+) runs per k", inspect.getsource(population))[1]
    assert 14 not in population.PUBLISHED and 16 in population.PUBLISHED
    return [
        f"∇label-noise(ξ = 2v r²) − ∇MSE to {superscript(tol['rtol'])}.",
        f"(2018, Table 1, {runs} runs, student n = k)",
        f"the code has the rate: k = {', '.join(map(str, ks))}.",
        "Other widths, k = 14 and the n = k + 1 student",
        "k = 14 and 16 run like any other k",
    ]


WHITELIST = [
    r"N\(0, I_k\)|N\(0, I/d\)|N\(0, I\)|N\(0, σ²I?\)",
    r"fixed to 1",
    r"rank-1",
    r"\(2π\)",
    r"θ = 0 or π",
    r"\(1 − f\)",
    r"ξ_\{t\+1\}",
    r"(et al\.|Mobahi|et al\.,?|ICML|NeurIPS) (19|20)\d\d",
    r"C = 1, v = ±1",
    r"v² = 1",
    r"r³|2v r²|2r²|r\)²|ξ\)²|y\)²|f\)²|‖r‖⁴|‖r‖²/\(2C\)|\)²r",
    r"0 … S−1",
    r"1 − β",
    r"rule 3",
    r"\b[1-4]\. (?=[A-Za-z])",  # the tuning rule's numbered steps
    r"n = k \+ 1",
    r"annealed to 0",
    r"ci95_(low|high)",
    r"escape-2",
    r"\(1 \+ cos",
]


def test_the_engine_and_protocol_sections_are_the_code():
    assert {"ci95_low", "ci95_high"} <= {f.name for f in dataclasses.fields(Row)}
    doc = Doc("docs/escape.md", [INTRO, SPAN])
    for part in (teacher_student, engine_rules, methods_table, tuning_rules, statistics,
                 protocol, figures_and_profiles, noise_and_widths):  # fmt: skip
        doc.quote(*part())
    doc.check(WHITELIST)
    text = Path(TESTS.parent / "docs" / "escape.md").read_text()
    raw = " ".join(text[text.index(SPAN[0]) : text.index(SPAN[1])].split())
    assert all(s in raw for s in nested_items())
