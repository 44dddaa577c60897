"""Training runs of the paper's experiments (sec. 4), one or several at once, resumable and
reproducible.

A run is (dataset, loss, SGD lr and momentum, batch size, epochs, seed, device). The data
sits on the device as one tensor; each epoch draws a permutation of the training set and,
for a random loss of the registry `qmse.loss.LOSSES` (QMSE's v, label noise's ξ), one noise
row per sample, both from generators seeded by the run's seed, and batches are slices of
them. So a run is a pure function of its config: killed and resumed from its last
checkpoint it writes the same metrics as a run that was never interrupted.

One engine trains M ≥ 1 runs as one stacked model (`qmse.stacked`): every step is one
forward, one backward and one SGD update of the stack, written out (PyTorch's convention:
buf ← momentum·buf + g, w ← w − lr·buf) so that lr and momentum may differ per run. Run m
writes the directory it would write alone, to float tolerance. `train_run` is the engine
with one run, the only case that takes torchrun's data parallelism and `resample_null`;
`train_many` takes several; `train_task` is a sweep's unit (`qmse.sweep.run_tasks`).

Every loss sees one-hot targets (cross-entropy with one-hot targets is cross-entropy on the
class indices). MSE and QMSE runs with the same seed start from the same weights and visit
the data in the same order, so their difference is paired.

The run directory's files (config.json, metrics.jsonl with one row of METRIC_KEYS per
epoch, timings.jsonl, checkpoint.pt with the optimizer in torch.optim.SGD's state_dict) are
described in `qmse.rundir`; they are written atomically at the end of every epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmse import runs
from qmse.config import TrainConfig
from qmse.distributed import data_parallel, is_main, sum_over_ranks, world
from qmse.errors import UserError
from qmse.loss import get_loss
from qmse.nullspace import resample_null_v
from qmse.rundir import (
    Data,
    NonFiniteLossError,
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
from qmse.stacked import (
    grouped_losses,
    loss_groups,
    momentum_buffers,
    sgd_state_dict,
    stack_parameters,
    stacked_forwards,
)

EVAL_KEYS = (  # measured on the full sets in the evaluated epochs only (`is_evaluated`)
    "train_acc",  # full train set, after the epoch
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

EVAL_CHUNK = 1000  # samples per forward pass measuring the full sets (M models: ≤ 4000/M)

SHARED_FIELDS = (
    "dataset",
    "data_dir",
    "train_subset",
    "test_subset",
    "batch_size",
    "epochs",
    "eval_every",
    "channels",
    "hidden",
)  # what every run trained together by `train_many` must share

Hook = Callable[[dict], None]  # on_epoch: called with each new metric row of a run


def train_run(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | Path,
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    on_epoch: Hook | None = None,
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
    In a process group of N ranks (torchrun; `qmse.distributed.init_distributed`) every rank
    runs this with the same arguments: each computes its 1/N of every batch
    (`qmse.distributed.data_parallel`), rank 0 alone writes, and the metrics are those of one
    process to float rounding. It is `train_many` with one run.
    """
    [(rows, diverged)] = _train_stack([config], [out_dir], dataset, device, quiet, "auto",
                                      [on_epoch])  # fmt: skip
    if diverged is not None:
        raise NonFiniteLossError(diverged)
    return rows


def train_many(
    configs: Sequence[TrainConfig | Mapping[str, Any]],
    out_dirs: Sequence[str | Path],
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    batching: str = "auto",
    on_epoch: Sequence[Hook | None] | None = None,
) -> list[list[dict]]:
    """Train M ≥ 1 runs at once, as one stacked model, and return each run's metric rows.

    Every step is one forward, one backward and one update of the stack, run by
    `qmse.stacked.stacked_forwards` with `batching` ("auto": "vmap" on CUDA for M > 1, else
    "loop"). Each run keeps its own seed (initial weights, batch order, its loss's noise),
    loss, lr and momentum, so run m writes the same directory, to float tolerance, as
    `train_run(configs[m], out_dirs[m])`. The runs must share SHARED_FIELDS, and, when they
    continue from checkpoints (train_run's too), their epoch. Every directory is claimed
    for the whole call. A run whose loss becomes non-finite gets diverged.json, keeps its
    last good checkpoint and stops being saved; the others go on, and nothing is raised.
    Evaluation, progress lines and `on_epoch` (one callable or None per run, called with
    each new row of its run) are train_run's. torchrun and resample_null take one run.
    """
    hooks = list(on_epoch) if on_epoch is not None else [None] * len(configs)
    if len(hooks) != len(configs):
        raise UserError(f"got {len(hooks)} on_epoch hooks for {len(configs)} runs; give one each")
    return [rows for rows, _ in _train_stack(configs, out_dirs, dataset, device, quiet,
                                             batching, hooks)]  # fmt: skip


