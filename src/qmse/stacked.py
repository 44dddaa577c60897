"""M training runs at once as one stacked model (torch.func), each writing its own run directory.

The M SimpleCNNs' parameters are stacked (`torch.func.stack_module_state`, {name: (M, ...)})
and every step is one forward, one backward and one update of the stack. Run m keeps its own
seed (initial weights, batch order, its loss's noise), loss, lr and momentum, and writes the
directory `qmse.train.train_run` would write for it, to float tolerance.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from qmse import runs
from qmse.errors import UserError
from qmse.loss import Loss, get_loss
from qmse.rundir import (
    Data,
    TrainConfig,
    build_model,
    claim_run,
    open_run,
    resolve_device,
    resolved_config,
    run_generators,
    save_epoch,
)
from qmse.train import (
    EVAL_CHUNK,
    check_finite,
    continued,
    epoch_line,
    epoch_lines,
    is_evaluated,
    load_data,
    metric_row,
)

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


class _LossGroup(NamedTuple):
    spec: Loss
    params: dict[str, float]  # the loss's parameters (label noise's sigma)
    idx: Tensor  # (k,) the models trained with this loss and these parameters


def _loss_groups(cfgs: Sequence[TrainConfig], device: torch.device) -> list[_LossGroup]:
    """The runs grouped by (loss, loss parameters), made once so that the training steps copy
    nothing from the host."""
    keys = [(c.loss, tuple(sorted(c.loss_params.items()))) for c in cfgs]
    return [
        _LossGroup(
            get_loss(name),
            dict(params),
            torch.tensor([m for m, k in enumerate(keys) if k == (name, params)], device=device),
        )
        for name, params in dict.fromkeys(keys)
    ]


def _grouped_losses(
    groups: list[_LossGroup], out: Tensor, onehot: Tensor, noise: Tensor | None
) -> Tensor:
    """(M, b) per-sample training losses of M models with outputs out (M, b, C) and one-hot
    targets (M, b, C), each group of `_loss_groups` computed together; noise (M, b, C) holds
    the random losses' draws (rows of the deterministic ones unused)."""
    M, b, C = out.shape
    per_sample = out.new_zeros(M, b)
    for spec, params, idx in groups:
        rows = noise[idx].reshape(-1, C) if spec.random else None  # (k·b, C)
        loss = spec(
            out[idx].reshape(-1, C), onehot[idx].reshape(-1, C), noise=rows, reduction="none",
            **params,
        )  # fmt: skip
        per_sample = per_sample.index_add(0, idx, loss.view(len(idx), b))
    return per_sample


