"""qmse diagnose, diagnose convexity, symmetry and landscape: where a run stopped and the
shape around it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qmse import convexity, endstate
from qmse.cli.common import (
    NONNEGATIVE,
    NONNEGATIVE_NUMBER,
    POSITIVE,
    POSITIVE_NUMBER,
    add_device,
    add_plugin,
    check_losses,
    check_run_losses,
    integer,
    load_plugins,
)
from qmse.errors import UserError
from qmse.landscape import landscape_of_run, landscapes_of_runs, match_runs
from qmse.loss import LOSSES
from qmse.symmetry import count_equivalent, permute, worked_example

DETERMINISTIC = (
    f"a registered loss ({', '.join(LOSSES)}) or a --plugin file's; a random one is refused "
    f"with the name of its expectation"
)


def add_diagnose(p: argparse.ArgumentParser) -> None:
    """`qmse diagnose RUN_DIR` and `qmse diagnose --compare RUN_A RUN_B`."""
    p.description = (
        "RUN_DIR: diagnose one finished `qmse train` run. --compare RUN_A RUN_B: two runs side "
        "by side on the same subset. The convexity demo: `qmse diagnose convexity` (a run "
        "directory named convexity: ./convexity)."
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two runs")
    p.add_argument("--samples", type=POSITIVE, default=256, help="fixed training subset size")
    p.add_argument(
        "--seed", type=NONNEGATIVE, default=0, help="subset, Lanczos and Hutchinson seed"
    )
    p.add_argument(
        "--eigenvalues", type=POSITIVE, default=5, help="top-k and bottom-k Hessian eigenvalues: k"
    )
    p.add_argument("--lanczos-steps", type=POSITIVE, default=30, help="Hessian products per run")
    p.add_argument("--slq-vectors", type=POSITIVE, default=2, help="Lanczos runs for the density")
    p.add_argument("--trace-samples", type=POSITIVE, default=20, help="Hutchinson probe vectors")
    p.add_argument(
        "--tol-residual", type=NONNEGATIVE_NUMBER, default=1e-3, help="case 1: ‖r‖ <= tol"
    )
    p.add_argument(
        "--tol-gradient", type=NONNEGATIVE_NUMBER, default=1e-6, help="case 2: max ‖∇f_c‖ <= tol"
    )
    p.add_argument(
        "--tol-ratio", type=NONNEGATIVE_NUMBER, default=1e-3, help="case 3: ‖Jᵀr‖/(‖J‖₂‖r‖)"
    )
    p.add_argument(
        "--curvature-tol", type=NONNEGATIVE_NUMBER, default=1e-3, help="λ_min vs tol·|λ_max|"
    )
    add_device(p)
    p.add_argument(
        "--out",
        default=None,
        help="RUN_DIR: where diagnosis.json/.txt go, None: in RUN_DIR; --compare: where "
        "comparison.json/.txt go, None: printed only",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_plugin(p)

    def run(args: argparse.Namespace) -> int:
        if (args.run_dir is None) == (args.compare is None):
            raise UserError(
                "give exactly one of RUN_DIR or --compare RUN_A RUN_B (the convexity demo: "
                "qmse diagnose convexity)"
            )
        load_plugins(args)
        check_run_losses(args.compare or [args.run_dir])
        kwargs = dict(
            n_samples=args.samples, seed=args.seed, device=args.device, quiet=args.quiet,
            k=args.eigenvalues, lanczos_steps=args.lanczos_steps,
            slq_vectors=args.slq_vectors, trace_samples=args.trace_samples,
            tol_residual=args.tol_residual, tol_gradient=args.tol_gradient,
            tol_ratio=args.tol_ratio, curvature_tol=args.curvature_tol,
        )  # fmt: skip
        if args.compare is not None:
            print(endstate.compare_runs(*args.compare, out_dir=args.out, **kwargs), end="")
            folders = args.compare  # each run's diagnosis is kept in its own folder
        else:
            d = endstate.diagnose_run(args.run_dir, out_dir=args.out, **kwargs)
            print(endstate.summary_text(d), end="")
            folders = [args.out or args.run_dir]
        for folder in map(Path, folders):
            where = " (in the run folder)" if args.compare or args.out is None else ""
            print(f"diagnosis: {folder / 'diagnosis.json'}, {folder / 'diagnosis.txt'}{where}")
        if args.compare is not None and args.out is not None:
            for name in ("comparison.json", "comparison.txt", "diagnose-spectra.png"):
                print(f"wrote {Path(args.out) / name}")
        return 0

    p.set_defaults(func=run)


def add_convexity(p: argparse.ArgumentParser) -> None:
    """`qmse diagnose convexity`."""
    p.add_argument("--segments", type=POSITIVE, default=200, help="random segments per model")
    p.add_argument(
        "--points", type=integer(3), default=21, help="points per segment, the ends included"
    )
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the segments")
    p.add_argument("--out", default="runs/diagnose-convexity", help="output directory")

    def run(args: argparse.Namespace) -> int:
        res = convexity.convexity_report(
            args.out, segments=args.segments, points=args.points, seed=args.seed
        )
        for name, r in res.items():
            print(f"{name:>20s}  {r['violating_segments']}/{r['segments']} segments above "
                  f"the chord, largest gap {r['max_gap']:.4g}")  # fmt: skip
        print(f"{args.out}/convexity.json, {args.out}/diagnose-convexity.png")
        return 0

    p.set_defaults(func=run)


def add_symmetry(p: argparse.ArgumentParser) -> None:
    """`qmse symmetry example|match`."""
    sym_sub = p.add_subparsers(dest="symmetry_command", required=True, metavar="SUBCOMMAND")
    p = sym_sub.add_parser(
        "example",
        help="a 2-2-1 network and the same network with its hidden units swapped: same outputs",
        formatter_class=p.formatter_class,
    )
    p.add_argument(
        "--activation", default="sigmoid", choices=("sigmoid", "tanh", "relu"), help="hidden"
    )
    p.add_argument("--samples", type=POSITIVE, default=10000, help="random inputs to compare on")
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random inputs")

    def example(args: argparse.Namespace) -> int:
        a, b = worked_example(args.activation)
        gen = torch.Generator().manual_seed(args.seed)
        x = 3 * torch.randn(args.samples, 2, dtype=torch.float64, generator=gen)  # (N, 2)
        swapped = permute(a, {"layers.0": torch.tensor([1, 0])})
        with torch.no_grad():
            fa, fb = a(x), b(x)  # (N, 1) each
        for name, net in (("a", a), ("b", b)):
            print(
                f"network {name}: W1 = {net.layers[0].weight.tolist()}, "
                f"W2 = {net.layers[2].weight.tolist()}"
            )
        flat = [torch.cat([p.reshape(-1) for p in n.parameters()]) for n in (a, b)]
        print(f"activation {args.activation}, {args.samples} inputs x ~ N(0, 9 I):")
        print(f"  max |f_a(x) - f_b(x)|     = {(fa - fb).abs().max().item():.3g}")
        print(f"  ||theta_a - theta_b||     = {(flat[0] - flat[1]).norm().item():.4f}")
        same = all(torch.equal(p, q) for p, q in zip(swapped.parameters(), b.parameters()))
        print(f"  b == a with hidden units swapped (permute): {same}")
        print(f"  distinct equivalent weight vectors (count_equivalent): {count_equivalent(a)}")
        return 0

    p.set_defaults(func=example)

    p = sym_sub.add_parser(
        "match",
        help="loss barrier on the straight path between two runs, before and after weight matching",
        formatter_class=p.formatter_class,
    )
    p.add_argument("run_a", metavar="RUN_A", help="run directory (config.json, checkpoint.pt)")
    p.add_argument("run_b", metavar="RUN_B", help="run directory of the same architecture")
    p.add_argument("--points", type=integer(2), default=25, help="values of alpha in [0, 1]")
    p.add_argument("--samples", type=POSITIVE, default=1000, help="first N training images")
    p.add_argument("--loss", default="mse", metavar="LOSS", help=DETERMINISTIC)
    add_plugin(p)
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the matching's layer order")
    add_device(p)
    p.add_argument("--out", default=None, help="None: runs/symmetry/<RUN_A>--<RUN_B>")

    def match(args: argparse.Namespace) -> int:
        check_losses(args, "--loss", [args.loss])
        check_run_losses([args.run_a, args.run_b])
        out = args.out or f"runs/symmetry/{Path(args.run_a).name}--{Path(args.run_b).name}"
        s = match_runs(
            args.run_a,
            args.run_b,
            out,
            points=args.points,
            samples=args.samples,
            loss=args.loss,
            seed=args.seed,
            device=str(args.device),
        )
        print(f"{args.loss} barrier, straight path a -> b:  {s['naive_barrier']:.5f}")
        print(f"{args.loss} barrier after weight matching:  {s['aligned_barrier']:.5f}")
        print(f"ends: a {s['end_a']}, b {s['end_b']}")
        for name in ("interpolation.png", "interpolation.npz", "summary.json"):
            print(f"wrote {Path(out) / name}")
        return 0

    p.set_defaults(func=match)


def add_landscape(p: argparse.ArgumentParser) -> None:
    """`qmse landscape`."""
    p.description = (
        "One RUN_DIR: its slice in --out. Several: each in --out/<run folder name>, and "
        "--out/landscape-<dims>d.png draws them all on one colour scale."
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--dims", type=int, default=2, choices=(1, 2), help="slice dimension")
    p.add_argument("--points", type=integer(2), default=25, help="grid points per direction")
    p.add_argument("--span", type=POSITIVE_NUMBER, default=1.0, help="grid covers [-span, span]")
    p.add_argument("--samples", type=POSITIVE, default=1000, help="first N training images")
    p.add_argument("--loss", default="mse", metavar="LOSS", help=DETERMINISTIC)
    add_plugin(p)
    p.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random directions")
    p.add_argument("--group-size", type=POSITIVE, default=5, help="grid points per vmapped pass")
    p.add_argument("--batch-size", type=POSITIVE, default=40, help="samples per vmapped pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the vmapped pass")
    add_device(p)
    p.add_argument(
        "--out", default=None, help="None: runs/landscape/<RUN_DIR names joined by +>-<dims>d"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def landscape(args: argparse.Namespace) -> int:
        check_losses(args, "--loss", [args.loss])
        check_run_losses(args.run_dirs)
        names = "+".join(Path(r).name for r in args.run_dirs)
        out = args.out or f"runs/landscape/{names}-{args.dims}d"
        options = dict(
            dims=args.dims, points=args.points, span=args.span, samples=args.samples,
            loss=args.loss, seed=args.seed, group_size=args.group_size,
            batch_size=args.batch_size, compile=args.compile, device=str(args.device),
            quiet=args.quiet,
        )  # fmt: skip
        if len(args.run_dirs) == 1:
            summaries = [landscape_of_run(args.run_dirs[0], out, **options)]
        else:
            summaries = landscapes_of_runs(args.run_dirs, out, **options)
        for s in summaries:
            print(
                f"{s['run']}: {s['evaluations']} points x {s['samples']} samples in "
                f"{s['wall_s']:.1f} s (CPU {s['cpu_s']:.1f} s, {s['torch_threads']} threads); "
                f"{args.loss} from {s['min_loss']:.4f} to {s['max_loss']:.4f}, centre "
                f"{s['centre_loss']}"
            )
        files = (f"landscape-{args.dims}d.npz", f"landscape-{args.dims}d.png", "summary.json")
        if len(args.run_dirs) == 1:
            folders = [Path(out)]
        else:
            folders = [Path(out) / Path(r).resolve().name for r in args.run_dirs]
        for folder in folders:
            for name in files:
                print(f"wrote {folder / name}")
        if len(args.run_dirs) > 1:
            print(f"wrote {Path(out) / f'landscape-{args.dims}d.png'} (all runs on one scale)")
        return 0

    p.set_defaults(func=landscape)


COMMANDS = {
    "diagnose": add_diagnose,
    "diagnose convexity": add_convexity,
    "symmetry": add_symmetry,
    "landscape": add_landscape,
}
