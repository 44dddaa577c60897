"""One training run of the paper's experiments (sec. 4), resumable and reproducible.

A run is (dataset, loss, SGD lr and momentum, batch size, epochs, seed, device). The data
sits on the device as one tensor; each epoch draws a permutation of the training set and,
for a random loss of the registry `qmse.loss.LOSSES` (QMSE's v, label noise's ξ), one noise
row per sample, both from generators seeded by the run's seed, and batches are slices of
them. So a run is a pure function of its config: killed and resumed from its last
checkpoint it writes the same metrics as a run that was never interrupted.

Every loss sees one-hot targets (cross-entropy with one-hot targets is cross-entropy on the
class indices). MSE and QMSE runs with the same seed start from the same weights and visit
the data in the same order, so their difference is paired.

The run directory's files (config.json, metrics.jsonl with one row of METRIC_KEYS per
epoch, timings.jsonl, checkpoint.pt) are described in `qmse.rundir`; they are written
atomically at the end of every epoch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmse import runs
from qmse.distributed import data_parallel, is_main, world
from qmse.errors import UserError
from qmse.loss import get_loss
from qmse.nullspace import resample_null_v
from qmse.rundir import (
    Data,
    NonFiniteLossError,
    TrainConfig,
    build_model,
    claim_run,
    load_dataset,
    open_run,
    prepare_data,
    resolve_device,
    resolved_config,
    run_generators,
    save_epoch,
)

# Learning rates of the paper's figures: 0.01 on MNIST (fig. 1), 0.1 on CIFAR (figs. 2-3).
# Fashion-MNIST has MNIST's shape and gets MNIST's rate.
PAPER_LR = {"mnist": 0.01, "fashion-mnist": 0.01, "cifar10": 0.1, "cifar100": 0.1}

EVAL_KEYS = (  # measured on the full sets in the evaluated epochs only (`is_evaluated`)
    "train_acc",  # full train set, eval mode, after the epoch
    "train_loss",  # the run's loss on the full train set (QMSE: its expectation over v)
    "train_mse",  # ½‖r‖² per sample, mean: comparable across losses
    "test_acc",
    "test_loss",
    "test_mse",
)
RUNNING_KEYS = (  # every epoch
    "running_train_acc",  # accuracy of the minibatch outputs during the epoch
    "running_train_loss",  # mean minibatch loss during the epoch (QMSE: with its v draws)
    "grad_norm",  # mean over the epoch's steps of ‖∇ minibatch loss‖₂
)
METRIC_KEYS = ("epoch", *EVAL_KEYS, *RUNNING_KEYS)

EVAL_CHUNK = 1000  # samples per forward pass when measuring the full sets


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, labels: Tensor, loss: str, **params: float
) -> dict[str, float]:
    """Accuracy, loss and ½‖r‖² of `model` over the whole of (x, labels), in eval mode,
    accumulated on the device and read once; the model's mode is restored. The loss is the
    registry's `value`: for a random loss its mean over the noise (QMSE: ½‖r‖⁴ + ‖r‖²/(2C)),
    with the loss's `params` (label noise's sigma)."""
    was_training = model.training
    model.eval()
    spec, mse = get_loss(loss), get_loss("mse")
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # correct, loss, mse
    for start in range(0, x.size(0), EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK]).float()  # (b, C)
        y = labels[start : start + EVAL_CHUNK]
        onehot = F.one_hot(y, out.size(-1)).to(out)  # (b, C)
        sums += torch.stack(
            [
                (out.argmax(-1) == y).sum().double(),
                spec.expected(out, onehot, **params).sum().double(),
                mse.expected(out, onehot).sum().double(),
            ]
        )
    model.train(was_training)
    correct, total_loss, total_mse = (sums / x.size(0)).tolist()
    return {"acc": correct, "loss": total_loss, "mse": total_mse}


def _train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    cfg: TrainConfig,
    order_gen: torch.Generator,
    direction_gen: torch.Generator,
    bar: Any,
) -> dict[str, float]:
    """One pass over the training set in seeded random order; returns the running metrics.

    Nothing is read back to the host until the end of the epoch.
    """
    model.train()
    x, y = data.x_train, data.y_train
    n, C = x.size(0), data.num_classes
    spec, params = get_loss(cfg.loss), cfg.loss_params
    perm = torch.randperm(n, generator=order_gen).to(x.device)  # (n,), drawn on the CPU
    noise_all = None  # (n, C): a random loss's draw for every sample, in the epoch's step order
    if spec.random:
        noise_all = spec.draw(n, C, generator=direction_gen, device=x.device, **params)
    weights = list(model.parameters())
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss·b, correct, ‖g‖
    steps = resampled = 0
    for start in range(0, n, cfg.batch_size):
        idx = perm[start : start + cfg.batch_size]  # (b,)
        out = model(x[idx])  # (b, C)
        yb = y[idx]
        target = F.one_hot(yb, C).to(out)  # (b, C)
        noise = None if noise_all is None else noise_all[start : start + cfg.batch_size]
        if cfg.resample_null:  # costs a per-sample VJP and a host sync per step
            noise, redrawn = resample_null_v(model, x[idx], noise, generator=direction_gen)
            resampled += redrawn
        loss = spec(out, target, noise=noise, **params)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in weights]))
        opt.step()
        sums += torch.stack(
            [
                loss.detach().double() * idx.numel(),
                (out.detach().argmax(-1) == yb).sum().double(),
                grad_norm.double(),
            ]
        )
        steps += 1
        bar.update(1)
    loss_sum, correct, grad_sum = sums.tolist()
    running = {
        "running_train_acc": correct / n,
        "running_train_loss": loss_sum / n,
        "grad_norm": grad_sum / steps,
    }
    if cfg.resample_null:
        running["resampled_v"] = resampled  # directions redrawn this epoch
    return running


def memory_format(device: torch.device) -> torch.memory_format:
    """The layout training uses for images and conv weights on `device`: channels_last on the
    CPU, where it makes a SimpleCNN epoch about 1.3× faster (benchmarks/train_speed.py);
    PyTorch's default elsewhere, where it has not been measured."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def load_data(cfg: TrainConfig, dataset: Any, device: torch.device) -> tuple[Data, Any]:
    """(the run's data on `device`, images in `memory_format(device)`; the dataset it came
    from): `dataset` (a qmse.data.Dataset named like cfg.dataset), or cfg's dataset read
    from disk (`qmse.rundir.load_dataset`) if None."""
    if dataset is None:
        dataset = load_dataset(cfg)
    elif getattr(dataset, "name", cfg.dataset) != cfg.dataset:
        raise UserError(f"dataset is {dataset.name!r} but config.dataset is {cfg.dataset!r}")
    data = prepare_data(dataset, device, train_subset=cfg.train_subset, test_subset=cfg.test_subset)
    layout = memory_format(device)
    data = data._replace(
        x_train=data.x_train.contiguous(memory_format=layout),
        x_test=data.x_test.contiguous(memory_format=layout),
    )
    return data, dataset


