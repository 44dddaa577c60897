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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qmse.errors import UserError

REDUCTIONS = ("mean", "sum", "none")
SCOPES = ("sample", "batch")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported; expected one of {choices}")


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_generator(generator: object) -> None:
    """A random draw's generator is a torch.Generator (or None: the global RNG)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (or None), got {type(generator).__module__}."
            f"{type(generator).__name__}; make one with torch.Generator().manual_seed(seed)"
        )


def _check_input(input: Tensor, target: Tensor) -> None:
    """Both tensors, input floating (N, C) with N, C >= 1. A 1-D input is refused rather than
    guessed: (N,) could be N scalar outputs or one sample of C outputs, two different losses
    (QMSE draws one direction per sample), the trap of torch.nn's losses (pytorch issues
    16045, 16413); the message says how to pass either."""
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
    if input.dim() == 1:
        (n,) = input.shape
        raise UserError(
            f"input has shape ({n},): 1-D is ambiguous; pass N = {n} scalar outputs as "
            f"input.unsqueeze(-1) of shape ({n}, 1) (with target.unsqueeze(-1) for float "
            f"targets), or one sample of C = {n} outputs as input.unsqueeze(0) of shape (1, {n})"
        )
    if input.dim() != 2:
        raise UserError(
            f"input must be (N, C), got shape {tuple(input.shape)}; flatten extra "
            f"dimensions into the batch with input.reshape(-1, C)"
        )
    C = input.size(-1)
    if C == 0:
        raise UserError(f"input has C = 0 outputs (shape {tuple(input.shape)}); need C >= 1")
    if input.size(0) == 0:
        raise UserError(f"input is an empty batch (shape {tuple(input.shape)}); need N >= 1")


def _prepare(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate (input, target) and return both as (N, C) float tensors in ≥ float32.

    `input` is (N, C), one row per sample (`_check_input`); `target` has its shape, or holds
    int class indices of shape (N,). Only shapes and dtypes are checked, except class
    indices on the CPU (free there); on an accelerator an out-of-range index is caught by an
    async assert.
    """
    _check_input(input, target)
    C = input.size(-1)
    x = _at_least_float32(input)  # (N, C)

    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target has dtype {target.dtype}; expected floating or int64 classes")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise UserError(
                f"target shape {tuple(target.shape)} does not match input shape "
                f"{tuple(input.shape)}; pass one-hot/regression targets of the same shape or "
                f"int64 class indices of shape {tuple(input.shape[:-1])}"
            )
        return x, target.reshape(-1, C).to(x.dtype)
    if target.shape != input.shape[:-1]:
        raise UserError(
            f"integer target (class indices) must have shape {tuple(input.shape[:-1])} for "
            f"input of shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    idx = target.reshape(-1).long()  # (N,)
    if not torch.compiler.is_compiling():
        if idx.device.type == "cpu":
            bad = (idx < 0) | (idx >= C)
            if bad.any():
                raise UserError(
                    f"target class index {int(idx[bad][0])} is out of range [0, {C}) for "
                    f"input with C = {C} outputs"
                )
        else:
            torch._assert_async(
                ((idx >= 0) & (idx < C)).all(), f"target class index out of range [0, {C})"
            )
    onehot = (idx.unsqueeze(-1) == torch.arange(C, device=idx.device)).to(x.dtype)  # (N, C)
    return x, onehot


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


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


def _check_noise(noise: Tensor, shape: tuple[int, ...], per_row: bool) -> None:
    """QMSE's draw v (`noise`) must have `shape` and unit norm per row (scope "sample") or
    as a whole ("batch").

    The norm is checked on the host for CPU tensors only; elsewhere an async device assert.
    """
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise (v) must be a floating-point tensor of shape {shape}")
    if tuple(noise.shape) != shape:
        raise UserError(f"noise (v) has shape {tuple(noise.shape)}; expected {shape}")
    if torch.compiler.is_compiling():
        return
    v = noise
    norms = v.reshape(-1, shape[-1]).norm(dim=-1) if per_row else v.norm().reshape(1)
    unit = ((norms - 1).abs() <= 1e-4).all()
    if v.device.type != "cpu":  # no host sync on an accelerator: assert on the device
        torch._assert_async(unit, "v must have unit norm (v on the unit sphere)")
        return
    if not unit:
        what = "unit-norm rows" if per_row else "unit norm as a whole (scope='batch')"
        raise UserError(
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
    noise: Tensor | None = None,
    scope: str = "sample",
) -> Tensor:
    """QMSE loss ½‖y − f‖²_Q with Q = (r + v)(r + v)ᵀ held constant (paper eqs. 6-8).

    input: (N, C) model outputs, one row per sample; a 1-D input is an error (pass N scalar
    outputs as (N, 1), one sample of C outputs as (1, C)). target: same shape, or int64
    class indices of shape (N,) (made one-hot with C = input.size(-1)).
    scope="sample" (the paper's method, one sample at a time): one independent v per sample,
    drawn from `generator` (or the global RNG) unless given as `noise` of shape (N, C), unit
    rows (the name every loss of the registry uses for its random draw).
    scope="batch" is a different method: one v on the unit sphere of R^{N·C} for the whole
    flattened batch residual R, loss ½⟨R + v, R⟩²; `noise` then has input's shape,
    reduction="sum" returns that value, "mean" divides it by N, "none" is not defined.
    Reductions: "mean" over samples, "sum", "none" (per-sample vector).
    Computed in float32 at least: fp16/bf16 inputs (e.g. under autocast) are upcast first.

    Shape:
        - Input: (N, C), N samples of C outputs.
        - Target: (N, C) floats, or (N,) int64 class indices in [0, C).
        - noise: (N, C), unit rows (scope="sample"); input's shape, unit as a whole ("batch").
        - Output: scalar; (N,) for reduction="none".

    Examples::

        >>> import torch
        >>> from qmse.loss import qmse_loss
        >>> input = torch.zeros(1, 2, requires_grad=True)
        >>> target = torch.tensor([[1.0, 0.0]])
        >>> v = torch.tensor([[0.0, 1.0]])  # a unit direction
        >>> loss = qmse_loss(input, target, noise=v)  # ½⟨r + v, r⟩², r = y − f = (1, 0)
        >>> loss.item()
        0.5
        >>> loss.backward()
        >>> input.grad  # −(r + v)⟨r + v, r⟩, with r + v held constant
        tensor([[-1., -1.]])
        >>> g = torch.Generator().manual_seed(0)
        >>> input = torch.randn(4, 3, generator=g)
        >>> target = torch.randint(0, 3, (4,), generator=g)  # class indices: one-hot inside
        >>> round(qmse_loss(input, target, generator=g).item(), 4)  # v drawn from g
        22.8082
        >>> qmse_loss(input, target, generator=g, reduction="none").shape
        torch.Size([4])
    """
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("scope", scope, SCOPES)
    _check_input(input, target)  # before noise is checked against input's shape
    _check_generator(generator)
    if scope == "batch":
        x, t = _prepare(input, target)
        r = t - x  # (N, C)
        N, C = r.shape
        if reduction == "none":
            raise UserError('scope="batch" gives one value per batch; use reduction="sum"')
        if noise is None:
            flat = sample_directions(1, N * C, generator=generator, device=r.device, dtype=r.dtype)
        else:
            _check_noise(noise, tuple(input.shape), per_row=False)
            flat = noise.reshape(1, N * C).to(r)
        R = r.reshape(1, N * C)
        total = 0.5 * ((R + flat).detach() * R).sum() ** 2
        return total / N if reduction == "mean" else total
    if noise is not None:
        _check_noise(noise, tuple(input.shape), per_row=True)
    return LOSSES["qmse"](input, target, noise=noise, generator=generator, reduction=reduction)


def mse_loss_half(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Per-sample ½‖y − f‖² (paper eq. 3), averaged over samples: the MSE every comparison uses.

    Equals 0.5 * C * F.mse_loss(input, target) for reduction="mean".

    Shape:
        - Input: (N, C).
        - Target: (N, C) floats, or (N,) int64 class indices in [0, C).
        - Output: scalar; (N,) for reduction="none".

    Examples::

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from qmse.loss import mse_loss_half
        >>> input = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
        >>> target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> mse_loss_half(input, target, reduction="none")  # ½‖r‖² per sample
        tensor([0.6250, 2.5000])
        >>> mse_loss_half(input, target).item(), (0.5 * 2 * F.mse_loss(input, target)).item()
        (1.5625, 1.5625)
        >>> mse_loss_half(input, torch.tensor([0, 1])).item()  # class indices, one-hot inside
        1.5625
    """
    return LOSSES["mse"](input, target, reduction=reduction)


def expected_qmse_loss(input: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Per-sample ¼‖r‖⁴ + ‖r‖²/(2C): the deterministic loss whose gradient is E_v of QMSE's.

    E[v] = 0 and E[vvᵀ] = I/C give E_v[Q r] = (‖r‖² + 1/C) r, the gradient of this loss.
    Training with it keeps QMSE's reshaped landscape and removes its noise (the ablation).

    Shape:
        - Input: (N, C).
        - Target: (N, C) floats, or (N,) int64 class indices in [0, C).
        - Output: scalar; (N,) for reduction="none".

    Examples::

        >>> import torch
        >>> from qmse.loss import expected_qmse_loss
        >>> input = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
        >>> target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ‖r‖² = 1.25 and 5, C = 2
        >>> expected_qmse_loss(input, target, reduction="none")  # ¼‖r‖⁴ + ‖r‖²/4
        tensor([0.7031, 7.5000])
    """
    return LOSSES["expected-qmse"](input, target, reduction=reduction)


def _label_noise_draw(
    n: int,
    c: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sigma: float = 0.1,
) -> Tensor:
    """Label noise ξ ~ N(0, σ² I_c) for n samples: (n, c), drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    return (sigma * torch.randn(n, c, generator=generator, device=gen_device, dtype=dtype)).to(
        device
    )


@dataclass(frozen=True)
class Loss:
    """One training loss of the registry: what every module that trains or measures reads.

    per_sample(input (N, C), target (N, C), noise (N, C) | None) -> (N,): the loss of each
        sample; target is a float (one-hot or regression) target; noise is the loss's random
        draw (QMSE's v, label noise's ξ), None for a deterministic loss.
    draw(n, C, *, generator, device, dtype, **params) -> (n, C): that draw; None when the
        loss is deterministic. A trainer may draw a whole epoch's noise at once and slice it.
    expected_value(input, target, **params) -> (N,): E over the draw of per_sample, the
        value reports show for a random loss (QMSE: ½‖r‖⁴ + ‖r‖²/(2C)); None for a
        deterministic one. `expected` applies it (or the loss itself when deterministic).
    mean_gradient_loss: the name of the registered deterministic loss whose *gradient* is the
        mean of this one's gradient over the draw (QMSE: "expected-qmse", ¼‖r‖⁴ + ‖r‖²/(2C),
        which is not E[QMSE]: see docs/theory.md), or None.
    params: the keyword parameters draw and expected_value accept (label noise's sigma).
    """

    name: str
    per_sample: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    draw: Callable[..., Tensor] | None = None
    expected_value: Callable[..., Tensor] | None = None
    mean_gradient_loss: str | None = None
    params: tuple[str, ...] = ()
    description: str = ""

    @property
    def random(self) -> bool:
        return self.draw is not None

    def __call__(
        self,
        input: Tensor,
        target: Tensor,
        *,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        **params: float,
    ) -> Tensor:
        """The loss of (input, target), reduced; a random loss draws its noise from
        `generator` (or the global RNG) unless `noise` (N, C) is given."""
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_generator(generator)
        self._check_params(params)
        x, t = _prepare(input, target)  # (N, C) each
        if self.random and noise is None:
            noise = self.draw(
                *x.shape, generator=generator, device=x.device, dtype=x.dtype, **params
            )
        elif noise is not None:
            if not self.random:
                raise UserError(f"loss {self.name!r} is deterministic; it takes no noise")
            if tuple(noise.shape) != tuple(input.shape):
                raise UserError(
                    f"noise has shape {tuple(noise.shape)}; expected input's {tuple(input.shape)}"
                )
            noise = noise.reshape(x.shape).to(x)
        return _reduce(self.per_sample(x, t, noise), reduction)

    def expected(self, input: Tensor, target: Tensor, **params: float) -> Tensor:
        """(N,) per-sample value without randomness: E over the draw for a random loss
        (`expected_value`), else the loss itself."""
        self._check_params(params)
        x, t = _prepare(input, target)
        if self.random:
            return self.expected_value(x, t, **params)
        return self.per_sample(x, t, None)

    def _check_params(self, params: dict) -> None:
        if unknown := set(params) - set(self.params):
            raise TypeError(
                f"loss {self.name!r} takes no parameter {sorted(unknown)}; it takes "
                f"{list(self.params) or 'none'}"
            )


LOSSES: dict[str, Loss] = {}


def register_loss(loss: Loss) -> Loss:
    """Add `loss` to the registry that train, diagnose, landscape, escape and the CLI read."""
    if not isinstance(loss, Loss):
        raise TypeError(f"register_loss takes a qmse.loss.Loss, got {type(loss).__name__}")
    if loss.name in LOSSES and LOSSES[loss.name] is not loss:
        raise UserError(f"a loss named {loss.name!r} is already registered")
    if loss.random and loss.expected_value is None:
        raise UserError(
            f"random loss {loss.name!r} needs `expected_value` (its mean over the draw)"
        )
    LOSSES[loss.name] = loss
    return loss


def get_loss(loss: str | Loss) -> Loss:
    """A registered loss by name (a Loss passes through)."""
    if isinstance(loss, Loss):
        return loss
    if loss not in LOSSES:
        raise UserError(f"loss={loss!r} is not registered; expected one of {tuple(LOSSES)}")
    return LOSSES[loss]


def _sq(r: Tensor) -> Tensor:
    return (r * r).sum(-1)  # (N,)  ‖r‖²


register_loss(
    Loss(
        "mse",
        lambda x, t, _: 0.5 * _sq(t - x),
        description="½‖r‖² per sample (paper eq. 3)",
    )
)
register_loss(
    Loss(
        "qmse",
        lambda x, t, v: 0.5 * (((t - x) + v).detach() * (t - x)).sum(-1) ** 2,
        draw=sample_directions,
        expected_value=lambda x, t: 0.5 * _sq(t - x) ** 2 + _sq(t - x) / (2 * x.size(-1)),
        mean_gradient_loss="expected-qmse",
        description="½⟨r + v, r⟩², v uniform on the unit sphere, r + v constant (eqs. 6-8)",
    )
)
register_loss(
    Loss(
        "expected-qmse",
        lambda x, t, _: 0.25 * _sq(t - x) ** 2 + _sq(t - x) / (2 * x.size(-1)),
        description="¼‖r‖⁴ + ‖r‖²/(2C): QMSE's landscape without its noise",
    )
)
register_loss(
    Loss(
        "label-noise",
        lambda x, t, xi: 0.5 * _sq(t + xi - x),
        draw=_label_noise_draw,
        expected_value=lambda x, t, sigma=0.1: 0.5 * _sq(t - x) + 0.5 * x.size(-1) * sigma**2,
        mean_gradient_loss="mse",
        params=("sigma",),
        description="½‖y + ξ − f‖², ξ ~ N(0, σ²I) fresh at every step",
    )
)
register_loss(
    Loss(
        "ce",
        lambda x, t, _: F.cross_entropy(x, t, reduction="none"),
        description="cross-entropy on logits, the practitioner's reference",
    )
)
LOSS_NAMES = tuple(LOSSES)  # the built-in losses


def compute_loss(
    name: str | Loss,
    input: Tensor,
    target: Tensor,
    *,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    **params: float,
) -> Tensor:
    """A registered training loss by name ("mse", "qmse", "expected-qmse", "label-noise",
    "ce", or one a user registered), reduced over samples."""
    return get_loss(name)(input, target, generator=generator, reduction=reduction, **params)


class QMSELoss(nn.Module):
    """Module form of `qmse_loss`, mirroring `torch.nn.MSELoss`; `noise` (v) may be passed per
    call.

    Args:
        reduction: "mean" over samples, "sum" or "none", as in `qmse_loss`.
        generator: the source of the draws v when `noise` is not given (else the global RNG).
        scope: "sample" (the paper's method, one v per sample) or "batch" (`qmse_loss`).

    Shape:
        - Input: (N, C).
        - Target: (N, C) floats, or (N,) int64 class indices in [0, C).
        - noise: (N, C), optional, unit rows.
        - Output: scalar; (N,) for reduction="none".

    Examples::

        >>> import torch
        >>> from qmse.loss import QMSELoss
        >>> loss = QMSELoss(generator=torch.Generator().manual_seed(0))
        >>> loss
        QMSELoss(reduction='mean', scope='sample')
        >>> input = torch.zeros(1, 2, requires_grad=True)
        >>> target = torch.tensor([[1.0, 0.0]])
        >>> output = loss(input, target, torch.tensor([[0.0, 1.0]]))  # v given: ½⟨r + v, r⟩²
        >>> output.backward()
        >>> output.item(), input.grad
        (0.5, tensor([[-1., -1.]]))
        >>> per_sample = QMSELoss(reduction="none", generator=torch.Generator().manual_seed(0))
        >>> per_sample(torch.zeros(4, 1), torch.ones(4, 1))  # C = 1: v = ±1, ½(1 + v)² ∈ {0, 2}
        tensor([2., 0., 0., 2.])
    """

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

    def forward(self, input: Tensor, target: Tensor, noise: Tensor | None = None) -> Tensor:
        return qmse_loss(
            input,
            target,
            reduction=self.reduction,
            generator=self.generator,
            noise=noise,
            scope=self.scope,
        )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, scope={self.scope!r}"
