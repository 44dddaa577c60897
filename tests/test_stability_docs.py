"""docs/stability.md says only what docs/stability/phase-*.json give.

The tables between the markers are `qmse.escape.phase.markdown` of each JSON, verbatim;
every number of the prose is recomputed below from the JSON (through `qmse.escape.phase`'s
classification) and its exact text looked up in the document. Then a guard: with those
snippets, the tables, code blocks, inline code and link targets taken out, no number may
remain but the few that are not results (TOKENS: the widths k, β and B values of the grid,
the constants of the derivation, the year of the reference).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from qmse.escape import phase

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "stability.md"
NAMES = ("k8", "sensing", "k8-qmse", "k8-expected-qmse")
DATA = {name: ROOT / "docs" / "stability" / f"phase-{name}.json" for name in NAMES}
WORDS = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SUP = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
TOKENS = {"0", "1", "2", "4", "8", "10", "16", "64", "256", "0.5", "0.8", "0.9", "0.95", "0.99",
          "2018"}  # fmt: skip


def load(name: str) -> dict:
    return json.loads(DATA[name].read_text())


def text() -> str:
    """The document with each paragraph's lines joined (a quote matches across wraps)."""
    out: list[str] = []
    for line in DOC.read_text().split("\n"):
        prev = out[-1] if out else ""
        fresh = not line.strip() or not prev.strip() or line.startswith(("|", "#", "- ", "<"))
        if fresh or prev.startswith(("|", "#", "<")):
            out.append(line)
        else:
            out[-1] = prev.rstrip() + " " + line.strip()
    return "\n".join(out)


def g(x: float) -> str:
    return f"{x:.4g}"


def power(x: float) -> str:
    """10⁻³ for 0.001."""
    e = round(math.log10(x))
    assert x == pytest.approx(10.0**e, rel=1e-12)
    return f"10{str(e).translate(SUP)}"


def pct(x: float) -> str:
    return f"{x:.0%}".replace("%", " %")


def at_end(data: dict) -> dict:
    """The diagram as the end-of-budget rule reads it: escaped where the objective was below
    the success threshold when the budget ran out, no finishing descent."""
    out = json.loads(json.dumps(data))
    for p in out["panels"]:
        p["escaped"], p["moved"] = p["end_escaped"], [0] * len(p["lrs"])
        p["stuck"] = [p["starts"] - e - d for e, d in zip(p["end_escaped"], p["diverged"])]
    return out


def steps_between(lo: float, hi: float) -> int:
    return round(math.log(hi / lo) / math.log(phase.STEP))


def minibatch(data: dict) -> list[dict]:
    return [p for p in data["panels"] if p["batch"] is not None]


def second(data: dict, p: dict) -> tuple[float, float]:
    return phase.thresholds(data, p, "second moment")


def common(data: dict, name: str) -> list[str]:
    """The sentences both families' sections share: what the finishing descent changed, and
    how many minibatch panels predict a band. Also: no run moved, no finish hit its cap."""
    cells = phase.classify(data, "second moment")
    ended = phase.classify(at_end(data), "second moment")
    late = sum(sum(p["escaped"]) - sum(p["end_escaped"]) for p in data["panels"])
    late99 = sum(sum(p["escaped"]) - sum(p["end_escaped"]) for p in data["panels"]
                 if p["beta"] == 0.99)  # fmt: skip
    assert not any(sum(p["moved"]) or sum(p["unfinished"]) for p in data["panels"])
    changed = sum(a["left"] != b["left"] for a, b in zip(cells, ended))
    with_band = [p for p in minibatch(data) if second(data, p)[0] < second(data, p)[1]]
    return [
        f"{name}: {late} of the {sum(sum(p['escaped']) for p in data['panels'])} escapes are "
        f"found only by the finish ({late99} of them at β = 0.99)",
        f"the end-of-budget rule would change the verdict of {changed} of the {len(cells)} cells",
        f"a band in {len(with_band)} of the {len(minibatch(data))} minibatch panels",
    ]


def accuracies(data: dict) -> dict[str, str]:
    return {rule: pct(phase.confusion(data, rule)["accuracy"]) for rule in phase.RULES}


