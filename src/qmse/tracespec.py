"""Permutation specs derived by tracing a model's data flow with torch.fx.

`trace_axes(model, example_input)` reads `model.forward` as a graph
(`torch.fx.symbolic_trace`; the shapes from one run on the example input, in eval mode) and
follows, node by node, which permutation may reorder the unit axis of each tensor (features
of a Linear's output, channels of a convolution's); `qmse.symmetry.traced_spec` makes the
result a `PermutationSpec`. The rules:

- a Linear or Conv2d (groups 1) starts a permutation on its outputs (its weight's rows and
  its bias) and carries its input's permutation on its weight's axis 1, in blocks of
  prod(S) columns after a flatten of (C, *S);
- BatchNorm / InstanceNorm carry their input's permutation on their weight, bias and
  running statistics; LayerNorm on its weight and bias when it normalises over the unit
  axis (over other axes it commutes with the permutation);
- elementwise activations, Dropout, pooling and means over other axes keep it; a flatten
  of (N, C, *S) turns C channels into C blocks of prod(S) features;
- a sum, difference or product of two tensors (a residual addition) joins their
  permutations into one: a residual stream shares one permutation;
- the model's input and outputs are never permuted: a permutation that reaches an output,
  or is joined to one that does, is dropped; so is one that reaches an operation after the
  last layer with parameters (a softmax on the logits): like an output, it is not permuted.

Each permutation is named after the first weight layer (in execution order) whose outputs it
reorders: in a ResNet, "conv1" is the stem and the first stage's residual stream. Anything
else that meets a permuted tensor (a concatenation, a reshape that is not a flatten, a module
or function not listed, a weight layer called twice) raises a UserError naming that node;
an unknown operation on tensors no permutation reaches (input preprocessing) is fine.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from qmse.curvature import eval_mode
from qmse.errors import UserError

Axes = dict[str, list[tuple[str, int, int]]]  # permutation -> [(entry, axis, block), …]
ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus,
    nn.Identity, nn.Dropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip  # per unit (or per channel): they commute with a permutation of the units
FIXED = 0  # the class of the axes no permutation may reorder: the input's and the outputs'
KEEP_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu,
    F.elu, F.softplus, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}  # fmt: skip  # per unit: they commute with a permutation of the units
KEEP_METHODS = {"relu", "relu_", "tanh", "sigmoid", "contiguous"}
JOIN_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.mul, operator.truediv,
    torch.add, torch.sub, torch.mul,
}  # fmt: skip  # elementwise in two tensors: their unit axes must carry one permutation
JOIN_METHODS = {"add", "add_", "sub", "mul"}
RESHAPES = ({torch.flatten}, {"flatten", "view", "reshape"})  # (functions, methods)
REDUCTIONS = ({torch.mean, torch.sum, torch.amax}, {"mean", "sum", "amax"})
SHAPE_QUERIES = ({getattr}, {"size", "dim"})  # outputs carry no data (tensor sizes)


class Units(NamedTuple):
    """Which permutation class reorders which axis of a tensor, in blocks of `block`."""

    cls: int
    axis: int
    block: int = 1


class _Classes:
    """Union-find over permutation classes; class FIXED (0) absorbs whatever joins it, and
    otherwise the earlier class is the root, so a permutation keeps its first layer's name."""

    def __init__(self) -> None:
        self.parent = [FIXED]

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, c: int) -> int:
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        self.parent[max(a, b)] = min(a, b)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"node {node.name!r} (method .{node.target}())"
    name = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {name})"


