"""Every setting a method's sweep tried, run from the evaluation starts of a finished
benchmark: how far a verdict could move with the tuning's choice.

Why: a method that fails on every tuning start at every trial (QMSE on the three-output
teacher–student minima, for one) is chosen by the tie-break alone, so its row is one
arbitrary setting among equals. Running all of its trials on the evaluation starts (the same
starts and input streams as its row) gives its best failure count over the whole search, an
oracle's: if even that is worse than another method's tuned row, the comparison does not
depend on which trial was chosen. The settings run in lockstep as one job.

    python -m benchmarks.escape_every_trial runs/escape-3/k6-n8-c3 --k 6 \\
        --protocol spurious-minima --methods qmse,qmse-momentum \\
        --save docs/escape-3/k6-n8-c3/every-trial.json

Writes, per method: every trial's settings with its failures on the tuning starts (from the
sweep record) and its failures and divergences on the evaluation starts; the chosen trial.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qmse.escape.cells import cell_name
from qmse.escape.config import load_config, problems_of, starts, streams
from qmse.escape.engine import make_job
from qmse.escape.methods import get_method
from qmse.escape.tuning import run_pooled
from qmse.runs import load_json, save_json


def every_trial(out: Path, k: int, protocol: str, methods: list[str]) -> dict:
    """method -> {"trials": [{settings, tune_failures, failures, diverged}], "chosen",
    "starts", "seconds"} on the evaluation starts of cell k of the benchmark at `out`."""
    cfg = load_config(out)
    torch.set_num_threads(1)
    W0, owner = starts(out, cfg, k, protocol, tuning=False, quiet=True)
    seed, method_seed = streams(cfg, k, protocol, tuning=False)
    result = {}
    for name in methods:
        record = load_json(out / "tuning" / f"{protocol}_{name}_{cell_name(cfg, k)}.json")
        trials = [p["params"] for p in record["points"]]
        hyper = get_method(name).hyper
        job = make_job(name, [t["lr"] for t in trials], {h: [t[h] for t in trials] for h in hyper})
        started = time.perf_counter()
        (runs,) = run_pooled(
            [job], W0.to(cfg.device), problems_of(cfg, k), owner, steps=cfg.steps,
            batch=cfg.batch, seed=seed, method_seed=method_seed,
            desc=f"{name}, {len(trials)} trials",
        )  # fmt: skip
        m = len(W0)
        failed = (~runs["success"].cpu()).view(len(trials), m)
        diverged = runs["diverged"].cpu().view(len(trials), m)
        result[name] = {
            "starts": m,
            "chosen": record["chosen"],
            "seconds": round(time.perf_counter() - started, 1),
            "trials": [
                {
                    "settings": t,
                    "tune_failures": p["failures"],
                    "tune_starts": record["starts"],
                    "failures": int(f.sum()),
                    "diverged": int(d.sum()),
                }
                for t, p, f, d in zip(trials, record["points"], failed, diverged)
            ],  # fmt: skip
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a finished `qmse escape` directory")
    p.add_argument("--k", type=int, required=True, help="the cell's size")
    p.add_argument("--protocol", default="spurious-minima", help="random-init or spurious-minima")
    p.add_argument("--methods", required=True, help="METHOD,... with sweep records there")
    p.add_argument("--save", type=Path, required=True, help="the JSON file to write")
    args = p.parse_args()
    result = every_trial(args.out, args.k, args.protocol, args.methods.split(","))
    save_json(args.save, {"benchmark": str(args.out), "k": args.k, "protocol": args.protocol,
                          "methods": result})  # fmt: skip
    for name, r in result.items():
        best = min(t["failures"] for t in r["trials"])
        print(f"{name}: best of {len(r['trials'])} trials fails on {best}/{r['starts']}")
    print(json.dumps({"saved": str(args.save)}))


if __name__ == "__main__":
    main()
