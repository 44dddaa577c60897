"""The `qmse` command: a thin layer of argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import sys

Formatter = argparse.ArgumentDefaultsHelpFormatter


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="short offline demo: a small MLP on synthetic regression, MSE vs QMSE",
        formatter_class=Formatter,
    )
    p.add_argument("--steps", type=int, default=2000, help="full-batch gradient steps")
    p.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from qmse.train import synthetic_demo

        for name, loss in synthetic_demo(steps=args.steps, seed=args.seed).items():
            print(f"{name:>14s}  final train ½‖r‖² = {loss:.6f}")
        return 0

    p.set_defaults(func=run)


def _add_data(sub: argparse._SubParsersAction) -> None:
    """`qmse data list|download` (issue 6)."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    """`qmse train` and `qmse reproduce` (issue 6)."""


def _add_escape(sub: argparse._SubParsersAction) -> None:
    """`qmse escape` (issue 7)."""


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    """`qmse diagnose` (issue 4)."""


def _add_symmetry(sub: argparse._SubParsersAction) -> None:
    """`qmse symmetry` and `qmse landscape` (issue 5)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmse",
        description="Why MSE training stops short of the global minimum, and whether QMSE helps.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_data, _add_train, _add_escape, _add_diagnose, _add_symmetry):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"qmse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
