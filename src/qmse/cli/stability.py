"""qmse escape stability: a minimum's predicted escape band on the command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from qmse import stability
from qmse.cli.common import (
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_NUMBER,
    add_loss_param,
    integer,
    integers,
    loss_params,
    names,
    number,
)
from qmse.errors import UserError
from qmse.escape import problems
from qmse.escape.phase import certified_minima
from qmse.loss import get_loss
from qmse.runs import load_torch, save_json

SEARCH = 200  # without --seed or --point: the first certified minimum among seeds 0 … 199
LINEARISED = ("mse", "qmse", "expected-qmse", "label-noise")  # losses `stability` linearises
GRAD_TOL = 1e-6  # a --point must be stationary: population gradient norm at most this


def numbers(low: float, high: float) -> Callable[[str], list[float]]:
    """An argparse type: a comma-separated list of numbers in [low, high)."""
    one = number(low, high)
    return lambda text: [one(item) for item in names(text)]


def positive_numbers(text: str) -> list[float]:
    """An argparse type: a comma-separated list of numbers > 0."""
    return [POSITIVE_NUMBER(item) for item in names(text)]


def _point(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """The point to analyse, (k, k) float64, and where it came from."""
    k = args.teacher_width
    if args.point is not None and args.seed is not None:
        raise UserError("--seed and --point: give one (a seed's minimum, or your own point)")
    if args.point is None:
        seeds = range(SEARCH) if args.seed is None else [args.seed]
        W, found = certified_minima(k, seeds)
        if not len(W):
            which = f"seeds 0..{SEARCH - 1}" if args.seed is None else f"seed {args.seed}"
            raise UserError(
                f"gd-population at k = {k} from {which} reaches no certified spurious minimum "
                f"(it converges to the global one): try another --seed, or a larger "
                f"--teacher-width (at k = 6 about 0.3 % of seeds get stuck, at k = 8 about 13 %)"
            )
        return W[0], f"gd-population from Xavier seed {found[0]}"
    held = load_torch(args.point)
    W = held.get("W") if isinstance(held, dict) else held
    if not isinstance(W, torch.Tensor):
        raise UserError(
            f"--point {args.point}: holds no tensor; save the point with torch.save(W, FILE) "
            f"(W: (k, k)) or torch.save({{'W': W}}, FILE)"
        )
    W = W.detach().double().squeeze(0) if W.dim() == 3 else W.detach().double()
    if tuple(W.shape) != (k, k):
        raise UserError(
            f"--point {args.point}: a point of shape {tuple(W.shape)}; teacher-student at "
            f"--teacher-width {k} needs ({k}, {k}): give the width of your point"
        )
    return W, f"{args.point}"


def add_stability(p: argparse.ArgumentParser) -> None:
    """`qmse escape stability`."""
    p.description = (
        "The step sizes at which heavy ball (b ← βb + g, w ← w − lr·b; SGD at β = 0) with "
        "batches of B fresh inputs is predicted to leave a minimum of the escape benchmark's "
        "teacher-student problem while the global minimum stays stable: linear stability of the "
        "mean and second moment at both points (docs/stability.md). The minimum: where "
        "gd-population from a Xavier seed ends (--seed; by default the first seed that ends "
        "at a certified spurious minimum), or your own point (--point FILE.pt)."
    )
    p.add_argument("--teacher-width", type=POSITIVE, default=8, help="k (student n = k)")
    p.add_argument(
        "--seed",
        type=NONNEGATIVE,
        default=None,
        help=f"gd-population's Xavier seed; None: the first of 0..{SEARCH - 1} that ends at a "
        "certified spurious minimum",
    )
    p.add_argument(
        "--point",
        default=None,
        metavar="FILE.pt",
        help="your point instead: torch.save(W, FILE) or torch.save({'W': W}, FILE), W (k, k); "
        f"it must be stationary (population gradient norm <= {GRAD_TOL:g})",
    )
    p.add_argument("--betas", type=numbers(0, 1), default="0,0.9", metavar="BETA,...",
                   help="heavy-ball β values in [0, 1)")  # fmt: skip
    p.add_argument("--batch-sizes", type=integers(1), default="16,64", metavar="B,...",
                   help="batch sizes B")  # fmt: skip
    p.add_argument("--loss", choices=LINEARISED, default="mse", help="the loss trained")
    add_loss_param(p, [get_loss(name) for name in LINEARISED])
    p.add_argument(
        "--lrs", type=positive_numbers, default=[], metavar="LR,...",
        help="also the stationary spread at these step sizes",
    )  # fmt: skip
    p.add_argument("--samples", type=POSITIVE, default=2**14, help="Monte Carlo inputs")
    p.add_argument("--groups", type=integer(2), default=8,
                   help="independent groups of the samples, for standard errors")  # fmt: skip
    p.add_argument("--sample-seed", type=NONNEGATIVE, default=0, help="the Monte Carlo seed")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the numbers here")

    def run(args: argparse.Namespace) -> int:
        torch.set_num_threads(1)  # small tensors: more threads only contend
        params = loss_params(args.loss_param, [get_loss(args.loss)])
        if args.samples < 2 * args.groups:
            raise UserError(f"--samples {args.samples}: need at least 2·--groups = "
                            f"{2 * args.groups}")  # fmt: skip
        W, source = _point(args)
        problem = problems.teacher_student(args.teacher_width)
        (cert,) = problems.certify(problem, W[None], grad_tol=GRAD_TOL)
        if cert["kind"] == "not stationary":
            raise UserError(
                f"--point {args.point}: not a stationary point (population gradient norm "
                f"{cert['grad_norm']:.3g} > {GRAD_TOL:g}): descend to the minimum first, e.g. "
                f"qmse.escape.gd_population(W[None], qmse.teacher_student.make_problem(k))"
            )
        data = stability.stability_data(
            problem, W, args.betas, args.batch_sizes, loss=args.loss, samples=args.samples,
            groups=args.groups, seed=args.sample_seed, lrs=args.lrs, **params,
        )  # fmt: skip
        data["point"] = {"source": source, **cert}
        print(f"point: {source}, a {cert['kind']} (smallest Hessian eigenvalue "
              f"{cert['min_eigenvalue']:.4g})")  # fmt: skip
        print(stability.format_report(data))
        if args.out is not None:
            save_json(args.out, data)
            print(f"wrote {args.out}")
        return 0

    p.set_defaults(func=run)


COMMANDS = {"escape stability": add_stability}