def claims_k8(data: dict) -> list[str]:
    proto, (minimum,) = data["protocol"], data["minima"]
    panels = {(p["beta"], p["batch"]): p for p in data["panels"]}
    edges = {key: phase.measured_edges(p) for key, p in panels.items()}
    out = common(data, "At k = 8")
    acc, acc_end = accuracies(data), accuracies(at_end(data))
    out.append(f"and the second-moment criterion would score {acc_end['second moment']} "
               f"instead of {acc['second moment']}")  # fmt: skip
    out += [
        f"gd-population from the Xavier seeds 0 … {proto['seeds'] - 1} stops at "
        f"{minimum['count']} certified strict minima, all of one loss, {minimum['loss']}",
        f"from 2{str(int(math.log2(proto['samples']))).translate(SUP)} Monte Carlo inputs in "
        f"{proto['groups']} groups",
        f"a factor {2 ** (proto['below'] / 8):g} below the lower predicted edge",
    ]
    lam, lam_g = minimum["eigenvalues"][1], data["global_minimum"]["eigenvalues"][1]
    assert lam < lam_g
    out.append(f"λ_max {g(lam)} against the teacher's {g(lam_g)}")
    # the upper edge
    ratio = {k: edges[k]["diverged"] / second(data, p)[1] for k, p in panels.items()
             if p["batch"] is not None}  # fmt: skip
    calm = [r for (beta, _), r in ratio.items() if beta < 0.99]
    wild = [r for (beta, _), r in ratio.items() if beta == 0.99]
    assert min(calm) >= 1 and max(calm) <= phase.STEP**3 * (1 + 1e-5) < min(wild)
    out.append(f"lies {min(calm):.2f} to {max(calm):.2f} times above it (at most three grid "
               f"steps) in every minibatch panel with β ≤ 0.95, and {min(wild):.2f} to "
               f"{max(wild):.2f} times above it at β = 0.99")  # fmt: skip
    assert all(c["outcome"] == "escaped" for c in phase.classify(data, "second moment")
               if c["beta"] == 0.99 and c["predicted"] == "diverged" and c["batch"] is not None
               and c["outcome"] != "diverged")  # fmt: skip
    # the population panels
    for (beta, batch), p in panels.items():
        if batch is not None:
            continue
        past = next(j for j, lr in enumerate(p["lrs"]) if lr >= float(f"{second(data, p)[0]:.6g}"))
        assert p["stuck"][:past] == [1] * past
        assert all(x == pytest.approx(minimum["loss"], abs=1e-6) for x in p["stuck_loss"][:past])
        assert p["diverged"][past + 1 :] == [1] * (len(p["lrs"]) - past - 1)
        expected = {0.0: "stuck", 0.5: "stuck", 0.8: "escaped"}.get(beta, "diverged")
        assert p[expected][past] == 1, (beta, expected)
        if expected == "stuck":  # a cycle far from the minimum at the end of the budget
            assert p["stuck_loss"][past] > 10 * minimum["loss"]
    cycles = [panels[(b, None)]["stuck_loss"] for b in (0.0, 0.5)]
    out.append(
        "ends in a 2-cycle of higher loss ("
        + " and ".join(g(next(x for x in c if x > 10 * minimum["loss"])) for c in cycles)
        + " at the end of the budget)"
    )
    unstable_stuck = [c for c in phase.classify(data, "second moment")
                      if c["predicted_unstable"] and not c["left"]]  # fmt: skip
    assert {(c["beta"], c["batch"]) for c in unstable_stuck} == {(0.0, None), (0.5, None)}
    out.append(f"the {len(unstable_stuck)} cells of the table that are unstable but stuck")
    # bands and escapes
    nobands = [k for k, p in panels.items() if p["batch"] is not None
               and second(data, p)[0] >= second(data, p)[1]]  # fmt: skip
    assert sorted(nobands) == sorted(k for k in panels if k[1] is not None
                                     and edges[k]["escaped"] is None)  # fmt: skip
    assert sorted(nobands) == [(0.0, 64), (0.0, 256), (0.5, 256)]
    sgd = second(data, panels[(0.0, 64)])
    out.append(f"({g(sgd[0])} at the minimum, {g(sgd[1])} at the teacher at B = 64)")
    # the lower edge
    below = {k: steps_between(edges[k]["escaped"], second(data, p)[0])
             for k, p in panels.items() if k[1] is not None and edges[k]["escaped"]}  # fmt: skip
    assert all(s >= 1 for s in below.values())
    out.append(f"they do so already {min(below.values())} to {max(below.values())} grid steps "
               f"below the predicted onset")  # fmt: skip
    assert all(below[(0.0, B)] == min(below.values()) for B in (4, 16))
    small = [s for (_, B), s in below.items() if B == 4]
    big = [s for (beta, B), s in below.items() if beta >= 0.9 and B >= 16]
    out.append(f"(B = 4: {min(small)} or {max(small)} grid steps at every β; β ≥ 0.9 and "
               f"B ≥ 16: {min(big)} to {max(big)})")  # fmt: skip
    cells = phase.classify(data, "second moment")
    stable_left = [c for c in cells if c["left"] and not c["predicted_unstable"]]
    escaping = [c for c in stable_left if c["outcome"] == "escaped"]
    others = [c for c in stable_left if c["outcome"] != "escaped"]
    assert [(c["beta"], c["batch"], c["lr"]) for c in others] == [
        (0.0, 64, edges[(0.0, 64)]["left"])
    ]
    assert g(edges[(0.0, 64)]["left"]) == g(sgd[1])
    out.append(f"{len(escaping)} of the table's {len(stable_left)} stable-but-left cells")
    p = panels[(0.0, 16)]
    j = p["lrs"].index(edges[(0.0, 16)]["escaped"])
    out.append(f"rises from {p['stuck_loss'][0]:.3g} at the smallest step size to "
               f"{p['stuck_loss'][j - 1]:.3g} just below")  # fmt: skip
    # outcomes past the global threshold at beta = 0.99
    late = [c for c in cells if c["predicted"] == "diverged" and c["outcome"] == "escaped"]
    out.append(f"{len(late)} cells where both points are predicted unstable")
    out.append(f"{sum(c['beta'] == 0.99 for c in late)} of them at β = 0.99")
    simple = {B: phase.thresholds(data, panels[(0.9, B)], "lr/(1-β)")[0] for B in (16, 64)}
    out.append(f"puts the onset at {g(simple[16])} for every batch size at β = 0.9, too late "
               f"for B = 16 (most starts escape from {g(edges[(0.9, 16)]['escaped'])}) and too "
               f"early for B = 64 (from {g(edges[(0.9, 64)]['escaped'])})")  # fmt: skip
    return out


