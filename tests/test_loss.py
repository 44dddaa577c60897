"""qmse.loss against independent references: explicit Jacobians, closed forms, Monte Carlo."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from qmse.loss import (
    LOSSES,
    Loss,
    QMSELoss,
    compute_loss,
    expected_qmse_loss,
    get_loss,
    mse_loss_half,
    qmse_loss,
    register_loss,
    sample_directions,
)
from qmse.models import MLP


@pytest.fixture(autouse=True)
def float64_default():
    """Reference computations in float64, restored afterwards for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _flat_grad(loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def _per_sample_jacobians(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, P) Jacobian of each sample's output w.r.t. the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,))  # (N, C)

    jac = torch.autograd.functional.jacobian(f, params)  # tuple of (N, C, *p.shape)
    N, C = x.size(0), jac[0].size(1)
    return torch.cat([j.reshape(N, C, -1) for j in jac], dim=-1)


def test_gradient_equals_minus_jt_q_r():
    model = tiny_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    v = sample_directions(5, 3, generator=g, dtype=torch.float64)
    grad = _flat_grad(qmse_loss(model(x), y, noise=v), model)

    J = _per_sample_jacobians(model, x)  # (N, C, P)
    with torch.no_grad():
        r = y - model(x)  # (N, C)
    Q = (r + v).unsqueeze(-1) * (r + v).unsqueeze(-2)  # (N, C, C)
    expected = -torch.einsum("ncp,ncd,nd->p", J, Q, r) / 5  # mean over samples
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_qmse_escapes_mse_stationary_point_of_least_squares():
    """f(w) = A w with more outputs than parameters (C > P): at the least-squares fit
    Jᵀr = Aᵀr = 0 with r ≠ 0 (case 3). QMSE's gradient is then −Jᵀv(‖r‖² + ⟨v, r⟩)
    (eq. 9, sign restored), and nonzero."""
    g = torch.Generator().manual_seed(2)
    C, P = 6, 2
    A, y = torch.randn(C, P, generator=g), torch.randn(C, generator=g)
    w = torch.linalg.lstsq(A, y.unsqueeze(-1)).solution.squeeze(-1).requires_grad_()
    r = (y - A @ w).detach()
    assert r.norm() > 0.5
    f, t = (A @ w).unsqueeze(0), y.unsqueeze(0)  # one sample of C outputs: (1, C)
    (mse_grad,) = torch.autograd.grad(mse_loss_half(f, t), w, retain_graph=True)
    assert mse_grad.norm() < 1e-12

    v = sample_directions(1, C, generator=g, dtype=torch.float64)[0]
    (grad,) = torch.autograd.grad(qmse_loss(f, t, noise=v.unsqueeze(0)), w)
    expected = -A.T @ v * (r @ r + v @ r)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert grad.norm() > 1e-3


def test_monte_carlo_mean_gradient_is_expected_qmse_gradient():
    model = tiny_mlp(3, c=3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 4, generator=g), torch.randn(1, 3, generator=g)
    out = model(x)
    J = _per_sample_jacobians(model, x)[0]  # (C, P)
    K = 20_000
    with torch.no_grad():
        r = (y - out)[0]  # (C,)
        v = sample_directions(K, 3, generator=g, dtype=torch.float64)  # (K, C)
        grads = -(((r + v) @ r).unsqueeze(-1) * (r + v)) @ J  # (K, P)  −Jᵀ(r+v)⟨r+v, r⟩
    # The per-draw formula agrees with autograd on a few draws.
    for k in range(3):
        auto = _flat_grad(qmse_loss(model(x), y, noise=v[k : k + 1]), model)
        torch.testing.assert_close(auto, grads[k], rtol=1e-9, atol=1e-12)
    expected = _flat_grad(expected_qmse_loss(model(x), y), model)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(K)
    z = (mean - expected).abs() / se.clamp_min(1e-12)
    assert z.max() < 5.0, z.max()
    assert (mean - expected).norm() < 0.05 * expected.norm()


def test_direction_distribution_unit_mean_zero_cov_identity_over_c():
    K, C = 40_000, 5
    v = sample_directions(K, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(K), rtol=0, atol=1e-12)
    se_mean = v.std(0) / math.sqrt(K)
    assert ((v.mean(0) / se_mean).abs() < 5).all()
    outer = v.unsqueeze(-1) * v.unsqueeze(-2)  # (K, C, C)
    cov, se_cov = outer.mean(0), outer.std(0) / math.sqrt(K)
    assert ((cov - torch.eye(C) / C).abs() < 5 * se_cov + 1e-12).all()


def test_scalar_output_direction_is_plus_or_minus_one():
    v = sample_directions(1000, 1, generator=torch.Generator().manual_seed(5))
    assert set(v.flatten().tolist()) == {-1.0, 1.0}
    assert 400 < (v > 0).sum() < 600


def test_seeded_determinism_and_explicit_v_path():
    model = tiny_mlp(6)
    x, y = torch.randn(7, 4), torch.randn(7, 3)

    def run(seed):
        loss = qmse_loss(model(x), y, generator=torch.Generator().manual_seed(seed))
        return loss, _flat_grad(loss, model)

    (l1, g1), (l2, g2) = run(11), run(11)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert not torch.equal(run(12)[0], l1)
    v = sample_directions(7, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    loss_v = qmse_loss(model(x), y, noise=v)
    assert torch.equal(loss_v, l1)
    assert torch.equal(_flat_grad(loss_v, model), g1)


def test_class_indices_equal_one_hot_and_reductions_agree():
    g = torch.Generator().manual_seed(7)
    out = torch.randn(6, 4, generator=g)
    idx = torch.tensor([0, 3, 1, 2, 3, 0])
    onehot = F.one_hot(idx, 4).double()
    v = sample_directions(6, 4, generator=g, dtype=torch.float64)
    for fn in (
        lambda t, red: qmse_loss(out, t, noise=v, reduction=red),
        lambda t, red: mse_loss_half(out, t, reduction=red),
        lambda t, red: expected_qmse_loss(out, t, reduction=red),
    ):
        per = fn(onehot, "none")
        assert per.shape == (6,)
        torch.testing.assert_close(fn(idx, "none"), per)
        torch.testing.assert_close(fn(idx, "mean"), per.mean())
        torch.testing.assert_close(fn(idx, "sum"), per.sum())
    module = QMSELoss(reduction="sum")
    torch.testing.assert_close(
        module(out, idx, v), qmse_loss(out, onehot, noise=v, reduction="sum")
    )
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        QMSELoss(generator=g1)(out, onehot), qmse_loss(out, onehot, generator=g2)
    )


def test_closed_forms_of_per_sample_losses():
    g = torch.Generator().manual_seed(8)
    out, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    v = sample_directions(5, 3, generator=g, dtype=torch.float64)
    r = y - out
    Q = (r + v).unsqueeze(-1) * (r + v).unsqueeze(-2)
    quad = 0.5 * torch.einsum("nc,ncd,nd->n", r, Q, r)  # ½ rᵀ Q r
    torch.testing.assert_close(qmse_loss(out, y, noise=v, reduction="none"), quad)
    torch.testing.assert_close(mse_loss_half(out, y), 0.5 * 3 * F.mse_loss(out, y))
    s = (r * r).sum(-1)
    torch.testing.assert_close(
        expected_qmse_loss(out, y, reduction="none"), s**2 / 4 + s / 6, rtol=1e-12, atol=0
    )
    # One sample is a batch of one: (1, C).
    assert qmse_loss(out[:1], y[:1], noise=v[:1], reduction="none").shape == (1,)
    torch.testing.assert_close(qmse_loss(out[:1], y[:1], noise=v[:1]), quad[0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_1d_input_is_refused_with_both_ways_to_pass_it(name):
    """f of shape (8,) is N = 8 scalar outputs or one sample of C = 8: different losses (for
    QMSE, 8 directions on {±1} or one on S^7), so neither is guessed."""
    g = torch.Generator().manual_seed(10)
    f, y = torch.randn(8, generator=g), torch.randn(8, generator=g)
    for call in (
        lambda: qmse_loss(f, y, generator=g),
        lambda: qmse_loss(f, y, noise=F.normalize(torch.randn(8, generator=g), dim=0)),
        lambda: get_loss(name)(f, y, generator=g),
        lambda: get_loss(name).expected(f, y),
        lambda: QMSELoss()(f, y),
    ):
        with pytest.raises(ValueError, match=r"unsqueeze\(-1\) of shape \(8, 1\).*\(1, 8\)"):
            call()
    # both explicit forms work and differ: 8 samples with C = 1 against one with C = 8
    v8 = sample_directions(8, 1, generator=torch.Generator().manual_seed(0))  # (8, 1): ±1
    column = qmse_loss(f.unsqueeze(-1), y.unsqueeze(-1), noise=v8)
    r = (y - f).unsqueeze(-1)
    ref = (0.5 * ((r + v8) * r).sum(-1) ** 2).mean()
    torch.testing.assert_close(column, ref)
    row = qmse_loss(f.unsqueeze(0), y.unsqueeze(0), generator=torch.Generator().manual_seed(0))
    assert row.shape == () and not torch.isclose(row, column)


def test_batch_scope_uses_one_direction_for_the_flattened_residual():
    g = torch.Generator().manual_seed(9)
    out, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    V = F.normalize(torch.randn(12, generator=g), dim=0).reshape(4, 3)
    R = (y - out).reshape(-1)
    expected = 0.5 * ((R + V.reshape(-1)) @ R) ** 2
    torch.testing.assert_close(qmse_loss(out, y, noise=V, scope="batch", reduction="sum"), expected)
    torch.testing.assert_close(qmse_loss(out, y, noise=V, scope="batch"), expected / 4)
    sampled = qmse_loss(out, y, scope="batch", generator=torch.Generator().manual_seed(0))
    assert sampled.shape == () and sampled >= 0


def test_compute_loss_names():
    out, idx = torch.randn(3, 4), torch.tensor([1, 0, 3])
    torch.testing.assert_close(compute_loss("mse", out, idx), mse_loss_half(out, idx))
    torch.testing.assert_close(compute_loss("ce", out, idx), F.cross_entropy(out, idx))
    torch.testing.assert_close(
        compute_loss("expected-qmse", out, idx), expected_qmse_loss(out, idx)
    )


def test_registry_mean_values_and_expectations_against_monte_carlo():
    """Each random loss's `mean` is the Monte Carlo mean of its value over its draw, and the
    gradient of its `expectation` is the Monte Carlo mean of its gradient (docs/theory.md)."""
    g = torch.Generator().manual_seed(10)
    out, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    draws, params = 40_000, {"qmse": {}, "label-noise": {"sigma": 0.3}}
    for name, kw in params.items():
        spec = get_loss(name)
        assert spec.random
        f = out.unsqueeze(0).expand(draws, -1, -1).reshape(-1, 4).clone().requires_grad_()
        t = y.repeat(draws, 1)
        values = spec(f, t, generator=g, reduction="none", **kw).reshape(draws, 3)
        mc, se = values.mean(0), values.std(0) / draws**0.5
        assert ((mc - spec.expected(out, y, **kw)).abs() <= 4 * se).all(), name
        (grad,) = torch.autograd.grad(values.sum() / draws, f)
        per_draw = grad.reshape(draws, 3, 4) * draws  # (draws, 3, 4) gradient of each draw
        mc_grad, se_grad = per_draw.mean(0), per_draw.std(0) / draws**0.5
        o = out.clone().requires_grad_()
        (exact,) = torch.autograd.grad(
            compute_loss(spec.mean_gradient_loss, o, y, reduction="sum"), o
        )
        assert ((mc_grad - exact).abs() <= 4 * se_grad).all(), name


def test_label_noise_is_mse_on_noisy_targets():
    """½‖y + ξ − f‖² with the given ξ, and with ξ drawn as σ·N(0, I) from the generator."""
    g = torch.Generator().manual_seed(11)
    out, y = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    xi = 0.2 * torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    expected = mse_loss_half(out, y + xi, reduction="none")
    given = LOSSES["label-noise"](out, y, noise=xi, reduction="none")
    drawn = compute_loss(
        "label-noise",
        out,
        y,
        reduction="none",
        sigma=0.2,
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(given, expected)
    torch.testing.assert_close(drawn, expected)


def test_register_a_user_loss_and_refuse_bad_ones():
    huber = Loss("huber-test", lambda x, t, _: F.huber_loss(x, t, reduction="none").sum(-1))
    try:
        register_loss(huber)
        out, y = torch.randn(4, 3), torch.randn(4, 3)
        torch.testing.assert_close(
            compute_loss("huber-test", out, y), F.huber_loss(out, y, reduction="sum") / 4
        )
        with pytest.raises(ValueError, match="already registered"):
            register_loss(Loss("huber-test", lambda x, t, _: (t - x).sum(-1)))
    finally:
        LOSSES.pop("huber-test", None)
    with pytest.raises(ValueError, match="needs `expected_value`"):
        register_loss(Loss("noisy", lambda x, t, n: (t - x + n).sum(-1), draw=sample_directions))
    with pytest.raises(ValueError, match="not registered"):
        get_loss("hinge")
    with pytest.raises(TypeError, match="takes no parameter"):
        compute_loss("mse", torch.randn(2, 2), torch.randn(2, 2), sigma=1.0)
    with pytest.raises(ValueError, match="deterministic"):
        LOSSES["mse"](torch.randn(2, 2), torch.randn(2, 2), noise=torch.zeros(2, 2))


def test_reduced_precision_is_computed_in_float32():
    out = torch.randn(4, 3, dtype=torch.bfloat16)
    y = torch.randn(4, 3, dtype=torch.bfloat16)
    assert qmse_loss(out, y).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(2, 3).float()
        pred = lin(torch.randn(4, 2, dtype=torch.float32))
        assert pred.dtype == torch.bfloat16
        assert qmse_loss(pred, y.float()).dtype == torch.float32
        assert mse_loss_half(pred, y.float()).dtype == torch.float32


def test_compiled_fullgraph_step():
    """The loss traces into one graph (no data-dependent Python branching). With inductor's
    fallback_random the compiled graph draws v from the same global RNG stream as eager."""
    torch.manual_seed(0)
    model = MLP(4, [8], 3).float()
    x, y = torch.randn(16, 4, dtype=torch.float32), torch.randint(0, 3, (16,))

    def loss_fn(x, y):
        return qmse_loss(model(x), y)

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(loss_fn, fullgraph=True)
        torch.manual_seed(1)
        loss = compiled(x, y)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    eager = loss_fn(x, y)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for cg, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(cg, p.grad)


finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    scale=finite,
)
def test_property_finite_nonnegative_and_gradient_formula(n, c, seed, scale):
    g = torch.Generator().manual_seed(seed)
    out = (scale * torch.randn(n, c, generator=g)).requires_grad_()
    y = torch.randn(n, c, generator=g)
    v = sample_directions(n, c, generator=g, dtype=torch.float64)
    loss = qmse_loss(out, y, noise=v, reduction="sum")
    assert torch.isfinite(loss) and loss >= 0
    (grad,) = torch.autograd.grad(loss, out)
    r = (y - out).detach()
    expected = -(r + v) * ((r * r).sum(-1) + (v * r).sum(-1)).unsqueeze(-1)  # −Q r
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-9)


X, Y = torch.randn(3, 4), torch.randn(3, 4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(input=X, target=torch.randn(3, 5)), ValueError, r"target shape"),
        (dict(input=X.long(), target=Y), TypeError, "int64"),
        (dict(input=X, target=torch.tensor([0, 4, 1])), ValueError, r"index 4.*\[0, 4\)"),
        (dict(input=X, target=torch.tensor([0, -1, 1])), ValueError, "out of range"),
        (dict(input=X, target=torch.tensor([0, 1])), ValueError, r"shape \(3,\)"),
        (
            dict(input=X, target=Y, noise=torch.randn(3, 5)),
            ValueError,
            r"noise \(v\) has shape \(3, 5\)",
        ),
        (dict(input=X, target=Y, noise=torch.ones(3, 4)), ValueError, "unit-norm"),
        (dict(input=X, target=Y, reduction="avg"), ValueError, "reduction='avg'"),
        (dict(input=X, target=Y, scope="global"), ValueError, "scope='global'"),
        (dict(input=torch.randn(3, 0), target=torch.randn(3, 0)), ValueError, "C = 0"),
        (dict(input=torch.randn(0, 4), target=torch.randn(0, 4)), ValueError, "empty batch"),
        (dict(input=torch.randn(2, 3, 4), target=torch.randn(2, 3, 4)), ValueError, r"\(N, C\)"),
        (dict(input=X, target=Y.bool()), TypeError, "bool"),
        (dict(input=[1.0, 2.0], target=torch.randn(2)), TypeError, "torch.Tensors"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        qmse_loss(**kwargs)


def test_a_generator_that_is_not_torchs_is_named():
    import numpy as np

    with pytest.raises(TypeError, match="numpy.random._generator.Generator; make one with torch"):
        qmse_loss(torch.randn(2, 3), torch.randn(2, 3), generator=np.random.default_rng(0))
