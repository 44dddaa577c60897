"""The model as a function of its weights, and its curvature: HVPs, Lanczos, Hutchinson, SLQ.

Every function reads the model through `torch.func.functional_call` on detached copies of
its parameters and buffers and runs it in eval mode (or in train mode where asked: `mode`),
restoring every module's `training` flag afterwards: the model's parameters, buffers,
`requires_grad` flags and mode are the same before and after.

The loss is a `criterion`: a deterministic loss of the registry `qmse.loss.LOSSES` by name,
or any callable (output, target) -> scalar mean loss, as in PyHessian's
`hessian(model, criterion, data)`; see `criterion_fn`.

Second order: the Hessian as a linear operator, `HessianOperator` (``op @ v``, ``op.shape``,
``op.to_scipy()``), built on Hessian-vector products (reverse-over-reverse, `torch.func.vjp`
of `torch.func.grad_and_value`); Lanczos with full reorthogonalisation for the extreme
eigenvalues, Hutchinson's trace estimate and stochastic Lanczos quadrature (SLQ) for the
spectral density. The estimators take any symmetric operator: a `HessianOperator`, a dense
(P, P) tensor, anything with ``@`` and ``.shape``, or a matvec callable with its size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vjp

from qmse.errors import UserError
from qmse.loss import get_loss

Batch = tuple[Tensor, Tensor]
MatVec = Callable[[Tensor], Tensor]
Criterion = str | Callable[[Tensor, Tensor], Tensor]
MODES = ("eval", "train")


@contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run `model` in `mode` ("eval" or "train"); every module's `training` flag is put back."""
    if mode not in MODES:
        raise UserError(f"mode={mode!r}; expected one of {MODES}")
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


eval_mode = partial(model_mode, mode="eval")  # with eval_mode(model): ...


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

    def scalar(output: Tensor, target: Tensor) -> Tensor:
        loss = criterion(output, target)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise UserError(
                f"criterion {criterion_name(criterion)} returned {shape}, not a scalar: it must "
                f"return the mean loss over the batch (e.g. reduction='mean', not 'none')"
            )
        return loss

    return scalar


def criterion_name(criterion: Criterion) -> str:
    """A label for reports: the registered name, a module's repr, or a function's name."""
    if isinstance(criterion, str):
        return criterion
    if isinstance(criterion, nn.Module):
        return repr(criterion)
    return getattr(criterion, "__name__", type(criterion).__name__)


def flat_params(
    model: nn.Module, params: Sequence[str] | None = None
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """The trainable parameters as one detached flat vector w (P,) and its inverse map.

    Only parameters with requires_grad=True are variables (the ones training moves), in the
    model's order; `params` names a subset of them (a block), None all. Frozen parameters,
    the others and buffers enter `model_fn` as constants.
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        if unknown := sorted(set(params) - {k for k, _ in named}):
            raise UserError(f"{unknown}: not trainable parameters of the model")
        named = [(k, p) for k, p in named if k in set(params)]
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


def model_fn(
    model: nn.Module, params: Sequence[str] | None = None
) -> tuple[Tensor, Callable[[Tensor, Tensor], Tensor]]:
    """(w, f) with f(w, x) = model(x) under weights w (`flat_params`), a pure function of
    both; each call copies the buffers (train mode updates the copy's BatchNorm statistics)."""
    w, unflatten = flat_params(model, params)
    variables = set(unflatten(w))
    const = {k: p.detach() for k, p in model.named_parameters() if k not in variables}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def f(wv: Tensor, x: Tensor) -> Tensor:
        fresh = {k: b.clone() for k, b in buffers.items()}
        return functional_call(model, {**unflatten(wv), **const, **fresh}, (x,))

    return w, f


def _as_batches(batches: Batch | Sequence[Batch]) -> list[Batch]:
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], Tensor):
        return [batches]
    out = list(batches)
    if not out:
        raise UserError("batches is empty; pass an (x, y) pair or a list of them")
    return out


