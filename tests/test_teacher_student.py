"""qmse.teacher_student against independent references: a brute-force arccos double loop
with autograd, a 10⁶-sample Monte Carlo, and the known global minima."""

import math

import pytest
import torch

from qmse.teacher_student import (
    arc_cosine_kernel,
    init_weights,
    make_problem,
    outputs,
    population_grad,
    population_hessian,
    population_loss,
    sample_inputs,
    sample_loss,
)

F64 = torch.float64


def _kernel_naive(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    c = (w @ u / (w.norm() * u.norm())).clamp(-1, 1)
    t = torch.arccos(c)
    return w.norm() * u.norm() * (torch.sin(t) + (math.pi - t) * c) / (2 * math.pi)


def _loss_naive(W: torch.Tensor, problem) -> torch.Tensor:
    """½E‖f − f*‖² as an explicit double loop over neurons (one seed), K(w, w) = ‖w‖²/2."""
    A_s, A_t, V = problem.A_student, problem.A_teacher, problem.V
    rows = [*W, *V]
    A = torch.cat([A_s, -A_t], dim=1)  # f − f* = A relu([W; V] x)
    loss = torch.zeros((), dtype=F64)
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            kij = a @ a / 2 if i == j else _kernel_naive(a, b)
            loss = loss + 0.5 * (A[:, i] @ A[:, j]) * kij
    return loss


@pytest.mark.parametrize(
    "k,n,c,teacher",
    [(3, 3, 1, "identity"), (4, 6, 1, "identity"), (5, 5, 3, "identity"), (4, 6, 3, "random"),
     (4, 4, 1, "random")],
    ids=["n=k", "n>k", "vector", "vector-n>k-random-V", "random-V"],
)  # fmt: skip
def test_loss_and_grad_match_bruteforce_autograd(k, n, c, teacher):
    problem = make_problem(k, n, outputs=c, seed=1, teacher=teacher)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, n, k, generator=g, dtype=F64)  # (S, n, d)
    batched_loss, batched_grad = population_loss(W, problem), population_grad(W, problem)
    for s in range(W.shape[0]):
        w = W[s].clone().requires_grad_()
        ref = _loss_naive(w, problem)
        (ref_grad,) = torch.autograd.grad(ref, w)
        torch.testing.assert_close(batched_loss[s], ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batched_grad[s], ref_grad, rtol=1e-10, atol=1e-12)


