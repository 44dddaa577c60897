"""M SimpleCNNs as one model: their parameters stacked on a leading axis, {name: (M, ...)}.

The trainer (`qmse.train`) runs M ≥ 1 runs as one stack (`stack_parameters`):
`stacked_forwards` gives the M models' forward passes as functions of the stacked
parameters, `loss_groups` and `grouped_losses` give each model its own loss, and
`sgd_state_dict` and `momentum_buffers` write and read run m's momentum buffers in
torch.optim.SGD's state_dict, the format of a run's checkpoint.pt (`qmse.rundir`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from qmse.config import TrainConfig
from qmse.errors import UserError
from qmse.loss import Loss, get_loss
from qmse.rundir import build_model

BATCHINGS = ("vmap", "loop")  # how the trainer runs its M stacked models


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
        raise UserError(f"batching={batching!r}; expected one of {BATCHINGS} or 'auto'")
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


def stack_parameters(
    models: Sequence[nn.Module], memory_format: torch.memory_format
) -> dict[str, Tensor]:
    """The models' parameters stacked, {name: (M, ...)} leaves that require grad (as
    `torch.func.stack_module_state` makes them), each model's conv kernels (M, O, I, kh, kw)
    laid out in `memory_format`: with torch.channels_last, model m's slice has the strides
    `.to(memory_format=torch.channels_last)` gives its own kernels, without which the CPU's
    convolutions run well below their channels_last speed (benchmarks/train_speed.py)."""
    params, _ = stack_module_state(models)
    if memory_format != torch.channels_last:
        return params
    for name, p in params.items():
        if p.dim() == 5:
            m, c_out, c_in, kh, kw = p.shape
            laid = p.new_empty(m, c_out, kh, kw, c_in).permute(0, 1, 4, 2, 3)  # p's shape
            params[name] = laid.copy_(p.detach()).requires_grad_()
    return params


class LossGroup(NamedTuple):
    spec: Loss
    params: dict[str, float]  # the loss's parameters (label noise's sigma)
    idx: Tensor  # (k,) the models trained with this loss and these parameters


def loss_groups(cfgs: Sequence[TrainConfig], device: torch.device) -> list[LossGroup]:
    """The runs grouped by (loss, loss parameters), made once so that the training steps copy
    nothing from the host."""
    keys = [(c.loss, tuple(sorted(c.loss_params.items()))) for c in cfgs]
    return [
        LossGroup(
            get_loss(name),
            dict(params),
            torch.tensor([m for m, k in enumerate(keys) if k == (name, params)], device=device),
        )
        for name, params in dict.fromkeys(keys)
    ]


def grouped_losses(
    groups: list[LossGroup], out: Tensor, onehot: Tensor, noise: Tensor | None
) -> Tensor:
    """(M, b) per-sample training losses of M models with outputs out (M, b, C) and one-hot
    targets (M, b, C), each group of `loss_groups` computed together; noise (M, b, C) holds
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


def sgd_state_dict(model: nn.Module, buffers: Sequence[Tensor], lr: float, momentum: float) -> dict:
    """torch.optim.SGD(model.parameters(), lr, momentum).state_dict() after steps that left
    `buffers` (one per parameter, in order) as its momentum buffers: what checkpoint.pt holds.
    Without momentum SGD keeps no state."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if momentum:
        for p, buf in zip(model.parameters(), buffers, strict=True):
            opt.state[p]["momentum_buffer"] = buf
    return opt.state_dict()


def momentum_buffers(state_dict: Mapping[str, Any], count: int) -> list[Tensor] | None:
    """The `count` momentum buffers of a torch.optim.SGD state_dict, in parameter order, or
    None where it holds none (no momentum, or no step taken)."""
    state = state_dict["state"]
    if not state or state[0].get("momentum_buffer") is None:
        return None
    return [state[i]["momentum_buffer"] for i in range(count)]