def loss_fn(
    model: nn.Module,
    criterion: Criterion,
    batches: Batch | Sequence[Batch],
    *,
    params: Sequence[str] | None = None,
) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(w, L) with L(w) the mean of `criterion` over all samples of `batches` at weights w.

    `criterion`: a deterministic registered loss name ("mse" is ½‖r‖² per sample, eq. 3) or a
    callable (output, target) -> scalar mean loss (`criterion_fn`), of any output shape it
    takes. `batches`: one (x, y) pair or a list of them; each batch's mean is weighted by its
    share of the samples. `params`: the parameters that are w (`flat_params`), None: all.
    """
    crit = criterion_fn(criterion)
    data = _as_batches(batches)
    w, f = model_fn(model, params)
    n_total = sum(x.shape[0] for x, _ in data)

    def loss_at(wv: Tensor) -> Tensor:
        return sum(crit(f(wv, x), y) * (x.shape[0] / n_total) for x, y in data)

    return w, loss_at


@dataclass(frozen=True, eq=False)
class HessianOperator:
    """The Hessian ∇²L(w) (P × P) of a mean loss at fixed weights w, as a linear operator.

    The matrix is never formed: ``op @ v`` is one Hessian-vector product (one more backward
    pass) for v of shape (P,), and one product per column for V of shape (P, k). v is cast
    to the operator's `dtype` and `device` (those of w) and the product returned in them.
    ``op(v)`` is ``op @ v`` (scipy's `LinearOperator` idiom); `to_scipy` hands the operator
    to scipy's solvers (`eigsh`, `cg`, `lobpcg`). The estimators of this module take it as it
    is. Build one with `hessian_operator` or `loss_gradient_hessian`.
    """

    hvp: MatVec = field(repr=False)  # v (P,) -> H v (P,)
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __matmul__(self, v: Tensor) -> Tensor:
        P = self.shape[0]
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != P:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise UserError(
                f"HessianOperator of shape {self.shape} multiplies a tensor of shape ({P},) "
                f"or ({P}, k), got {got}"
            )
        v = v.to(dtype=self.dtype, device=self.device)
        if v.dim() == 1:
            return self.hvp(v)  # (P,)
        return torch.stack([self.hvp(c) for c in v.unbind(1)], dim=1)  # (P, k)

    __call__ = __matmul__

    def to_scipy(self) -> LinearOperator:
        """A `scipy.sparse.linalg.LinearOperator` (float64 NumPy in and out) on this one."""

        def apply(x: np.ndarray) -> np.ndarray:
            out = self @ torch.as_tensor(np.asarray(x, dtype=np.float64))
            return out.detach().cpu().double().numpy()

        return LinearOperator(  # symmetric: the adjoint is the operator itself
            self.shape, matvec=apply, matmat=apply, rmatvec=apply, rmatmat=apply, dtype=np.float64
        )


def loss_gradient_hessian(
    model: nn.Module,
    criterion: Criterion,
    batches: Batch | Sequence[Batch],
    *,
    params: Sequence[str] | None = None,
    mode: str = "eval",
) -> tuple[Tensor, Tensor, HessianOperator]:
    """(L, ∇L, H) at the model's weights, for the mean loss of `loss_fn`: the value, the
    gradient (P,) and the Hessian as a `HessianOperator`, all from one forward and backward
    pass; with `params` (a block) of the loss as a function of that block alone: H is then
    the diagonal block of the full Hessian. The model runs in `mode` ("eval"; "train":
    BatchNorm on batch statistics, one dropout draw that every product shares).

    Reverse-over-reverse (`vjp` of `grad_and_value`; the Hessian is symmetric): the gradient
    graph is built once and each product is one more backward pass, so keep `batches` small
    (a fixed subset of a few hundred samples).
    """
    w, loss_at = loss_fn(model, criterion, batches, params=params)
    with model_mode(model, mode):
        g, pull, value = vjp(grad_and_value(loss_at), w, has_aux=True)
    P = w.numel()
    op = HessianOperator(lambda v: pull(v)[0], (P, P), w.dtype, w.device)
    return value.detach(), g.detach(), op


def hessian_operator(
    model: nn.Module, criterion: Criterion, batches: Batch | Sequence[Batch]
) -> HessianOperator:
    """The Hessian ∇²L(w) of the mean `criterion` over `batches` at the model's weights w,
    as a `HessianOperator` (see `loss_gradient_hessian`).

    Args:
        model: any `nn.Module`; its trainable parameters (requires_grad=True) are w.
        criterion: a deterministic registered loss name ("mse", "expected-qmse", "ce") or a
            callable (output, target) -> scalar mean loss, e.g. `torch.nn.HuberLoss()`.
        batches: one (x, y) pair or a list of them (the mean over all their samples).

    Shape:
        - Operator: (P, P), P the number of trainable weights.
        - ``op @ v``: v of shape (P,) or (P, k); the output has v's shape.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from qmse import curvature
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 2).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
        >>> H = curvature.hessian_operator(model, "mse", (x, y))
        >>> H.shape
        (8, 8)
        >>> (H @ torch.ones(8)).shape, (H @ torch.eye(8)).shape
        (torch.Size([8]), torch.Size([8, 8]))
        >>> from scipy.sparse.linalg import eigsh
        >>> top = eigsh(H.to_scipy(), k=1, return_eigenvectors=False)
        >>> round(float(top[0]), 4)
        1.7336
        >>> lanczos_top, _ = curvature.hessian_eigs(H, k=1, steps=8)  # the same, by Lanczos
        >>> round(lanczos_top.item(), 4)
        1.7336
    """
    return loss_gradient_hessian(model, criterion, batches)[2]


class Operator(Protocol):
    """What the estimators accept as an operator: `@` on a (P,) tensor and a square `.shape`
    (a `HessianOperator`, a dense symmetric tensor, a curvlinops-style operator)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __matmul__(self, v: Tensor) -> Tensor: ...


