"""The `qmse` command: a thin layer of argument parsing over the library's functions."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from qmse import convexity, diagnose
from qmse.data import DATASETS
from qmse.distributed import init_distributed, is_main
from qmse.download import DownloadError, download, status
from qmse.escape import (
    BUILTIN_METHODS,
    PROTOCOLS,
    EscapeConfig,
    parse_hyper,
    parse_values,
    run_benchmark,
)
from qmse.landscape import landscape_of_run, landscapes_of_runs, match_runs
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
from qmse.rundir import NonFiniteLossError, TrainConfig, resolve_device, run_name
from qmse.runs import DirectoryBusyError, describe_os_error
from qmse.stepsize import Tuning
from qmse.sweep import MissingExtraError
from qmse.symmetry import count_equivalent, permute, worked_example
from qmse.tblog import tensorboard_logger
from qmse.train import PAPER_LR, train_run

Formatter = argparse.ArgumentDefaultsHelpFormatter


def _add_backend_args(p: argparse.ArgumentParser, ray_unit: str) -> None:
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
        help="Ray cluster: auto, HOST:PORT; default: $RAY_ADDRESS, else a new local instance",
    )
    p.add_argument("--cpus-per-task", type=float, default=1, help="Ray: CPUs (threads) per task")
    p.add_argument("--gpus-per-task", type=float, default=0, help="Ray: GPUs per task (0.25 ok)")


def _add_unverified(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-unverified-data",
        action="store_true",
        help="train on data files whose MD5 is not the published one (recorded in config.json)",
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
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
    _add_unverified(p)

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


def _add_data(sub: argparse._SubParsersAction) -> None:
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


def _add_train(sub: argparse._SubParsersAction) -> None:
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
        _add_unverified(p)

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
    _add_backend_args(p, "ray: one Ray task per run (per group with --parallel)")

    def reproduce(args: argparse.Namespace) -> int:
        out = args.out or f"runs/reproduce-{args.dataset}"
        if args.report_only:
            for kind, path in write_outputs(out).items():
                print(f"{kind}: {path}")
            return 0
        losses = [name.strip() for name in args.losses.split(",") if name.strip()]
        if unknown := [name for name in losses if name not in LOSSES]:
            raise ValueError(f"--losses: {', '.join(unknown)} not registered; use {tuple(LOSSES)}")
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


def _add_escape(sub: argparse._SubParsersAction) -> None:
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
        default="sgd,momentum,qmse",
        help="methods every method is paired against (McNemar)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_backend_args(p, "ray: the benchmark's cells as Ray tasks")

    def names(text: str) -> list[str]:
        return [m.strip() for m in text.split(",") if m.strip()]

    def run(args: argparse.Namespace) -> int:
        if args.device == "cuda" and args.backend == "ray" and args.gpus_per_task <= 0:
            raise ValueError("--device cuda --backend ray: give each task a GPU, --gpus-per-task")
        if args.device == "cuda" and args.backend == "local" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
        torch.set_num_threads(args.threads)
        try:
            ks = [int(k) for k in args.k.split(",")]
        except ValueError as e:
            raise ValueError(f"--k {args.k!r}: expected integers like 6,8,10") from e
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
            references=names(args.references),
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
        print((Path(args.out) / "table.md").read_text())
        return 0

    p.set_defaults(func=run)


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    """`qmse diagnose RUN_DIR`, `qmse diagnose --compare RUN_A RUN_B`, `qmse diagnose
    convexity`."""
    p = sub.add_parser(
        "diagnose",
        help="where did a run stop (paper sec. 2.2 cases, Hessian spectrum); convexity demo",
        description="RUN_DIR: diagnose one finished `qmse train` run. --compare RUN_A RUN_B: "
        "two runs side by side on the same subset. 'convexity': loss vs chord on random "
        "segments for linear/logistic regression and a 1-hidden-layer MLP.",
        formatter_class=Formatter,
    )
    p.add_argument("run_dir", nargs="?", help="a run directory, or the word 'convexity'")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two runs")
    p.add_argument("--samples", type=int, default=256, help="fixed training subset size")
    p.add_argument("--seed", type=int, default=0, help="subset, Lanczos and Hutchinson seed")
    p.add_argument("--k", type=int, default=5, help="top-k and bottom-k Hessian eigenvalues")
    p.add_argument("--lanczos-steps", type=int, default=30, help="Hessian products per run")
    p.add_argument("--slq-vectors", type=int, default=2, help="Lanczos runs for the density")
    p.add_argument("--trace-samples", type=int, default=20, help="Hutchinson probe vectors")
    p.add_argument("--tol-residual", type=float, default=1e-3, help="case 1: ‖r‖ <= tol")
    p.add_argument("--tol-gradient", type=float, default=1e-6, help="case 2: max ‖∇f_c‖ <= tol")
    p.add_argument("--tol-ratio", type=float, default=1e-3, help="case 3: ‖Jᵀr‖/(‖J‖₂‖r‖)")
    p.add_argument("--curvature-tol", type=float, default=1e-3, help="λ_min vs tol·|λ_max|")
    p.add_argument("--segments", type=int, default=200, help="convexity: random segments")
    p.add_argument("--points", type=int, default=21, help="convexity: points per segment")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda:0, ...")
    p.add_argument(
        "--out",
        default=None,
        help="RUN_DIR: where diagnosis.json/.txt go (default RUN_DIR); --compare: where "
        "comparison.json/.txt go (default: print only); convexity: output directory "
        "(default runs/diagnose-convexity)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        if args.run_dir == "convexity" and args.compare is None:
            out = args.out or "runs/diagnose-convexity"
            res = convexity.convexity_report(out, segments=args.segments, points=args.points,
                                             seed=args.seed)  # fmt: skip
            for name, r in res.items():
                print(f"{name:>20s}  {r['violating_segments']}/{r['segments']} segments above "
                      f"the chord, largest gap {r['max_gap']:.4g}")  # fmt: skip
            print(f"{out}/convexity.json, {out}/diagnose-convexity.png")
            return 0
        if (args.run_dir is None) == (args.compare is None):
            raise ValueError("give exactly one of RUN_DIR, --compare RUN_A RUN_B or 'convexity'")
        kwargs = dict(
            n_samples=args.samples, seed=args.seed, device=torch.device(args.device),
            quiet=args.quiet, k=args.k, lanczos_steps=args.lanczos_steps,
            slq_vectors=args.slq_vectors, trace_samples=args.trace_samples,
            tol_residual=args.tol_residual, tol_gradient=args.tol_gradient,
            tol_ratio=args.tol_ratio, curvature_tol=args.curvature_tol,
        )  # fmt: skip
        if args.compare is not None:
            print(diagnose.compare_runs(*args.compare, out_dir=args.out, **kwargs), end="")
            return 0
        d = diagnose.diagnose_run(args.run_dir, out_dir=args.out, **kwargs)
        print(diagnose.summary_text(d), end="")
        return 0

    p.set_defaults(func=run)


def _add_symmetry(sub: argparse._SubParsersAction) -> None:
    """`qmse symmetry example|match` and `qmse landscape`."""
    sym = sub.add_parser(
        "symmetry",
        help="hidden-unit permutation symmetry: the worked example, weight matching of two runs",
        formatter_class=Formatter,
    )
    sym_sub = sym.add_subparsers(dest="symmetry_command", required=True, metavar="SUBCOMMAND")
    deterministic = "a registered loss; a random one is refused with the name of its expectation"

    p = sym_sub.add_parser(
        "example",
        help="a 2-2-1 network and the same network with its hidden units swapped: same outputs",
        formatter_class=Formatter,
    )
    p.add_argument(
        "--activation", default="sigmoid", choices=("sigmoid", "tanh", "relu"), help="hidden"
    )
    p.add_argument("--samples", type=int, default=10000, help="random inputs to compare on")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")

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
        formatter_class=Formatter,
    )
    p.add_argument("run_a", metavar="RUN_A", help="run directory (config.json, checkpoint.pt)")
    p.add_argument("run_b", metavar="RUN_B", help="run directory of the same architecture")
    p.add_argument("--points", type=int, default=25, help="values of alpha in [0, 1]")
    p.add_argument("--samples", type=int, default=1000, help="first N training images")
    p.add_argument("--loss", default="mse", choices=tuple(LOSSES), help=deterministic)
    p.add_argument("--seed", type=int, default=0, help="seed of the matching's layer order")
    p.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    p.add_argument("--out", default=None, help="default runs/symmetry/<RUN_A>--<RUN_B>")

    def match(args: argparse.Namespace) -> int:
        out = args.out or f"runs/symmetry/{Path(args.run_a).name}--{Path(args.run_b).name}"
        s = match_runs(
            args.run_a,
            args.run_b,
            out,
            points=args.points,
            samples=args.samples,
            loss=args.loss,
            seed=args.seed,
            device=args.device,
        )
        print(f"{args.loss} barrier, straight path a -> b:  {s['naive_barrier']:.5f}")
        print(f"{args.loss} barrier after weight matching:  {s['aligned_barrier']:.5f}")
        print(f"ends: a {s['end_a']}, b {s['end_b']}")
        print(f"wrote {out}/interpolation.png, interpolation.npz, summary.json")
        return 0

    p.set_defaults(func=match)

    p = sub.add_parser(
        "landscape",
        help="1-D or 2-D loss slice around runs along filter-normalised random directions",
        description="One RUN_DIR: its slice in --out. Several: each in --out/<run folder "
        "name>, and --out/landscape-<dims>d.png draws them all on one colour scale.",
        formatter_class=Formatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--dims", type=int, default=2, choices=(1, 2), help="slice dimension")
    p.add_argument("--points", type=int, default=25, help="grid points per direction")
    p.add_argument("--span", type=float, default=1.0, help="grid covers [-span, span]")
    p.add_argument("--samples", type=int, default=1000, help="first N training images")
    p.add_argument("--loss", default="mse", choices=tuple(LOSSES), help=deterministic)
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--group-size", type=int, default=5, help="grid points per vmapped pass")
    p.add_argument("--batch-size", type=int, default=40, help="samples per vmapped pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the vmapped pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda:0, ...")
    p.add_argument(
        "--out", default=None, help="default runs/landscape/<RUN_DIR names joined by +>-<dims>d"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def landscape(args: argparse.Namespace) -> int:
        names = "+".join(Path(r).name for r in args.run_dirs)
        out = args.out or f"runs/landscape/{names}-{args.dims}d"
        options = dict(
            dims=args.dims, points=args.points, span=args.span, samples=args.samples,
            loss=args.loss, seed=args.seed, group_size=args.group_size,
            batch_size=args.batch_size, compile=args.compile, device=args.device,
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
        print(f"wrote {out}/landscape-{args.dims}d.png (and each run's .npz, summary.json)")
        return 0

    p.set_defaults(func=landscape)


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
    """Run one command. What the user or the environment got wrong (bad arguments, a run
    directory of another run or kind or in use, data that does not verify, a missing device,
    a full disk, no permission, a damaged file) ends in one line naming the file and the fix,
    exit status 2; a bug still shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"qmse {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # FileNotFoundError, PermissionError, ENOSPC, ...
        message = describe_os_error(e) if e.errno is not None else str(e)
    except (
        ValueError,
        NonFiniteLossError,
        DirectoryBusyError,
        DownloadError,
        MissingExtraError,
        torch.cuda.OutOfMemoryError,
    ) as e:
        message = str(e)
    print(f"qmse {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
