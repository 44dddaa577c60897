"""How often randomly initialised SGD fails on Zhang et al.'s δ = 1/2 rank-1 sensing instance
(NeurIPS 2018: "fails 12 % of the time"), and how that depends on the protocol the paper's
readable text leaves open (`qmse.escape.matrix_sensing`'s docstring has the choices).

The base protocol: the published instance in its eigenbasis realisation (3 measurements),
x₀ ~ N(0, I₂), one measurement per step (batch 1), lr 0.01, 10,000 steps; a start fails when
f ≥ 1e-6 (f(0) = 1) or it diverged. Each row changes one thing: the budget (for SGD and for
full-batch gradient descent), the step size, the initialisation scale, the batch, the
realisation of the same operator (a seeded mix of the measurements), or the instance (δ = 0.6:
a strict spurious minimum; δ = 0.4: none). Failures are split by where they ended: diverged,
on the line x ⊥ z through the spurious point (|⟨x, z⟩| < 1e-3: SGD's multiplicative noise
shrinks ⟨x, z⟩ geometrically there), near it (|⟨x, z⟩| < 0.1: gradient descent's slow escape
from the degenerate saddle) and elsewhere (not yet converged to ±z). One thread, about two
and a half minutes at the default 4,000 starts:

    python -m benchmarks.matrix_sensing_sgd [--starts 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from qmse.escape.matrix_sensing import (
    PUBLISHED_FAILURE,
    SUCCESS,
    make_instance,
    objective,
    sgd,
    sgd_starts,
)
from qmse.stats import wilson

BASE = {"delta": 0.5, "mixed": False, "batch": 1, "lr": 0.01, "steps": 10_000, "scale": 1.0}
ROWS = [
    {},
    {"steps": 1_000},
    {"steps": 3_000},
    {"steps": 30_000},
    {"batch": None, "steps": 1_000},
    {"batch": None, "steps": 3_000},
    {"batch": None},
    {"batch": None, "steps": 30_000},
    {"lr": 0.003},
    {"lr": 0.03},
    {"scale": 0.1},
    {"scale": 0.5},
    {"scale": 2.0},
    {"batch": 3},
    {"mixed": True},
    {"mixed": True, "batch": None},
    {"delta": 0.6},
    {"delta": 0.6, "batch": None},
    {"delta": 0.4},
    {"delta": 0.4, "batch": None},
]


def run_row(row: dict, starts: int, seed: int) -> dict:
    """One protocol: its failures, split by where the failed starts ended."""
    inst = make_instance(row["delta"], 2, seed if row["mixed"] else None)
    X, g = sgd_starts(inst, starts, seed, row["scale"])
    X = sgd(inst, X, row["steps"], row["lr"], row["batch"], g)
    f = objective(inst, X)
    failed = ~(f < SUCCESS)
    diverged = ~torch.isfinite(f)
    off = (X @ inst.z).abs()  # |⟨x, z⟩|: nan where diverged
    return {
        "failures": int(failed.sum()),
        "diverged": int(diverged.sum()),
        "on_line": int((failed & (off < 1e-3)).sum()),
        "near_line": int((failed & (off >= 1e-3) & (off < 0.1)).sum()),
        "elsewhere": int((failed & (off >= 0.1)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"published (abstract): SGD fails {PUBLISHED_FAILURE:.0%} of the time; "
        f"{args.starts} starts per row, seed {args.seed}"
    )
    print(
        "| δ | measurements | batch | lr | steps | init σ | failed | rate [95 % Wilson] "
        "| 12 % inside | diverged | on x ⊥ z | near it | elsewhere | s |"
    )
    print("|" + "---|" * 14)
    for change in ROWS:
        row = {**BASE, **change}
        t = time.perf_counter()
        out = run_row(row, args.starts, args.seed)
        seconds = time.perf_counter() - t
        lo, hi = wilson(out["failures"], args.starts)
        rate = out["failures"] / args.starts
        print(
            f"| {row['delta']} | {'mixed' if row['mixed'] else 'eigenbasis'} "
            f"| {row['batch'] or 'full'} | {row['lr']} | {row['steps']:,} | {row['scale']} "
            f"| {out['failures']}/{args.starts} | {rate:.1%} [{lo:.1%}, {hi:.1%}] "
            f"| {'yes' if lo <= PUBLISHED_FAILURE <= hi else 'no'} | {out['diverged']} "
            f"| {out['on_line']} | {out['near_line']} | {out['elsewhere']} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
