"""docs/stability.md says only what docs/stability/phase-k8.json gives.

The tables between the markers are `qmse.escape.phase.markdown` of the JSON, verbatim; every
number of the prose is recomputed below from the JSON (through `qmse.escape.phase`'s
classification) and its exact text looked up in the document. Then a guard: with those
snippets, the tables, code blocks, inline code and link targets taken out, no number may
remain but the few that are not results (TOKENS: k, β and B values of the protocol, the
constants of the derivation, the year of the reference).
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
DATA = ROOT / "docs" / "stability" / "phase-k8.json"
WORDS = {4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
TOKENS = {"0", "1", "2", "4", "8", "10", "16", "64", "256", "0.5", "0.8", "0.9", "0.95",
          "0.99", "2018"}  # fmt: skip


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


def claims(data: dict) -> list[str]:
    """Every number-bearing snippet of the prose, computed from the JSON."""
    proto, (minimum,) = data["protocol"], data["minima"]
    panels = {(p["beta"], p["batch"]): p for p in data["panels"]}
    second = lambda p: phase.thresholds(data, p, "second moment")  # noqa: E731
    edges = {key: phase.measured_edges(p) for key, p in panels.items()}
    out = [
        f"gd-population from the Xavier seeds 0 … {proto['seeds'] - 1}",
        f"stops at {minimum['count']} certified strict minima, all of one loss, {minimum['loss']}",
        f"{proto['starts']} runs of {proto['steps']} steps",
        f"a grid {proto['step']} apart from a factor {2 ** (proto['below'] / 8):g} below the "
        f"lower predicted edge to {WORDS[proto['above']]} steps above the upper one",
        f"β ∈ {{{', '.join(sorted({f'{b:g}' for b, _ in panels}))}}}",
        f"B ∈ {{{', '.join(str(B) for B in sorted({B for _, B in panels if B}))}}}",
        "below 10⁻³" if proto["stuck_loss"] == 1e-3 else "?",
        "exceeded 10⁴" if proto["diverged_norm"] == 1e4 else "?",
        f"from 2{str(int(math.log2(proto['samples']))).translate(SUP)} samples in "
        f"{proto['groups']} groups",
    ]
    ratio = {key: p["lrs"][p["lrs"].index(edges[key]["diverged"])] / second(p)[1]
             for key, p in panels.items()}  # fmt: skip
    wild = {(beta, B): r for (beta, B), r in ratio.items() if beta == 0.99 and B is not None}
    calm = [r for key, r in ratio.items() if key not in wild]
    assert len(wild) == 2 and len({f"{r:.2f}" for r in wild.values()}) == 1
    out.append(f"lies {min(calm):.2f} to {max(calm):.2f} times above it, at most two grid "
               f"steps, in every panel but the two at β = 0.99 with minibatches, where it lies "
               f"{min(wild.values()):.2f} times above it")  # fmt: skip
    assert max(calm) <= phase.STEP**2 * (1 + 1e-5) < min(wild.values())
    for (beta, batch), p in panels.items():
        if batch is not None:
            continue
        past = next(j for j, lr in enumerate(p["lrs"]) if lr >= second(p)[0])
        below = p["stuck_loss"][:past]
        assert all(x == pytest.approx(minimum["loss"], abs=1e-6) for x in below)
        assert p["stuck"][past] == 0 or p["stuck_loss"][past] > 2 * minimum["loss"]
        assert p["diverged"][past + 1 :] == [1] * (len(p["lrs"]) - past - 1)
        if beta in (0.0, 0.5):  # "ends in a cycle of higher loss, counted stuck"
            assert p["stuck"][past] == 1
    lam, lam_g = minimum["eigenvalues"][1], data["global_minimum"]["eigenvalues"][1]
    assert lam < lam_g
    out.append(f"λ_max {g(lam)} against {g(lam_g)}")
    sgd = second(panels[(0.0, 64)])
    assert sgd[0] > sgd[1] and edges[(0.0, 64)]["escaped"] is None
    out.append(f"({g(sgd[0])} at the minimum, {g(sgd[1])} at the teacher)")
    for B in (16, 64):
        p = panels[(0.9, B)]
        lo, hi = second(p)
        out.append(f"[{g(lo)}, {g(hi)}) at B = {B}")
        onset = next(j for j, lr in enumerate(p["lrs"]) if lr >= float(f"{lo:.6g}"))
        assert p["escaped"][onset] == p["starts"]  # "at their lower edge every start escapes"
    steps = [round(math.log(second(p)[0] / edges[k]["escaped"]) / math.log(phase.STEP))
             for k, p in panels.items() if edges[k]["escaped"] is not None]  # fmt: skip
    out.append(f"they do so already {min(steps)} to {max(steps)} grid steps below the "
               f"predicted onset")  # fmt: skip
    cells = phase.classify(data, "second moment")
    stable_left = [c for c in cells if c["left"] and not c["predicted_unstable"]]
    escaping = [c for c in stable_left if c["outcome"] == "escaped"]
    assert [(c["beta"], c["batch"]) for c in stable_left if c not in escaping] == [(0.0, 64)]
    assert len(escaping) == sum(steps)
    out.append(f"those {len(escaping)} cells are {len(escaping)} of the table's "
               f"{len(stable_left)} stable-but-left ones")  # fmt: skip
    unstable_stuck = [c for c in cells if c["predicted_unstable"] and not c["left"]]
    losses = []
    for c in unstable_stuck:
        p = panels[(c["beta"], c["batch"])]
        losses.append(p["stuck_loss"][p["lrs"].index(c["lr"])])
    low = [x for x in losses if x < minimum["loss"]]
    high = [x for x in losses if x >= minimum["loss"]]
    out.append(f"other errors are {len(unstable_stuck)} cells past the onset")
    out.append(f"below the minimum's in {len(low)} of them")
    out.append(f"from {g(min(high))} to {g(max(high))} in the others")
    for phrase in ("in", "within", "after"):
        out.append(f" {phrase} {proto['steps']} steps")
    wide = panels[(0.99, 16)]
    assert max(wide["escaped"]) <= wide["starts"] / 2
    out.append(f"falls to {g(min(x for x in wide['stuck_loss'] if x is not None))} around")
    p = panels[(0.0, 16)]
    below = p["lrs"].index(edges[(0.0, 16)]["escaped"])
    assert p["lrs"][below + 1] >= float(f"{second(p)[0]:.6g}")  # the last point below the onset
    out.append(f"rises from {p['stuck_loss'][0]:.2g} at the smallest step size to "
               f"{p['stuck_loss'][below]:.3g} just below the onset")  # fmt: skip
    simple = {B: phase.thresholds(data, panels[(0.9, B)], "lr/(1-β)")[0] for B in (16, 64)}
    assert g(simple[16]) == g(simple[64])
    out.append(f"puts the onset at {g(simple[16])} for both batch sizes, too late for B = 16 "
               f"(most starts escape from {g(edges[(0.9, 16)]['escaped'])}) and too early for "
               f"B = 64 (from {g(edges[(0.9, 64)]['escaped'])})")  # fmt: skip
    acc = {rule: phase.confusion(data, rule) for rule in phase.RULES}
    out.append(
        f"Accuracy over the {acc['mean map']['cells']} cells: "
        f"{acc['lr/(1-β)']['accuracy']:.0%} for the simple rule, {acc['mean map']['accuracy']:.0%} "
        f"for the mean map, {acc['second moment']['accuracy']:.0%} for the second-moment "
        f"criterion".replace("%", " %")
    )
    s = data["seconds"]
    out.append(f"{s['minima']} s for the minima, {s['prediction']} s for the predictions, "
               f"{s['measurement']} s for the runs")  # fmt: skip
    return out


def test_the_tables_are_the_committed_results():
    data = json.loads(DATA.read_text())
    doc = DOC.read_text()
    block = doc.split("<!-- tables: qmse.escape.phase.markdown(docs/stability/phase-k8.json) -->\n")
    assert len(block) == 2
    assert block[1].split("<!-- end of tables -->")[0] == phase.markdown(data) + "\n"


def test_every_number_in_the_prose_is_recomputed():
    data = json.loads(DATA.read_text())
    doc = text()
    rest = doc
    for snippet in claims(data):
        assert snippet in doc, snippet
        rest = rest.replace(snippet, " ")
    rest = re.sub(r"<!-- tables.*?<!-- end of tables -->", " ", rest, flags=re.S)
    rest = re.sub(r"```.*?```", " ", rest, flags=re.S)
    rest = re.sub(r"`[^`]*`", " ", rest)
    rest = re.sub(r"\]\([^)]*\)", "]", rest)
    left = set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?", rest)) - TOKENS
    assert not left, sorted(left)
