"""The `qmse` command: a thin layer of argument parsing over the library's functions.

One module per group of subcommands (run: demo, data, train, reproduce; escape; analysis:
diagnose, symmetry, landscape); this one builds the parser and turns the user's and the
environment's mistakes into one-line errors.
"""

from __future__ import annotations

import argparse
import sys

import torch

from qmse.cli.analysis import add_diagnose, add_symmetry
from qmse.cli.common import Formatter
from qmse.cli.escape import add_escape
from qmse.cli.run import add_data, add_demo, add_train
from qmse.errors import QmseError
from qmse.runs import describe_os_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmse",
        description="Why MSE training stops short of the global minimum, and whether QMSE helps.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_data, add_train, add_escape, add_diagnose, add_symmetry):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. What the user or the environment got wrong (bad arguments, a run
    directory of another run or kind or in use, data that does not verify, a missing device,
    a full disk, no permission, a damaged file: a `qmse.errors.QmseError` or an OSError)
    ends in one line naming the file and the fix, exit status 2; any other exception is a
    bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"qmse {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, PermissionError, ENOSPC, ...
        message = describe_os_error(e) if e.errno is not None else str(e)
    except (QmseError, torch.cuda.OutOfMemoryError) as e:
        message = str(e)
    print(f"qmse {args.command}: error: {message}", file=sys.stderr)
    return 2
