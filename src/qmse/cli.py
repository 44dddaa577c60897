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
    from qmse import data

    p = sub.add_parser(
        "data",
        help="list or download MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100",
        formatter_class=Formatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    data_dir_help = "data folder; None means $QMSE_DATA, else ~/.cache/qmse"
    show = actions.add_parser(
        "list", help="which datasets are present and match their MD5", formatter_class=Formatter
    )
    show.add_argument("--data-dir", default=None, help=data_dir_help)
    fetch = actions.add_parser(
        "download",
        help="fetch a dataset's official files, verify their MD5, resume/retry",
        formatter_class=Formatter,
    )
    fetch.add_argument("name", choices=data.DATASETS, help="dataset to fetch")
    fetch.add_argument("--data-dir", default=None, help=data_dir_help)
    fetch.add_argument(
        "--mirror",
        action="append",
        default=None,
        metavar="URL",
        help="base URL to fetch from instead of the official mirrors (repeat: tried in order)",
    )

    def run_list(args: argparse.Namespace) -> int:
        words = {True: "verified", None: "present", False: "MD5 MISMATCH"}
        print(f"{'dataset':<14s} {'status':<13s} location")
        for row in data.status(args.data_dir):
            word = words[row["verified"]] if row["present"] else "missing"
            print(f"{row['name']:<14s} {word:<13s} {row['location']}  ({row['detail']})")
        return 0

    def run_download(args: argparse.Namespace) -> int:
        folder = data.download(args.name, args.data_dir, mirrors=args.mirror)
        print(f"{args.name}: verified files in {folder}")
        return 0

    show.set_defaults(func=run_list)
    fetch.set_defaults(func=run_download)


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
