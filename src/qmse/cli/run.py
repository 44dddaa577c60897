"""qmse demo, data, train and reproduce: the paper's experiments on the command line."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from qmse.cli.common import Formatter, add_backend_args, add_unverified
from qmse.data import DATASETS
from qmse.distributed import init_distributed, is_main
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
from qmse.rundir import TrainConfig, resolve_device, run_name
from qmse.stepsize import Tuning
from qmse.tblog import tensorboard_logger
from qmse.train import PAPER_LR, train_run


def add_demo(sub: argparse._SubParsersAction) -> None:
    """`qmse demo`: `qmse reproduce` on Fashion-MNIST in about 4 minutes on 2 CPU cores."""
    p = sub.add_parser(
        "demo",
        help="the paper's Fashion-MNIST grid (MSE vs QMSE, momentum 0 and 0.9) at a CPU budget",
        formatter_class=Formatter,
    )
    p.add_argument("--data-dir", default=None, help="else $QMSE_DATA, else ~/.cache/qmse")
    p.add_argument("--out", default="runs/demo", help="grid directory (reused: runs resume)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per setting")
    p.add_argument("--epochs", type=int, default=8, help="passes over the training subset")
    p.add_argument("--train-subset", type=int, default=5000, help="first N training images")
    p.add_argument("--test-subset", type=int, default=2000, help="first N test images")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:0, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_unverified(p)

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
        paths = run_grid(configs, args.out, device=args.device, quiet=args.quiet)
        print(f"figure: {paths['figure']}")
        print(f"report: {paths['report']}")
        return 0

    p.set_defaults(func=run)


def add_data(sub: argparse._SubParsersAction) -> None:
    """`qmse data list|download`."""
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


def add_train(sub: argparse._SubParsersAction) -> None:
    """`qmse train` (one run) and `qmse reproduce` (the paper's grid, figure and report)."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS, help="data set")
        p.add_argument("--data-dir", default=None, help="else $QMSE_DATA, else ~/.cache/qmse")
        p.add_argument("--lr", type=float, default=None, help="default: MNIST 0.01, CIFAR 0.1")
        p.add_argument("--batch-size", type=int, default=128, help="SGD minibatch size")
        p.add_argument("--epochs", type=int, default=100, help="passes over the training set")
        p.add_argument("--train-subset", type=int, default=None, help="first N training images")
        p.add_argument("--test-subset", type=int, default=None, help="first N test images")
        p.add_argument(
            "--eval-every", type=int, default=1, help="measure the full sets every N epochs, + last"
        )
        p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda:0, ...")
        p.add_argument(
            "--quiet", action="store_true", help="no progress bars (nor per-epoch lines off a tty)"
        )
        p.add_argument(
            "--tensorboard",
            default=None,
            metavar="DIR",
            help="also log the metrics to TensorBoard in DIR (pip install 'qmse[tensorboard]')",
        )
        add_unverified(p)

    p = sub.add_parser(
        "train", help="train one SimpleCNN run into a run directory", formatter_class=Formatter
    )
    common(p)
    p.add_argument(
        "--loss",
        default="qmse",
        choices=tuple(LOSSES),
        help="training loss: "
        + "; ".join(f"{name}: {spec.description}" for name, spec in LOSSES.items()),
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="label-noise: the standard deviation σ of its noise ξ ~ N(0, σ²I) (required with "
        "--loss label-noise, refused with the others)",
    )
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--seed", type=int, default=0, help="init, batch order, the loss's noise")
    p.add_argument("--channels", type=int, nargs=2, default=[32, 64], help="conv widths")
    p.add_argument("--hidden", type=int, default=128, help="hidden linear width")
    p.add_argument("--out", default=None, help="run directory; default runs/<dataset>/<run name>")
    p.add_argument(
        "--resume",
        action="store_true",
        help="accepted and ignored: a run in --out with the same settings and data always "
        "continues (a finished one returns at once); other settings are refused",
    )
    p.add_argument(
        "--resample-null",
        action="store_true",
        help="QMSE: redraw v_i while ‖J_iᵀv_i‖ ≤ 1e-6 (paper sec. 3.1; costly, see docs)",
    )

    def train(args: argparse.Namespace) -> int:
        cfg = TrainConfig(
            dataset=args.dataset,
            data_dir=args.data_dir,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            loss=args.loss,
            loss_params={} if args.sigma is None else {"sigma": args.sigma},
            lr=args.lr if args.lr is not None else PAPER_LR[args.dataset],
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
        device = init_distributed(resolve_device(args.device))  # under torchrun: join, pick GPU
        log = contextlib.nullcontext(None)
        if args.tensorboard is not None and is_main():
            log = tensorboard_logger(Path(args.tensorboard) / Path(out).name)
        with log as on_epoch:
            rows = train_run(cfg, out, device=device, quiet=args.quiet, on_epoch=on_epoch)
        last = rows[-1]
        if is_main():
            print(
                f"{out}: epoch {last['epoch']} train acc {last['train_acc']:.4f} "
                f"test acc {last['test_acc']:.4f} train ½‖r‖² {last['train_mse']:.5f}"
            )
        return 0

    p.set_defaults(func=train)

    p = sub.add_parser(
        "reproduce",
        help="the paper's grid (losses × momentum {0, 0.9} × seeds), figure.png and report.md",
        formatter_class=Formatter,
    )
    common(p)
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per setting")
    p.add_argument(
        "--losses",
        default=",".join(PAPER_LOSSES),
        help=f"comma-separated registered losses ({', '.join(LOSSES)}); the end-of-training "
        f"grid: {','.join(END_LOSSES)}",
    )
    p.add_argument("--with-ablation", action="store_true", help="add expected-qmse and ce")
    p.add_argument(
        "--sigma", type=float, default=0.1, help="label-noise's σ (with --tune: its start value)"
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="also run each method at its own lr (and σ), chosen by a factor-2 sweep of full "
        "runs on --sweep-seed (see docs/results.md)",
    )
    p.add_argument("--sweep-seed", type=int, default=100, help="--tune: the held-out seed")
    p.add_argument(
        "--sweep-start-step",
        type=float,
        default=None,
        help="--tune: start each lr sweep at lr = STEP·(1 − momentum) (0.1: the paper's lr "
        "with momentum 0.9); default: at --lr",
    )
    p.add_argument(
        "--max-extend", type=int, default=4, help="--tune: values within start·2^±(1 + N)"
    )
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
    p.add_argument("--diagnose-samples", type=int, default=256, help="fixed subset for --diagnose")
    p.add_argument("--lanczos-steps", type=int, default=20, help="--diagnose: Hessian products")
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
        type=int,
        default=1,
        help="runs trained at once as one stacked model (train_many: vmap on CUDA, a loop on CPU)",
    )
    p.add_argument("--out", default=None, help="grid directory; default runs/reproduce-<dataset>")
    add_backend_args(p, "ray: one Ray task per run (per group with --parallel)")

    def reproduce(args: argparse.Namespace) -> int:
        out = args.out or f"runs/reproduce-{args.dataset}"
        if args.report_only:
            for kind, path in write_outputs(out).items():
                print(f"{kind}: {path}")
            return 0
        losses = [name.strip() for name in args.losses.split(",") if name.strip()]
        if unknown := [name for name in losses if name not in LOSSES]:
            raise UserError(f"--losses: {', '.join(unknown)} not registered; use {tuple(LOSSES)}")
        configs = grid_configs(
            args.dataset,
            seeds=args.seeds,
            epochs=args.epochs,
            lr=args.lr,
            losses=losses,
            with_ablation=args.with_ablation,
            loss_params=loss_params_for(
                [*losses, *(ABLATION if args.with_ablation else ())], {"sigma": args.sigma}
            ),
            batch_size=args.batch_size,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            eval_every=args.eval_every,
            data_dir=args.data_dir,
            allow_unverified_data=args.allow_unverified_data,
        )
        paths = run_grid(
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
        for kind, path in paths.items():  # figures only once some runs are complete
            print(f"{kind}: {path}")
        return 0

    p.set_defaults(func=reproduce)
