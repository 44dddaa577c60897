"""The QMSE loss of the paper (eqs. 6-9), the ½‖r‖² MSE it modifies, and its expectation.

For one sample with residual r = y − f (length C) the paper minimises ½‖r‖²_Q with
Q = (r + v)(r + v)ᵀ (eq. 8), v uniform on the unit sphere S^{C−1}, Q held constant when
differentiating. Then ½ rᵀQr = ½⟨r + v, r⟩² and

    ∇_w L = −Jᵀ Q r = −Jᵀ (r + v)(‖r‖² + ⟨v, r⟩)          (eq. 6 with eq. 8)

which at an MSE stationary point (Jᵀr = 0) is −Jᵀ v (‖r‖² + ⟨v, r⟩): eq. 9 up to the sign
the paper drops. Writing the loss as ½⟨(r + v).detach(), r⟩² makes autograd return exactly
that gradient.

Scale against `torch.nn.MSELoss`: its mean divides ‖r‖² by N·C; every loss here is a
per-sample quantity averaged over the N samples only (`reduction="mean"`), so
`mse_loss_half(f, y) == 0.5 * C * F.mse_loss(f, y)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
SCOPES = ("sample", "batch")
LOSS_NAMES = ("mse", "qmse", "expected-qmse", "ce")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {choices}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _residual(input: Tensor, target: Tensor) -> Tensor:
    """Validate (input, target) and return r = target − input as (N, C) in ≥ float32.

    `input` is (N, C) or (C,); `target` has its shape, or holds int class indices of shape
    input.shape[:-1]. Only shapes and dtypes are checked, except class indices on the CPU
    (free there); on an accelerator an out-of-range index is caught by an async assert.
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be torch.Tensors, got {type(input).__name__} and "
            f"{type(target).__name__}"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"input must be a floating-point tensor (the model's output), got dtype "
            f"{input.dtype}; convert it with input.float()"
        )
    if input.dim() not in (1, 2):
        raise ValueError(
            f"input must be (N, C) or (C,), got shape {tuple(input.shape)}; flatten extra "
            f"dimensions into the batch with input.reshape(-1, C)"
        )
    C = input.size(-1)
    if C == 0:
        raise ValueError(f"input has C = 0 outputs (shape {tuple(input.shape)}); need C >= 1")
    if input.dim() == 2 and input.size(0) == 0:
        raise ValueError(f"input is an empty batch (shape {tuple(input.shape)}); need N >= 1")
    x = _at_least_float32(input).reshape(-1, C)  # (N, C)

    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target has dtype {target.dtype}; expected floating or int64 classes")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape "
                f"{tuple(input.shape)}; pass one-hot/regression targets of the same shape or "
                f"int64 class indices of shape {tuple(input.shape[:-1])}"
            )
        return target.reshape(-1, C).to(x.dtype) - x
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"integer target (class indices) must have shape {tuple(input.shape[:-1])} for "
            f"input of shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    idx = target.reshape(-1).long()  # (N,)
    if not torch.compiler.is_compiling():
        if idx.device.type == "cpu":
            bad = (idx < 0) | (idx >= C)
            if bad.any():
                raise ValueError(
                    f"target class index {int(idx[bad][0])} is out of range [0, {C}) for "
                    f"input with C = {C} outputs"
                )
        else:
            torch._assert_async(
                ((idx >= 0) & (idx < C)).all(), f"target class index out of range [0, {C})"
            )
    onehot = (idx.unsqueeze(-1) == torch.arange(C, device=idx.device)).to(x.dtype)  # (N, C)
    return onehot - x


def _reduce(per_sample: Tensor, reduction: str, one_sample: bool) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample[0] if one_sample else per_sample


def sample_directions(
    n: int,
    c: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """n independent directions uniform on the unit sphere S^{c−1}: normalised N(0, I_c) draws.

    Returns (n, c). For c = 1 this is ±1 with probability ½ each. Drawn on the generator's
    device and moved to `device`, so a CPU generator also seeds CUDA runs reproducibly.
    """
    gen_device = generator.device if generator is not None else device
    z = torch.randn(n, c, generator=generator, device=gen_device, dtype=dtype)
    return F.normalize(z, dim=-1).to(device)


def _check_v(v: Tensor, shape: tuple[int, ...], per_row: bool) -> None:
    """v must have `shape` and unit norm per row (scope "sample") or as a whole ("batch").

    The norm is checked on the host for CPU tensors only; elsewhere an async device assert.
    """
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"v must be a floating-point tensor of shape {shape}")
    if tuple(v.shape) != shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; expected {shape}")
    if torch.compiler.is_compiling():
        return
    norms = v.reshape(-1, shape[-1]).norm(dim=-1) if per_row else v.norm().reshape(1)
    unit = ((norms - 1).abs() <= 1e-4).all()
    if v.device.type != "cpu":  # no host sync on an accelerator: assert on the device
        torch._assert_async(unit, "v must have unit norm (v on the unit sphere)")
        return
    if not unit:
        what = "unit-norm rows" if per_row else "unit norm as a whole (scope='batch')"
        raise ValueError(
            f"v must have {what} (v on the unit sphere), got norms in "
            f"[{norms.min().item():.6g}, {norms.max().item():.6g}]; normalise it with "
            f"torch.nn.functional.normalize"
        )


