"""docs/benchmarks.md's GPU section against the outputs committed in docs/gpu/: every table
rebuilt and every number in the section's prose derived from those files."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import Doc

GPU = Path(__file__).resolve().parent.parent / "docs" / "gpu"
REPORT = (GPU / "gpu-check.md").read_text()


def report_part(title: str) -> str:
    """The output block of one part of the gpu-check report."""
    part = REPORT[REPORT.index(f"## {title}: ") :]
    start = part.index("```\n") + 4
    return part[start : part.index("\n```", start)]


def loss_overhead(text: str) -> dict[str, tuple[float, float]]:
    """loss -> (ms per step, ratio to MSE), from benchmarks.loss_overhead's output."""
    rows = re.findall(r"^\s*(\S+)\s+([\d.]+) ms/step\s+ratio to mse\s+([\d.]+)$", text, re.M)
    return {name: (float(ms), float(ratio)) for name, ms, ratio in rows}


def styles(text: str) -> dict[str, list[str]]:
    """style -> its four columns as printed, from benchmarks.train_speed's output."""
    rows = re.findall(r"^(\S.*?)\s{2,}([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    return {r[0]: list(r[1:]) for r in rows}


def grid(text: str) -> tuple[list[tuple[str, int, str, str]], str, str, dict[str, int]]:
    """Rows (data set, runs, seconds, projected minutes), the total's seconds and minutes, and
    the QMSE runs that diverged per data set (their messages come before the set's line)."""
    rows, diverged, pending = [], {}, 0
    total = ("", "")
    for line in text.splitlines():
        if line.startswith("diverged: qmse run"):
            pending += 1
        elif m := re.match(r"(\S+)\s+(\d+) runs\s+([\d.]+) s .*:\s+([\d.]+) min", line):
            rows.append((m[1], int(m[2]), m[3], m[4]))
            diverged[m[1]], pending = pending, 0
        elif m := re.match(r"all\s+([\d.]+) s\s+projected: ([\d.]+) min", line):
            total = (m[1], m[2])
    return rows, *total, diverged


def test_the_gpu_section_is_what_the_committed_outputs_say():
    doc = Doc("docs/benchmarks.md", [("## On one GPU", "## The escape benchmark — ")])
    head = REPORT.splitlines()[2]
    device, torch_v, cuda_v = re.match(r"(.+?), torch (\S+), CUDA (\S+),", head).groups()
    doc.quote(f"one {device} (16 CPU cores), torch {torch_v}, CUDA {cuda_v},")
    assert all(": ok, " in line for line in REPORT.splitlines() if line.startswith("## "))
    passed = re.search(r"(\d+) passed", report_part("CUDA tests"))[1]
    doc.quote(f"({passed} passed: every device path against the")

    costs = loss_overhead((GPU / "loss-overhead-repeats100.txt").read_text())
    labels = {"mse": "| mse (½‖r‖²)", "qmse+resample": "check"}  # the flag is code, not prose
    for name, (ms, ratio) in costs.items():
        doc.quote(f"{labels.get(name, '| ' + name)} | {ms:.3f} | {ratio:.3f} |")
    short = loss_overhead(report_part("QMSE's step against MSE's"))
    doc.quote(f"{costs['qmse'][1]:.3f}× MSE here, {short['qmse'][1]:.3f}× in", "1.03 target")
    assert costs["qmse"][1] > 1.03 and short["qmse"][1] > 1.03

    rows = styles(report_part("training loop styles"))
    for style, cols in rows.items():
        doc.quote(f"| {style} | {' | '.join(cols)} |")
    assert float(rows["vmap M=32"][2]) > float(rows["loop M=32"][2])
    for other in ("resident tf32", "resident compile", "resident channels_last"):
        assert float(rows[other][3]) <= 1.05  # nothing gained over the resident loop
    assert float(rows["resident channels_last"][3]) < 1
    full = float(rows["vmap M=32"][1])
    assert full > 0.04
    doc.quote(
        f"{rows['vmap M=32'][2]}× the naive loop at",
        f"at {rows['loop M=32'][2]}×",
        f"{full} s at M = 32",
        "M = 32",
        "0.04 s per 50,000-image model-epoch (≥ 25× naive)",
        "scales to 50,000 images",
    )

    names = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
    table, seconds, minutes, diverged = grid((GPU / "grid-time-parallel20.txt").read_text())
    for data, runs, s, m in table:
        doc.quote(f"| {names[data]} | {runs} | {s} | {m} |")
    doc.quote(f"| all | {sum(r[1] for r in table)} | {seconds} | {minutes} |")
    doc.quote(f"projects to {minutes} minutes with 20 runs at once")
    assert float(minutes) > 5
    qmse_runs = sum(r[1] for r in table) // len(table) // 2  # half of each set's runs
    assert diverged["mnist"] == 0
    doc.quote(f"({diverged['cifar10']} and {diverged['cifar100']} of the {qmse_runs} QMSE runs")
    doc.check(
        [
            r"H200",
            r"Python 3\.12",
            r"\b5 seeds and 100 epochs",
            r"100 epochs × 5 seeds",
            r"61 h on the two CPU cores",
            r"≤ 5 min",
            r"lr 0\.1",
            r"batch of 128, median of 100 steps",
            r"30 steps",
            r"first\s+epoch",
            r"CIFAR-100?",
            r"TF32",
            r"gpu/[\w.-]+",
            r"\b1 epoch each",
        ]
    )
