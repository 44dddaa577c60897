"""How many distinct certified spurious minima the teacher–student problem gives, per teacher
width k, student width n, outputs C and teacher seed: the pipeline of the benchmark's
spurious-minima protocol (`qmse.escape.config.minima`: gd-population from the Xavier starts
0 … S−1, the stuck end points grouped modulo the problem's symmetries, each class certified
by the smallest eigenvalue of the exact Hessian), timed per setting on one thread.

Per setting: the starts, the starts that hit gradient descent's step cap, how many of those
Newton's method finished at a stuck point (`qmse.escape.population.finish`), the stuck end
points (converged, loss ≥ 10⁻³), the distinct stuck points, how many of those are strict
minima (and the kinds of the others), and the seconds. Written as a markdown table (JSON
lines with --json).

    python -m benchmarks.teacher_student_minima --k 6 8 --extra 0 1 2 --outputs 1 3 \
        --teachers 0 --starts 200 --max-steps 30000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter

import torch

from qmse.escape.config import EscapeConfig, minima, population


def count(k: int, extra: int, outputs: int, teacher: int, starts: int, max_steps: int) -> dict:
    """One setting's counts (module docstring), computed in a throwaway directory."""
    cfg = EscapeConfig(
        ks=[k], n_extra=extra, outputs=outputs, problem_seed=teacher, seeds=starts,
        max_gd_steps=max_steps, methods=["gd-population"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        runs = population(out, cfg, k, tag="eval", quiet=True)
        found = minima(out, cfg, k, tag="eval", quiet=True)
        seconds = time.perf_counter() - started
    return {
        "k": k,
        "n": k + extra,
        "C": outputs,
        "teacher": teacher,
        "starts": starts,
        "capped": sum(int((~run["converged"]).sum()) for run in runs),
        "newton": sum(int((run["newton"] & run["end_stuck"]).sum()) for run in runs),
        "stuck": found["stuck"],
        "distinct_stuck": len(found["certificates"]) + len(found["excluded"]),
        "strict_minima": len(found["certificates"]),
        "excluded": dict(Counter(found["excluded"])),
        "losses": [round(c["objective"], 6) for c in found["certificates"]],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--extra", type=int, nargs="+", default=[0, 1, 2], help="n − k")
    ap.add_argument("--outputs", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--teachers", type=int, nargs="+", default=[0], help="teacher seeds")
    ap.add_argument("--starts", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=30_000)
    ap.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.json:
        print("| k | n | C | teacher | starts | capped | by Newton | stuck | distinct stuck "
              "| strict minima | others | seconds |")  # fmt: skip
        print("|---" * 12 + "|")
    for k in args.k:
        for extra in args.extra:
            for outputs in args.outputs:
                for teacher in args.teachers:
                    r = count(k, extra, outputs, teacher, args.starts, args.max_steps)
                    if args.json:
                        print(json.dumps(r), flush=True)
                        continue
                    others = ", ".join(f"{v} {kind}" for kind, v in r["excluded"].items())
                    print(
                        f"| {k} | {r['n']} | {outputs} | {teacher} | {r['starts']} | "
                        f"{r['capped']} | {r['newton']} | {r['stuck']} | {r['distinct_stuck']} | "
                        f"{r['strict_minima']} | {others or '–'} | {r['seconds']} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
