"""qmse.hessian against independent references: dense torch.func.hessian Hessians and their
diagonal blocks (the shared CASES of conftest, a GRU tagger with (N, T, C) outputs, a
BatchNorm net in train and eval mode), power iteration on autograd Hessian-vector products
written here (PyHessian's algorithm for its top eigenvalue), Hutchinson within its standard
error of the exact trace."""

from __future__ import annotations

import copy
import doctest
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CASES, dense_hessian, leaves_untouched, tiny_mlp
from torch import nn
from torch.func import functional_call

from qmse import hessian
from qmse.hessian import hessian_summary, layer_blocks
from qmse.loss import get_loss

DT = torch.float64


class Tagger(nn.Module):
    """A sequence model: a GRU and a linear read-out at every step, (N, T, 3) -> (N, T, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(self.rnn(x)[0])


def token_ce(out, y):
    """Cross-entropy per token: out (N, T, C), y (N, T) class indices."""
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _case_sequence():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, 3, generator=g, dtype=DT)
    return Tagger().to(DT), token_ce, x, torch.randint(0, 3, (4, 5), generator=g)


ALL_CASES = {**CASES, "gru-sequence": _case_sequence}


def _reference(criterion):
    return criterion if callable(criterion) else (lambda out, t: get_loss(criterion)(out, t))


def _block_of(model: nn.Module, H: torch.Tensor, names) -> torch.Tensor:
    """The diagonal block of the dense Hessian H (over the trainable parameters in the
    model's order) that belongs to the parameters `names`."""
    index, start = [], 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in names:
            index.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    idx = torch.cat(index)
    return H[idx][:, idx]


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_whole_model_and_layer_blocks_against_the_dense_hessian(name):
    model, criterion, x, y = ALL_CASES[name]()
    H = dense_hessian(model, _reference(criterion), x, y)
    P = H.shape[0]
    with leaves_untouched(model):
        s = hessian_summary(model, criterion, (x, y), what=("top", "bottom"), blocks="layers",
                            k=2, lanczos_steps=P)  # fmt: skip
    assert (s.size, s.lanczos_steps, s.dtype, s.mode, s.n_samples) == (P, P, "float64", "eval",
                                                                       x.shape[0])  # fmt: skip
    eig = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(
        torch.tensor(s.top, dtype=DT), eig.flip(0)[:2], rtol=1e-9, atol=1e-11
    )
    torch.testing.assert_close(torch.tensor(s.bottom, dtype=DT), eig[:2], rtol=1e-9, atol=1e-11)
    assert s.trace is None and s.density is None
    layers = {n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    assert set(s.blocks) == layers and len(s.blocks) >= 2
    assert sum(b.size for b in s.blocks.values()) == P  # the layers partition the weights
    for block in s.blocks.values():
        exact = torch.linalg.eigvalsh(_block_of(model, H, block.params))
        assert block.size == exact.numel() == block.lanczos_steps  # steps capped at the size
        torch.testing.assert_close(block.top[0], exact[-1].item(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(block.bottom[0], exact[0].item(), rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        loss = _reference(criterion)(model(x), y).item()
    assert math.isclose(s.loss, loss, rel_tol=1e-12)


def test_scalar_logits_and_sequences_are_the_shapes_diagnose_refuses():
    for name, shape in (("scalar-bce", (8,)), ("gru-sequence", (4, 5, 3))):
        model, _, x, _ = ALL_CASES[name]()
        with torch.no_grad():
            assert tuple(model(x).shape) == shape


def _power_iteration(model, criterion, x, y, names, iters=2000, tol=1e-13):
    """PyHessian's top eigenvalue: power iteration on H v by double backward through the
    model itself (loss.backward(create_graph=True), then autograd.grad of g·v), over the
    parameters `names`; returns the Rayleigh quotient of the dominant (largest |λ|)
    eigenvector."""
    params = [p for n, p in model.named_parameters() if n in names]
    loss = criterion(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(11)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    value = None
    for _ in range(iters):
        norm = torch.sqrt(sum((u * u).sum() for u in v))
        v = [u / norm for u in v]
        Hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        new = sum((h * u).sum() for h, u in zip(Hv, v)).item()
        if value is not None and abs(new - value) <= tol * abs(new):
            return new
        value, v = new, [h.detach() for h in Hv]
    raise AssertionError(f"power iteration did not converge: {value}")


@pytest.mark.parametrize("name", ["mlp-mse", "scalar-bce", "mlp-ce"])
def test_top_eigenvalue_against_power_iteration(name):
    model, criterion, x, y = ALL_CASES[name]()
    s = hessian_summary(model, criterion, (x, y), what=("top", "bottom"), blocks="layers",
                        lanczos_steps=200)  # fmt: skip
    crit = _reference(criterion)
    parts = [(s, [n for n, _ in model.named_parameters()])]
    parts += [(b, list(b.params)) for b in s.blocks.values()]
    for summary, names in parts:
        dominant = max(summary.top[0], summary.bottom[0], key=abs)  # what power iteration finds
        got = _power_iteration(model, crit, x, y, names)
        assert math.isclose(got, dominant, rel_tol=1e-8), (names, got, dominant)


def test_trace_and_density_of_the_whole_model_and_its_blocks():
    model, criterion, x, y = CASES["mlp-ce"]()
    H = dense_hessian(model, _reference(criterion), x, y)
    P = H.shape[0]
    s = hessian_summary(model, criterion, (x, y), blocks="layers", what=("trace", "density"),
                        trace_samples=200, slq_vectors=3, lanczos_steps=P, seed=5)  # fmt: skip
    assert s.top is None and s.bottom is None
    blocks = [(s, torch.trace(H).item(), torch.linalg.eigvalsh(H))]
    for b in s.blocks.values():
        sub = _block_of(model, H, b.params)
        blocks.append((b, torch.trace(sub).item(), torch.linalg.eigvalsh(sub)))
    assert math.isclose(sum(t for _, t, _ in blocks[1:]), blocks[0][1], rel_tol=1e-10)
    for summary, exact_trace, eig in blocks:
        assert summary.trace_se > 0 and abs(summary.trace - exact_trace) < 3 * summary.trace_se
        assert len(summary.density) == 3
        for nodes, weights in summary.density:  # full Lanczos: the nodes are eigenvalues
            assert math.isclose(sum(weights), 1.0, rel_tol=1e-10)
            used = torch.tensor([n for n, w in zip(nodes, weights) if w > 1e-10], dtype=DT)
            assert (used[:, None] - eig[None]).abs().amin(1).max() < 1e-8


def test_the_extremes_and_the_first_density_run_are_one_lanczos_run():
    model, criterion, x, y = CASES["mlp-mse"]()
    both = hessian_summary(model, criterion, (x, y), what=("top", "density"), k=3, seed=2)
    alone = hessian_summary(model, criterion, (x, y), what=("top",), k=3, seed=2)
    assert both.top == alone.top
    assert both.top == tuple(sorted(both.density[0][0], reverse=True)[:3])


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _autograd_hessian(model, criterion, x, y, train):
    """The dense Hessian by torch.autograd.functional on a copy of the model in the mode
    asked for (train: BatchNorm on batch statistics)."""
    net = copy.deepcopy(model).train(train)
    named = [(k, p.detach()) for k, p in net.named_parameters()]
    w = torch.cat([p.reshape(-1) for _, p in named])

    def loss(wv):
        params, start = {}, 0
        for k, p in named:
            params[k] = wv[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return criterion(functional_call(net, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, w)


def test_train_and_eval_mode_are_chosen_recorded_and_restored():
    torch.manual_seed(4)
    model = BatchNormNet().to(DT)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, 2, generator=g, dtype=DT)
    with torch.no_grad():
        model.bn.running_mean.fill_(0.3)  # eval and train statistics differ
        model.bn.running_var.fill_(2.0)
    crit = nn.MSELoss()
    model.train()
    model.fc1.eval()  # a mixed state, restored exactly; the BatchNorm statistics untouched
    P = sum(p.numel() for p in model.parameters())
    summaries = {}
    with leaves_untouched(model):
        for mode in ("train", "eval"):
            summaries[mode] = hessian_summary(model, crit, (x, y), mode=mode, blocks="layers",
                                              what=("top", "bottom"), lanczos_steps=P)  # fmt: skip
    for mode, s in summaries.items():
        H = _autograd_hessian(model, crit, x, y, train=mode == "train")
        eig = torch.linalg.eigvalsh(H)
        assert s.mode == mode
        assert math.isclose(s.top[0], eig[-1].item(), rel_tol=1e-9)
        assert math.isclose(s.bottom[0], eig[0].item(), rel_tol=1e-9, abs_tol=1e-12)
        bn = torch.linalg.eigvalsh(_block_of(model, H, ("bn.weight", "bn.bias")))
        assert math.isclose(s.blocks["bn"].top[0], bn[-1].item(), rel_tol=1e-9)
    assert abs(summaries["train"].top[0] - summaries["eval"].top[0]) > 1e-3
    with pytest.raises(ValueError, match="mode='test'"):
        hessian_summary(model, crit, (x, y), mode="test")


def test_the_estimators_run_in_the_weights_dtype():
    model, criterion, x, y = CASES["mlp-mse"]()
    H = dense_hessian(model, _reference(criterion), x, y)
    exact = torch.linalg.eigvalsh(H)[-1].item()
    s64 = hessian_summary(model, criterion, (x, y), what=("top",), lanczos_steps=H.shape[0])
    assert s64.dtype == "float64" and abs(s64.top[0] - exact) < 1e-12 * abs(exact)
    s32 = hessian_summary(model.float(), criterion, (x.float(), y.float()), what=("top",),
                          lanczos_steps=H.shape[0])  # fmt: skip
    assert s32.dtype == "float32" and abs(s32.top[0] - exact) < 1e-4 * abs(exact)


def test_user_blocks_are_diagonal_blocks_of_the_hessian():
    model, criterion, x, y = CASES["mlp-mse"]()
    H = dense_hessian(model, _reference(criterion), x, y)
    blocks = {"first weight": ["layers.0.weight"], "biases": ["layers.2.bias", "layers.0.bias"]}
    s = hessian_summary(model, criterion, (x, y), blocks=blocks, what=("top", "trace"),
                        lanczos_steps=100, trace_samples=300)  # fmt: skip
    assert list(s.blocks) == ["first weight", "biases"]
    assert s.blocks["biases"].params == ("layers.2.bias", "layers.0.bias")
    for name, names in blocks.items():
        sub = _block_of(model, H, names)
        b = s.blocks[name]
        assert b.size == sub.shape[0]
        assert math.isclose(b.top[0], torch.linalg.eigvalsh(sub)[-1].item(), rel_tol=1e-9)
        assert abs(b.trace - torch.trace(sub).item()) < 3 * b.trace_se


def test_layer_blocks_names():
    assert layer_blocks(tiny_mlp()) == {
        "layers.0": ["layers.0.weight", "layers.0.bias"],
        "layers.2": ["layers.2.weight", "layers.2.bias"],
    }
    assert layer_blocks(nn.Linear(3, 2)) == {"weight": ["weight"], "bias": ["bias"]}
    model = tiny_mlp()
    model.layers[0].requires_grad_(False)
    assert layer_blocks(model) == {"layers.2": ["layers.2.weight", "layers.2.bias"]}


def test_bad_arguments_are_named():
    model, criterion, x, y = CASES["mlp-mse"]()
    data = (x, y)
    with pytest.raises(ValueError, match=r"\['layers\.9\.weight'\]: not trainable"):
        hessian_summary(model, criterion, data, blocks={"b": ["layers.9.weight"]})
    with pytest.raises(ValueError, match="block 'b': give a non-empty list"):
        hessian_summary(model, criterion, data, blocks={"b": []})
    with pytest.raises(ValueError, match="block 'b': give a non-empty list"):
        hessian_summary(model, criterion, data, blocks={"b": "layers.0.weight"})
    with pytest.raises(ValueError, match="blocks='modules'"):
        hessian_summary(model, criterion, data, blocks="modules")
    with pytest.raises(ValueError, match="what=.*give a list of top, bottom, trace, density"):
        hessian_summary(model, criterion, data, what=("top", "spectrum"))
    with pytest.raises(ValueError, match="what='top'"):
        hessian_summary(model, criterion, data, what="top")
    with pytest.raises(ValueError, match="k must be >= 1"):
        hessian_summary(model, criterion, data, k=0)
    with pytest.raises(ValueError, match='random.*"expected-qmse"'):
        hessian_summary(model, "qmse", data)


def test_the_summary_is_frozen_and_json_ready():
    model, criterion, x, y = CASES["scalar-bce"]()
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    options = dict(blocks="layers", lanczos_steps=5, trace_samples=3)
    s = hessian_summary(model, criterion, batches, **options)
    assert s.n_samples == 8 and s.criterion == "BCEWithLogitsLoss()"
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["blocks"]["0"]["params"] == ["0.weight", "0.bias"] and d["top"] == list(s.top)
    assert s == hessian_summary(model, criterion, batches, **options)  # seeded
    union = hessian_summary(model, criterion, (x, y), **options)  # the batches' mean
    assert math.isclose(union.top[0], s.top[0], rel_tol=1e-12)
    assert math.isclose(union.loss, s.loss, rel_tol=1e-12)
    with pytest.raises(AttributeError):
        s.top = (0.0,)
    with pytest.raises(TypeError):
        s.blocks["0"] = None


def test_docstring_examples_run():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    with torch.random.fork_rng(devices=[]):
        tests = doctest.DocTestFinder().find(hessian)
        attempted = sum(runner.run(t, out=report.append).attempted for t in tests)
    assert runner.failures == 0 and attempted >= 5, "".join(report)


def test_the_documented_example_prints_what_the_docs_show(capsys):
    """docs/diagnostics.md, "Hessian summaries": its code block prints its output block."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "diagnostics.md").read_text()
    section = doc.split("### Hessian summaries", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = section.split("prints\n\n```\n", 1)[1].split("```", 1)[0]
    with torch.random.fork_rng(devices=[]):
        exec(compile(code, "docs/diagnostics.md", "exec"), {})
    assert capsys.readouterr().out == shown
