"""Measured phase diagrams of escape from certified minima, with the linear-stability
prediction drawn over them (`qmse.escape.phase`; docs/stability.md).

Per family, OUT/phase-NAME.json (the predicted thresholds and the escaped / diverged / moved
/ stuck counts on an lr grid 2^(1/8) apart per distinct minimum, β and B) and
phase-NAME.png: NAME k8, k10, … for the teacher–student widths (--widths), "sensing" for
rank-1 matrix sensing (--sensing DELTA,N,SEED,M). B "population" is the mean field in closed
form. --loss qmse or expected-qmse trains that loss from the same minima of MSE
(phase-NAME-LOSS.json; minibatch panels only). Resumable: the JSON is rewritten after each
panel, and a rerun computes only the panels it lacks. The committed diagrams
(docs/stability/; matrix sensing's escapes start further below the predicted band, hence its
longer grid):

    python -m benchmarks.stability_phase --widths 8 \\
        --betas 0,0.5,0.8,0.9,0.95,0.99 --batches 4,16,64,256,population --out docs/stability
    python -m benchmarks.stability_phase --widths '' --sensing 0.75,2,0,8 --below 24 \\
        --betas 0,0.5,0.8,0.9,0.95,0.99 --batches 4,16,64,256,population --out docs/stability

`make stability-phase` runs the same into runs/stability (Makefile: its time).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmse.escape import phase


def batches(text: str) -> list[int | None]:
    """B,B,... with "population" for the population gradient."""
    return [None if b.strip() == "population" else int(b) for b in text.split(",")]


def sensing(text: str) -> tuple[float, int, int, int]:
    """DELTA,N,SEED,M."""
    delta, n, seed, m = text.split(",")
    return float(delta), int(n), int(seed), int(m)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--widths", default="8", help="teacher widths k, comma-separated ('' none)")
    parser.add_argument("--sensing", type=sensing, default=None,
                        help="also rank-1 matrix sensing: DELTA,N,SEED,M")  # fmt: skip
    parser.add_argument("--betas", default="0,0.9", help="heavy-ball β values")
    parser.add_argument("--batches", type=batches, default="16,64,population", help="batch sizes")
    parser.add_argument("--starts", type=int, default=64, help="runs per cell")
    parser.add_argument("--steps", type=int, default=3000, help="steps per run")
    parser.add_argument("--below", type=int, default=16, help="grid steps under the band")
    parser.add_argument("--above", type=int, default=6, help="grid steps over the band")
    parser.add_argument("--loss", choices=tuple(phase.LOSS_METHODS), default="mse",
                        help="the loss trained (other than MSE: teacher-student)")  # fmt: skip
    parser.add_argument("--out", default="runs/stability", help="output directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    families = [lambda k=int(w): phase.teacher_student(k) for w in args.widths.split(",") if w]
    if args.sensing is not None:
        families.append(lambda: phase.matrix_sensing(*args.sensing))
    for make in families:
        family = make()
        suffix = "" if args.loss == "mse" else f"-{args.loss}"
        path = Path(args.out) / f"phase-{family.name}{suffix}.json"
        data = phase.phase_diagram(
            family, [float(b) for b in args.betas.split(",")], args.batches, starts=args.starts,
            steps=args.steps, below=args.below, above=args.above, loss=args.loss, path=path,
        )  # fmt: skip
        phase.plot(data, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
        print(f"{family.name}: minima {family.seconds:.1f} s, panels {phase.seconds(data)}")
        for rule in phase.RULES:
            print(f"  {rule}: {phase.confusion(data, rule)}")


if __name__ == "__main__":
    main()
