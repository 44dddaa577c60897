"""QMSE's null-space rule (sec. 3.1): a direction v_i with ‖J_iᵀ v_i‖ ≈ 0 moves nothing; redraw it.

Training with `resample_null` calls `resample_null_v` every step; `null_space_mask` is the
test it applies, usable on its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from qmse.curvature import eval_mode, model_fn
from qmse.errors import UserError
from qmse.loss import sample_directions


def null_space_mask(
    model: nn.Module,
    x: Tensor,
    v: Tensor,
    tol: float = 1e-6,
    *,
    params: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Per sample, whether ‖J_iᵀ v_i‖ ≤ tol: the paper's "v in the null space" (after eq. 8).

    x: a batch (N, ...); v: (N, C) unit directions; J_i the Jacobian of `model`'s output
    for sample i in its weights, or in `params` ({name: tensor}, every parameter of the
    model, as `torch.func.functional_call` takes them) in their place: the trainer's weights
    live outside the module (`qmse.stacked`). Returns a bool tensor (N,). One
    per-sample VJP of the batch (vmapped over samples: a batch VJP would give only the sum
    Σ_i J_iᵀ v_i), holding an (N, P) per-sample gradient. The tolerance is absolute; with
    ‖v_i‖ = 1 it compares against the smallest singular value of J_i that v_i can pick out,
    which is ≥ 1 for a model with an output bias: then nothing is ever flagged for tol < 1.
    """
    if not tol >= 0:
        raise UserError(f"tol must be >= 0, got {tol}")
    if v.dim() != 2 or v.shape[0] != x.shape[0]:
        raise UserError(f"v must be (N, C) with N = {x.shape[0]} rows, got {tuple(v.shape)}")
    if params is None:
        w, f = model_fn(model)
    else:
        w, f = dict(params), lambda p, xs: functional_call(model, p, (xs,))

    def norm_one(xi: Tensor, vi: Tensor) -> Tensor:
        out, pull = vjp(lambda wv: f(wv, xi.unsqueeze(0)).squeeze(0), w)
        (grad,) = pull(vi.to(out.dtype))  # shaped like w: a flat vector or {name: tensor}
        parts = grad.values() if isinstance(grad, dict) else [grad]
        return torch.cat([g.reshape(-1) for g in parts]).norm()

    with eval_mode(model), torch.no_grad():
        return vmap(norm_one)(x, v) <= tol  # (N,)


def resample_null_v(
    model: nn.Module,
    x: Tensor,
    v: Tensor,
    *,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    max_tries: int = 3,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, int]:
    """Redraw the v_i with ‖J_iᵀ v_i‖ ≤ tol, up to `max_tries` rounds: the paper's rule
    "if the sampled vector still lies in the null space, simply resample" (sec. 3.1).

    The test is `null_space_mask`'s, with `model` or `params` in its weights' place.
    Returns (v, n_resampled): a new (N, C) tensor (the input is not modified) and the total
    number of single-sample redraws. Only flagged samples are checked again. A sample still
    flagged after `max_tries` rounds (e.g. J_i = 0, case 2, where every v is null) keeps its
    last draw. Cost: one vmapped per-sample VJP of the batch, plus one per round on the
    flagged samples only.
    """
    if max_tries < 0:
        raise UserError(f"max_tries must be >= 0, got {max_tries}")
    v = v.clone()
    idx = torch.nonzero(null_space_mask(model, x, v, tol, params=params)).squeeze(1)  # (k,)
    n_resampled = 0
    for _ in range(max_tries):
        if idx.numel() == 0:
            break
        v[idx] = sample_directions(
            idx.numel(), v.shape[1], generator=generator, device=v.device, dtype=v.dtype
        )
        n_resampled += idx.numel()
        idx = idx[null_space_mask(model, x[idx], v[idx], tol, params=params)]
    return v, n_resampled