def trace_axes(model: nn.Module, example_input: Tensor) -> Axes:
    """The hidden-unit symmetry of `model`, derived by tracing (module docstring), as the
    axes of a `qmse.symmetry.PermutationSpec`.

    `example_input`: a batch the model accepts, to read the shapes; the model runs once on
    it in eval mode, untouched. Raises UserError naming the first node it cannot follow, or
    if torch.fx cannot trace the model (data-dependent control flow): write a
    `PermutationSpec` by hand then.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # torch.fx raises many kinds on code it cannot trace
        raise UserError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); write a "
            f"PermutationSpec by hand (see qmse.symmetry)"
        ) from e
    with eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    return _Tracer(model, gm).axes()


class _Tracer:
    """One pass over a traced graph: the units of every node, the entries of every class."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.classes = _Classes()
        self.units: dict[fx.Node, Units | None] = {}  # None: no data (a size, a shape)
        self.entries: list[tuple[int, tuple[str, int, int]]] = []  # (class, entry) in order
        self.names: dict[int, str] = {}  # class -> the weight layer that started it
        self.used: set[str] = set()
        nodes = list(gm.graph.nodes)
        weighted = [
            i
            for i, n in enumerate(nodes)
            if n.op == "get_attr"
            or (
                n.op == "call_module" and any(True for _ in gm.get_submodule(n.target).parameters())
            )
        ]
        self.tail = set(nodes[max(weighted, default=-1) + 1 :])  # after the last layer

    def fail(self, node: fx.Node, why: str) -> UserError:
        return UserError(
            f"cannot derive a permutation spec for {type(self.model).__name__}: "
            f"{_describe(node, self.gm)} {why}; write a PermutationSpec by hand (see "
            f"qmse.symmetry)"
        )

    def fixed(self, u: Units) -> bool:
        return self.classes.find(u.cls) == FIXED

    def axes(self) -> Axes:
        for node in self.gm.graph.nodes:
            self.units[node] = self.visit(node)
        axes: Axes = {}
        for c, entry in self.entries:
            root = self.classes.find(c)
            if root != FIXED:
                axes.setdefault(self.names[root], []).append(entry)
        return axes

    def inputs(self, node: fx.Node) -> list[Units]:
        return [u for a in node.all_input_nodes if (u := self.units.get(a)) is not None]

    def visit(self, node: fx.Node) -> Units | None:
        if node.op in ("placeholder", "get_attr"):
            return Units(FIXED, 0)
        if node.op == "output":
            for u in self.inputs(node):
                self.classes.union(u.cls, FIXED)
            return None
        kind = 0 if node.op == "call_function" else 1  # index into (functions, methods)
        target = node.target
        if node.op == "call_module":
            return self.module(node, self.gm.get_submodule(target))
        if target in SHAPE_QUERIES[kind]:
            return None
        if target in (KEEP_FUNCTIONS, KEEP_METHODS)[kind]:
            return self.keep(node)
        if target in (JOIN_FUNCTIONS, JOIN_METHODS)[kind]:
            return self.join(node)
        if target in RESHAPES[kind]:
            return self.flatten(node)
        if target in REDUCTIONS[kind]:
            return self.reduce(node)
        return self.unknown(node, "is not an operation it knows")

    def unknown(self, node: fx.Node, why: str) -> Units:
        """Fine on tensors no permutation reaches (their output is fixed too) and after the last
        layer with parameters (its inputs are then not permuted), else an error."""
        if node in self.tail:
            for u in self.inputs(node):
                self.classes.union(u.cls, FIXED)
        if all(self.fixed(u) for u in self.inputs(node)):
            return Units(FIXED, 0)
        raise self.fail(node, f"{why}, and a permuted tensor reaches it")

    def first(self, node: fx.Node) -> Units:
        arg = node.args[0] if node.args else None
        if not isinstance(arg, fx.Node) or self.units.get(arg) is None:
            raise self.fail(node, "has no tensor as its first argument")
        return self.units[arg]

    def keep(self, node: fx.Node) -> Units:
        u, shape = self.first(node), _shape(node)
        before = _shape(node.args[0])
        if not self.fixed(u) and (
            shape is None or len(shape) != len(before) or shape[u.axis] != before[u.axis]
        ):
            raise self.fail(node, "changes the unit axis of its input")
        return u

    def join(self, node: fx.Node) -> Units:
        shape = _shape(node)
        moving = [
            (a, u) for a in node.all_input_nodes if (u := self.units.get(a)) and not self.fixed(u)
        ]
        if not moving:
            return Units(FIXED, 0)
        axis, block = moving[0][1].axis, moving[0][1].block
        for a, u in moving:
            s = _shape(a)
            if (
                (u.axis, u.block) != (axis, block)
                or s is None
                or len(s) != len(shape)
                or (s[axis] != shape[axis])
            ):
                raise self.fail(node, "combines tensors whose unit axes do not line up")
        for u in self.inputs(node):  # a fixed operand (the input, a parameter) fixes them all
            self.classes.union(u.cls, moving[0][1].cls)
        return Units(moving[0][1].cls, axis, block)

    def flatten(self, node: fx.Node) -> Units:
        u, shape, before = self.first(node), _shape(node), _shape(node.args[0])
        if self.fixed(u) or shape == before:
            return u
        if (
            len(before) >= 3
            and (u.axis, u.block) == (1, 1)
            and shape
            == (
                before[0],
                math.prod(before[1:]),
            )
        ):
            return Units(u.cls, 1, math.prod(before[2:]))
        raise self.fail(
            node, f"reshapes {before} to {shape}, which is not a flatten of whole units"
        )

    def reduce(self, node: fx.Node) -> Units:
        u, shape, before = self.first(node), _shape(node), _shape(node.args[0])
        if self.fixed(u):
            return u
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims) if dims is not None else []
        dims = [d % len(before) for d in dims]
        if not dims or u.axis in dims or shape is None:
            raise self.fail(node, "reduces over the unit axis")
        axis = u.axis if len(shape) == len(before) else u.axis - sum(d < u.axis for d in dims)
        return Units(u.cls, axis, u.block)

    def module(self, node: fx.Node, m: nn.Module) -> Units:
        if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1:
            return self.weight_layer(node, m)
        if isinstance(m, nn.modules.batchnorm._NormBase):
            return self.norm(node, m, ("weight", "bias", "running_mean", "running_var"), 1)
        if isinstance(m, nn.LayerNorm):
            return self.norm(node, m, ("weight", "bias"), None)
        if isinstance(m, ELEMENTWISE):
            return self.keep(node)
        if isinstance(m, nn.Flatten):
            return self.flatten(node)
        return self.unknown(node, "is not a module it knows")

    def claim(self, node: fx.Node) -> None:
        if node.target in self.used:
            raise self.fail(node, "is called twice (shared weights)")
        self.used.add(node.target)

    def weight_layer(self, node: fx.Node, m: nn.Linear | nn.Conv2d) -> Units:
        self.claim(node)
        u, before = self.first(node), _shape(node.args[0])
        axis = len(before) - 1 if isinstance(m, nn.Linear) else 1  # the axis it reads
        if not self.fixed(u):
            if u.axis != axis or (isinstance(m, nn.Conv2d) and u.block != 1):
                raise self.fail(node, "reads an axis other than its input's unit axis")
            self.entries.append((u.cls, (f"{node.target}.weight", 1, u.block)))
        c = self.classes.new()
        self.names[c] = node.target
        self.entries.append((c, (f"{node.target}.weight", 0, 1)))
        if m.bias is not None:
            self.entries.append((c, (f"{node.target}.bias", 0, 1)))
        shape = _shape(node)
        return Units(c, len(shape) - 1 if isinstance(m, nn.Linear) else 1)

    def norm(
        self, node: fx.Node, m: nn.Module, entries: tuple[str, ...], axis: int | None
    ) -> Units:
        """A norm layer over `axis` (None: LayerNorm, over its trailing normalized_shape)."""
        self.claim(node)
        u, before = self.first(node), _shape(node.args[0])
        if self.fixed(u):
            return u
        if axis is None:  # LayerNorm: its weight covers the last len(normalized_shape) axes
            first = len(before) - len(m.normalized_shape)
            if u.axis < first:
                return u  # normalises over other axes: commutes with the permutation
            at = u.axis - first
        elif u.axis != axis:
            raise self.fail(node, "normalises an axis other than its input's unit axis")
        else:
            at = 0
        for name in entries:
            if isinstance(getattr(m, name, None), Tensor):
                self.entries.append((u.cls, (f"{node.target}.{name}", at, u.block)))
        return u