def _as_matvec(op: Operator | MatVec, dim: int | None) -> tuple[MatVec, int, torch.dtype | None]:
    """(matvec, P, dtype) of an operator (anything with `@` and a square `.shape`; its
    `dtype`, when a torch dtype, casts the inputs) or of a (matvec callable, dim) pair
    (dtype None)."""
    if hasattr(op, "shape") and hasattr(op, "__matmul__"):
        shape = tuple(op.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise UserError(f"the operator must be square (P, P), got shape {shape}")
        if dim is not None and dim != shape[0]:
            raise UserError(
                f"dim={dim} does not match the operator's shape {shape}; leave dim out, the "
                f"size is taken from the operator"
            )
        dtype = op.dtype if isinstance(getattr(op, "dtype", None), torch.dtype) else None
        device = getattr(op, "device", None)
        if dtype is None:
            return (lambda v: op @ v), shape[0], None
        return (lambda v: op @ v.to(dtype=dtype, device=device)), shape[0], dtype
    if not callable(op):
        raise TypeError(
            f"expected an operator (with @ and .shape) or a matvec callable, got "
            f"{type(op).__name__}"
        )
    if dim is None:
        raise UserError("a matvec callable needs its size: pass dim=P, or pass an operator")
    return op, dim, None


def _basis_dtype(dtype: torch.dtype | None, op_dtype: torch.dtype | None) -> torch.dtype:
    """The estimators' working dtype: `dtype` if given, else the operator's, at least float32."""
    if dtype is not None:
        return dtype
    return torch.float32 if op_dtype is None else torch.promote_types(op_dtype, torch.float32)


def lanczos(
    op: Operator | MatVec,
    dim: int | None = None,
    steps: int | None = None,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`steps` Lanczos iterations with full reorthogonalisation on a symmetric operator.

    `op`: an operator (anything with `@` and `.shape` (P, P): a `HessianOperator`, a dense
    symmetric tensor), its size taken from it, or a matvec callable v -> A v with its size
    `dim`. Returns (nodes, weights) in float64: the Ritz values (ascending, length ≤ steps;
    fewer if the Krylov space closes) and the squared first components of the Ritz vectors,
    which are the quadrature weights of SLQ. Ritz values interlace the spectrum: the smallest
    one is ≥ λ_min, so a negative one proves a negative eigenvalue; with steps = P they are
    the eigenvalues. The start vector is Gaussian from `generator` unless given; the basis is
    kept in `dtype` (default: the operator's, at least float32).
    """
    matvec, dim, op_dtype = _as_matvec(op, dim)
    if steps is None:
        raise UserError("lanczos needs steps=, the number of products (1 <= steps <= P)")
    if not 1 <= steps <= dim:
        raise UserError(f"steps must be in [1, dim={dim}], got {steps}")
    dtype = _basis_dtype(dtype, op_dtype)
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
    op: Operator | MatVec,
    dim: int | None = None,
    *,
    k: int = 5,
    steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(top, bottom): the k largest (descending) and k smallest (ascending) Ritz values of
    one Lanczos run of `steps` products (capped at P).

    Extremes converge first; take steps ≳ 3k, and steps = P for the exact spectrum of a
    small model. `op` is a symmetric operator (a `HessianOperator`, a dense tensor, anything
    with `@` and `.shape`), or a matvec callable with its size `dim`; `dtype` is the Lanczos
    basis's (default: the operator's, at least float32). Seeded by `seed`, not by the global
    RNG.

    Shape:
        - op: (P, P).
        - Output: (top, bottom), each (min(k, steps),), float64.

    Examples::

        >>> import torch
        >>> from qmse import curvature
        >>> A = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=torch.float64))
        >>> top, bottom = curvature.hessian_eigs(A, k=2, steps=4)
        >>> [round(x, 4) for x in top.tolist()], [round(x, 4) for x in bottom.tolist()]
        ([3.0, 1.0], [-2.0, 0.5])
    """
    matvec, dim, op_dtype = _as_matvec(op, dim)
    gen = torch.Generator().manual_seed(seed)
    dtype = _basis_dtype(dtype, op_dtype)
    nodes, _ = lanczos(matvec, dim, min(steps, dim), generator=gen, dtype=dtype)
    return ritz_extremes(nodes, k)


def hutchinson_trace(
    op: Operator | MatVec,
    dim: int | None = None,
    *,
    samples: int = 30,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """Hutchinson's estimate of tr H = E[zᵀHz] with Rademacher z, and its standard error
    (sample std / √samples).

    `op` is a symmetric operator (a `HessianOperator`, a dense tensor, anything with `@` and
    `.shape`), or a matvec callable with its size `dim`; the probes z are drawn in `dtype`
    (default: the operator's, at least float32) from a generator seeded by `seed`.

    Shape:
        - op: (P, P).
        - Output: (estimate, standard error), two Python floats.

    Examples::

        >>> import torch
        >>> from qmse import curvature
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))  # trace 55
        >>> est, se = curvature.hutchinson_trace(A, samples=10)
        >>> round(est, 4), round(se, 4)  # exact for a diagonal matrix: zᵢ² = 1
        (55.0, 0.0)
        >>> M = torch.ones(10, 10, dtype=torch.float64)  # trace 10, rank one
        >>> est, se = curvature.hutchinson_trace(M, samples=400)
        >>> abs(est - 10) < 3 * se
        True
    """
    if samples < 2:
        raise UserError(f"samples must be >= 2 to give a standard error, got {samples}")
    matvec, dim, op_dtype = _as_matvec(op, dim)
    dtype = _basis_dtype(dtype, op_dtype)
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=gen).to(dtype) * 2 - 1
        vals.append(torch.dot(z, matvec(z).to(z)).item())
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(samples)).item()


def spectral_density(
    op: Operator | MatVec,
    dim: int | None = None,
    *,
    steps: int = 30,
    vectors: int = 3,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Stochastic Lanczos quadrature: one (nodes, weights) pair per random start vector.

    The density of the eigenvalues of `op` (P × P, normalised to 1, each eigenvalue weighing
    1/P) is estimated by (1/vectors) Σ_l Σ_j weights_l[j] δ(λ − nodes_l[j]); smooth it with
    `density_on_grid`. One Lanczos run of `steps` products per vector; the first run starts
    where `hessian_eigs` with the same seed does, so its nodes are those Ritz values. `op`
    and `dtype` are those of `hessian_eigs`.
    """
    matvec, dim, op_dtype = _as_matvec(op, dim)
    dtype = _basis_dtype(dtype, op_dtype)
    steps = min(steps, dim)
    gen = torch.Generator().manual_seed(seed)
    return [lanczos(matvec, dim, steps, generator=gen, dtype=dtype) for _ in range(vectors)]


def density_on_grid(runs: Sequence[tuple[Tensor, Tensor]], grid: Tensor, sigma: float) -> Tensor:
    """The SLQ density of `runs` smoothed by a Gaussian of width sigma, on `grid` (G,)."""
    g = grid.double().reshape(-1, 1)  # (G, 1)
    out = torch.zeros(grid.numel(), dtype=torch.float64)
    for nodes, weights in runs:
        kern = torch.exp(-0.5 * ((g - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        out += (kern * weights).sum(-1) / len(runs)  # (G,)
    return out