def claims_sensing(data: dict) -> list[str]:
    proto, (minimum,) = data["protocol"], data["minima"]
    panels = {(p["beta"], p["batch"]): p for p in data["panels"]}
    edges = {key: phase.measured_edges(p) for key, p in panels.items()}
    out = common(data, "In matrix sensing")
    acc, acc_end = accuracies(data), accuracies(at_end(data))
    assert acc["second moment"] == acc_end["second moment"]
    out.append(f"the second-moment criterion scores {acc['second moment']} under either rule")
    out += [
        f"δ = {proto['delta']:g}, n = {proto['n']}, m = {proto['m']} measurements, instance "
        f"seed {proto['seed']}",
        f"from the starts of seeds 0 … {proto['seeds'] - 1} stops at {minimum['count']} "
        f"certified strict minima, all at f = {minimum['loss']:g}",
        f"a factor {2 ** (proto['below'] / 8):g} for matrix sensing",
    ]
    lam = minimum["eigenvalues"]
    delta, m = proto["delta"], proto["m"]
    assert lam[0] == pytest.approx(4 * (1 + delta) * (2 * delta - 1) / (2 * m), rel=1e-12)
    assert lam[1] == pytest.approx(8 * delta / (2 * m), rel=1e-12)
    lam_g = data["global_minimum"]["eigenvalues"][1]
    out.append(f"eigenvalues {g(lam[0])} and {g(lam[1])}; the global minimum's λ_max is {g(lam_g)}")
    # escapes everywhere, bands or not
    mb = {k: p for k, p in panels.items() if k[1] is not None}
    nobands = [k for k, p in mb.items() if second(data, p)[0] >= second(data, p)[1]]
    assert all(edges[k]["escaped"] is not None for k in mb)
    out.append(f"most starts escape at some step size in all {len(mb)}, the {len(nobands)} "
               f"without a band included")  # fmt: skip
    # the lower edge
    below = {k: steps_between(edges[k]["escaped"], second(data, p)[0]) for k, p in mb.items()}
    early = [s for s in below.values() if s > 0]
    (late,) = [k for k, s in below.items() if s <= 0]
    assert late == (0.0, 256) and below[late] == -1
    out.append(f"in {len(early)} of the {len(mb)} minibatch panels most starts escape already "
               f"{min(early)} to {max(early)} grid steps below the predicted onset (a factor of "
               f"up to {phase.STEP ** max(early):.1f})")  # fmt: skip
    # the upper edge
    ratio = {k: edges[k]["diverged"] / second(data, p)[1] for k, p in mb.items()}
    sgd = [r for (beta, _), r in ratio.items() if beta == 0]
    early_div = [r for (beta, B), r in ratio.items() if beta in (0.8, 0.9, 0.95) and B >= 64]
    out.append(f"lies {min(ratio.values()):.2f} to {max(ratio.values()):.2f} times the global "
               f"minimum's threshold: past it for SGD ({min(sgd):.2f} to {max(sgd):.2f}), "
               f"well before it with β ∈ {{0.8, 0.9, 0.95}} and B ≥ 64 ({min(early_div):.2f} to "
               f"{max(early_div):.2f})")  # fmt: skip
    assert max(early_div) < 1 < min(sgd)
    cells = phase.classify(data, "second moment")
    stuck_div = [c for c in cells if c["predicted"] == "stuck" and c["outcome"] == "diverged"]
    out.append(f"{len(stuck_div)} cells predicted stuck diverge")
    # the population panels
    cycles = {}
    for (beta, batch), p in panels.items():
        if batch is not None:
            continue
        past = next(j for j, lr in enumerate(p["lrs"]) if lr >= float(f"{second(data, p)[0]:.6g}"))
        assert p["stuck"][:past] == [1] * past
        assert all(x == pytest.approx(minimum["loss"], abs=1e-9) for x in p["stuck_loss"][:past])
        n = next(j for j in range(past, len(p["lrs"])) if p["diverged"][j]) - past
        assert p["diverged"][past + n :] == [1] * (len(p["lrs"]) - past - n)
        assert all(p["stuck_loss"][j] > minimum["loss"] * 1.01 for j in range(past, past + n))
        cycles[beta] = n
    assert all(n == 0 for beta, n in cycles.items() if beta >= 0.8)
    out.append(f"at β = 0 at the first {WORDS[cycles[0.0]]} points past it and at β = 0.5 at "
               f"the first {'one' if cycles[0.5] == 1 else cycles[0.5]}")  # fmt: skip
    unstable_stuck = [c for c in cells if c["predicted_unstable"] and not c["left"]]
    pop = [c for c in unstable_stuck if c["batch"] is None]
    rest = [c for c in unstable_stuck if c["batch"] is not None]
    assert {(c["beta"], c["batch"]) for c in rest} == {(0.0, 256)}
    out.append(f"These cycles are {len(pop)} of the table's {len(unstable_stuck)} "
               f"unstable-but-stuck cells; the other {len(rest)} are SGD at B = 256")  # fmt: skip
    acc_all = {r: phase.confusion(data, r) for r in phase.RULES}
    out.append(f"outcome accuracy {pct(acc_all['second moment']['outcome_accuracy'])} against "
               f"{pct(acc_all['lr/(1-β)']['outcome_accuracy'])}")  # fmt: skip
    return out