def is_evaluated(epoch: int, cfg: TrainConfig) -> bool:
    """Whether the full sets are measured after `epoch`: every cfg.eval_every epochs and
    after the last one, so a finished run always ends with a measured row."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def metric_row(epoch: int, train: dict | None, test: dict | None, running: dict) -> dict:
    """One line of metrics.jsonl from `evaluate`'s train and test dicts and the running ones;
    an epoch that was not evaluated (train and test None) has the running metrics only."""
    row: dict = {"epoch": epoch}
    if train is not None and test is not None:
        for split, measured in (("train", train), ("test", test)):
            row.update({f"{split}_{key}": measured[key] for key in ("acc", "loss", "mse")})
    return {**row, **running}


def check_finite(row: dict, cfg: TrainConfig, out: Path) -> str | None:
    """None if every metric in `row` is finite; else record diverged.json and return the
    message."""
    if all(math.isfinite(row[k]) for k in METRIC_KEYS if k in row):
        return None
    held = row["epoch"] - 1  # epochs in checkpoint.pt
    if held:
        kept = f"its last good epoch ({held}) is kept in checkpoint.pt"
        fix = "try a smaller --lr in another directory (another --out)"
    else:
        kept = "nothing was saved (it diverged in its first epoch)"
        fix = "try a smaller --lr (here: a run with other settings starts afresh)"
    message = (
        f"{cfg.loss} run in {out}: the loss became non-finite in epoch {row['epoch']} "
        f"(running loss {row['running_train_loss']}, train loss {row.get('train_loss')}) at "
        f"lr={cfg.lr}, momentum={cfg.momentum}; {kept}. {fix[0].upper()}{fix[1:]}."
    )
    if is_main():
        runs.save_json(out / "diverged.json", {"epoch": row["epoch"], "message": message})
    return message


def epoch_lines(quiet: bool) -> bool:
    """Whether to print a line per epoch: when the progress bars are off because stderr is
    not a terminal (nohup, tee, a Ray worker; `qmse.runs.progress`'s rule), so that a long
    run is never silent, and never with `quiet`."""
    bars = sys.stderr.isatty() or os.environ.get("QMSE_PROGRESS") == "1"
    return not quiet and not bars and is_main()


def epoch_line(name: str, row: dict, epochs: int, wall_s: float) -> str:
    """One epoch of a run as a line: its running metrics, and the full-set ones when it was
    evaluated."""
    line = (
        f"{name}: epoch {row['epoch']}/{epochs} running loss {row['running_train_loss']:.5g} "
        f"acc {row['running_train_acc']:.4f}"
    )
    if "train_mse" in row:
        line += (
            f" | train ½‖r‖² {row['train_mse']:.5g} acc {row['train_acc']:.4f} "
            f"test acc {row['test_acc']:.4f}"
        )
    return f"{line} | {wall_s:.1f} s"


def say(message: str, quiet: bool) -> None:
    """A line about what a command does with its output directory, on stderr (rank 0)."""
    if not quiet and is_main():
        print(message, file=sys.stderr)


def continued(out: Path, ckpt: dict | None, epochs: int, quiet: bool) -> None:
    """Say that `out` continues from its checkpoint, or holds a finished run."""
    if ckpt is not None:
        done = len(ckpt["metrics"])
        say(f"{out}: continuing the run from epoch {done} of {epochs}" if done < epochs
            else f"{out}: the run is finished ({done} epochs)", quiet)  # fmt: skip


def train_run(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | Path,
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train one run into `out_dir` and return its metric rows (one per epoch).

    `dataset` (a qmse.data.Dataset named like config.dataset) skips loading from disk.
    The full sets are measured every config.eval_every epochs and after the last
    (`is_evaluated`). Progress: bars on a terminal, else a line per epoch on stderr
    (`epoch_lines`), nothing with `quiet`; `on_epoch(row)` is called with every new row once
    it is saved (e.g. `qmse.tblog.tensorboard_logger`).
    A directory holding a checkpoint of the same run (same config, epochs aside, same data)
    continues from it and says so (a finished run returns at once; a larger `epochs`
    extends it); anything else there is refused with what differs (`qmse.rundir.open_run`).
    The directory is claimed (`qmse.runs.claim`): a second writer fails at once.
    Raises NonFiniteLossError if the loss becomes non-finite, leaving the last good
    checkpoint and metrics in place and a `diverged.json` that records the epoch.
    In a process group of N ranks (torchrun; `qmse.distributed.init_distributed`) every rank runs
    this with the same arguments: each computes its 1/N of every batch (`data_parallel`),
    rank 0 alone writes, and the metrics are those of one process to float rounding.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.resample_null and world()[1] > 1:
        raise UserError("resample_null is not supported under torchrun; train in one process")
    out, device = Path(out_dir), resolve_device(device)
    data, dataset = load_data(cfg, dataset, device)
    resolved = resolved_config(cfg, data, device, dataset)
    model = build_model(resolved["model"], cfg.seed).to(device, memory_format=memory_format(device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gens = run_generators(cfg.seed)
    with claim_run(out):
        rows: list[dict] = []
        timings: list[dict] = []
        ckpt = open_run(out, resolved, device)
        continued(out, ckpt, cfg.epochs, quiet)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            gens[0].set_state(ckpt["order_rng"])
            gens[1].set_state(ckpt["direction_rng"])
            rows, timings = ckpt["metrics"], ckpt.get("timings", [])

        net = data_parallel(model)  # under torchrun: each rank a share of every batch
        quiet = quiet or not is_main()
        steps = math.ceil(data.x_train.size(0) / cfg.batch_size)
        label = f"{cfg.loss} m={cfg.momentum:g} seed={cfg.seed}"
        lines = epoch_lines(quiet)
        epochs = runs.progress(range(len(rows) + 1, cfg.epochs + 1), quiet=quiet, desc=label)
        for epoch in epochs:
            t0 = time.perf_counter()
            with runs.progress(total=steps, quiet=quiet, desc=f"epoch {epoch}") as bar:
                running = _train_epoch(net, opt, data, cfg, *gens, bar)
            train = test = None
            if is_evaluated(epoch, cfg):
                train = evaluate(net, data.x_train, data.y_train, cfg.loss, **cfg.loss_params)
                test = evaluate(net, data.x_test, data.y_test, cfg.loss, **cfg.loss_params)
            row = metric_row(epoch, train, test, running)
            if message := check_finite(row, cfg, out):
                raise NonFiniteLossError(message)
            rows.append(row)
            timings.append({"epoch": epoch, "wall_s": time.perf_counter() - t0})
            save_epoch(out, model.state_dict(), opt.state_dict(), gens, rows, timings)
            if lines:
                print(epoch_line(out.name, row, cfg.epochs, timings[-1]["wall_s"]), file=sys.stderr)
            if on_epoch is not None and is_main():
                on_epoch(row)
            if train is not None:
                epochs.set_postfix(train_acc=f"{train['acc']:.4f}", test_acc=f"{test['acc']:.4f}")
    return rows
