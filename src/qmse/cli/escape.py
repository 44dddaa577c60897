"""qmse escape: the escape benchmark on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmse.cli.common import (
    NONNEGATIVE,
    POSITIVE,
    add_backend_args,
    add_device,
    add_field,
    assignments,
    integers,
    names,
    names_of,
    number,
)
from qmse.errors import UserError
from qmse.escape import PROTOCOLS, EscapeConfig, parse_hyper, run_benchmark, write_outputs
from qmse.escape.config import is_benchmark_dir
from qmse.escape.summary import write_summary
from qmse.runs import claim


def by_method(text: str) -> dict[str, dict[str, float]]:
    """An argparse type: METHOD.NAME=VALUE[,...] -> {method: {name: value}}, each once."""
    assignments(text)  # the form, finite numbers, no name twice
    try:
        return parse_hyper(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def budget(text: str) -> int | None:
    """An argparse type: a number of tuning trials >= 1, or "none" (coordinate passes)."""
    return None if text.strip().lower() == "none" else POSITIVE(text)


def pairs(text: str) -> list[str]:
    """An argparse type: A:B[,C:D...], each pair of two different names, each pair once."""
    items = names(text)
    for item in items:
        a, sep, b = item.partition(":")
        if not (sep and a and b and a != b):
            raise argparse.ArgumentTypeError(f"{item!r}: write a comparison as A:B, e.g. qmse:sgd")
    return items


def add_escape(p: argparse.ArgumentParser) -> None:
    """`qmse escape`."""
    add_field(
        p, EscapeConfig, "ks", "--teacher-widths", type=integers(1), default=[6, 8, 10, 12],
        metavar="K,...",
    )  # fmt: skip
    add_field(p, EscapeConfig, "problem", metavar="NAME")
    add_field(p, EscapeConfig, "problem_args", type=assignments, metavar="NAME=VALUE,...")
    add_field(p, EscapeConfig, "n_extra", type=NONNEGATIVE)
    add_field(p, EscapeConfig, "outputs", type=POSITIVE)
    add_field(p, EscapeConfig, "seeds", "--population-seeds", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "sample_seeds", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "methods", type=names, metavar="METHOD,...")
    add_field(p, EscapeConfig, "plugins", "--plugin", action="append", metavar="FILE.py",
              more_help="repeatable")  # fmt: skip
    add_field(p, EscapeConfig, "lr", type=assignments, metavar="METHOD=VALUE,...")
    p.add_argument(
        "--radius",
        type=assignments,
        default={},
        metavar="METHOD=VALUE,...",
        help="fixed PGD radius (·‖W‖), by method, e.g. pgd=0.5 (not swept)",
    )
    add_field(p, EscapeConfig, "hyper", type=by_method, metavar="METHOD.NAME=VALUE,...")
    add_field(p, EscapeConfig, "protocols", type=names_of(PROTOCOLS, "a protocol"))
    add_field(p, EscapeConfig, "steps", type=POSITIVE)
    add_field(p, EscapeConfig, "batch", "--batch-size", type=POSITIVE)
    add_field(p, EscapeConfig, "tune_k", type=POSITIVE, metavar="K")
    add_field(p, EscapeConfig, "tune_seeds", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "tune_pool", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "max_gd_steps", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "problem_seed", type=NONNEGATIVE)
    add_field(p, EscapeConfig, "teachers", type=POSITIVE, metavar="N")
    add_field(p, EscapeConfig, "teacher", choices=("identity", "random"))
    add_field(p, EscapeConfig, "references", type=names, metavar="METHOD,...",
              more_help="each among --methods")  # fmt: skip
    add_field(p, EscapeConfig, "tune_budget", type=budget, metavar="N|none")
    add_field(p, EscapeConfig, "comparisons", type=pairs, metavar="A:B,...",
              more_help="each method among --methods")  # fmt: skip
    add_field(p, EscapeConfig, "equivalence_margin", type=number(0, 1, above=True))
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite table.md and the figures of --out from its files (nothing is computed)",
    )
    add_device(p)
    p.add_argument("--threads", type=POSITIVE, default=1, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_args(p, "ray: the benchmark's cells as Ray tasks")

    def run(args: argparse.Namespace) -> int:
        if args.report_only:
            with claim(args.out, "escape-benchmark", recognise=is_benchmark_dir):
                paths = write_outputs(args.out)
            print(paths["table"].read_text())
            print("\n".join(f"wrote {path}" for path in paths.values()))
            return 0
        sample = [m for m in args.methods if m != "gd-population"]
        if stray := [r for r in args.references or () if r not in sample]:
            raise UserError(
                f"--references {','.join(stray)}: not among the sample-based --methods "
                f"({','.join(sample)})"
            )
        hyper = {method: dict(values) for method, values in args.hyper.items()}
        for method, radius in args.radius.items():
            if "radius" in hyper.get(method, {}):
                raise UserError(f"--radius {method} and --hyper {method}.radius: give one")
            hyper.setdefault(method, {})["radius"] = radius
        torch.set_num_threads(args.threads)
        cfg = EscapeConfig(
            ks=args.teacher_widths,
            problem=args.problem,
            problem_args=args.problem_args,
            n_extra=args.n_extra,
            outputs=args.outputs,
            seeds=args.population_seeds,
            sample_seeds=args.sample_seeds,
            methods=args.methods,
            protocols=args.protocols,
            steps=args.steps,
            batch=args.batch_size,
            tune_k=args.tune_k,
            tune_seeds=args.tune_seeds,
            tune_pool=args.tune_pool,
            max_gd_steps=args.max_gd_steps,
            problem_seed=args.problem_seed,
            teachers=args.teachers,
            teacher=args.teacher,
            device=str(args.device),
            lr=args.lr,
            hyper=hyper,
            plugins=[str(Path(f).resolve()) for f in args.plugin],
            references=args.references,
            tune_budget=args.tune_budget,
            comparisons=args.comparisons,
            equivalence_margin=args.equivalence_margin,
        )
        run_benchmark(
            args.out,
            cfg,
            backend=args.backend,
            address=args.address,
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            quiet=args.quiet,
        )
        paths = write_outputs(args.out)
        print(paths["table"].read_text())
        print("\n".join(f"wrote {path}" for path in paths.values()))
        return 0

    p.set_defaults(func=run)


def add_summary(p: argparse.ArgumentParser) -> None:
    """`qmse escape summary`."""
    p.add_argument("dirs", nargs="+", metavar="DIR", help="finished `qmse escape` directories")
    p.add_argument("--out", required=True, help="where summary.md and profiles.png go")

    def run(args: argparse.Namespace) -> int:
        paths = write_summary(args.dirs, args.out)
        print(paths["summary"].read_text())
        print("\n".join(f"wrote {path}" for path in paths.values()))
        return 0

    p.set_defaults(func=run)


COMMANDS = {"escape": add_escape, "escape summary": add_summary}