def claims_losses(k8: dict, qmse: dict, expected: dict) -> list[str]:
    """QMSE and expected-QMSE from MSE's minimum, against MSE's panels at the same (β, B)."""
    mse = {(p["beta"], p["batch"]): p for p in k8["panels"]}
    out = []
    for name, data in (("QMSE", qmse), ("expected-QMSE", expected)):
        (minimum,) = data["minima"]
        assert minimum["loss"] == k8["minima"][0]["loss"] and data["protocol"]["below"] == 24
        out.append(f"{name}: Newton shift {minimum['newton_shift']:.3g}, λ_max "
                   f"{g(minimum['eigenvalues'][1])}")  # fmt: skip
        p = next(p for p in data["panels"] if (p["beta"], p["batch"]) == (0.0, 16))
        lo, hi = second(data, p)
        assert hi == pytest.approx(second(k8, mse[(0.0, 16)])[1], rel=1e-6)  # MSE's at r = 0
        out.append(f"[{g(lo)}, {g(hi)}) for {name}")
        escaping = [(p["beta"], p["batch"]) for p in data["panels"]
                    if phase.measured_edges(p)["escaped"] is not None]  # fmt: skip
        assert escaping == [(0.9, 64)]
        for p in data["panels"]:  # "the largest share that escape is below MSE's"
            assert max(p["escaped"]) < max(mse[(p["beta"], p["batch"])]["escaped"])
        ratio = [phase.measured_edges(p)["diverged"] / second(data, p)[1] for p in data["panels"]]
        out.append(f"{min(ratio):.2f} to {max(ratio):.2f} times the global minimum's threshold "
                   f"for {name}")  # fmt: skip
    p = mse[(0.0, 16)]
    out.append(f"against [{g(second(k8, p)[0])}, {g(second(k8, p)[1])}) for MSE")
    ratio = [phase.measured_edges(mse[(p["beta"], p["batch"])])["diverged"] / second(k8, p)[1]
             for p in qmse["panels"]]  # fmt: skip
    out.append(f"for MSE in the same panels {min(ratio):.2f} to {max(ratio):.2f} times")
    q = {(p["beta"], p["batch"]): p for p in qmse["panels"]}
    se = q[(0.0, 16)]["predicted"]["minimum"]
    out.append(f"({g(se['second'])} ± {se['second_se']:.2g} at β = 0 and B = 16)")
    for name, data in (("QMSE", qmse), ("expected-QMSE", expected)):
        s = phase.seconds(data)
        out.append(f"{name}: {data['minima_seconds']} s for the minima, {s['prediction']} s for "
                   f"the predictions, {s['measurement']} s for the runs")  # fmt: skip
    return out


