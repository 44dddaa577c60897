"""docs/symmetry.md section 6 says only what docs/symmetry/width.json (ResNet-8) and
docs/symmetry/width-resnet20.json (ResNet-20) give.

The JSONs are the committed outputs of `python -m benchmarks.symmetry_width` without and with
`--blocks 3` (`make symmetry-width`). Every number of the section's tables and prose is
computed here from them and its exact text asserted to be in the section; then, with every
checked snippet taken out, no number may be left in the section's prose except the settings
of the runs (tokens listed in SETTINGS), so a new number in the prose fails here until a check
computes it.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path

from qmse.landscape import barrier
from qmse.models import ResNet

ROOT = Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "docs" / "symmetry" / "width.json").read_text())
WIDTHS = RESULTS["widths"]
RESNET20 = json.loads((ROOT / "docs" / "symmetry" / "width-resnet20.json").read_text())
DEEP = {w: r for w, r in RESNET20["widths"].items() if "paths" in r}  # the widths that trained
PATHS = ("naive-recompute", "aligned-recompute", "naive-blend", "aligned-blend")


def _section() -> str:
    """Section 6 with each paragraph on one line (code blocks dropped)."""
    text = (ROOT / "docs" / "symmetry.md").read_text()
    text = text[text.index("## 6. ") : text.index("## Reproduce")]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    lines: list[str] = []
    for line in text.split("\n"):
        prev = lines[-1] if lines else ""
        if (
            not line.strip()
            or not prev.strip()
            or line.startswith(("|", "#", "- "))
            or (prev.startswith(("|", "#")))
        ):
            lines.append(line)
        else:
            lines[-1] = prev.rstrip() + " " + line.strip()
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _params(width: int, blocks: int) -> int:
    return sum(p.numel() for p in ResNet(1, 10, width=width, blocks=blocks).parameters())


def _tables(results: dict) -> list[str]:
    """The rows of the two tables of one run (ResNet-8 or ResNet-20), built from its results;
    widths whose training diverged have none."""
    blocks = results["settings"]["blocks"]
    widths = {w: r for w, r in results["widths"].items() if "paths" in r}
    rows = []
    for w, r in widths.items():
        runs = r["runs"]
        ends = r["paths"]["naive-recompute"]["loss"], r["paths"]["naive-blend"]["loss"]
        rows.append(
            f"| {w} | {16 * int(w)}/{32 * int(w)}/{64 * int(w)} | {_params(int(w), blocks):,} | "
            f"{runs[0]['train_loss'][-1]:.3f} / {runs[1]['train_loss'][-1]:.3f} | "
            f"{_pct(runs[0]['test_accuracy'])} / {_pct(runs[1]['test_accuracy'])} | "
            f"{ends[1][0]:.3f} / {ends[1][-1]:.3f} | {ends[0][0]:.3f} / {ends[0][-1]:.3f} |"
        )
    for w, r in widths.items():
        p = r["paths"]
        cells = " | ".join(f"{p[k]['barrier']:.3f}" for k in PATHS)
        ratios = " | ".join(
            f"{p[f'aligned-{m}']['barrier'] / p[f'naive-{m}']['barrier']:.2f}"
            for m in ("recompute", "blend")
        )
        drops = " | ".join(_pct(p[k]["accuracy_drop"]) for k in PATHS)
        rows.append(f"| {w} | {cells} | {ratios} | {drops} |")
    return rows


def _prose() -> list[str]:
    """The numbers the prose quotes, as they appear in it."""
    s = RESULTS["settings"]
    out = [
        f"first {s['train']:,} Fashion-MNIST training images",
        f"{s['epochs']} epochs",
        f"lr {s['lr']}",
        f"first {s['eval']} training images",
        f"{s['points']} values of α",
        f"first {s['stats']} training images",
        f"first {s['test']:,} test images",
        f"{s['epochs']} epochs on {s['train']:,} images",
    ]
    total = sum(
        r["train_cpu_s"] + r["eval_cpu_s_recompute"] + r["eval_cpu_s_blend"]
        for r in WIDTHS.values()
    )
    out.append(f"{total / 60:.0f} CPU minutes")
    paths = [r["paths"] for r in WIDTHS.values()]
    inner = [v for p in paths for k in ("naive-blend", "aligned-blend") for v in p[k]["loss"][2:-2]]
    out.append(f"the loss stays between {min(inner):.2f} and {max(inner):.2f}")
    chance = [min(p[k]["accuracy"]) for p in paths for k in ("naive-blend", "aligned-blend")]
    out.append(f"accuracy falls to {_range(chance, 100, '.1f')} %")
    drops = [p["aligned-recompute"]["accuracy_drop"] for p in paths]
    blend_drops = [p["aligned-blend"]["accuracy_drop"] for p in paths]
    out.append(f"lose {_range(drops, 100, '.1f')} accuracy points instead of "
               f"{_range(blend_drops, 100, '.1f')}")  # fmt: skip
    share = [1 - p["aligned-recompute"]["barrier"] / p["aligned-blend"]["barrier"] for p in paths]
    out.append(f"matched barrier is {_range(share, 100, '.0f')} % lower")
    tests = [run["test_accuracy"] for r in WIDTHS.values() for run in r["runs"]]
    out.append(f"test accuracy {_range(tests, 100, '.1f')} %")
    return out


def _prose_resnet20() -> list[str]:
    """The numbers the ResNet-20 paragraphs quote, as they appear in them."""
    s = RESNET20["settings"]
    diverged = {w: r["runs"][0]["diverged_at_step"] for w, r in RESNET20["widths"].items()
                if w not in DEEP}  # fmt: skip
    ((w_bad, step),) = diverged.items()
    warm = math.ceil(s["train"] / 128)
    rows = RESNET20["widths"].values()
    cpu = sum(r["train_cpu_s"] + r.get("eval_cpu_s_recompute", 0) + r.get("eval_cpu_s_blend", 0)
              for r in rows)  # fmt: skip
    wall = sum(r["wall_s"] for r in rows)
    out = [
        f"Width {w_bad} did not train: the loss of seed 0 was not finite at step {step}, "
        f"within the {warm} warm-up steps of the first epoch, so width {w_bad} has no rows",
        f"The run took {cpu / 60:.0f} CPU minutes, {wall / 60:.0f} minutes of wall time",
        f"After {s['epochs']} epochs",
    ]
    deep_runs = [run for r in DEEP.values() for run in r["runs"]]
    runs8 = [run for r in WIDTHS.values() for run in r["runs"]]
    final = [[run["train_loss"][-1] for run in runs] for runs in (deep_runs, runs8)]
    tests = [[run["test_accuracy"] for run in runs] for runs in (deep_runs, runs8)]
    out.append(
        f"its training ½‖r‖² is {_range(final[0], 1, '.3f')} and its test accuracy "
        f"{_range(tests[0], 100, '.1f')} %, against {_range(final[1], 1, '.3f')} and "
        f"{_range(tests[1], 100, '.1f')} % for ResNet-8"
    )
    first = [[run["train_loss"][0] for run in runs] for runs in (deep_runs, runs8)]
    out.append(f"first epoch's mean ½‖r‖² is {_range(first[0], 1, '.2f')}, against "
               f"{_range(first[1], 1, '.2f')}")  # fmt: skip
    paths = {w: r["paths"] for w, r in DEEP.items()}
    ends = [v for p in paths.values() for k in PATHS for v in (p[k]["loss"][0], p[k]["loss"][-1])]
    out.append(f"starts and ends at ½‖r‖² {_range(ends, 1, '.3f')}")
    ratio = {w: p["aligned-recompute"]["barrier"] / p["naive-recompute"]["barrier"]
             for w, p in paths.items()}  # fmt: skip
    (w1, r1), (w2, r2) = ratio.items()
    out.append(f"straight is {r1:.2f} at width {w1} and {r2:.2f} at width {w2}")
    naive, aligned = paths[w2]["naive-recompute"]["loss"], paths[w2]["aligned-recompute"]["loss"]
    peak = Fraction(naive.index(max(naive)), s["points"] - 1)
    out.append(f"rises to ½‖r‖² {max(naive):.3f} at α = {peak} and the matched one only to "
               f"{max(aligned):.3f}")  # fmt: skip
    inner = [v for p in paths.values() for k in ("naive-blend", "aligned-blend")
             for v in p[k]["loss"][2:-2]]  # fmt: skip
    out.append(f"stays between {min(inner):.2f} and {max(inner):.2f}")
    chance = [
        min(p[k]["accuracy"]) for p in paths.values() for k in ("naive-blend", "aligned-blend")
    ]
    out.append(f"accuracy falls to {_range(chance, 100, '.1f')} %")
    drops = [p["aligned-recompute"]["accuracy_drop"] for p in paths.values()]
    blend_drops = [p["aligned-blend"]["accuracy_drop"] for p in paths.values()]
    out.append(f"lose {_range(drops, 100, '.1f')} accuracy points instead of "
               f"{_range(blend_drops, 100, '.1f')}")  # fmt: skip
    share = [1 - p["aligned-recompute"]["barrier"] / p["aligned-blend"]["barrier"]
             for p in paths.values()]  # fmt: skip
    out.append(f"matched barrier is {_range(share, 100, '.0f')} % lower")
    return out


def _range(values: list[float], scale: float, fmt: str) -> str:
    return f"{scale * min(values):{fmt}}–{scale * max(values):{fmt}}"


def test_the_claims_in_words():
    """What section 6 says without a number: matching lowers the recomputed barrier at every
    width but by less than half; the matched, recomputed barrier varies little with width
    (within 25 % of its smallest value) while its accuracy drop is smallest at width 4; the
    blended paths sit near ½, the loss of zero outputs on one-hot targets; training was still
    improving at its last epoch."""
    paths = {w: r["paths"] for w, r in WIDTHS.items()}
    for p in paths.values():
        assert 0.5 < p["aligned-recompute"]["barrier"] / p["naive-recompute"]["barrier"] < 1
    matched = [p["aligned-recompute"]["barrier"] for p in paths.values()]
    assert max(matched) < 1.25 * min(matched)
    drops = {w: p["aligned-recompute"]["accuracy_drop"] for w, p in paths.items()}
    assert min(drops, key=drops.get) == "4"
    for r in WIDTHS.values():
        for run in r["runs"]:
            assert run["train_loss"][-1] < run["train_loss"][-2]


def test_the_resnet20_claims_in_words():
    """What the ResNet-20 paragraphs say without a number: one width diverged, seed 0 within
    the warm-up, and has no paths; the others trained worse than every ResNet-8; matching
    lowers the recomputed barrier at every trained width; blended, every path's accuracy falls
    to near chance (below 12 %, chance being 10 %) and the matched barrier is higher than
    recomputed."""
    (bad,) = [r for w, r in RESNET20["widths"].items() if w not in DEEP]
    assert [run["seed"] for run in bad["runs"]] == [0]
    assert bad["runs"][0]["diverged_at_step"] <= math.ceil(RESNET20["settings"]["train"] / 128)
    worst8 = max(run["train_loss"][-1] for r in WIDTHS.values() for run in r["runs"])
    for r in DEEP.values():
        p = r["paths"]
        assert all(run["train_loss"][-1] > worst8 for run in r["runs"])
        assert p["aligned-recompute"]["barrier"] < p["naive-recompute"]["barrier"]
        assert p["aligned-recompute"]["barrier"] < p["aligned-blend"]["barrier"]
        assert all(min(p[k]["accuracy"]) < 0.12 for k in ("naive-blend", "aligned-blend"))
    assert {k: v for k, v in RESNET20["settings"].items() if k not in ("blocks", "out")} == {
        k: v for k, v in RESULTS["settings"].items() if k not in ("blocks", "out")
    }, "ResNet-20 is said to be trained and evaluated exactly as ResNet-8"


def test_results_are_consistent():
    """The stored barriers are those of the stored paths; the ends of the straight and the
    matched path agree (the matched b computes b's function)."""
    for r in [*WIDTHS.values(), *DEEP.values()]:
        for k in PATHS:
            assert r["paths"][k]["barrier"] == barrier(r["paths"][k]["loss"])
        for mode in ("recompute", "blend"):
            naive, aligned = r["paths"][f"naive-{mode}"], r["paths"][f"aligned-{mode}"]
            assert abs(naive["loss"][-1] - aligned["loss"][-1]) < 1e-5
            assert naive["loss"][0] == aligned["loss"][0]


def test_every_number_of_section_6_is_computed():
    section = _section()
    snippets = _tables(RESULTS) + _tables(RESNET20) + _prose() + _prose_resnet20()
    missing = [s for s in snippets if s not in section]
    assert not missing, "not in docs/symmetry.md section 6:\n" + "\n".join(missing)
    rest = section
    for s in sorted(snippets, key=len, reverse=True):
        rest = rest.replace(s, "")
    rest = re.sub(r"`[^`]*`", "", rest)  # inline code: commands, names
    rest = re.sub(r"\]\([^)]*\)", "]", rest)  # link targets
    numbers = re.findall(r"\d+(?:[.,]\d+)*", rest)
    unexplained = [n for n in numbers if n not in SETTINGS]
    assert not unexplained, f"numbers in section 6 no check computes: {unexplained}"


SETTINGS = {
    "6",  # the section number
    "1", "2", "4",  # widths
    "32", "16", "64",  # image side, channel counts
    "3", "8", "20",  # ResNet-8 / -20, blocks a stage
    "0", "0.9", "128",  # seeds, momentum, batch
    "0.5", "1/4", "3/4",  # ½‖one-hot‖², the loss of zero outputs; the inner α range
    "2022", "2023",  # the papers' years
    "60", "100", "74", "90", "50", "18", "10",  # the papers' quoted figures and models
}  # fmt: skip
