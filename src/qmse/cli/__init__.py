"""The `qmse` command: a thin layer of argument parsing over the library's functions.

One module per group of subcommands (run: demo, data, train, reproduce; escape; stability:
escape stability; analysis: diagnose, diagnose convexity, symmetry, landscape), each with a
table COMMANDS of the functions that fill a command's parser. This one lists the commands
from a static table (`qmse --help` imports neither torch nor the library), imports the module
of the command that is run, or whose help is asked, and turns the user's and the
environment's mistakes into one-line errors.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from qmse.cli.common import Formatter, Parser, UsageError, resolve_device
from qmse.errors import QmseError

# command words: (its module in qmse.cli, its one-line help)
COMMANDS = {
    "demo": (
        "run",
        "the paper's Fashion-MNIST grid (MSE vs QMSE, momentum 0 and 0.9) at a CPU budget",
    ),
    "data": ("run", "list or download MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100"),
    "train": ("run", "train one SimpleCNN run into a run directory"),
    "reproduce": (
        "run",
        "the paper's grid (losses × momentum {0, 0.9} × seeds), figure.png and report.md",
    ),
    "escape": (
        "escape",
        "escape benchmark: teacher-student ReLU nets (Safran & Shamir 2018), from random "
        "init and from certified spurious minima; `qmse escape stability`: a minimum's "
        "predicted escape band",
    ),
    "escape stability": (
        "stability",
        "the step sizes at which SGD or heavy ball is predicted to leave a minimum (linear "
        "stability at batch B)",
    ),
    "escape summary": (
        "escape",
        "several escape benchmark directories read together: the declared comparisons per "
        "cell with distinct minima, verdicts per problem family, wall time, profiles",
    ),
    "diagnose": (
        "analysis",
        "where did a run stop (paper sec. 2.2 cases, Hessian spectrum); `qmse diagnose "
        "convexity`: the convexity demo",
    ),
    "diagnose convexity": (
        "analysis",
        "loss vs chord on random segments: linear and logistic regression (convex) vs a "
        "1-hidden-layer MLP",
    ),
    "symmetry": (
        "analysis",
        "hidden-unit permutation symmetry: the worked example, weight matching of two runs",
    ),
    "landscape": (
        "analysis",
        "1-D or 2-D loss slice around runs along filter-normalised random directions",
    ),
}


def command_of(argv: Sequence[str]) -> str | None:
    """The command `argv` names: the longest key of COMMANDS its first words spell."""
    named = [c for c in COMMANDS if c.split() == list(argv[: len(c.split())])]
    return max(named, key=len, default=None)


def build_parser(argv: Sequence[str] = ()) -> Parser:
    """The `qmse` parser: every command with its one-line help; the command `argv` names
    (e.g. ["train", ...] or ["diagnose", "convexity", ...]) also with its options, from its
    module, imported here."""
    parser = Parser(
        prog="qmse",
        description="Why MSE training stops short of the global minimum, and whether QMSE helps.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = command_of(argv)
    for command, (_, help_text) in COMMANDS.items():
        if " " in command:
            continue  # a subcommand: its parser is made below when it is chosen
        p = sub.add_parser(
            command, help=help_text, description=help_text, formatter_class=Formatter
        )
        if chosen is None or chosen.split()[0] != command:
            continue
        if chosen != command:
            inner = p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            word = chosen.split()[1]
            help_text = COMMANDS[chosen][1]
            p = inner.add_parser(
                word, help=help_text, description=help_text, formatter_class=Formatter
            )
        module = importlib.import_module(f"qmse.cli.{COMMANDS[chosen][0]}")
        module.COMMANDS[chosen](p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. What the user or the environment got wrong (bad arguments, a run
    directory of another run or kind or in use, data that does not verify, a missing device,
    a full disk, no permission, a damaged file: a `qmse.errors.QmseError` or an OSError)
    ends in one line naming the option or the file and the fix, exit status 2; any other
    exception is a bug and keeps its traceback. Without a command: the help, status 2. With
    QMSE_DEBUG=1 in the environment, a one-line error is raised with its traceback instead
    (a plug-in's error, say, then shows where in its file it happened)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    name = f"qmse {command_of(argv) or ''}".rstrip()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(f"{name}: error: unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    import torch  # loaded with the command's module

    try:
        if hasattr(args, "device"):
            resolve_device(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, PermissionError, ENOSPC, ...
        from qmse.runs import describe_os_error

        message = describe_os_error(e) if e.errno is not None else str(e)
    except (QmseError, torch.cuda.OutOfMemoryError) as e:
        if os.environ.get("QMSE_DEBUG") == "1":
            raise
        message = str(e)
    print(f"{name}: error: {message}", file=sys.stderr)
    return 2
