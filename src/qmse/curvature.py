"""The model as a function of its weights, and its curvature: HVPs, Lanczos, Hutchinson, SLQ.

Every function reads the model through `torch.func.functional_call` on detached copies of
its parameters and runs it in eval mode, restoring every module's `training` flag afterwards:
the model's parameters, `requires_grad` flags and mode are the same before and after.

The loss is a `criterion`: a deterministic loss of the registry `qmse.loss.LOSSES` by name,
or any callable (output, target) -> scalar mean loss, as in PyHessian's
`hessian(model, criterion, data)`; see `criterion_fn`.

Second order: Hessian-vector products (reverse-over-reverse, `torch.func.vjp` of
`torch.func.grad_and_value`), Lanczos with full reorthogonalisation for the extreme eigenvalues,
Hutchinson's trace estimate and stochastic Lanczos quadrature (SLQ) for the spectral density.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp

from qmse.errors import UserError
from qmse.loss import get_loss

Batch = tuple[Tensor, Tensor]
MatVec = Callable[[Tensor], Tensor]
Criterion = str | Callable[[Tensor, Tensor], Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode and put every module's `training` flag back afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def criterion_fn(criterion: Criterion) -> Callable[[Tensor, Tensor], Tensor]:
    """`criterion` as a function (output, target) -> scalar mean loss over the samples.

    A string names a loss of the registry `qmse.loss.LOSSES` (the shortcut); it must be
    deterministic, because a random loss (QMSE's v, label noise's ξ) has no fixed value or
    Hessian at a point: its registered `mean_gradient_loss`, the deterministic loss with the same
    mean gradient, is the landscape to measure instead. Any other callable is used as it is,
    like `torch.nn.HuberLoss()` or a user function; it must return the mean over the samples
    of the batch, so that batches of different sizes combine into the mean over all of them.
    """
    if isinstance(criterion, str):
        spec = get_loss(criterion)
        if spec.random:
            instead = (
                f'use "{spec.mean_gradient_loss}" (the deterministic loss with the same mean '
                f"gradient)"
                if spec.mean_gradient_loss is not None
                else "register a deterministic loss for its mean and use that"
            )
            raise UserError(
                f"loss {criterion!r} is random (it draws new noise at every call), so it has "
                f"no fixed value or curvature at a point; {instead}"
            )
        return lambda output, target: spec(output, target)
    if not callable(criterion):
        raise TypeError(
            f"criterion must be a registered loss name or a callable (output, target) -> "
            f"scalar, got {type(criterion).__name__}"
        )
    return criterion


def criterion_name(criterion: Criterion) -> str:
    """A label for reports: the registered name, a module's repr, or a function's name."""
    if isinstance(criterion, str):
        return criterion
    if isinstance(criterion, nn.Module):
        return repr(criterion)
    return getattr(criterion, "__name__", type(criterion).__name__)


def flat_params(model: nn.Module) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """The trainable parameters as one detached flat vector w (P,) and its inverse map.

    Only parameters with requires_grad=True are variables (the ones training moves); frozen
    parameters and buffers enter `model_fn` as constants.
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("model has no parameters with requires_grad=True to diagnose")
    names = [k for k, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    w = torch.cat([p.detach().reshape(-1) for _, p in named])  # (P,) a copy
    if not torch.isfinite(w).all():
        bad = [k for k, p in named if not torch.isfinite(p).all()]
        raise UserError(
            f"model parameters {bad} hold non-finite values (training diverged?); there is "
            f"nothing to diagnose: use an earlier checkpoint or a smaller learning rate"
        )

    def unflatten(vec: Tensor) -> dict[str, Tensor]:
        return {k: c.view(s) for k, c, s in zip(names, vec.split(sizes), shapes)}

    return w, unflatten


def model_fn(model: nn.Module) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """(w, f) with f(w, x) = model(x) under weights w, a pure function of both arguments."""
    w, unflatten = flat_params(model)
    const = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    const.update({k: b.detach() for k, b in model.named_buffers()})

    def f(wv: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, {**unflatten(wv), **const}, (x,))

    return w, f


def _as_batches(batches: Batch | Sequence[Batch]) -> list[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise UserError("batches is empty; pass an (x, y) pair or a list of them")
    return out


def loss_fn(
    model: nn.Module, criterion: Criterion, batches: Batch | Sequence[Batch]
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(w, L) with L(w) the mean of `criterion` over all samples of `batches` at weights w.

    `criterion`: a deterministic registered loss name ("mse" is ½‖r‖² per sample, eq. 3) or a
    callable (output, target) -> scalar mean loss (`criterion_fn`). `batches`: one (x, y)
    pair or a list of them; each batch's mean is weighted by its share of the samples.
    """
    crit = criterion_fn(criterion)
    data = _as_batches(batches)
    w, f = model_fn(model)
    n_total = sum(x.shape[0] for x, _ in data)

    def loss_at(wv: Tensor) -> Tensor:
        return sum(crit(f(wv, x), y) * (x.shape[0] / n_total) for x, y in data)

    return w, loss_at


def loss_gradient_hessian(
    model: nn.Module, criterion: Criterion, batches: Batch | Sequence[Batch]
) -> tuple[Tensor, Tensor, MatVec]:
    """(L, ∇L, hvp) at the model's weights, for the mean loss of `loss_fn`: the value, the
    gradient (P,) and hvp(v) = ∇²L v, all from one forward and backward pass.

    Reverse-over-reverse (`vjp` of `grad_and_value`; the Hessian is symmetric): the gradient
    graph is built once and each product is one more backward pass, so keep `batches` small
    (a fixed subset of a few hundred samples). The model is evaluated in eval mode.
    """
    w, loss_at = loss_fn(model, criterion, batches)
    with eval_mode(model):
        g, pull, value = vjp(grad_and_value(loss_at), w, has_aux=True)
    return value.detach(), g.detach(), lambda v: pull(v.to(w))[0]


def hessian_operator(
    model: nn.Module, criterion: Criterion, batches: Batch | Sequence[Batch]
) -> tuple[MatVec, int]:
    """(hvp, P): hvp(v) = ∇²L(w) v for the mean `criterion` over `batches` at the model's
    weights, P the number of trainable weights (see `loss_gradient_hessian`)."""
    _, g, hvp = loss_gradient_hessian(model, criterion, batches)
    return hvp, g.numel()


def lanczos(
    matvec: MatVec,
    dim: int,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`steps` Lanczos iterations with full reorthogonalisation on a symmetric operator.

    Returns (nodes, weights) in float64: the Ritz values (ascending, length ≤ steps; fewer if
    the Krylov space closes) and the squared first components of the Ritz vectors, which
    are the quadrature weights of SLQ. Ritz values interlace the spectrum: the smallest one
    is ≥ λ_min, so a negative one proves a negative eigenvalue; with steps = dim they are
    the eigenvalues. The start vector is Gaussian from `generator` unless given.
    """
    if not 1 <= steps <= dim:
        raise UserError(f"steps must be in [1, dim={dim}], got {steps}")
    device = generator.device if generator is not None else None
    q = (
        start
        if start is not None
        else torch.randn(dim, generator=generator, device=device, dtype=dtype)
    )
    q = q / q.norm()
    Q = torch.zeros(steps, dim, dtype=q.dtype, device=q.device)  # Lanczos basis
    alphas, betas = [], []
    for j in range(steps):
        Q[j] = q
        z = matvec(q).to(q)  # the operator may live on another device than the basis
        alpha = torch.dot(z, q)
        alphas.append(alpha.item())
        for _ in range(2):  # full reorthogonalisation, twice is enough
            z = z - Q[: j + 1].T @ (Q[: j + 1] @ z)
        beta = z.norm()
        if j == steps - 1 or beta <= 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta.item())
        q = z / beta
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: m - 1], dtype=torch.float64)
    T += torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(T)
    return nodes, vecs[0] ** 2


