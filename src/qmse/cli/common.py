"""What every subcommand shares: a parser whose errors are one line, argparse types that
check each value where it is parsed (ranges, finiteness, names, repeats), options declared
from the config dataclasses' fields, and the options several commands take (--device, the
Ray backend, --loss-param).

Nothing here imports torch or the library at module level: `qmse --help` reads only this
package's table of commands; a command's module (and torch) is imported when it is run or
its own help is asked (`qmse.cli.build_parser`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from qmse.errors import UserError

Formatter = argparse.ArgumentDefaultsHelpFormatter


class UsageError(Exception):
    """A command line that argparse refused, as the one line `qmse.cli.main` prints."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose error is one line, "PROG: error: MESSAGE" (a UsageError for
    `qmse.cli.main`), not the usage and a SystemExit: the message names the option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # no abbreviations: a renamed option (--batch) must not silently match its
        # successor (--batch-size), nor a prefix change meaning when an option is added
        super().__init__(*args, **kwargs, allow_abbrev=False)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def integer(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {low}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high) — in (low, high) with `above`."""
    bounds = f"{'>' if above else '>='} {low:g}" + (f" and < {high:g}" if high < math.inf else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        inside = (value > low if above else value >= low) and value < high
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"{text}: expected a finite number {bounds}")
        return value

    return parse


POSITIVE, NONNEGATIVE = integer(1), integer(0)
POSITIVE_NUMBER, NONNEGATIVE_NUMBER = number(0, above=True), number(0)


def repeated(items: Sequence[object]) -> list:
    """The items that occur more than once, sorted."""
    return sorted({item for item in items if items.count(item) > 1})


def names(text: str) -> list[str]:
    """An argparse type: a comma-separated list of names, at least one, none twice."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give NAME[,NAME...]")
    if "" in items:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name: give NAME[,NAME...]")
    if twice := repeated(items):
        raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(twice)} twice")
    return items


def names_of(known: Iterable[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: `names`, each one of `known` (the refusal lists them as `what`)."""
    known = tuple(known)

    def parse(text: str) -> list[str]:
        items = names(text)
        if unknown := [n for n in items if n not in known]:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown)}: not {what}; choose from {', '.join(known)}"
            )
        return items

    return parse


def integers(low: int) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of distinct integers >= `low`, e.g. 6,8,10."""
    one = integer(low)

    def parse(text: str) -> list[int]:
        values = [one(item) for item in names(text)]
        if twice := repeated(values):
            raise argparse.ArgumentTypeError(f"{text!r} gives {twice[0]} twice")
        return values

    return parse


def assignment(text: str) -> tuple[str, float]:
    """An argparse type: NAME=NUMBER (a finite number) -> (name, value)."""
    name, sep, value = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER, e.g. sgd=0.3") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r}: {name.strip()} must be a finite number")
    return name.strip(), x


def assignments(text: str) -> dict[str, float]:
    """An argparse type: NAME=NUMBER[,NAME=NUMBER...], each name once -> {name: value}."""
    pairs = [assignment(item) for item in names(text)]
    if twice := repeated([name for name, _ in pairs]):
        raise argparse.ArgumentTypeError(f"{text!r} gives {', '.join(twice)} twice")
    return dict(pairs)


def add_field(
    p: argparse.ArgumentParser,
    config: type,
    name: str,
    *flags: str,
    more_help: str = "",
    **kwargs: Any,
) -> None:
    """Add the option that fills the dataclass `config`'s field `name`: spelled `flags`
    (default --name-with-dashes), its default the field's (a field without one may be given
    `default`), its help the field's metadata["help"] and `more_help`; `kwargs` (type,
    nargs, choices, metavar, action) as for add_argument."""
    spec = {f.name: f for f in dataclasses.fields(config)}[name]
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        default = kwargs.pop("default", None)
    if "default" in kwargs:
        raise TypeError(f"{config.__name__}.{name} has a default: the option takes it")
    if isinstance(default, list) and "type" in kwargs:  # shown, and parsed, as a,b,c
        default = ",".join(map(str, default))
    help_text = spec.metadata["help"] + (f"; {more_help}" if more_help else "")
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    flags = flags or ("--" + name.replace("_", "-"),)
    p.add_argument(*flags, default=default, help=help_text, **kwargs)


def device_name(text: str) -> str:
    """An argparse type: "auto" or a name torch reads as a device (its availability is
    checked by `resolve_device`, before the command runs)."""
    import torch  # only once a command that takes --device is parsed

    if text != "auto":
        try:
            torch.device(text)
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a torch device: use auto, cpu, cuda or cuda:0"
            ) from None
    return text


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        type=device_name,
        help="auto: CUDA when visible, else the CPU; or cpu, cuda, cuda:1, ...",
    )


