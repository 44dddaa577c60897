"""One training run of the paper's experiments (sec. 4), resumable and reproducible.

A run is (dataset, loss, SGD lr and momentum, batch size, epochs, seed, device). The data
sits on the device as one tensor; each epoch draws a permutation of the training set and,
for QMSE, one direction v per sample, both from generators seeded by the run's seed, and
batches are slices of them. So a run is a pure function of its config: killed and resumed
from its last checkpoint it writes the same metrics as a run that was never interrupted.

The squared losses see one-hot targets; "ce" sees class indices. MSE and QMSE runs with the
same seed start from the same weights and visit the data in the same order, so their
difference is paired.

A run directory holds
    config.json     the resolved TrainConfig, the model's constructor arguments, provenance
    metrics.jsonl   one row per epoch (METRIC_KEYS, plus "wall_s", the epoch's seconds)
    checkpoint.pt   model, optimizer, both generators' states, epoch and the metric rows
all written atomically at the end of every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmse import runs
from qmse.distributed import data_parallel, is_main, world
from qmse.loss import compute_loss, qmse_loss, sample_directions
from qmse.nullspace import resample_null_v
from qmse.rundir import (
    Data,
    NonFiniteLossError,
    TrainConfig,
    build_model,
    open_run,
    prepare_data,
    resolved_config,
    run_generators,
    save_epoch,
)

# Learning rates of the paper's figures: 0.01 on MNIST (fig. 1), 0.1 on CIFAR (figs. 2-3).
# Fashion-MNIST has MNIST's shape and gets MNIST's rate.
PAPER_LR = {"mnist": 0.01, "fashion-mnist": 0.01, "cifar10": 0.1, "cifar100": 0.1}

METRIC_KEYS = (
    "epoch",
    "train_acc",  # full train set, eval mode, after the epoch
    "train_loss",  # the run's loss on the full train set (QMSE: its expectation over v)
    "train_mse",  # ½‖r‖² per sample, mean: comparable across losses
    "test_acc",
    "test_loss",
    "test_mse",
    "running_train_acc",  # accuracy of the minibatch outputs during the epoch
    "running_train_loss",  # mean minibatch loss during the epoch (QMSE: with its v draws)
    "grad_norm",  # mean over the epoch's steps of ‖∇ minibatch loss‖₂
)

_EVAL_CHUNK = 1000  # samples per forward pass when measuring the full sets


def _per_sample_loss(name: str, out: Tensor, onehot: Tensor, labels: Tensor) -> Tensor:
    """(N,) loss values to report. QMSE's depends on v: report its expectation over v,
    E_v ½⟨r + v, r⟩² = ½‖r‖⁴ + ‖r‖²/(2C) (E v = 0, E vvᵀ = I/C)."""
    if name == "ce":
        return F.cross_entropy(out, labels, reduction="none")
    s = ((onehot - out) ** 2).sum(-1)  # (N,)  ‖r‖²
    C = out.size(-1)
    if name == "mse":
        return 0.5 * s
    if name == "qmse":
        return 0.5 * s**2 + s / (2 * C)
    return 0.25 * s**2 + s / (2 * C)  # expected-qmse


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, labels: Tensor, loss: str) -> dict[str, float]:
    """Accuracy, loss (as `_per_sample_loss`) and ½‖r‖² of `model` over the whole of (x, labels),
    in eval mode, accumulated on the device and read once. The model's mode is restored."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # correct, loss, mse
    for start in range(0, x.size(0), _EVAL_CHUNK):
        out = model(x[start : start + _EVAL_CHUNK]).float()  # (b, C)
        y = labels[start : start + _EVAL_CHUNK]
        onehot = F.one_hot(y, out.size(-1)).to(out)  # (b, C)
        sums += torch.stack(
            [
                (out.argmax(-1) == y).sum().double(),
                _per_sample_loss(loss, out, onehot, y).sum().double(),
                _per_sample_loss("mse", out, onehot, y).sum().double(),
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
    perm = torch.randperm(n, generator=order_gen, device=x.device)  # (n,)
    if cfg.loss == "qmse":  # one v per sample, in the epoch's step order (note 5)
        v_all = sample_directions(n, C, generator=direction_gen, device=x.device)  # (n, C)
    params = list(model.parameters())
    sums = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss·b, correct, ‖g‖
    steps = resampled = 0
    for start in range(0, n, cfg.batch_size):
        idx = perm[start : start + cfg.batch_size]  # (b,)
        out = model(x[idx])  # (b, C)
        yb = y[idx]
        if cfg.loss == "qmse":
            target = F.one_hot(yb, C).to(out)  # (b, C)
            v = v_all[start : start + cfg.batch_size]  # (b, C)
            if cfg.resample_null:  # costs a per-sample VJP and a host sync per step
                v, redrawn = resample_null_v(model, x[idx], v, generator=direction_gen)
                resampled += redrawn
            loss = qmse_loss(out, target, v=v)
        elif cfg.loss == "ce":
            loss = compute_loss("ce", out, yb)
        else:
            loss = compute_loss(cfg.loss, out, F.one_hot(yb, C).to(out))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
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


def _load_data(cfg: TrainConfig, dataset: Any, device: torch.device) -> Data:
    """The run's data on `device`, images in `memory_format(device)`."""
    if dataset is None:
        data = prepare_data(cfg, device)
    elif getattr(dataset, "name", cfg.dataset) != cfg.dataset:
        raise ValueError(f"dataset is {dataset.name!r} but config.dataset is {cfg.dataset!r}")
    else:
        sub = {"train_subset": cfg.train_subset, "test_subset": cfg.test_subset}
        data = prepare_data(dataset, device, **sub)
    layout = memory_format(device)
    return data._replace(
        x_train=data.x_train.contiguous(memory_format=layout),
        x_test=data.x_test.contiguous(memory_format=layout),
    )


def _metric_row(epoch: int, train: dict, test: dict, running: dict, wall_s: float) -> dict:
    return {
        "epoch": epoch,
        "train_acc": train["acc"],
        "train_loss": train["loss"],
        "train_mse": train["mse"],
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_mse": test["mse"],
        **running,
        "wall_s": wall_s,
    }


def _check_finite(row: dict, cfg: TrainConfig, out: Path) -> str | None:
    """None if every metric is finite; else record diverged.json and return the message."""
    if all(math.isfinite(row[k]) for k in METRIC_KEYS):
        return None
    message = (
        f"{cfg.loss} run in {out}: the loss became non-finite in epoch {row['epoch']} "
        f"(running loss {row['running_train_loss']}, train loss {row['train_loss']}) at "
        f"lr={cfg.lr}, momentum={cfg.momentum}; the last good checkpoint (epoch "
        f"{row['epoch'] - 1}) is kept. Try a smaller --lr."
    )
    if is_main():
        runs.save_json(out / "diverged.json", {"epoch": row["epoch"], "message": message})
    return message


def train_run(
    config: TrainConfig | Mapping[str, Any],
    out_dir: str | Path,
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    quiet: bool = False,
) -> list[dict]:
    """Train one run into `out_dir` and return its metric rows (one per epoch).

    `dataset` (a qmse.data.Dataset named like config.dataset) skips loading from disk.
    With `resume`, a run directory holding a checkpoint continues from it (a finished run
    returns at once; a larger `epochs` extends it); without, such a directory is an error.
    Raises NonFiniteLossError if the loss becomes non-finite, leaving the last good
    checkpoint and metrics in place and a `diverged.json` that records the epoch.
    In a process group of N ranks (torchrun; `qmse.distributed.init_distributed`) every rank runs
    this with the same arguments: each computes its 1/N of every batch (`data_parallel`),
    rank 0 alone writes, and the metrics are those of one process to float rounding.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if cfg.resample_null and world()[1] > 1:
        raise ValueError("resample_null is not supported under torchrun; train in one process")
    out, device = Path(out_dir), torch.device(device)
    data = _load_data(cfg, dataset, device)
    resolved = resolved_config(cfg, data, device)
    model = build_model(resolved["model"], cfg.seed).to(device, memory_format=memory_format(device))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gens = run_generators(cfg.seed, device)
    rows: list[dict] = []
    if (ckpt := open_run(out, resolved, device, resume)) is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gens[0].set_state(ckpt["order_rng"])
        gens[1].set_state(ckpt["direction_rng"])
        rows = ckpt["metrics"]

    net = data_parallel(model)  # under torchrun: each rank a share of every batch
    quiet = quiet or not is_main()
    steps = math.ceil(data.x_train.size(0) / cfg.batch_size)
    label = f"{cfg.loss} m={cfg.momentum:g} seed={cfg.seed}"
    epochs = runs.progress(range(len(rows) + 1, cfg.epochs + 1), quiet=quiet, desc=label)
    for epoch in epochs:
        t0 = time.perf_counter()
        with runs.progress(total=steps, quiet=quiet, desc=f"epoch {epoch}") as bar:
            running = _train_epoch(net, opt, data, cfg, *gens, bar)
        train = evaluate(net, data.x_train, data.y_train, cfg.loss)
        test = evaluate(net, data.x_test, data.y_test, cfg.loss)
        row = _metric_row(epoch, train, test, running, time.perf_counter() - t0)
        if message := _check_finite(row, cfg, out):
            raise NonFiniteLossError(message)
        rows.append(row)
        save_epoch(out, model.state_dict(), opt.state_dict(), gens, rows)
        epochs.set_postfix(train_acc=f"{row['train_acc']:.4f}", test_acc=f"{row['test_acc']:.4f}")
    return rows


# ---- many runs at once (torch.func) -------------------------------------------------------

SHARED_FIELDS = (
    "dataset",
    "data_dir",
    "train_subset",
    "test_subset",
    "batch_size",
    "epochs",
    "channels",
    "hidden",
)  # what every run trained together by `train_many` must share


def _loss_groups(names: Sequence[str], device: torch.device) -> list[tuple[str, Tensor]]:
    """Each distinct loss in `names` with the indices of the models that use it, made once so
    that the training steps copy nothing from the host."""
    return [
        (name, torch.tensor([m for m, n in enumerate(names) if n == name], device=device))
        for name in dict.fromkeys(names)
    ]


def _grouped_losses(
    groups: list[tuple[str, Tensor]], out: Tensor, onehot: Tensor, labels: Tensor, v: Tensor | None
) -> Tensor:
    """(M, b) per-sample training losses of M models with outputs out (M, b, C), the models of
    each of `_loss_groups` computed together; v (M, b, C) holds QMSE's directions."""
    M, b, C = out.shape
    per_sample = out.new_zeros(M, b)
    for name, idx in groups:
        o = out[idx].reshape(-1, C)  # (k·b, C)
        if name == "qmse":
            t = onehot[idx].reshape(-1, C)
            loss = qmse_loss(o, t, v=v[idx].reshape(-1, C), reduction="none")
        elif name == "ce":
            loss = F.cross_entropy(o, labels[idx].reshape(-1), reduction="none")
        else:
            loss = compute_loss(name, o, onehot[idx].reshape(-1, C), reduction="none")
        per_sample = per_sample.index_add(0, idx, loss.view(len(idx), b))
    return per_sample


def train_many(
    configs: Sequence[TrainConfig | Mapping[str, Any]],
    out_dirs: Sequence[str | Path],
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    quiet: bool = False,
    batching: str = "auto",
) -> list[list[dict]]:
    """Train M runs at once, as one stacked model, and return each run's metric rows.

    The M SimpleCNNs' parameters are stacked (`torch.func.stack_module_state`) and every
    step is one forward, one backward and one update of the stack, run by `stacked_forwards`
    with `batching` ("auto": "vmap" on CUDA, "loop" elsewhere). Each run keeps its own seed
    (initial weights, batch order, QMSE's v), loss, lr and momentum, so run m writes the same
    directory, to float tolerance, as `train_run(configs[m], out_dirs[m])` (tested). The SGD
    step is written out (PyTorch's convention: buf ← momentum·buf + g, w ← w − lr·buf) so lr
    and momentum may differ per run. The runs must share SHARED_FIELDS, and, when resumed,
    their epoch. A run whose loss becomes non-finite gets diverged.json, keeps its last good
    checkpoint and stops being saved; the others go on.
    """
    from torch.func import stack_module_state

    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    outs, device = [Path(o) for o in out_dirs], torch.device(device)
    if not cfgs or len(cfgs) != len(outs):
        raise ValueError(f"got {len(cfgs)} configs and {len(outs)} out_dirs; need as many, >= 1")
    if any(c.resample_null for c in cfgs):
        raise ValueError("resample_null is supported by train_run only; train those runs alone")
    for name in SHARED_FIELDS:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise ValueError(
                f"train_many needs one {name} for all runs, got "
                f"{sorted({str(getattr(c, name)) for c in cfgs})}; train them in groups"
            )
    cfg0, M = cfgs[0], len(cfgs)
    data = _load_data(cfg0, dataset, device)
    resolved = [resolved_config(c, data, device) for c in cfgs]
    if batching == "auto":
        batching = "vmap" if device.type == "cuda" else "loop"
    train_forward, eval_forward = stacked_forwards(resolved[0]["model"], batching)
    models = [build_model(r["model"], c.seed).to(device) for r, c in zip(resolved, cfgs)]
    gens = [run_generators(c.seed, device) for c in cfgs]
    momentum_bufs: list[dict[str, Tensor] | None] = [None] * M
    rows: list[list[dict]] = [[] for _ in range(M)]
    for m, (out, r) in enumerate(zip(outs, resolved)):
        if (ckpt := open_run(out, r, device, resume)) is None:
            continue
        models[m].load_state_dict(ckpt["model"])
        gens[m][0].set_state(ckpt["order_rng"])
        gens[m][1].set_state(ckpt["direction_rng"])
        names = [n for n, _ in models[m].named_parameters()]
        state = ckpt["optimizer"]["state"]
        if state and state[0].get("momentum_buffer") is not None:
            momentum_bufs[m] = {n: state[i]["momentum_buffer"] for i, n in enumerate(names)}
        rows[m] = ckpt["metrics"]
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            f"train_many resumes runs at one epoch; these are at epochs "
            f"{[len(r) for r in rows]}: bring them level with train_run first"
        )

    params, _ = stack_module_state(models)  # name -> (M, ...) leaf tensors
    names = list(params)
    bufs = {  # zeros where a run has no buffer yet: momentum·0 + g = g, PyTorch's first step
        n: torch.stack([b[n] if b else torch.zeros_like(params[n][0]) for b in momentum_bufs])
        for n in names
    }
    losses = [c.loss for c in cfgs]
    alive = [True] * M
    steps = math.ceil(data.x_train.size(0) / cfg0.batch_size)
    epochs = runs.progress(range(len(rows[0]) + 1, cfg0.epochs + 1), quiet=quiet, desc=f"{M} runs")
    for epoch in epochs:
        t0 = time.perf_counter()
        with runs.progress(total=steps, quiet=quiet, desc=f"epoch {epoch}") as bar:
            running = _train_epoch_many(train_forward, params, bufs, cfgs, data, gens, bar)
        with torch.no_grad():
            train = _evaluate_many(eval_forward, params, data.x_train, data.y_train, losses)
            test = _evaluate_many(eval_forward, params, data.x_test, data.y_test, losses)
        wall = (time.perf_counter() - t0) / M
        for m in range(M):
            if not alive[m]:
                continue
            row = _metric_row(epoch, train[m], test[m], running[m], wall)
            if _check_finite(row, cfgs[m], outs[m]):
                alive[m] = False
                continue
            rows[m].append(row)
            state = {k: params[k][m].detach().clone() for k in names}
            opt = torch.optim.SGD(models[m].parameters(), lr=cfgs[m].lr, momentum=cfgs[m].momentum)
            if cfgs[m].momentum:
                for k, p in zip(names, models[m].parameters()):
                    opt.state[p]["momentum_buffer"] = bufs[k][m].clone()
            save_epoch(outs[m], state, opt.state_dict(), gens[m], rows[m])
        if not any(alive):
            break
    return rows


BATCHINGS = ("vmap", "loop")  # how `train_many` runs its M stacked models


def stacked_forwards(args: Mapping[str, Any], batching: str) -> tuple[Any, Any]:
    """SimpleCNN(**args) as functions of stacked parameters {name: (M, ...)}: one for M
    batches (M, b, Ch, H, W) and one for a shared batch (b, Ch, H, W), both → (M, b, C).

    "vmap" runs the M models as one batched model (`torch.func.vmap`: grouped convolutions,
    batched matrix products), which pays where kernel launches dominate, as on a GPU. "loop"
    runs them one after another on views of the stack: on the CPU, where each model's
    kernels already keep the cores busy, grouped convolutions are slower than separate ones
    (docs/benchmarks.md). Both give the same outputs and gradients to float rounding.
    """
    from torch.func import functional_call, vmap

    if batching not in BATCHINGS:
        raise ValueError(
            f"batching={batching!r}; expected one of {BATCHINGS} (train_many: or 'auto')"
        )
    base = build_model(args, 0).to("meta")

    def forward(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, p, (x,))

    if batching == "vmap":
        return vmap(forward), vmap(forward, in_dims=(0, None))

    def per_model(p: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        # unbind, not p[k][m]: its backward stacks the M gradients instead of adding M
        # zero-padded (M, ...) tensors
        return [dict(zip(p, views)) for views in zip(*(t.unbind(0) for t in p.values()))]

    def train_loop(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.stack([forward(pm, xm) for pm, xm in zip(per_model(p), x)])

    def eval_loop(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.stack([forward(pm, x) for pm in per_model(p)])

    return train_loop, eval_loop


def _train_epoch_many(
    train_forward: Any,
    params: dict[str, Tensor],
    bufs: dict[str, Tensor],
    cfgs: Sequence[TrainConfig],
    data: Data,
    gens: Sequence[tuple[torch.Generator, torch.Generator]],
    bar: Any,
) -> list[dict[str, float]]:
    """`_train_epoch` for M stacked models (params and momentum buffers (M, ...), updated in
    place); returns each model's running metrics. Read back once, at the end."""
    M, device = len(cfgs), data.x_train.device
    x, y, C = data.x_train, data.y_train, data.num_classes
    n, B = x.size(0), cfgs[0].batch_size
    lr = torch.tensor([c.lr for c in cfgs], device=device)  # (M,)
    mom = torch.tensor([c.momentum for c in cfgs], device=device)  # (M,)
    losses = [c.loss for c in cfgs]
    groups = _loss_groups(losses, device)
    names = list(params)
    perms = torch.stack([torch.randperm(n, generator=g, device=device) for g, _ in gens])
    v_all = None  # (M, n, C): each QMSE run's v, in its step order (zeros for the others)
    if "qmse" in losses:
        v_all = torch.stack(
            [
                sample_directions(n, C, generator=gd, device=device)
                if loss == "qmse"
                else torch.zeros(n, C, device=device)
                for (_, gd), loss in zip(gens, losses)
            ]
        )
    sums = torch.zeros(M, 3, dtype=torch.float64, device=device)  # loss·b, correct, ‖g‖
    for start in range(0, n, B):
        idx = perms[:, start : start + B]  # (M, b)
        out = train_forward(params, x[idx])  # (M, b, C)
        yb = y[idx]  # (M, b)
        onehot = F.one_hot(yb, C).to(out)  # (M, b, C)
        v = v_all[:, start : start + B] if v_all is not None else None
        loss = _grouped_losses(groups, out, onehot, yb, v).mean(1)  # (M,)
        grads = torch.autograd.grad(loss.sum(), [params[k] for k in names])
        with torch.no_grad():
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads])  # (P, M)
            for k, g in zip(names, grads):
                shape = (M,) + (1,) * (g.dim() - 1)
                bufs[k].mul_(mom.view(shape)).add_(g)
                params[k].sub_(lr.view(shape) * bufs[k])
            correct = (out.argmax(-1) == yb).sum(1)  # (M,)
            sums += torch.stack(
                [loss.double() * idx.size(1), correct.double(), norms.norm(dim=0).double()],
                dim=1,
            )
        bar.update(1)
    steps = math.ceil(n / B)
    running = (sums / torch.tensor([n, n, steps], device=device)).tolist()
    keys = ("running_train_loss", "running_train_acc", "grad_norm")
    return [dict(zip(keys, r)) for r in running]


def _evaluate_many(
    eval_forward: Any, params: dict[str, Tensor], x: Tensor, labels: Tensor, losses: list[str]
) -> list[dict[str, float]]:
    """`evaluate` for M stacked models at once: one dict per model."""
    M = len(losses)
    sums = torch.zeros(M, 3, dtype=torch.float64, device=x.device)  # correct, loss, mse
    chunk = max(1, _EVAL_CHUNK * 4 // M)
    for start in range(0, x.size(0), chunk):
        out = eval_forward(params, x[start : start + chunk]).float()  # (M, b, C)
        y = labels[start : start + chunk]
        onehot = F.one_hot(y, out.size(-1)).to(out)  # (b, C)
        for m, name in enumerate(losses):
            sums[m] += torch.stack(
                [
                    (out[m].argmax(-1) == y).sum().double(),
                    _per_sample_loss(name, out[m], onehot, y).sum().double(),
                    _per_sample_loss("mse", out[m], onehot, y).sum().double(),
                ]
            )
    values = (sums / x.size(0)).tolist()
    return [{"acc": a, "loss": b, "mse": c} for a, b, c in values]