def qmse_loss(
    input: Tensor,
    target: Tensor,
    *,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    v: Tensor | None = None,
    scope: str = "sample",
) -> Tensor:
    """QMSE loss ½‖y − f‖²_Q with Q = (r + v)(r + v)ᵀ held constant (paper eqs. 6-8).

    input: (N, C) or (C,) model outputs. target: same shape, or int64 class indices of shape
    input.shape[:-1] (made one-hot with C = input.size(-1)).
    scope="sample" (the paper's method, one sample at a time): one independent v per sample,
    drawn from `generator` (or the global RNG) unless given as `v` of shape (N, C) / (C,).
    scope="batch" is a different method: one v on the unit sphere of R^{N·C} for the whole
    flattened batch residual R, loss ½⟨R + v, R⟩²; `v` then has input's shape,
    reduction="sum" returns that value, "mean" divides it by N, "none" is not defined.
    Reductions: "mean" over samples, "sum", "none" (per-sample vector).
    Computed in float32 at least: fp16/bf16 inputs (e.g. under autocast) are upcast first.
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("scope", scope, SCOPES)
    r = _residual(input, target)  # (N, C)
    N, C = r.shape
    if scope == "batch":
        if reduction == "none":
            raise ValueError('scope="batch" gives one value per batch; use reduction="sum"')
        if v is None:
            flat = sample_directions(1, N * C, generator=generator, device=r.device, dtype=r.dtype)
        else:
            _check_v(v, tuple(input.shape), per_row=False)
            flat = v.reshape(1, N * C).to(r)
        R = r.reshape(1, N * C)
        total = 0.5 * ((R + flat).detach() * R).sum() ** 2
        return total / N if reduction == "mean" else total
    if v is None:
        v = sample_directions(N, C, generator=generator, device=r.device, dtype=r.dtype)
    else:
        _check_v(v, tuple(input.shape), per_row=True)
        v = v.reshape(N, C).to(r)
    a = ((r + v).detach() * r).sum(-1)  # (N,)  ⟨r + v, r⟩ with r + v constant
    return _reduce(0.5 * a**2, reduction, input.dim() == 1)


def mse_loss_half(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Per-sample ½‖y − f‖² (paper eq. 3), averaged over samples: the MSE every comparison uses.

    Equals 0.5 * C * F.mse_loss(input, target) for reduction="mean".
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    r = _residual(input, target)
    return _reduce(0.5 * (r * r).sum(-1), reduction, input.dim() == 1)


def expected_qmse_loss(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Per-sample ¼‖r‖⁴ + ‖r‖²/(2C): the deterministic loss whose gradient is E_v of QMSE's.

    E[v] = 0 and E[vvᵀ] = I/C give E_v[Q r] = (‖r‖² + 1/C) r, the gradient of this loss.
    Training with it keeps QMSE's reshaped landscape and removes its noise (the ablation).
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    r = _residual(input, target)
    s = (r * r).sum(-1)  # (N,)  ‖r‖²
    return _reduce(0.25 * s**2 + s / (2 * r.size(-1)), reduction, input.dim() == 1)


def compute_loss(
    name: str,
    input: Tensor,
    target: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> Tensor:
    """The training loss by name: "mse" (½‖r‖²), "qmse", "expected-qmse" or "ce".

    "ce" is cross-entropy on logits (class indices or probability targets), for reference.
    """
    _check_choice("loss", name, LOSS_NAMES)
    if name == "mse":
        return mse_loss_half(input, target, reduction=reduction)
    if name == "qmse":
        return qmse_loss(input, target, reduction=reduction, generator=generator)
    if name == "expected-qmse":
        return expected_qmse_loss(input, target, reduction=reduction)
    if not target.is_floating_point():
        target = target.long()
    return F.cross_entropy(_at_least_float32(input), target, reduction=reduction)


class QMSELoss(nn.Module):
    """Module form of `qmse_loss`, mirroring `torch.nn.MSELoss`; `v` may be passed per call."""

    def __init__(
        self,
        *,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        scope: str = "sample",
    ) -> None:
        super().__init__()
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_choice("scope", scope, SCOPES)
        self.reduction, self.generator, self.scope = reduction, generator, scope

    def forward(self, input: Tensor, target: Tensor, v: Tensor | None = None) -> Tensor:
        return qmse_loss(
            input,
            target,
            reduction=self.reduction,
            generator=self.generator,
            v=v,
            scope=self.scope,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, scope={self.scope!r}"