def resolve_device(args: argparse.Namespace) -> None:
    """Check and resolve args.device before any work, the same for every command: in this
    process (`qmse.rundir.resolve_device`: a CUDA device that is not visible is refused,
    naming the fix); with --backend ray the tasks use it where they run, so "auto" means
    cuda when each task gets a GPU (--gpus-per-task) and a CUDA device needs one."""
    from qmse.rundir import resolve_device as resolve

    if getattr(args, "backend", "local") == "local":
        args.device = resolve(args.device)
    elif args.device == "auto":
        args.device = "cuda" if args.gpus_per_task > 0 else "cpu"
    elif args.device.startswith("cuda") and args.gpus_per_task <= 0:
        raise UserError(
            f"--device {args.device} --backend ray: give each task a GPU, --gpus-per-task"
        )


def add_backend_args(p: argparse.ArgumentParser, ray_unit: str) -> None:
    """--backend/--address/--cpus-per-task/--gpus-per-task of the sweep commands."""
    p.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help=f"local: this process; {ray_unit}",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto, HOST:PORT; None: $RAY_ADDRESS, else a new local instance",
    )
    p.add_argument(
        "--cpus-per-task", type=POSITIVE_NUMBER, default=1, help="Ray: CPUs (threads) per task"
    )
    p.add_argument(
        "--gpus-per-task", type=NONNEGATIVE_NUMBER, default=0, help="Ray: GPUs per task (0.25 ok)"
    )


def add_loss_param(p: argparse.ArgumentParser, losses: Iterable[Any], note: str = "") -> None:
    """--loss-param NAME=VALUE, repeatable: a parameter of the loss trained, checked against
    the registered `losses`' declared params (`loss_params`); `note` says more."""
    takes = "; ".join(f"{spec.name}: {', '.join(spec.params)}" for spec in losses if spec.params)
    p.add_argument(
        "--loss-param",
        action="append",
        type=assignment,
        default=[],
        metavar="NAME=VALUE",
        help=f"a parameter of the loss, e.g. sigma=0.1, repeatable{f', {note}' if note else ''} "
        f"(the losses that take any: {takes})",
    )


def loss_params(pairs: Sequence[tuple[str, float]], losses: Sequence[Any]) -> dict[str, float]:
    """The --loss-param values {name: value}: each name given once and taken by one of the
    registered `losses` trained, every parameter they take given."""
    if twice := repeated([name for name, _ in pairs]):
        raise UserError(f"--loss-param {', '.join(twice)} given twice")
    given = dict(pairs)
    takes = {p for spec in losses for p in spec.params}
    trained = ", ".join(spec.name for spec in losses)
    if extra := sorted(set(given) - takes):
        raise UserError(
            f"--loss-param {', '.join(extra)}: no loss trained here ({trained}) takes it"
            + (f"; they take {', '.join(sorted(takes))}" if takes else "")
        )
    for spec in losses:
        if missing := [p for p in spec.params if p not in given]:
            raise UserError(
                f"loss {spec.name!r} needs {', '.join(missing)}: give "
                + " ".join(f"--loss-param {p}=VALUE" for p in missing)
            )
    return given


def add_plugin(p: argparse.ArgumentParser) -> None:
    """--plugin FILE.py, repeatable: a Python file that registers losses, imported before
    the command's loss names are checked (`check_losses`)."""
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE.py",
        help="a Python file that registers losses with qmse.register_loss, imported before "
        "the loss names are checked; repeatable",
    )


def load_plugins(args: argparse.Namespace) -> None:
    """Import the --plugin files of `args` into the loss registry (`qmse.plugins`)."""
    from qmse.loss import LOSSES
    from qmse.plugins import load_plugin

    for path in args.plugin:
        load_plugin(path, LOSSES)


def check_losses(args: argparse.Namespace, option: str, names: Sequence[str]) -> None:
    """`load_plugins`, then check each of `names`, given with `option`, against the loss
    registry: argparse's `choices` are built before the plug-ins are loaded, so the check is
    made here, in argparse's words."""
    from qmse.loss import LOSSES

    load_plugins(args)
    if unknown := [name for name in names if name not in LOSSES]:
        raise UserError(
            f"argument {option}: {', '.join(unknown)}: not a registered loss; choose from "
            f"{', '.join(LOSSES)}, or register one in a --plugin FILE.py (qmse.register_loss)"
        )


def check_run_losses(run_dirs: Iterable[str]) -> None:
    """Each run directory's loss (its config.json) is registered: a run trained with a
    plug-in's loss needs that plug-in again (--plugin) to be read."""
    from pathlib import Path

    from qmse.loss import LOSSES
    from qmse.runs import load_json

    for run in run_dirs:
        config = Path(run) / "config.json"
        held = load_json(config) if config.is_file() else None
        loss = held.get("loss") if isinstance(held, dict) else None
        if isinstance(loss, str) and loss not in LOSSES:
            raise UserError(
                f"{run} was trained with loss {loss!r}, which no loaded plug-in registers: "
                f"give the file that registers it, --plugin FILE.py"
            )