def claims(k8: dict, sensing: dict, qmse: dict, expected: dict) -> list[str]:
    out = claims_k8(k8) + claims_sensing(sensing) + claims_losses(k8, qmse, expected)
    for name, data in (("k = 8", k8), ("matrix sensing", sensing)):
        s = phase.seconds(data)
        out.append(f"{name}: {data['minima_seconds']} s for the minima, {s['prediction']} s "
                   f"for the predictions, {s['measurement']} s for the runs and their finishing "
                   f"descents")  # fmt: skip
    proto = k8["protocol"]
    assert proto["finish_lr"] == sensing["protocol"]["finish_lr"]
    out += [
        f"{proto['starts']} runs of {proto['steps']} steps",
        f"at step {proto['finish_lr']:g} until the gradient norm is at most "
        f"{power(proto['finish_tol'])}, or {proto['finish_steps']:,} steps",
        f"below {power(proto['success'])} for teacher–student and "
        f"{power(sensing['protocol']['success'])} for matrix sensing",
        f"exceeded {power(proto['diverged_norm'])}",
        f"by more than {power(proto['moved'])} relative",
        f"{WORDS[proto['above']]} steps above the upper one",
    ]
    return out


@pytest.mark.parametrize("name", sorted(DATA))
def test_the_tables_are_the_committed_results(name):
    doc = DOC.read_text()
    block = doc.split(f"<!-- tables: qmse.escape.phase.markdown(docs/stability/phase-{name}.json) "
                      "-->\n")  # fmt: skip
    assert len(block) == 2
    assert block[1].split("<!-- end of tables -->")[0] == phase.markdown(load(name)) + "\n"


def test_every_number_in_the_prose_is_recomputed():
    doc = text()
    rest = doc
    for snippet in claims(*(load(name) for name in NAMES)):
        assert snippet in doc, snippet
        rest = rest.replace(snippet, " ")
    rest = re.sub(r"<!-- tables.*?<!-- end of tables -->", " ", rest, flags=re.S)
    rest = re.sub(r"```.*?```", " ", rest, flags=re.S)
    rest = re.sub(r"`[^`]*`", " ", rest)
    rest = re.sub(r"\]\([^)]*\)", "]", rest)
    left = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?", rest)) - TOKENS
    assert not left, sorted(left)