def train_many(
    configs: Sequence[TrainConfig | Mapping[str, Any]],
    out_dirs: Sequence[str | Path],
    *,
    dataset: Any = None,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    batching: str = "auto",
    on_epoch: Sequence[Callable[[dict], None] | None] | None = None,
) -> list[list[dict]]:
    """Train M runs at once, as one stacked model, and return each run's metric rows.

    The M SimpleCNNs' parameters are stacked (`torch.func.stack_module_state`) and every
    step is one forward, one backward and one update of the stack, run by `stacked_forwards`
    with `batching` ("auto": "vmap" on CUDA, "loop" elsewhere). Each run keeps its own seed
    (initial weights, batch order, its loss's noise), loss, lr and momentum, so run m writes
    the same directory, to float tolerance, as `qmse.train.train_run(configs[m], out_dirs[m])`.
    The SGD step is written out (PyTorch's convention: buf ← momentum·buf + g, w ← w − lr·buf)
    so lr and momentum may differ per run. The runs must share SHARED_FIELDS, and, when they
    continue from checkpoints (as train_run's do), their epoch. Every directory is claimed
    for the whole call. A run whose loss becomes non-finite gets diverged.json, keeps its
    last good checkpoint and stops being saved; the others go on. Evaluation, progress
    lines and `on_epoch` (one callable or None per run, called with each new row of its
    run) are train_run's.
    """
    cfgs = [c if isinstance(c, TrainConfig) else TrainConfig.from_dict(c) for c in configs]
    outs, device = [Path(o) for o in out_dirs], resolve_device(device)
    if not cfgs or len(cfgs) != len(outs):
        raise UserError(f"got {len(cfgs)} configs and {len(outs)} out_dirs; need as many, >= 1")
    hooks = list(on_epoch) if on_epoch is not None else [None] * len(cfgs)
    if len(hooks) != len(cfgs):
        raise UserError(f"got {len(hooks)} on_epoch hooks for {len(cfgs)} runs; give one each")
    if any(c.resample_null for c in cfgs):
        raise UserError("resample_null is supported by train_run only; train those runs alone")
    for name in SHARED_FIELDS:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise UserError(
                f"train_many needs one {name} for all runs, got "
                f"{sorted({str(getattr(c, name)) for c in cfgs})}; train them in groups"
            )
    data, dataset = load_data(cfgs[0], dataset, device)
    resolved = [resolved_config(c, data, device, dataset) for c in cfgs]
    if batching == "auto":
        batching = "vmap" if device.type == "cuda" else "loop"
    train_forward, eval_forward = stacked_forwards(resolved[0]["model"], batching)
    models = [build_model(r["model"], c.seed).to(device) for r, c in zip(resolved, cfgs)]
    gens = [run_generators(c.seed) for c in cfgs]
    with contextlib.ExitStack() as claims:
        for out in outs:
            claims.enter_context(claim_run(out))
        return _train_many(
            cfgs, outs, data, resolved, models, gens, device, quiet, train_forward, eval_forward,
            hooks,
        )  # fmt: skip


