"""qmse demo, data, train and reproduce: the paper's experiments on the command line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from qmse.cli.common import (
    NONNEGATIVE,
    POSITIVE,
    POSITIVE_NUMBER,
    add_backend_args,
    add_device,
    add_field,
    add_loss_param,
    add_plugin,
    check_losses,
    loss_params,
    names,
    number,
)
from qmse.config import TrainConfig
from qmse.data import DATASETS
from qmse.distributed import close_distributed, init_distributed, is_main, world
from qmse.download import download, status
from qmse.errors import UserError
from qmse.loss import LOSSES
from qmse.report import write_outputs
from qmse.reproduce import (
    ABLATION,
    END_LOSSES,
    PAPER_LOSSES,
    grid_configs,
    loss_params_for,
    run_grid,
)
from qmse.rundir import run_name
from qmse.runs import claim
from qmse.stepsize import Tuning
from qmse.tblog import tensorboard_logger
from qmse.train import train_run

SEEDS_HELP = "train seeds 0..N-1 for every setting (loss × momentum)"
RUN_FILES = ("config.json", "metrics.jsonl", "timings.jsonl", "checkpoint.pt", "diverged.json")


def grid_outputs(out: str | Path) -> dict[str, Path]:
    """`qmse.report.write_outputs` of a grid folder, claimed (a grid) while it writes."""
    with claim(out, "grid", recognise=lambda d: (d / "grid.json").exists()):
        return write_outputs(out)


def add_demo(p: argparse.ArgumentParser) -> None:
    """`qmse demo`: `qmse reproduce` on Fashion-MNIST in about 4 minutes on 2 CPU cores."""
    add_field(p, TrainConfig, "data_dir")
    p.add_argument("--out", default="runs/demo", help="grid directory (reused: runs resume)")
    p.add_argument("--seeds", type=POSITIVE, default=2, help=SEEDS_HELP)
    p.add_argument("--epochs", type=POSITIVE, default=8, help="passes over the training subset")
    p.add_argument("--train-subset", type=POSITIVE, default=5000, help="first N training images")
    p.add_argument("--test-subset", type=POSITIVE, default=2000, help="first N test images")
    add_device(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_field(p, TrainConfig, "allow_unverified_data", action="store_true")

    def run(args: argparse.Namespace) -> int:
        configs = grid_configs(
            "fashion-mnist",
            seeds=args.seeds,
            epochs=args.epochs,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            data_dir=args.data_dir,
            allow_unverified_data=args.allow_unverified_data,
        )
        paths = grid_outputs(run_grid(configs, args.out, device=args.device, quiet=args.quiet))
        print(f"figure: {paths['figure']}")
        print(f"report: {paths['report']}")
        return 0

    p.set_defaults(func=run)


def add_data(p: argparse.ArgumentParser) -> None:
    """`qmse data list|download`."""
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    data_dir_help = "data folder; None means $QMSE_DATA, else ~/.cache/qmse"
    show = actions.add_parser(
        "list",
        help="which datasets are present and match their MD5",
        formatter_class=p.formatter_class,
    )
    show.add_argument("--data-dir", default=None, help=data_dir_help)
    fetch = actions.add_parser(
        "download",
        help="fetch a dataset's official files, verify their MD5, resume/retry",
        formatter_class=p.formatter_class,
    )
    fetch.add_argument("name", choices=DATASETS, help="dataset to fetch")
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
        for row in status(args.data_dir):
            word = words[row["verified"]] if row["present"] else "missing"
            print(f"{row['name']:<14s} {word:<13s} {row['location']}  ({row['detail']})")
        return 0

    def run_download(args: argparse.Namespace) -> int:
        folder = download(args.name, args.data_dir, mirrors=args.mirror)
        print(f"{args.name}: verified files in {folder}")
        return 0

    show.set_defaults(func=run_list)
    fetch.set_defaults(func=run_download)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options `qmse train` and `qmse reproduce` share: TrainConfig's data and
    optimisation fields, the device, logging."""
    add_field(p, TrainConfig, "dataset", choices=DATASETS)
    add_field(p, TrainConfig, "data_dir")
    add_field(p, TrainConfig, "lr", type=POSITIVE_NUMBER)
    add_field(p, TrainConfig, "batch_size", type=POSITIVE)
    add_field(p, TrainConfig, "epochs", type=POSITIVE)
    add_field(p, TrainConfig, "train_subset", type=POSITIVE, metavar="N")
    add_field(p, TrainConfig, "test_subset", type=POSITIVE, metavar="N")
    add_field(p, TrainConfig, "eval_every", type=POSITIVE, metavar="N")
    add_device(p)
    p.add_argument(
        "--quiet", action="store_true", help="no progress bars (nor per-epoch lines off a tty)"
    )
    p.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also log the metrics to TensorBoard in DIR (pip install 'qmse[tensorboard]')",
    )
    add_field(p, TrainConfig, "allow_unverified_data", action="store_true")


