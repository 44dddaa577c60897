"""PyHessian's questions on any model and loss: the extreme eigenvalues, the trace and the
spectral density of the Hessian of the training loss, for the whole model and by block.

`hessian_summary(model, criterion, data)` returns a `HessianSummary`, a frozen dataclass:
the loss and its gradient norm at the point, the top-k and bottom-k Ritz values (Lanczos),
Hutchinson's trace with its standard error and the SLQ runs of the spectral density, each
only where asked (`what`), and the same quantities for each block of parameters (`blocks`):
a block's Hessian is the diagonal block of the full one, the Hessian of the loss as a
function of that block with the other weights held where they are (per-layer curvature).

It is `qmse.curvature` put together: any output shape the criterion takes ((N,) logits for
`BCEWithLogitsLoss`, (N, C), a sequence model's (N, T, C)), the model run in the mode asked
for and recorded ("eval" or "train"; every module's flag is put back), the estimators run
in the weights' dtype (float64 for a float64 model; float32 at least). Nothing needs (N, C)
outputs or class targets: that is `qmse.diagnose`'s MSE stopping-case geometry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from qmse.curvature import (
    Batch,
    Criterion,
    HessianOperator,
    _as_batches,
    criterion_name,
    hessian_eigs,
    hutchinson_trace,
    loss_gradient_hessian,
    ritz_extremes,
    spectral_density,
)
from qmse.errors import UserError

WHAT = ("top", "bottom", "trace", "density")
Density = tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]  # SLQ runs: (nodes, weights)


@dataclass(frozen=True)
class BlockSummary:
    """The curvature of one block of parameters: its Hessian is `size` × `size`.

    top: the k largest Ritz values (descending); bottom: the k smallest (ascending), from one
    Lanczos run of `lanczos_steps` products (steps = size: the exact eigenvalues); trace ±
    trace_se: Hutchinson's estimate and its standard error; density: one (nodes, weights)
    pair per SLQ run (`qmse.curvature.density_on_grid` smooths them). None: not asked for.
    """

    params: tuple[str, ...]
    size: int
    lanczos_steps: int
    top: tuple[float, ...] | None
    bottom: tuple[float, ...] | None
    trace: float | None
    trace_se: float | None
    density: Density | None = field(repr=False)


@dataclass(frozen=True)
class HessianSummary:
    """The curvature of the mean loss `criterion` on `n_samples` samples at the model's
    weights: `loss` and `grad_norm` there, the quantities of `BlockSummary` for all `size`
    trainable weights, and one `BlockSummary` per block (`blocks`, empty when none were
    asked for). `mode` is the mode the model ran in, `dtype` that of its weights (the
    estimators run in it, float32 at least). `to_dict` is the JSON-ready form."""

    criterion: str
    mode: str
    dtype: str
    n_samples: int
    loss: float
    grad_norm: float
    size: int
    lanczos_steps: int
    top: tuple[float, ...] | None
    bottom: tuple[float, ...] | None
    trace: float | None
    trace_se: float | None
    density: Density | None = field(repr=False)
    blocks: Mapping[str, BlockSummary]

    def to_dict(self) -> dict:
        """The summary as plain dicts, lists and numbers (json.dumps takes it)."""

        def plain(value: object) -> object:
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        fields = {k: plain(v) for k, v in vars(self).items() if k != "blocks"}
        fields["blocks"] = {
            name: {k: plain(v) for k, v in vars(block).items()}
            for name, block in self.blocks.items()
        }
        return fields


def layer_blocks(model: nn.Module) -> dict[str, list[str]]:
    """One block per module that holds trainable parameters of its own (a layer: its weight
    and bias together), named by the module; a parameter of the model itself is a block of
    its own, named by the parameter. In the model's order.

    E.g. `MLP(3, [4], 2)`: {"layers.0": ["layers.0.weight", "layers.0.bias"], "layers.2":
    [...]}; `nn.Linear(3, 2)`: {"weight": ["weight"], "bias": ["bias"]}.
    """
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    blocks: dict[str, list[str]] = {}
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{k}" if prefix else k for k, _ in module.named_parameters(recurse=False)]
        own = [k for k in own if k in trainable]  # a shared parameter counts where first named
        if prefix and own:
            blocks[prefix] = own
        elif own:
            blocks.update({k: [k] for k in own})
    return blocks


def _blocks(model: nn.Module, blocks: str | Mapping[str, Sequence[str]] | None) -> dict:
    """`blocks` as {name: [parameter names]}: None none, "layers" `layer_blocks`, or the
    user's mapping (each name a list of trainable parameter names, checked when used)."""
    if blocks is None:
        return {}
    if blocks == "layers":
        return layer_blocks(model)
    if isinstance(blocks, str) or not isinstance(blocks, Mapping):
        raise UserError(
            f"blocks={blocks!r}; give None (the whole model), 'layers', or a mapping "
            f"name -> list of parameter names"
        )
    out = {}
    for name, params in blocks.items():
        if isinstance(params, str) or not list(params):
            raise UserError(
                f"block {name!r}: give a non-empty list of parameter names, got {params!r}"
            )
        out[str(name)] = list(params)
    return out