def _train_stack(
    configs: Sequence[TrainConfig | Mapping[str, Any]],
    out_dirs: Sequence[str | Path],
    dataset: Any,
    device: torch.device | str,
    quiet: bool,
    batching: str,
    hooks: list[Hook | None],
) -> list[tuple[list[dict], str | None]]:
    """train_many's checks and set-up; per run, its metric rows and, if its loss became
    non-finite, the message of its diverged.json (else None)."""
    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    outs, device = [Path(o) for o in out_dirs], resolve_device(device)
    if not cfgs or len(cfgs) != len(outs):
        raise UserError(f"got {len(cfgs)} configs and {len(outs)} out_dirs; need as many, >= 1")
    if len(cfgs) > 1 and any(c.resample_null for c in cfgs):
        raise UserError("resample_null takes one run at a time (train_run); train those alone")
    if len(cfgs) > 1 and world()[1] > 1:
        raise UserError(
            f"torchrun's data parallelism trains one run at a time, got {len(cfgs)}: call "
            f"train_run per run, or train_many without torchrun"
        )
    if cfgs[0].resample_null and world()[1] > 1:
        raise UserError("resample_null is not supported under torchrun; train in one process")
    for name in SHARED_FIELDS:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise UserError(
                f"train_many needs one {name} for all runs, got "
                f"{sorted({str(getattr(c, name)) for c in cfgs})}; train them in groups"
            )
    data, dataset = load_data(cfgs[0], dataset, device)
    resolved = [resolved_config(c, data, device, dataset) for c in cfgs]
    if batching == "auto":
        batching = "vmap" if device.type == "cuda" and len(cfgs) > 1 else "loop"
    forwards = stacked_forwards(resolved[0]["model"], batching)
    models = [build_model(r["model"], c.seed).to(device) for r, c in zip(resolved, cfgs)]
    gens = [run_generators(c.seed) for c in cfgs]
    with contextlib.ExitStack() as claims:
        for out in outs:
            claims.enter_context(claim_run(out))
        return _fit(cfgs, outs, data, resolved, models, gens, quiet or not is_main(),
                    forwards, hooks)  # fmt: skip