def add_train(p: argparse.ArgumentParser) -> None:
    """`qmse train`: one run."""
    add_run_options(p)
    add_field(
        p,
        TrainConfig,
        "loss",
        metavar="LOSS",
        more_help="; ".join(f"{name}: {spec.description}" for name, spec in LOSSES.items())
        + "; or a loss a --plugin file registers",
    )
    add_loss_param(p, LOSSES.values())
    add_plugin(p)
    add_field(p, TrainConfig, "momentum", type=number(0, 1))
    add_field(p, TrainConfig, "seed", type=NONNEGATIVE)
    add_field(p, TrainConfig, "channels", type=POSITIVE, nargs=2, metavar=("C1", "C2"))
    add_field(p, TrainConfig, "hidden", type=POSITIVE)
    p.add_argument("--out", default=None, help="run directory; None: runs/<dataset>/<run name>")
    add_field(p, TrainConfig, "resample_null", action="store_true")

    def train(args: argparse.Namespace) -> int:
        check_losses(args, "--loss", [args.loss])
        cfg = TrainConfig(
            dataset=args.dataset,
            data_dir=args.data_dir,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            loss=args.loss,
            loss_params=loss_params(args.loss_param, [LOSSES[args.loss]]),
            lr=args.lr,
            momentum=args.momentum,
            batch_size=args.batch_size,
            epochs=args.epochs,
            eval_every=args.eval_every,
            seed=args.seed,
            channels=tuple(args.channels),
            hidden=args.hidden,
            resample_null=args.resample_null,
            allow_unverified_data=args.allow_unverified_data,
        )
        out = args.out or f"runs/{args.dataset}/{run_name(cfg)}"
        device = init_distributed(args.device)  # under torchrun: join, pick this rank's GPU
        log = contextlib.nullcontext(None)
        if args.tensorboard is not None and is_main():
            log = tensorboard_logger(Path(args.tensorboard) / Path(out).name)
        with log as on_epoch:
            rows = train_run(cfg, out, device=device, quiet=args.quiet, on_epoch=on_epoch)
        main, ranks = is_main(), world()[1]
        close_distributed()  # after rank 0's files: no rank tears down while another writes
        last = rows[-1]
        if main:
            print(
                f"{out}: epoch {last['epoch']} train acc {last['train_acc']:.4f} "
                f"test acc {last['test_acc']:.4f} train ½‖r‖² {last['train_mse']:.5f}"
            )
            for name in RUN_FILES:
                if (Path(out) / name).exists():
                    print(f"wrote {Path(out) / name}")
            if args.tensorboard is not None:
                print(f"wrote {Path(args.tensorboard) / Path(out).name} (TensorBoard)")
        if ranks > 1:  # every file is closed: skip the interpreter's teardown, where gloo
            sys.stdout.flush()  # aborted a rank in 2 of 110 runs after its group was destroyed
            sys.stderr.flush()  # (SIGABRT: torchrun reported a finished run as failed; 0 of 100
            # with this exit)
            os._exit(0)
        return 0

    p.set_defaults(func=train)