def _train_many(
    cfgs: list[TrainConfig],
    outs: list[Path],
    data: Data,
    resolved: list[dict],
    models: list[torch.nn.Module],
    gens: list[tuple[torch.Generator, torch.Generator]],
    device: torch.device,
    quiet: bool,
    train_forward: Any,
    eval_forward: Any,
    hooks: list[Callable[[dict], None] | None],
) -> list[list[dict]]:
    """train_many's work once its directories are claimed: open or continue every run, then
    train the stack epoch by epoch."""
    cfg0, M = cfgs[0], len(cfgs)
    momentum_bufs: list[dict[str, Tensor] | None] = [None] * M
    rows: list[list[dict]] = [[] for _ in range(M)]
    timings: list[list[dict]] = [[] for _ in range(M)]
    for m, (out, r) in enumerate(zip(outs, resolved)):
        ckpt = open_run(out, r, device)
        continued(out, ckpt, cfgs[m].epochs, quiet)
        if ckpt is None:
            continue
        models[m].load_state_dict(ckpt["model"])
        gens[m][0].set_state(ckpt["order_rng"])
        gens[m][1].set_state(ckpt["direction_rng"])
        names = [n for n, _ in models[m].named_parameters()]
        state = ckpt["optimizer"]["state"]
        if state and state[0].get("momentum_buffer") is not None:
            momentum_bufs[m] = {
                n: state[i]["momentum_buffer"].to(device) for i, n in enumerate(names)
            }
        rows[m], timings[m] = ckpt["metrics"], ckpt.get("timings", [])
    if len({len(r) for r in rows}) > 1:
        raise UserError(
            f"train_many resumes runs at one epoch; these are at epochs "
            f"{[len(r) for r in rows]}: bring them level with train_run first"
        )

    params, _ = stack_module_state(models)  # name -> (M, ...) leaf tensors
    names = list(params)
    bufs = {  # zeros where a run has no buffer yet: momentum·0 + g = g, PyTorch's first step
        n: torch.stack([b[n] if b else torch.zeros_like(params[n][0]) for b in momentum_bufs])
        for n in names
    }
    alive = [True] * M
    lines = epoch_lines(quiet)
    steps = math.ceil(data.x_train.size(0) / cfg0.batch_size)
    epochs = runs.progress(range(len(rows[0]) + 1, cfg0.epochs + 1), quiet=quiet, desc=f"{M} runs")
    for epoch in epochs:
        t0 = time.perf_counter()
        with runs.progress(total=steps, quiet=quiet, desc=f"epoch {epoch}") as bar:
            running = _train_epoch_many(train_forward, params, bufs, cfgs, data, gens, bar)
        train = test = [None] * M
        if is_evaluated(epoch, cfg0):
            with torch.no_grad():
                train = _evaluate_many(eval_forward, params, data.x_train, data.y_train, cfgs)
                test = _evaluate_many(eval_forward, params, data.x_test, data.y_test, cfgs)
        wall = (time.perf_counter() - t0) / M
        for m in range(M):
            if not alive[m]:
                continue
            row = metric_row(epoch, train[m], test[m], running[m])
            if check_finite(row, cfgs[m], outs[m]):
                alive[m] = False
                continue
            rows[m].append(row)
            timings[m].append({"epoch": epoch, "wall_s": wall})
            state = {k: params[k][m].detach().clone() for k in names}
            opt = torch.optim.SGD(models[m].parameters(), lr=cfgs[m].lr, momentum=cfgs[m].momentum)
            if cfgs[m].momentum:
                for k, p in zip(names, models[m].parameters()):
                    opt.state[p]["momentum_buffer"] = bufs[k][m].clone()
            save_epoch(outs[m], state, opt.state_dict(), gens[m], rows[m], timings[m])
            if lines:
                print(epoch_line(outs[m].name, row, cfgs[m].epochs, wall), file=sys.stderr)
            if hooks[m] is not None:
                hooks[m](row)
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
    if batching not in BATCHINGS:
        raise UserError(
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
    """qmse.train's epoch for M stacked models (params and momentum buffers (M, ...), updated in
    place); returns each model's running metrics. Read back once, at the end."""
    M, device = len(cfgs), data.x_train.device
    x, y, C = data.x_train, data.y_train, data.num_classes
    n, B = x.size(0), cfgs[0].batch_size
    lr = torch.tensor([c.lr for c in cfgs], device=device)  # (M,)
    mom = torch.tensor([c.momentum for c in cfgs], device=device)  # (M,)
    groups = _loss_groups(cfgs, device)
    names = list(params)
    perms = torch.stack([torch.randperm(n, generator=g) for g, _ in gens]).to(device)  # (M, n)
    noise_all = None  # (M, n, C): each random loss's draw, in its step order (zeros elsewhere)
    if any(get_loss(c.loss).random for c in cfgs):
        noise_all = torch.stack(
            [
                get_loss(c.loss).draw(n, C, generator=gd, device=device, **c.loss_params)
                if get_loss(c.loss).random
                else torch.zeros(n, C, device=device)
                for (_, gd), c in zip(gens, cfgs)
            ]
        )
    sums = torch.zeros(M, 3, dtype=torch.float64, device=device)  # loss·b, correct, ‖g‖
    for start in range(0, n, B):
        idx = perms[:, start : start + B]  # (M, b)
        out = train_forward(params, x[idx])  # (M, b, C)
        yb = y[idx]  # (M, b)
        onehot = F.one_hot(yb, C).to(out)  # (M, b, C)
        noise = noise_all[:, start : start + B] if noise_all is not None else None
        loss = _grouped_losses(groups, out, onehot, noise).mean(1)  # (M,)
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
    eval_forward: Any, params: dict[str, Tensor], x: Tensor, labels: Tensor, cfgs: Sequence
) -> list[dict[str, float]]:
    """`qmse.train.evaluate` for M stacked models at once: one dict per model."""
    M = len(cfgs)
    specs, mse = [get_loss(c.loss) for c in cfgs], get_loss("mse")
    sums = torch.zeros(M, 3, dtype=torch.float64, device=x.device)  # correct, loss, mse
    chunk = max(1, EVAL_CHUNK * 4 // M)
    for start in range(0, x.size(0), chunk):
        out = eval_forward(params, x[start : start + chunk]).float()  # (M, b, C)
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