def test_grad_matches_autograd_of_closed_form_loss():
    problem = make_problem(5, 6)
    W = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    W.requires_grad_()
    (auto,) = torch.autograd.grad(population_loss(W, problem).sum(), W)
    torch.testing.assert_close(population_grad(W.detach(), problem), auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c", [1, 3])
def test_loss_matches_monte_carlo(c):
    """10⁶ Gaussian inputs: the closed form lies within 4 standard errors of the sample mean."""
    problem = make_problem(4, outputs=c, seed=3)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(1, 4, 4, generator=g, dtype=F64) / 2
    x = torch.randn(1, 10**6, 4, generator=g, dtype=F64)  # (1, B, d)
    f = outputs(W, problem.A_student, x)
    y = outputs(problem.V.unsqueeze(0), problem.A_teacher, x)
    per = 0.5 * ((f - y) ** 2).sum(-1).squeeze(0)  # (B,)
    se = per.std() / math.sqrt(per.numel())
    assert abs(per.mean() - population_loss(W, problem)[0]) < 4 * se


def test_kernel_matches_monte_carlo_at_obtuse_angle():
    g = torch.Generator().manual_seed(5)
    w, u = torch.tensor([[1.0, 0.2, 0.0]], dtype=F64), torch.tensor([[-0.8, 0.5, 0.3]], dtype=F64)
    x = torch.randn(10**6, 3, generator=g, dtype=F64)
    prod = torch.relu(x @ w.T) * torch.relu(x @ u.T)
    se = prod.std() / 1e3
    assert abs(prod.mean() - arc_cosine_kernel(w, u)[0, 0]) < 4 * se


def test_global_minimum_is_exact():
    """At a permutation of the teacher the loss is 0 and the gradient is 0 to rounding, far
    below Safran & Shamir's stopping tolerance (1e-9)."""
    problem = make_problem(8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    scale = torch.linspace(0.5, 2.0, 8, dtype=F64).unsqueeze(-1)
    W = problem.V[perm].unsqueeze(0)  # (1, n, d)
    assert population_loss(W, problem).abs().item() < 1e-12
    assert population_grad(W, problem).norm(dim=-1).max().item() < 1e-13
    # a wrong scale is not a minimum: the kernel's norms enter exactly
    assert population_grad(W * scale, problem).norm(dim=-1).max().item() > 1e-2


def test_hessian_matches_autograd_and_is_psd_at_global_minimum():
    problem = make_problem(3, 4)
    W = torch.randn(4, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    H = population_hessian(W, problem)
    ref = torch.autograd.functional.hessian(lambda w: _loss_naive(w, problem), W).reshape(12, 12)
    torch.testing.assert_close(H, ref, rtol=1e-9, atol=1e-11)
    minimum = make_problem(4).V[[2, 0, 3, 1]]
    assert torch.linalg.eigvalsh(population_hessian(minimum, make_problem(4))).min() > -1e-10


def test_batched_equals_one_seed_at_a_time():
    problem = make_problem(6, 7)
    W = init_weights(range(5), 7, 6)
    one = torch.stack([population_grad(W[s], problem) for s in range(5)])
    torch.testing.assert_close(population_grad(W, problem), one, rtol=0, atol=1e-14)


def test_init_weights_per_seed_and_scale():
    a, b = init_weights([3, 9], 5, 4), init_weights([9], 5, 4)
    torch.testing.assert_close(a[1], b[0], rtol=0, atol=0)
    big = init_weights(range(400), 10, 10)
    assert abs(big.var().item() - 0.1) < 0.005  # N(0, I/d), d = 10


def test_sample_mse_gradient_is_unbiased_for_population_gradient():
    """The sampled ½(f − f*)² gradient at batch 2·10⁵ matches the closed form to a few SE."""
    problem = make_problem(4)
    W = init_weights([0], 4, 4).requires_grad_()
    x = sample_inputs(1, 200_000, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    sample_loss(W, problem, x, "mse").sum().backward()
    torch.testing.assert_close(W.grad, population_grad(W.detach(), problem), rtol=0, atol=0.02)


def test_sample_qmse_gradient_averages_to_expected_qmse():
    """Note 2: over many v (here C = 1, v = ±1) QMSE's gradient is expected-QMSE's. The batch
    repeats 64 inputs 4000 times, so the mean over it averages each sample over 4000 draws."""
    problem = make_problem(3)
    W = init_weights([1], 3, 3)
    x = sample_inputs(1, 64, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    gv = torch.Generator().manual_seed(9)
    grads = []
    for name, xs in (("qmse", x.repeat(1, 4000, 1)), ("expected-qmse", x)):
        w = W.clone().requires_grad_()
        grads.append(torch.autograd.grad(sample_loss(w, problem, xs, name, generator=gv), w)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0.03, atol=0.01)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n >= k"):
        make_problem(4, 3, outputs=2)
    with pytest.raises(ValueError, match="teacher='orthogonal'"):
        make_problem(4, teacher="orthogonal")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4, 4\)"):
        population_loss(torch.zeros(2, 3, 4, dtype=F64), make_problem(4))
    with pytest.raises(TypeError, match="floating-point"):
        population_grad(torch.zeros(2, 4, 4, dtype=torch.long), make_problem(4))


@pytest.mark.parametrize("c", [1, 3])
def test_a_random_teacher_is_orthogonal_seeded_and_fit_exactly(c):
    """V is orthogonal and a function of the seed; the student [V; 0] (its extra units
    switched off) has loss 0, and its output columns start with the teacher's."""
    problem = make_problem(4, 6, outputs=c, seed=7, teacher="random")
    V = problem.V
    torch.testing.assert_close(V @ V.T, torch.eye(4, dtype=F64))
    assert not torch.allclose(V, torch.eye(4, dtype=F64))
    torch.testing.assert_close(V, make_problem(4, 6, outputs=c, seed=7, teacher="random").V)
    torch.testing.assert_close(problem.A_student[:, :4], problem.A_teacher)
    fit = torch.cat([V, torch.zeros(2, 4, dtype=F64)]).unsqueeze(0)
    assert population_loss(fit, problem).item() == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="n >= k"):
        make_problem(4, 3, outputs=3)
