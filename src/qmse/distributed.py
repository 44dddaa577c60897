"""Data parallelism under torchrun: this process's rank, and a forward sharded over ranks.

Under `torchrun --nproc-per-node N` every rank holds the whole data set and the same
generators, so every rank draws the same epoch permutation and the same QMSE directions v
(one per sample, in step order): v is a function of (seed, epoch, position in the epoch),
never of the rank. `data_parallel` wraps the trainer's forward (a function of the stacked
parameters, `qmse.stacked`) so that each rank runs the forward and backward pass on its 1/N
share of every batch and every rank sees the whole batch's output; `sum_over_ranks` adds
the ranks' gradients. The loss, the metrics and the update are then those of one process,
up to the order of floating-point sums, whatever N is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from qmse.errors import UserError

Forward = Callable[[Any, Tensor], Tensor]  # (params, x) -> (M, B, C): M models' outputs


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and outside a process group): the process that writes files."""
    return world()[0] == 0


def init_distributed(device: torch.device | str) -> torch.device:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) and return this rank's device.

    nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Without torchrun's environment, or
    with WORLD_SIZE=1, nothing is initialised and `device` is returned as it is. Leave the
    group with `close_distributed` when the run is done.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"device={device}; data-parallel runs need cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_distributed() -> None:
    """Leave the process group together, after the last collective of a run that succeeded:
    a barrier, then `destroy_process_group` (PyTorch's documented shutdown). Outside a process
    group: nothing. Not after a failure: torchrun stops the other ranks, and a barrier would
    wait for a rank that never comes. It does not stop gloo from aborting a rank in the
    interpreter's teardown ("terminate called without an active exception", SIGABRT: 2 of
    110 `qmse train` runs on 2 loaded CPU ranks), which is why the CLI ends a rank with
    `os._exit` once its files are closed (`qmse.cli.run`)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def data_parallel(forward: Forward, dim: int = 0) -> Forward:
    """`forward` itself outside a process group of several ranks, else `forward` sharded over
    the ranks: same arguments (params, x), x holding B rows along `dim`, same (M, B, C) output.

    Rank r runs `forward` on rows [r·per, (r+1)·per) of x along `dim`, per = ⌈B/N⌉,
    zero-padded to `per` rows when the batch runs short, and every rank gets the whole
    output. A gradient through it reaches the parameters from the rank's own rows only: sum
    the ranks' gradients with `sum_over_ranks` to get one process's gradient.
    """
    if world()[1] == 1:
        return forward

    def sharded(params: Any, x: Tensor) -> Tensor:
        rank, size = world()
        b = x.size(dim)
        per = -(-b // size)
        local = x[(slice(None),) * dim + (slice(rank * per, (rank + 1) * per),)]  # ≤ per rows
        if local.size(dim) < per:
            shape = list(x.shape)
            shape[dim] = per - local.size(dim)
            local = torch.cat([local, local.new_zeros(shape)], dim)  # per rows
        return _GatherRows.apply(forward(params, local))[:, :b]  # (M, b, C)

    return sharded


def sum_over_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors summed over the ranks, on every rank (one all_reduce of them all); the
    tensors themselves outside a process group of several ranks."""
    if world()[1] == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _GatherRows(torch.autograd.Function):
    """(M, per, C) on each rank → (M, world·per, C), rank-major along dim 1, on every rank.

    Backward: every rank computes the same loss from the same gathered output, so each holds
    the whole output gradient; a rank keeps its own rows (`sum_over_ranks` adds the ranks'
    parameter gradients).
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:
        rank, size = world()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous())
        ctx.rows, ctx.rank = local.size(1), rank
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        start = ctx.rank * ctx.rows
        return grad[:, start : start + ctx.rows]