def add_reproduce(p: argparse.ArgumentParser) -> None:
    """`qmse reproduce`: the paper's grid, its figure and report."""
    add_run_options(p)
    p.add_argument("--seeds", type=POSITIVE, default=5, help=SEEDS_HELP)
    p.add_argument(
        "--losses",
        type=names,
        default=",".join(PAPER_LOSSES),
        metavar="LOSS,...",
        help=f"comma-separated registered losses ({', '.join(LOSSES)}, or a --plugin file's); "
        f"the end-of-training grid: {','.join(END_LOSSES)}",
    )
    add_plugin(p)
    p.add_argument("--with-ablation", action="store_true", help=f"add {' and '.join(ABLATION)}")
    add_loss_param(
        p, LOSSES.values(), "for every loss of the grid that takes it; with --tune: its start value"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="also run each method at its own lr (and loss parameters), chosen by a factor-2 "
        "sweep of full runs on --sweep-seed (see docs/results.md)",
    )
    add_field(p, Tuning, "seed", "--sweep-seed", type=NONNEGATIVE, more_help="with --tune")
    add_field(
        p, Tuning, "start_step", "--sweep-start-step", type=POSITIVE_NUMBER, metavar="STEP",
        more_help="with --tune",
    )  # fmt: skip
    add_field(p, Tuning, "max_extend", type=NONNEGATIVE, metavar="N", more_help="with --tune")
    p.add_argument(
        "--no-common-lr",
        action="store_true",
        help="--tune: train only the runs at each method's own lr, not those at --lr",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="diagnose every final checkpoint (stopping case, Hessian extremes, full-set "
        "gradient and residuals) into its diagnosis.json",
    )
    p.add_argument(
        "--diagnose-samples", type=POSITIVE, default=256, help="fixed subset for --diagnose"
    )
    p.add_argument(
        "--lanczos-steps", type=POSITIVE, default=20, help="--diagnose: Hessian products"
    )
    p.add_argument(
        "--piece",
        default="all",
        help="train a part: all, sweep, sweep-m<momentum>, seed<k> (then the report)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite report.md and the figures of --out from its files (no training, no "
        "checkpoints needed)",
    )
    p.add_argument(
        "--parallel",
        type=POSITIVE,
        default=1,
        help="runs trained at once as one stacked model (train_many: vmap on CUDA, a loop on CPU)",
    )
    p.add_argument("--out", default=None, help="grid directory; None: runs/reproduce-<dataset>")
    add_backend_args(p, "ray: one Ray task per run (per group with --parallel)")

    def reproduce(args: argparse.Namespace) -> int:
        if args.plugin and args.backend != "local":
            raise UserError(
                f"--plugin with --backend {args.backend}: the workers do not import plug-in "
                f"files; train a plug-in's loss with --backend local"
            )
        check_losses(args, "--losses", args.losses)
        out = args.out or f"runs/reproduce-{args.dataset}"
        if args.report_only:
            for kind, path in grid_outputs(out).items():
                print(f"{kind}: {path}")
            return 0
        trained = list(dict.fromkeys([*args.losses, *(ABLATION if args.with_ablation else ())]))
        given = loss_params(args.loss_param, [LOSSES[name] for name in trained])
        configs = grid_configs(
            args.dataset,
            seeds=args.seeds,
            epochs=args.epochs,
            lr=args.lr,
            losses=args.losses,
            with_ablation=args.with_ablation,
            loss_params=loss_params_for(trained, given),
            batch_size=args.batch_size,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            eval_every=args.eval_every,
            data_dir=args.data_dir,
            allow_unverified_data=args.allow_unverified_data,
        )
        grid = run_grid(
            configs,
            out,
            tuning=(
                Tuning(args.sweep_seed, args.max_extend, start_step=args.sweep_start_step)
                if args.tune
                else None
            ),
            common_lr=not args.no_common_lr,
            diagnosis=(
                {"samples": args.diagnose_samples, "lanczos_steps": args.lanczos_steps}
                if args.diagnose
                else None
            ),
            piece=args.piece,
            tensorboard=args.tensorboard,
            device=args.device,
            parallel=args.parallel,
            backend=args.backend,
            address=args.address,
            cpus_per_task=args.cpus_per_task,
            gpus_per_task=args.gpus_per_task,
            quiet=args.quiet,
        )
        for kind, path in grid_outputs(grid).items():  # figures once some runs are complete
            print(f"{kind}: {path}")
        return 0

    p.set_defaults(func=reproduce)


COMMANDS = {"demo": add_demo, "data": add_data, "train": add_train, "reproduce": add_reproduce}
