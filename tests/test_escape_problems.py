"""qmse.escape.problems: the plug-in interface's generic tools — gradient, Hessian (also on
a manifold), certification of stuck points and distinct minima modulo symmetries — on toy
problems with known answers."""

import pytest
import torch

from qmse.errors import UserError
from qmse.escape.problems import (
    PROBLEMS,
    Problem,
    certify,
    distinct,
    get_problem,
    gradient,
    register_problem,
    tangent_hessian,
)

DT = torch.float64


def double_well() -> Problem:
    """f(w) = (w₀² − 1)² + w₁²: strict minima at (±1, 0) (Hessian diag(8, 2)), one class
    modulo the sign of w₀; a saddle at 0 (Hessian diag(−4, 2))."""
    return Problem(
        name="double-well",
        instance={},
        shape=(2,),
        outputs=1,
        init=lambda seeds: torch.randn(len(seeds), 2, dtype=DT),
        sample=lambda m, b, g: (torch.zeros(m, b, 1), torch.zeros(m, b, 1)),
        predict=lambda W, x: x,
        objective=lambda W: (W[:, 0] ** 2 - 1) ** 2 + W[:, 1] ** 2,
        success=1e-9,
        canonical=lambda W: torch.stack([W[:, 0].abs(), W[:, 1]], 1),
    )


def linear_on_sphere() -> Problem:
    """f(w) = ⟨c, w⟩ on the unit sphere of R³, c = e₃: its Riemannian Hessian on the tangent
    space is −⟨c, w⟩·I, so w = −c is a strict minimum (+I), w = c a maximum (−I)."""
    c = torch.tensor([0.0, 0.0, 1.0], dtype=DT)
    return Problem(
        name="linear-on-sphere",
        instance={},
        shape=(3,),
        outputs=1,
        init=lambda seeds: torch.nn.functional.normalize(torch.randn(len(seeds), 3, dtype=DT)),
        sample=lambda m, b, g: (torch.zeros(m, b, 1), torch.zeros(m, b, 1)),
        predict=lambda W, x: x,
        objective=lambda W: W @ c,
        success=-1 + 1e-9,
        hessian=lambda w: -(c @ w) * (torch.eye(3, dtype=DT) - torch.outer(w, w)),
        project=lambda W, G: G - (G * W).sum(-1, keepdim=True) * W,
        retract=lambda W: torch.nn.functional.normalize(W, dim=-1),
    )


def test_gradient_and_hessian_of_a_flat_problem_by_closed_form():
    p = double_well()
    W = torch.tensor([[0.5, 0.3], [2.0, -1.0]], dtype=DT)
    expected = torch.stack([4 * W[:, 0] * (W[:, 0] ** 2 - 1), 2 * W[:, 1]], 1)
    torch.testing.assert_close(gradient(p, W), expected)
    torch.testing.assert_close(
        tangent_hessian(p, W[0]), torch.diag(torch.tensor([-1.0, 2.0], dtype=DT))
    )


def test_certify_tells_minima_saddles_and_moving_points_apart():
    p = double_well()
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.5, 0.0]], dtype=DT)
    kinds = [c["kind"] for c in certify(p, W)]
    assert kinds == ["strict minimum", "strict minimum", "saddle", "not stationary"]
    assert certify(p, W[:1])[0]["min_eigenvalue"] == pytest.approx(2.0)


def test_certify_on_a_manifold_uses_the_tangent_space():
    p = linear_on_sphere()
    W = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(gradient(p, W)[0], torch.zeros(3, dtype=DT))  # c ⟂ tangent
    assert tangent_hessian(p, W[0]).shape == (2, 2)
    kinds = [c["kind"] for c in certify(p, W)]
    assert kinds == ["strict minimum", "saddle", "not stationary"]


def test_distinct_counts_points_once_modulo_the_symmetry():
    p = double_well()
    W = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1e-9], [1.0, 0.5]], dtype=DT)
    assert distinct(p, W) == [0, 3]
    assert distinct(p, W, tol=0.0) == [0, 2, 3]


def test_the_registry_refuses_another_factory_under_a_taken_name():
    register_problem("test-well", double_well)
    try:
        assert get_problem("test-well") is double_well
        register_problem("test-well", double_well)  # the same: a no-op
        with pytest.raises(UserError, match="already registered"):
            register_problem("test-well", linear_on_sphere)
    finally:
        PROBLEMS.pop("test-well")
    with pytest.raises(UserError, match="not registered"):
        get_problem("test-well")


def test_the_teacher_student_problem_counts_permuted_copies_once():
    """Two hidden-unit permutations of one point are one distinct minimum (scalar output);
    its objective, gradient and Hessian are the closed form's."""
    from qmse import teacher_student as ts

    p = get_problem("teacher-student")(4)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(2, 4, 4, generator=g, dtype=DT)
    copies = torch.stack([W[0], W[0][[2, 0, 3, 1]], W[1]])
    assert distinct(p, copies) == [0, 2]
    reference = ts.make_problem(4)
    torch.testing.assert_close(p.objective(copies), ts.population_loss(copies, reference))
    torch.testing.assert_close(gradient(p, copies), ts.population_grad(copies, reference))
    (fit,) = certify(p, reference.V.unsqueeze(0))  # the teacher itself: the global minimum
    assert fit["objective"] == pytest.approx(0, abs=1e-12) and fit["grad_norm"] < 1e-10
    x, y = p.sample(3, 5, torch.Generator().manual_seed(0))
    assert x.shape == (3, 5, 4) and y.shape == (3, 5, 1)
    torch.testing.assert_close(p.predict(reference.V.expand(3, 4, 4).float(), x), y)
    vector = get_problem("teacher-student")(4, 5, outputs=3, teacher="random")
    assert vector.shape == (5, 4) and distinct(vector, copies[:, :, :4].repeat(1, 2, 1)[:, :5]) == [
        0,
        1,
        2,
    ]
