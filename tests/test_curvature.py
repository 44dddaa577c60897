"""qmse.curvature against dense references: torch.func.hessian / autograd Hessians of the
same loss, eigvalsh of known matrices, scipy's eigsh on the operator, Gauss quadrature
identities; registered losses, torch's own criteria and user functions, on qmse's MLP and on
models qmse does not define."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import dense_hessian, leaves_untouched
from scipy.sparse.linalg import eigsh
from torch import nn

from qmse import curvature
from qmse.loss import LOSSES, get_loss
from qmse.models import MLP

DT = torch.float64


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(3, [4], 2, activation="tanh").to(DT)


def _data(n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _conv_net(seed: int = 0) -> nn.Sequential:
    """A user's model: Conv2d → ReLU → Flatten → Linear, nothing from qmse.models."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).to(DT)


def _half_sq(out, y):
    """A user function: ½‖r‖² summed over outputs, mean over samples (the registry's 'mse')."""
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


@pytest.mark.parametrize("criterion", ["mse", "expected-qmse", "ce", "huber", "lambda"])
def test_hvp_matches_thedense_hessian(criterion):
    model = _mlp()
    x, y = _data()
    if criterion == "ce":
        y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    crit = {
        "huber": nn.HuberLoss(delta=0.5),
        "lambda": lambda out, t: (out - t).abs().pow(3).mean(),
    }
    crit = crit.get(criterion, criterion)
    reference = crit if callable(crit) else (lambda out, t: get_loss(criterion)(out, t))
    H = dense_hessian(model, reference, x, y)
    op = curvature.hessian_operator(model, crit, (x, y))
    assert op.shape == H.shape
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(op @ v, H @ v, rtol=1e-10, atol=1e-12)


def test_the_operator_multiplies_vectors_and_columns_like_thedense_hessian():
    model = _mlp()
    x, y = _data()
    H = dense_hessian(model, _half_sq, x, y)
    P = sum(p.numel() for p in model.parameters())
    op = curvature.hessian_operator(model, "mse", (x, y))
    assert op.shape == (P, P) and op.dtype == DT and op.device == torch.device("cpu")
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-10, atol=1e-12)  # (P, 4): one per column
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op(V[:, 1]), H @ V[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V.float(), H @ V, rtol=1e-6, atol=1e-6)  # cast to op's dtype
    value, grad, from_triple = curvature.loss_gradient_hessian(model, "mse", (x, y))
    assert grad.shape == (P,)
    torch.testing.assert_close(from_triple @ V, H @ V, rtol=1e-10, atol=1e-12)
    for bad in (torch.ones(P + 1), torch.ones(P, 2, 1)):
        with pytest.raises(ValueError, match=rf"shape \({P}, {P}\).*got"):
            op @ bad


def test_scipy_eigsh_on_the_operator_gives_the_dense_top_eigenvalue():
    model = _conv_net()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 1, 3, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    H = dense_hessian(model, _half_sq, x, y)
    exact = torch.linalg.eigvalsh(H)
    linop = curvature.hessian_operator(model, "mse", (x, y)).to_scipy()
    assert linop.shape == tuple(H.shape) and linop.dtype == np.float64
    top = eigsh(linop, k=1, which="LA", return_eigenvectors=False)
    assert math.isclose(top[0], exact[-1].item(), rel_tol=1e-8)
    X = np.random.default_rng(0).standard_normal((H.shape[0], 3))
    np.testing.assert_allclose(linop @ X, H.numpy() @ X, rtol=1e-9, atol=1e-12)  # matmat
    np.testing.assert_allclose(linop.rmatvec(X[:, 0]), H.numpy() @ X[:, 0], rtol=1e-9, atol=1e-12)


