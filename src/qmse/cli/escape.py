"""qmse escape: the escape benchmark on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmse.cli.common import Formatter, add_backend_args
from qmse.errors import UserError
from qmse.escape import (
    BUILTIN_METHODS,
    PROTOCOLS,
    EscapeConfig,
    parse_hyper,
    parse_values,
    run_benchmark,
    write_outputs,
)
from qmse.escape.config import REFERENCES, is_benchmark_dir
from qmse.runs import claim


def add_escape(sub: argparse._SubParsersAction) -> None:
    """`qmse escape`."""
    p = sub.add_parser(
        "escape",
        help="escape benchmark: teacher-student ReLU nets (Safran & Shamir 2018), "
        "from random init and from certified spurious minima",
        formatter_class=Formatter,
    )
    p.add_argument("--k", default="6,8,10,12", help="teacher widths, comma-separated")
    p.add_argument("--n-extra", type=int, default=0, help="student width n = k + n_extra")
    p.add_argument("--outputs", type=int, default=1, help="C; > 1: vector output A relu(Vx)")
    p.add_argument("--seeds", type=int, default=1000, help="gd-population seeds per k")
    p.add_argument(
        "--sample-seeds",
        type=int,
        default=1000,
        help="evaluation starts per cell: seeds (random-init) or minima (spurious-minima)",
    )
    p.add_argument(
        "--methods",
        default=",".join(("gd-population", *BUILTIN_METHODS)),
        help="comma-separated: gd-population, built-in methods, methods of --plugin files",
    )
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="a Python file that registers methods (qmse.escape.register_method); repeatable",
    )
    p.add_argument(
        "--lr", default=None, metavar="METHOD=VALUE,...", help="fixed learning rates (not swept)"
    )
    p.add_argument(
        "--radius", default=None, metavar="METHOD=VALUE,...", help="fixed PGD radius (·‖W‖)"
    )
    p.add_argument(
        "--hyper",
        default=None,
        metavar="METHOD.NAME=VALUE,...",
        help="fixed hyperparameters, e.g. label-noise.sigma=0.2 (not swept)",
    )
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated")
    p.add_argument("--steps", type=int, default=3000, help="step budget of sample-based methods")
    p.add_argument("--batch", type=int, default=64, help="fresh samples per step and start")
    p.add_argument("--tune-k", type=int, default=None, help="tune at this k only; unset: each k")
    p.add_argument("--tune-seeds", type=int, default=100, help="tuning starts per swept value")
    p.add_argument("--tune-pool", type=int, default=1000, help="gd seeds searched for minima")
    p.add_argument("--max-gd-steps", type=int, default=100_000, help="gd-population step cap")
    p.add_argument("--problem-seed", type=int, default=0, help="seed of A when outputs > 1")
    p.add_argument(
        "--references",
        default=None,
        help=f"methods every method is paired against (McNemar); default: those of "
        f"{','.join(REFERENCES)} that run",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite table.md and the figures of --out from its files (nothing is computed)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_backend_args(p, "ray: the benchmark's cells as Ray tasks")

    def names(text: str) -> list[str]:
        return [m.strip() for m in text.split(",") if m.strip()]

    def run(args: argparse.Namespace) -> int:
        if args.report_only:
            with claim(args.out, "escape-benchmark", recognise=is_benchmark_dir):
                paths = write_outputs(args.out)
            print(paths["table"].read_text())
            print("\n".join(f"wrote {path}" for path in paths.values()))
            return 0
        if args.device == "cuda" and args.backend == "ray" and args.gpus_per_task <= 0:
            raise UserError("--device cuda --backend ray: give each task a GPU, --gpus-per-task")
        if args.device == "cuda" and args.backend == "local" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
        torch.set_num_threads(args.threads)
        try:
            ks = [int(k) for k in args.k.split(",")]
        except ValueError as e:
            raise UserError(f"--k {args.k!r}: expected integers like 6,8,10") from e
        hyper = parse_hyper(args.hyper)
        for method, radius in parse_values(args.radius, "--radius").items():
            hyper.setdefault(method, {})["radius"] = radius
        cfg = EscapeConfig(
            ks=ks,
            n_extra=args.n_extra,
            outputs=args.outputs,
            seeds=args.seeds,
            sample_seeds=args.sample_seeds,
            methods=names(args.methods),
            protocols=names(args.protocols),
            steps=args.steps,
            batch=args.batch,
            tune_k=args.tune_k,
            tune_seeds=args.tune_seeds,
            tune_pool=args.tune_pool,
            max_gd_steps=args.max_gd_steps,
            problem_seed=args.problem_seed,
            device=args.device,
            lr=parse_values(args.lr, "--lr"),
            hyper=hyper,
            plugins=[str(Path(f).resolve()) for f in args.plugin],
            references=None if args.references is None else names(args.references),
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