def _fit(
    cfgs: list[TrainConfig],
    outs: list[Path],
    data: Data,
    resolved: list[dict],
    models: list[nn.Module],
    gens: list[tuple[torch.Generator, torch.Generator]],
    quiet: bool,
    forwards: tuple[Any, Any],
    hooks: list[Hook | None],
) -> list[tuple[list[dict], str | None]]:
    """The epoch loop, once the directories are claimed: open or continue every run, then
    train the stack epoch by epoch, saving each run's epoch in its directory."""
    cfg0, M, device = cfgs[0], len(cfgs), data.x_train.device
    rows: list[list[dict]] = [[] for _ in range(M)]
    timings: list[list[dict]] = [[] for _ in range(M)]
    saved_bufs: list[list[Tensor] | None] = [None] * M
    for m, (out, r) in enumerate(zip(outs, resolved)):
        ckpt = open_run(out, r, device)
        continued(out, ckpt, cfgs[m].epochs, quiet)
        if ckpt is None:
            continue
        models[m].load_state_dict(ckpt["model"])
        gens[m][0].set_state(ckpt["order_rng"])
        gens[m][1].set_state(ckpt["direction_rng"])
        saved_bufs[m] = momentum_buffers(ckpt["optimizer"], len(list(models[m].parameters())))
        rows[m], timings[m] = ckpt["metrics"], ckpt.get("timings", [])
    if len({len(r) for r in rows}) > 1:
        raise UserError(
            f"train_many resumes runs at one epoch; these are at epochs "
            f"{[len(r) for r in rows]}: bring them level with train_run first"
        )

    params = stack_parameters(models, memory_format(device))  # name -> (M, ...) leaves
    names = list(params)
    bufs = {k: torch.zeros_like(p) for k, p in params.items()}  # momentum·0 + g = g: SGD's
    for m, saved in enumerate(saved_bufs):  # first step, where a run has no buffer yet
        for k, buf in zip(names, saved or []):
            bufs[k][m] = buf
    train_forward = data_parallel(forwards[0], dim=1)  # under torchrun: a share of each batch
    eval_forward = data_parallel(forwards[1], dim=0)
    null_model = models[0] if cfg0.resample_null else None  # one run (checked)
    diverged: list[str | None] = [None] * M
    lines = epoch_lines(quiet)
    steps = math.ceil(data.x_train.size(0) / cfg0.batch_size)
    label = f"{cfg0.loss} m={cfg0.momentum:g} seed={cfg0.seed}" if M == 1 else f"{M} runs"
    epochs = runs.progress(range(len(rows[0]) + 1, cfg0.epochs + 1), quiet=quiet, desc=label)
    for epoch in epochs:
        t0 = time.perf_counter()
        with runs.progress(total=steps, quiet=quiet, desc=f"epoch {epoch}") as bar:
            running = _train_epoch(train_forward, params, bufs, cfgs, data, gens, bar, null_model)
        train = test = [None] * M
        if is_evaluated(epoch, cfg0):
            train = evaluate(eval_forward, params, data.x_train, data.y_train, cfgs)
            test = evaluate(eval_forward, params, data.x_test, data.y_test, cfgs)
        wall = (time.perf_counter() - t0) / M
        for m in range(M):
            if diverged[m] is not None:
                continue
            row = metric_row(epoch, train[m], test[m], running[m])
            diverged[m] = check_finite(row, cfgs[m], outs[m])
            if diverged[m] is not None:
                continue
            rows[m].append(row)
            timings[m].append({"epoch": epoch, "wall_s": wall})
            weights = {k: params[k][m].detach().clone() for k in names}
            opt = sgd_state_dict(models[m], [bufs[k][m].clone() for k in names], cfgs[m].lr,
                                 cfgs[m].momentum)  # fmt: skip
            save_epoch(outs[m], weights, opt, gens[m], rows[m], timings[m])
            if lines:
                print(epoch_line(outs[m].name, row, cfgs[m].epochs, wall), file=sys.stderr)
            if hooks[m] is not None and is_main():
                hooks[m](row)
        if all(d is not None for d in diverged):
            break
        if M == 1 and train[0] is not None:
            epochs.set_postfix(train_acc=f"{train[0]['acc']:.4f}", test_acc=f"{test[0]['acc']:.4f}")
    return list(zip(rows, diverged))


def _train_epoch(
    forward: Any,
    params: dict[str, Tensor],
    bufs: dict[str, Tensor],
    cfgs: Sequence[TrainConfig],
    data: Data,
    gens: Sequence[tuple[torch.Generator, torch.Generator]],
    bar: Any,
    null_model: nn.Module | None = None,
) -> list[dict[str, float]]:
    """One pass of M stacked runs over the training set, each in its own seeded order with
    its own loss and noise; the parameters and momentum buffers ({name: (M, ...)}) are
    updated in place. With `null_model` (one run: its module, whose weights `params`
    replace), QMSE's directions in the null space are redrawn (`resample_null_v`), at the
    cost of a per-sample VJP and a host sync per step. Returns each run's running metrics;
    nothing else is read back to the host until the end of the epoch."""
    M, device = len(cfgs), data.x_train.device
    x, y, C = data.x_train, data.y_train, data.num_classes
    n, B = x.size(0), cfgs[0].batch_size
    lr = torch.tensor([c.lr for c in cfgs], device=device)  # (M,)
    mom = torch.tensor([c.momentum for c in cfgs], device=device)  # (M,)
    per_model = {k: (M,) + (1,) * (p.dim() - 1) for k, p in params.items()}  # broadcast shapes
    groups = loss_groups(cfgs, device)
    specs = [get_loss(c.loss) for c in cfgs]
    perms = torch.stack([torch.randperm(n, generator=g) for g, _ in gens]).to(device)  # (M, n)
    noise_all = None  # (M, n, C): each random loss's draw, in its step order (zeros elsewhere)
    if any(s.random for s in specs):
        noise_all = torch.stack(
            [
                s.draw(n, C, generator=gd, device=device, **c.loss_params)
                if s.random
                else torch.zeros(n, C, device=device)
                for s, c, (_, gd) in zip(specs, cfgs, gens)
            ]
        )
    sums = torch.zeros(M, 3, dtype=torch.float64, device=device)  # loss·b, correct, ‖g‖
    resampled = 0
    for start in range(0, n, B):
        idx = perms[:, start : start + B]  # (M, b)
        xb, yb = x[idx], y[idx]  # (M, b, Ch, H, W), (M, b)
        noise = None if noise_all is None else noise_all[:, start : start + B]  # (M, b, C)
        if null_model is not None:
            weights = {k: p[0].detach() for k, p in params.items()}
            v, redrawn = resample_null_v(null_model, xb[0], noise[0], generator=gens[0][1],
                                         params=weights)  # fmt: skip
            noise, resampled = v.unsqueeze(0), resampled + redrawn
        out = forward(params, xb)  # (M, b, C)
        loss = grouped_losses(groups, out, F.one_hot(yb, C).to(out), noise).mean(1)  # (M,)
        grads = sum_over_ranks(torch.autograd.grad(loss.sum(), list(params.values())))
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads):
                bufs[k].mul_(mom.view(per_model[k])).add_(g)
                p.sub_(lr.view(per_model[k]) * bufs[k])
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # (M,)
            correct = (out.argmax(-1) == yb).sum(1)  # (M,)
            sums += torch.stack(
                [loss.double() * idx.size(1), correct.double(), norms.double()], dim=1
            )
        bar.update(1)
    steps = math.ceil(n / B)
    running = (sums / torch.tensor([n, n, steps], device=device)).tolist()
    keys = ("running_train_loss", "running_train_acc", "grad_norm")
    metrics = [dict(zip(keys, r)) for r in running]
    if null_model is not None:
        metrics[0]["resampled_v"] = resampled  # directions redrawn this epoch
    return metrics