def test_estimators_take_a_dense_symmetric_matrix_and_its_size():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(12, 12, generator=g, dtype=DT)
    A = M + M.T
    exact = torch.linalg.eigvalsh(A)
    top, bottom = curvature.hessian_eigs(A, k=2, steps=12)
    assert top.dtype == DT  # the operator's dtype, not float32
    torch.testing.assert_close(top, exact.flip(0)[:2], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bottom, exact[:2], rtol=1e-9, atol=1e-10)
    est, se = curvature.hutchinson_trace(A, samples=400, seed=1)
    assert se > 0 and abs(est - torch.trace(A).item()) < 3 * se
    assert curvature.hutchinson_trace(A, samples=400, seed=1) == curvature.hutchinson_trace(
        lambda v: A @ v, 12, samples=400, seed=1, dtype=DT
    )  # the (matvec, dim) form is the same estimator
    (nodes, weights), *_ = curvature.spectral_density(A, steps=12, vectors=1)
    torch.testing.assert_close(nodes, exact, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(curvature.lanczos(A, steps=12)[0], exact, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="dim=5 does not match"):
        curvature.hessian_eigs(A, 5)
    with pytest.raises(ValueError, match="square"):
        curvature.hutchinson_trace(torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs its size"):
        curvature.spectral_density(lambda v: A @ v)
    with pytest.raises(ValueError, match="steps="):
        curvature.lanczos(A)


def test_user_conv_model_and_huber_loss_eigenvalues():
    """A Sequential the project does not define, a torch criterion: exact spectrum by Lanczos."""
    model = _conv_net()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 1, 3, 3, generator=g, dtype=DT), torch.randn(5, 3, generator=g, dtype=DT)
    crit = nn.HuberLoss(delta=0.3)
    H = dense_hessian(model, crit, x, y)
    exact = torch.linalg.eigvalsh(H)
    op = curvature.hessian_operator(model, crit, (x, y))
    top, bottom = curvature.hessian_eigs(op, k=3, steps=op.shape[0])
    torch.testing.assert_close(top, exact.flip(0)[:3], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bottom, exact[:3], rtol=1e-7, atol=1e-9)
    value, grad, _ = curvature.loss_gradient_hessian(model, crit, (x, y))
    with torch.no_grad():
        assert math.isclose(value.item(), crit(model(x), y).item(), rel_tol=1e-12)
    model.zero_grad()
    crit(model(x), y).backward()
    torch.testing.assert_close(grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))


def test_random_losses_are_refused_with_their_registered_expectation():
    model = _mlp()
    x, y = _data()
    random = [name for name, spec in LOSSES.items() if spec.random]
    assert random  # qmse and label-noise at least
    for name in random:
        expectation = LOSSES[name].mean_gradient_loss
        with pytest.raises(ValueError, match=f'random.*use "{expectation}"'):
            curvature.hessian_operator(model, name, (x, y))
    with pytest.raises(ValueError, match="not registered"):
        curvature.loss_fn(model, "no-such-loss", (x, y))
    with pytest.raises(TypeError, match="callable"):
        curvature.loss_fn(model, 3.0, (x, y))


def test_criterion_names():
    assert curvature.criterion_name("mse") == "mse"
    assert curvature.criterion_name(nn.HuberLoss(delta=0.5)) == "HuberLoss()"
    assert curvature.criterion_name(_half_sq) == "_half_sq"


def test_hvp_over_batches_is_the_sample_weighted_mean():
    model = _mlp()
    x, y = _data(9)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    whole = curvature.hessian_operator(model, _half_sq, (x, y))
    split = curvature.hessian_operator(model, _half_sq, [(x[:2], y[:2]), (x[2:], y[2:])])
    torch.testing.assert_close(split @ v, whole @ v, rtol=1e-10, atol=1e-12)
    registered = curvature.hessian_operator(model, "mse", (x, y))  # the same loss by name
    torch.testing.assert_close(registered @ v, whole @ v, rtol=1e-10, atol=1e-12)


def test_lanczos_full_run_gives_the_hessian_spectrum():
    model = _mlp()
    x, y = _data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, _half_sq, x, y))
    op = curvature.hessian_operator(model, "mse", (x, y))
    P = op.shape[0]
    top, bottom = curvature.hessian_eigs(op, P, k=3, steps=P, dtype=DT)  # dim given: checked
    torch.testing.assert_close(top, exact.flip(0)[:3], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bottom, exact[:3], rtol=1e-7, atol=1e-9)


def test_lanczos_extremes_converge_before_the_bulk():
    g = torch.Generator().manual_seed(0)
    eig = torch.cat([torch.tensor([-5.0, 10.0], dtype=DT), torch.rand(198, generator=g, dtype=DT)])
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))
    A = U @ torch.diag(eig) @ U.T
    top, bottom = curvature.hessian_eigs(lambda v: A @ v, 200, k=1, steps=30, dtype=DT)
    assert abs(top.item() - 10.0) < 1e-8 and abs(bottom.item() + 5.0) < 1e-8


def test_lanczos_weights_reproduce_the_rayleigh_quotient():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(30, 30, generator=g, dtype=DT)
    A = M + M.T
    q = torch.randn(30, generator=g, dtype=DT)
    nodes, weights = curvature.lanczos(lambda v: A @ v, 30, 12, dtype=DT, start=q)
    qn = q / q.norm()
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-12)
    for p in (1, 2, 3):  # m-point Gauss quadrature is exact up to degree 2m − 1
        expect = qn @ torch.linalg.matrix_power(A, p) @ qn
        assert math.isclose((weights * nodes**p).sum().item(), expect.item(), rel_tol=1e-9)


def test_lanczos_stops_when_the_krylov_space_closes():
    A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0], dtype=DT))
    nodes, weights = curvature.lanczos(lambda v: A @ v, 5, 5, generator=torch.Generator(), dtype=DT)
    torch.testing.assert_close(nodes, torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-12)


