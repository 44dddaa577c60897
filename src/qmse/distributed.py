"""Data parallelism under torchrun: this process's rank, and a forward sharded over ranks.

Under `torchrun --nproc-per-node N` every rank holds the whole data set and the same
generators, so every rank draws the same epoch permutation and the same QMSE directions v
(one per sample, in step order): v is a function of (seed, epoch, position in the epoch),
never of the rank. `data_parallel` wraps the model so that each rank runs the forward and
backward pass on its 1/N share of every batch (DistributedDataParallel averages the
gradients) and every rank sees the whole batch's output. The loss, the metrics and the update
are then those of one process, up to the order of floating-point sums, whatever N is.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qmse.errors import UserError


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
    with WORLD_SIZE=1, nothing is initialised and `device` is returned as it is.
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
        atexit.register(dist.destroy_process_group)
    return device


def data_parallel(model: nn.Module) -> nn.Module:
    """`model` itself outside a process group of several ranks, else a ShardedForward
    around it (same parameters: optimise and checkpoint `model` as usual)."""
    return ShardedForward(model) if world()[1] > 1 else model


class _GatherRows(torch.autograd.Function):
    """(per, C) on each rank → (world·per, C), rank-major, on every rank.

    Backward: every rank computes the same loss from the same gathered output, so each holds
    the whole gradient; a rank keeps its own rows, times the world size because
    DistributedDataParallel averages (not sums) the ranks' parameter gradients.
    """

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:
        rank, size = world()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous())
        ctx.rows, ctx.rank, ctx.size = local.size(0), rank, size
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows] * ctx.size


class ShardedForward(nn.Module):
    """Data-parallel forward of a whole batch: rank r runs `module` (wrapped in
    DistributedDataParallel) on rows [r·per, (r+1)·per) of the batch, per = ⌈B/N⌉, zero-padded
    to `per` rows when the batch runs short, and every rank gets the whole (B, C) output.

    The caller's loss over the whole batch then has the gradient of one process; the only
    difference is the order of floating-point sums.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        device = next(module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def forward(self, x: Tensor) -> Tensor:
        rank, size = world()
        b = x.size(0)
        per = -(-b // size)
        local = x[rank * per : (rank + 1) * per]  # (≤ per, ...)
        if local.size(0) < per:
            pad = local.new_zeros((per - local.size(0), *x.shape[1:]))
            local = torch.cat([local, pad])  # (per, ...)
        return _GatherRows.apply(self.ddp(local))[:b]  # (b, C)