@torch.no_grad()
def evaluate(
    forward: Any, params: dict[str, Tensor], x: Tensor, labels: Tensor, cfgs: Sequence[TrainConfig]
) -> list[dict[str, float]]:
    """Accuracy, loss and ½‖r‖² over the whole of (x, labels) of M stacked models, one dict
    per model: forward(params, chunk) → (M, b, C) (`qmse.stacked.stacked_forwards`), sums
    accumulated on the device and read once. Model m's loss is the registry's `expected`
    for cfgs[m].loss with its loss_params: for a random loss its mean over the noise (QMSE:
    ½‖r‖⁴ + ‖r‖²/(2C))."""
    M = len(cfgs)
    specs, mse = [get_loss(c.loss) for c in cfgs], get_loss("mse")
    sums = torch.zeros(M, 3, dtype=torch.float64, device=x.device)  # correct, loss, mse
    chunk = max(1, min(EVAL_CHUNK, EVAL_CHUNK * 4 // M))
    for start in range(0, x.size(0), chunk):
        out = forward(params, x[start : start + chunk]).float()  # (M, b, C)
        y = labels[start : start + chunk]
        onehot = F.one_hot(y, out.size(-1)).to(out)  # (b, C)
        for m, (spec, cfg) in enumerate(zip(specs, cfgs)):
            sums[m] += torch.stack(
                [
                    (out[m].argmax(-1) == y).sum().double(),
                    spec.expected(out[m], onehot, **cfg.loss_params).sum().double(),
                    mse.expected(out[m], onehot).sum().double(),
                ]
            )
    values = (sums / x.size(0)).tolist()
    return [{"acc": a, "loss": b, "mse": c} for a, b, c in values]


def train_task(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Runs of a training grid, the unit of a sweep (`qmse.sweep.run_tasks`): {"configs":
    [TrainConfig fields, ...], "out_dirs": [run directory, ...], "device": "auto" | "cpu" |
    "cuda" ...}.

    The runs are trained together by `train_many`; unfinished runs continue, finished ones
    return at once. The data set is read from the configs' data_dir on the worker's own
    machine, once per task. Returns, per run, its directory, the epochs it holds and whether
    its loss became non-finite (diverged runs do not raise).
    """
    dirs = [Path(d) for d in task["out_dirs"]]
    with contextlib.suppress(NonFiniteLossError):  # a run diverged before: diverged.json
        train_many(task["configs"], dirs, device=str(task.get("device", "auto")), quiet=True)
    return [
        {
            "out_dir": str(d),
            "epochs": len(runs.read_jsonl(d / "metrics.jsonl")),
            "diverged": (d / "diverged.json").exists(),
        }
        for d in dirs
    ]


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