def test_hutchinson_within_its_standard_error_and_seeded():
    model = _mlp()
    x, y = _data()
    exact = torch.trace(dense_hessian(model, _half_sq, x, y)).item()
    op = curvature.hessian_operator(model, "mse", (x, y))
    est, se = curvature.hutchinson_trace(op, samples=200, seed=4)
    assert se > 0 and abs(est - exact) < 3 * se
    assert curvature.hutchinson_trace(op, samples=200, seed=4) == (est, se)


def test_spectral_density_matches_the_exact_spectrum():
    model = _mlp()
    x, y = _data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, _half_sq, x, y))
    op = curvature.hessian_operator(model, "mse", (x, y))
    P = op.shape[0]
    runs = curvature.spectral_density(op, steps=P, vectors=4)
    assert len(runs) == 4
    for nodes, weights in runs:
        assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-12)
        used = nodes[weights > 1e-10]
        assert (used[:, None] - exact[None]).abs().amin(1).max() < 1e-7  # nodes are eigenvalues
    top, bottom = curvature.hessian_eigs(op, k=2, steps=P)
    first = curvature.ritz_extremes(runs[0][0], 2)  # same seed, same first start vector
    assert torch.equal(first[0], top) and torch.equal(first[1], bottom)
    grid = torch.linspace(exact[0] - 1, exact[-1] + 1, 4001, dtype=DT)
    density = curvature.density_on_grid(runs, grid, sigma=0.05)
    assert math.isclose(torch.trapezoid(density, grid).item(), 1.0, rel_tol=1e-4)


def test_model_is_left_untouched():
    model = _mlp()
    model.layers[0].bias.requires_grad_(False)
    model.train()
    model.layers[1].eval()  # a mixed state must be restored exactly
    x, y = _data()
    with leaves_untouched(model):
        op = curvature.hessian_operator(model, nn.MSELoss(), (x, y))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert op.shape == (trainable, trainable)  # the frozen bias enters as a constant
        curvature.hessian_eigs(op, k=2)
        curvature.hutchinson_trace(op, samples=3)
        op.to_scipy() @ np.ones(trainable)


def test_bad_arguments_are_named():
    model = _mlp()
    x, y = _data()
    with pytest.raises(ValueError, match="target shape"):
        curvature.hessian_operator(model, "mse", (x, y[:, :1]))
    with pytest.raises(ValueError, match="steps"):
        curvature.lanczos(lambda v: v, 3, 4)
    with pytest.raises(ValueError, match="empty"):
        curvature.loss_fn(model, "mse", [])
    with torch.no_grad():
        model.layers[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.2\.bias.*non-finite"):
        curvature.hessian_operator(model, "mse", (x, y))


def test_a_criterion_that_does_not_reduce_is_named():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"MSELoss\(\) returned \(5, 2\), not a scalar"):
        curvature.hessian_operator(model, torch.nn.MSELoss(reduction="none"), (x, y))


def test_the_operator_matches_the_dense_hessian_on_every_shared_case(case):
    crit = case.criterion
    reference = crit if callable(crit) else (lambda out, t: get_loss(crit)(out, t))
    H = dense_hessian(case.model, reference, case.x, case.y)
    op = curvature.hessian_operator(case.model, crit, (case.x, case.y))
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-9, atol=1e-10)
    top, bottom = curvature.hessian_eigs(op, k=1, steps=op.shape[0], dtype=DT)
    eig = torch.linalg.eigvalsh(H)
    torch.testing.assert_close(top[0], eig[-1], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(bottom[0], eig[0], rtol=1e-7, atol=1e-9)


def test_a_block_of_parameters_gives_the_diagonal_block_and_its_gradient():
    model = _mlp()
    x, y = _data()
    H = dense_hessian(model, _half_sq, x, y)
    _, full_grad, _ = curvature.loss_gradient_hessian(model, _half_sq, (x, y))
    block = ["layers.2.bias", "layers.0.weight"]  # taken in the model's order
    sizes = [p.numel() for p in model.parameters()]  # layers.0.weight, .bias, layers.2.*
    idx = torch.cat([torch.arange(0, sizes[0]), torch.arange(sum(sizes[:3]), sum(sizes))])
    with leaves_untouched(model):
        value, grad, op = curvature.loss_gradient_hessian(model, _half_sq, (x, y), params=block)
    assert op.shape == (idx.numel(), idx.numel())
    V = torch.randn(idx.numel(), 3, generator=torch.Generator().manual_seed(6), dtype=DT)
    torch.testing.assert_close(op @ V, H[idx][:, idx] @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, full_grad[idx], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"\['layers\.1\.weight'\]: not trainable"):
        curvature.loss_fn(model, _half_sq, (x, y), params=["layers.1.weight"])
    with pytest.raises(ValueError, match="mode='inference'"):
        curvature.loss_gradient_hessian(model, _half_sq, (x, y), mode="inference")
