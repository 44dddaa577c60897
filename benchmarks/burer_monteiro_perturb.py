"""O'Carroll, Srinivas & Vijayaraghavan's perturbation experiment (NeurIPS 2022), rerun:
how often do starts perturbed from the spurious point Y₀ of their Burer–Monteiro instance
return to it, and how much does the answer depend on the optimiser?

For p = 2 (n = 4) and p = 25 (n = 50), per perturbation scale (0.30 … 0.25), the share of
runs that end at the spurious set (cost within 1e-3·|f*| of 0,
`qmse.escape.burer_monteiro.classify`) with its Wilson 95 % interval:
- their summary.txt (their rule: final cost ≥ 0), 1,000 runs at p = 2, 100 at p = 25;
- their raw outcomes recounted, by their rule and by ours (with --raw DIR, DIR their
  repository's experiments/results; without it, ours is `RAW_STUCK`, quoted);
- our rerun of their method (`trust_regions`): with their halved model (their gradient CY is
  half of f's) or f's own, Manopt's finite-difference Hessian (theirs, "FD") or the exact
  one; the same starts (one Gaussian draw per seed, shared by the scales and the optimisers);
- Riemannian gradient descent (`riemannian_gd`) at several step sizes, below 2/λ_max of the
  Hessian at the optimum (λ_max = 16 at p = 2, 4.26 at p = 25), on the same starts.

About 2 minutes on one core:

    python -m benchmarks.burer_monteiro_perturb --raw ~/burer-monteiro/experiments/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from qmse.escape.burer_monteiro import (
    PERTURBATIONS,
    PUBLISHED,
    RAW_STUCK,
    SIZES,
    TRIALS,
    classify,
    perturbation_experiment,
)
from qmse.stats import wilson

GD_LRS = {2: (0.01, 0.03, 0.1), 25: (0.2, 0.4)}


def read_raw(directory: Path, p: int) -> list[list[float]]:
    """Their outcomes-p{p}.csv: one row per trial (the first TRIALS[p] rows are filled), one
    column per perturbation scale; the final costs."""
    lines = (directory / f"outcomes-p{p}.csv").read_text().split()
    return [[float(v) for v in line.split(",")] for line in lines[: TRIALS[p]]]


def cell(count: int, trials: int) -> str:
    lo, hi = wilson(count, trials)
    return f"{count / trials:.3f} [{lo:.3f},{hi:.3f}]"


def row(name: str, counts: list[int], trials: int, note: str = "") -> str:
    return f"{name:<42} " + " ".join(f"{cell(c, trials):>19}" for c in counts) + note


def report(p: int, trials: int, raw: Path | None) -> None:
    print(f"\np = {p} (n = {2 * p}): share of runs that end at the spurious set, Wilson 95 %;")
    print(f"their runs: {TRIALS[p]} per scale; ours: {trials}, the same for each optimiser")
    print(f"{'perturbation':<42} " + " ".join(f"{s:>19}" for s in PERTURBATIONS))
    print(row("their summary.txt (cost ≥ 0)", list(PUBLISHED[p]), TRIALS[p]))
    if raw is not None:
        runs = read_raw(raw, p)
        columns = [[r[j] for r in runs] for j in range(len(PERTURBATIONS))]
        theirs = [sum(v >= 0 for v in col) for col in columns]
        ours = [classify(p, torch.tensor(col)).count("spurious") for col in columns]
        others = sum(classify(p, torch.tensor(col)).count("other") for col in columns)
        print(row("their raw outcomes, cost ≥ 0", theirs, TRIALS[p]))
        print(row("their raw outcomes, |cost| ≤ tol", ours, TRIALS[p], f"  (other: {others})"))
    else:
        print(row("their raw outcomes, |cost| ≤ tol (quoted)", list(RAW_STUCK[p]), TRIALS[p]))
    runs = [
        ("ours: RTR, ½ model, FD Hessian (theirs)", "trust-regions", {}),
        ("ours: RTR, ½ model, exact Hessian", "trust-regions", {"exact_hessian": True}),
        ("ours: RTR, f's model, FD Hessian", "trust-regions", {"model_scale": 1.0}),
        (
            "ours: RTR, f's model, exact Hessian",
            "trust-regions",
            {"model_scale": 1.0, "exact_hessian": True},
        ),
    ]
    runs += [(f"ours: gradient descent, lr {lr:g}", "gd", {"lr": lr}) for lr in GD_LRS[p]]
    for name, method, options in runs:
        start = time.perf_counter()
        result = perturbation_experiment(p, trials=trials, method=method, **options)
        counts = [result[s]["spurious"] for s in PERTURBATIONS]
        others = sum(result[s]["other"] for s in PERTURBATIONS)
        note = f"  ({time.perf_counter() - start:.0f} s" + (
            f", other: {others})" if others else ")"
        )
        print(row(name, counts, trials, note))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw", type=Path, help="their experiments/results directory")
    parser.add_argument("--trials", type=int, nargs=2, default=(10_000, 100), metavar=("P2", "P25"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for p, trials in zip(SIZES, args.trials):
        report(p, trials, args.raw)


if __name__ == "__main__":
    main()
