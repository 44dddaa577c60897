"""Measured phase diagrams of escape from the certified minima of the teacher–student problem,
with the linear-stability prediction drawn over them (`qmse.escape.phase`; docs/stability.md).

For each width k: OUT/phase-k{k}.json (the predicted thresholds and the escaped / diverged /
stuck counts on an lr grid 2^(1/8) apart per distinct minimum, β and B) and phase-k{k}.png.
B "population" is the closed-form population gradient. The committed piece (docs/stability/,
about 8 CPU minutes on one core, the predictions most of it):

    python -m benchmarks.stability_phase --widths 8 --betas 0,0.5,0.9,0.99 \\
        --batches 16,64,population --out docs/stability

The issue's full grid is `make stability-phase` (Makefile: its size and time).
"""

from __future__ import annotations

import argparse

import torch

from qmse.escape.phase import confusion, phase_diagram, write


def batches(text: str) -> list[int | None]:
    """B,B,... with "population" for the population gradient."""
    return [None if b.strip() == "population" else int(b) for b in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--widths", default="8", help="teacher widths k, comma-separated")
    parser.add_argument("--betas", default="0,0.9", help="heavy-ball β values")
    parser.add_argument("--batches", type=batches, default="16,64,population", help="batch sizes")
    parser.add_argument("--seeds", type=int, default=200, help="gd-population seeds for minima")
    parser.add_argument("--starts", type=int, default=64, help="runs per cell")
    parser.add_argument("--steps", type=int, default=3000, help="steps per run")
    parser.add_argument("--below", type=int, default=16, help="grid steps under the band")
    parser.add_argument("--above", type=int, default=6, help="grid steps over the band")
    parser.add_argument("--samples", type=int, default=2**14, help="Monte Carlo inputs")
    parser.add_argument("--out", default="runs/stability", help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for k in (int(w) for w in args.widths.split(",")):
        data = phase_diagram(
            k, [float(b) for b in args.betas.split(",")], args.batches, seeds=args.seeds,
            starts=args.starts, steps=args.steps, below=args.below, above=args.above,
            samples=args.samples,
        )  # fmt: skip
        for path in write(data, args.out, f"phase-k{k}"):
            print(f"wrote {path}")
        print(f"k = {k}: seconds {data['seconds']}")
        for rule in ("second moment", "mean map", "lr/(1-β)"):
            print(f"  {rule}: {confusion(data, rule)}")


if __name__ == "__main__":
    main()