def _curvature(
    op: HessianOperator,
    what: frozenset[str],
    *,
    k: int,
    steps: int,
    slq_vectors: int,
    trace_samples: int,
    seed: int,
) -> dict:
    """The quantities `what` of one operator, as `BlockSummary` fields. With "density" the
    extremes are the first SLQ run's Ritz values (the run `hessian_eigs` makes with the same
    seed), so they cost no extra products."""
    size = op.shape[0]
    steps = min(steps, size)
    out = dict(size=size, lanczos_steps=steps, top=None, bottom=None, trace=None,
               trace_se=None, density=None)  # fmt: skip
    if "density" in what:
        runs = spectral_density(op, steps=steps, vectors=slq_vectors, seed=seed)
        out["density"] = tuple((tuple(n.tolist()), tuple(w.tolist())) for n, w in runs)
        top, bottom = ritz_extremes(runs[0][0], k)
    elif what & {"top", "bottom"}:
        top, bottom = hessian_eigs(op, k=k, steps=steps, seed=seed)
    if "top" in what:
        out["top"] = tuple(top.tolist())
    if "bottom" in what:
        out["bottom"] = tuple(bottom.tolist())
    if "trace" in what:
        out["trace"], out["trace_se"] = hutchinson_trace(op, samples=trace_samples, seed=seed)
    return out


def hessian_summary(
    model: nn.Module,
    criterion: Criterion,
    data: Batch | Sequence[Batch],
    *,
    what: Sequence[str] = WHAT,
    blocks: str | Mapping[str, Sequence[str]] | None = None,
    mode: str = "eval",
    k: int = 1,
    lanczos_steps: int = 30,
    slq_vectors: int = 2,
    trace_samples: int = 20,
    seed: int = 0,
) -> HessianSummary:
    """The Hessian of the mean `criterion` over `data` at the model's weights, summarised
    like PyHessian's `hessian(model, criterion, data)`: eigenvalues, trace, density.

    Args:
        model: any `nn.Module`; its trainable parameters (requires_grad=True) are the weights.
        criterion: a deterministic registered loss name or a callable (output, target) ->
            scalar mean loss (`qmse.curvature.criterion_fn`), e.g. `nn.BCEWithLogitsLoss()`.
        data: one (x, y) pair or a list of them (the mean over all their samples).
        what: any of "top", "bottom" (the k largest and smallest Ritz values of one Lanczos
            run of `lanczos_steps` products), "trace" (Hutchinson, `trace_samples` Rademacher
            probes) and "density" (SLQ, `slq_vectors` Lanczos runs, the first being the run
            of the extremes).
        blocks: None (the whole model alone), "layers" (`layer_blocks`: one block per
            layer), or a mapping name -> list of parameter names. Each block's Hessian is
            the diagonal block of the full Hessian; the whole model is always summarised.
        mode: "eval" or "train" (BatchNorm on batch statistics; dropout draws one mask per
            operator, which all its products share), recorded in the summary; the model's
            flags and buffers are as they were after.
        seed: seeds every estimator (Lanczos start vectors, Hutchinson probes); the global
            RNG is not used.

    Costs one forward and backward pass per block and the whole model, then one
    Hessian-vector product per Lanczos step and per probe. Steps are capped at each
    operator's size; steps = size gives the exact spectrum.

    Shape:
        - data: x of shape (N, *), y whatever `criterion` takes with model(x).
        - model(x): any shape `criterion` takes, e.g. (N,), (N, C) or (N, T, C).

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from qmse.hessian import hessian_summary
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
        >>> model = model.double()  # (N, 3) -> (N,) logits
        >>> x = torch.randn(16, 3, dtype=torch.float64)
        >>> y = (x[:, 0] > 0).double()
        >>> s = hessian_summary(model, nn.BCEWithLogitsLoss(), (x, y), blocks="layers",
        ...                     what=("top", "bottom"), lanczos_steps=21)
        >>> s.size, s.dtype, s.mode, list(s.blocks), s.blocks["2"].size
        (21, 'float64', 'eval', ['0', '2'], 5)
        >>> round(s.top[0], 6), round(s.bottom[0], 6), round(s.blocks["2"].top[0], 6)
        (0.529803, -0.482044, 0.296333)
        >>> w2 = torch.cat([model[2].weight.flatten(), model[2].bias]).detach()
        >>> def loss_of_layer_2(w):  # the loss as a function of that layer alone
        ...     params = {"2.weight": w[:4].view(1, 4), "2.bias": w[4:]}
        ...     return nn.BCEWithLogitsLoss()(torch.func.functional_call(model, params, (x,)), y)
        >>> H2 = torch.func.hessian(loss_of_layer_2)(w2)  # (5, 5): the block, densely
        >>> round(torch.linalg.eigvalsh(H2)[-1].item(), 6)
        0.296333
    """
    wanted = frozenset(what)
    if isinstance(what, str) or not wanted <= set(WHAT):
        raise UserError(f"what={what!r}; give a list of {', '.join(WHAT)}")
    for name, value in (("k", k), ("lanczos_steps", lanczos_steps), ("slq_vectors", slq_vectors)):
        if not value >= 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    named_blocks = _blocks(model, blocks)
    options = dict(what=wanted, k=k, steps=lanczos_steps, slq_vectors=slq_vectors,
                   trace_samples=trace_samples, seed=seed)  # fmt: skip
    value, grad, op = loss_gradient_hessian(model, criterion, data, mode=mode)
    whole = _curvature(op, **options)
    per_block = {}
    for name, params in named_blocks.items():
        _, _, block_op = loss_gradient_hessian(model, criterion, data, params=params, mode=mode)
        per_block[name] = BlockSummary(params=tuple(params), **_curvature(block_op, **options))
    return HessianSummary(
        criterion=criterion_name(criterion),
        mode=mode,
        dtype=str(op.dtype).removeprefix("torch."),
        n_samples=sum(x.shape[0] for x, _ in _as_batches(data)),
        loss=value.item(),
        grad_norm=grad.norm().item(),
        **whole,
        blocks=MappingProxyType(per_block),
    )