def ritz_extremes(nodes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(top, bottom): the k largest (descending) and k smallest (ascending) of the ascending
    Ritz values `nodes` of one Lanczos run (fewer if the run has fewer)."""
    k = min(k, nodes.numel())
    return nodes.flip(0)[:k], nodes[:k]


def hessian_eigs(
    hvp: MatVec,
    dim: int,
    *,
    k: int = 5,
    steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(top, bottom): the k largest (descending) and k smallest (ascending) Ritz values of
    one Lanczos run of `steps` products (capped at dim). Extremes converge first; take
    steps ≳ 3k, and steps = dim for the exact spectrum of a small model."""
    steps = min(steps, dim)
    gen = torch.Generator().manual_seed(seed)
    nodes, _ = lanczos(lambda v: hvp(v).to(dtype), dim, steps, generator=gen, dtype=dtype)
    return ritz_extremes(nodes, k)


def hutchinson_trace(
    hvp: MatVec,
    dim: int,
    *,
    samples: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Hutchinson's estimate of tr H = E[zᵀHz] with Rademacher z, and its standard error
    (sample std / √samples)."""
    if samples < 2:
        raise UserError(f"samples must be >= 2 to give a standard error, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=gen).to(dtype) * 2 - 1
        vals.append(torch.dot(z, hvp(z).to(z)).item())
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(samples)).item()


def spectral_density(
    hvp: MatVec,
    dim: int,
    *,
    steps: int = 30,
    vectors: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[Tensor, Tensor]]:
    """Stochastic Lanczos quadrature: one (nodes, weights) pair per random start vector.

    The density of the Hessian's eigenvalues (normalised to 1, each eigenvalue weighing
    1/dim) is estimated by (1/vectors) Σ_l Σ_j weights_l[j] δ(λ − nodes_l[j]); smooth it
    with `density_on_grid`. One Lanczos run of `steps` products per vector; the first run
    starts where `hessian_eigs` with the same seed does, so its nodes are those Ritz values.
    """
    steps = min(steps, dim)
    gen = torch.Generator().manual_seed(seed)
    return [
        lanczos(lambda v: hvp(v).to(dtype), dim, steps, generator=gen, dtype=dtype)
        for _ in range(vectors)
    ]


def density_on_grid(runs: Sequence[tuple[Tensor, Tensor]], grid: Tensor, sigma: float) -> Tensor:
    """The SLQ density of `runs` smoothed by a Gaussian of width sigma, on `grid` (G,)."""
    g = grid.double().reshape(-1, 1)  # (G, 1)
    out = torch.zeros(grid.numel(), dtype=torch.float64)
    for nodes, weights in runs:
        kern = torch.exp(-0.5 * ((g - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        out += (kern * weights).sum(-1) / len(runs)  # (G,)
    return out
