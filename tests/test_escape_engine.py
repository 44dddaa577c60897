"""qmse.escape.engine: numbers recorded from the single-method loop it replaced, the batched
gradient against autograd of the sample loss, common random numbers, stacked settings and
neighbouring starts that change nothing, the gradient at other weights on the step's batch
(state["grad_at"]) and the count of gradients, divergence."""

import dataclasses

import pytest
import torch

from qmse.errors import UserError
from qmse.escape import (
    BUILTIN_METHODS,
    METHODS,
    STUCK_LOSS,
    Method,
    get_problem,
    make_job,
    register_method,
    run_method,
    run_methods,
)
from qmse.escape.engine import job_gradient, problem_gradient, teacher_outputs
from qmse.escape.rules import EXTRA_METHODS
from qmse.teacher_student import (
    init_weights,
    make_problem,
    outputs,
    population_loss,
    sample_inputs,
    sample_loss,
)

# Final population losses of 5 seeds (k = n = 4, init seeds 0-4, batch 16, 300 steps, seed 7)
# recorded from the previous engine (one method per call, inputs and noise from one
# generator seeded 7) before it was replaced. For deterministic losses its input stream is
# the new engine's, so the numbers must agree; "inf" = diverged.
RECORDED = {
    "sgd": (0.2, [0.000212275, 0.03550005, 0.002416505, 0.01109663, 0.02398695]),
    "momentum": (0.02, [0.0002101, 0.03632701, 0.000129336, 0.01841217, 0.02105806]),
    "adam": (0.01, [0.03734236, 0.03315478, 0.04568486, 0.03430154, 0.03338141]),
    "expected-qmse": (0.05, [float("inf"), 0.0299022, float("inf"), 0.03090676, 0.03451158]),
    "expected-qmse-momentum": (0.005, [0.02417639, 0.03000832, 0.01821275, 0.0332248, 0.03474138]),
}
RECORDED_FIRST = {"sgd": [300, -1, -1, -1, -1], "momentum": [300, -1, 250, -1, -1]}


@pytest.mark.parametrize("name", list(RECORDED))
def test_builtin_methods_reproduce_the_previous_engine(name):
    lr, losses = RECORDED[name]
    problem = make_problem(4)
    W0 = init_weights(range(5), 4, 4)
    r = run_method(name, W0, problem, steps=300, lr=lr, batch=16, seed=7, quiet=True)
    expected = torch.tensor(losses, dtype=torch.float64)
    torch.testing.assert_close(r["loss"], expected, rtol=1e-5, atol=1e-9)
    assert r["diverged"].tolist() == torch.isinf(expected).tolist()
    if name in RECORDED_FIRST:
        assert r["first_success"].tolist() == RECORDED_FIRST[name]


def test_job_gradients_match_autograd_of_the_sample_loss():
    """A job's settings in one forward/backward: each row's gradient equals autograd of
    teacher_student.sample_loss on that row's weights and its start's batch."""
    problem = make_problem(3, 5).to(torch.float64)
    m, B = 3, 7
    x = sample_inputs(m, B, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = teacher_outputs(x, problem)
    jobs = [make_job("sgd", [0.1, 0.2]), make_job("expected-qmse", 0.1)]
    Ws = [torch.randn(2 * m, 5, 3, dtype=torch.float64), torch.randn(m, 5, 3, dtype=torch.float64)]
    for job, W in zip(jobs, Ws):
        grad = job_gradient(job, W, x, y, problem, torch.Generator().manual_seed(1))
        loss = job.method.loss
        xs = x.repeat(job.settings, 1, 1)  # row g·m + i sees start i's batch
        Wr = W.clone().requires_grad_()
        (ref,) = torch.autograd.grad(sample_loss(Wr, problem, xs, loss).sum(), Wr)
        torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12)


def test_a_method_registered_with_sgds_update_gives_exactly_sgds_results():
    """Common random numbers: same loss, same update, same lr, run side by side or alone,
    give bit-identical results; a random loss too (its noise stream is per method)."""
    copy = register_method(
        Method("test-sgd-copy", "mse", lambda W, g, s, t, lr: (W - lr * g, s), (0.1, 0.2))
    )
    qcopy = register_method(
        Method("test-qmse-copy", "qmse", lambda W, g, s, t, lr: (W - lr * g, s), (0.1, 0.2))
    )
    problem = make_problem(4)
    W0 = init_weights(range(6), 4, 4)
    kw = {"steps": 200, "batch": 8, "seed": 3, "method_seed": 4, "quiet": True}
    jobs = [make_job(n, 0.05) for n in ("sgd", "momentum", copy, "qmse", qcopy)]
    sgd, _, mine, qmse, qmine = run_methods(jobs, W0, problem, **kw)
    alone = run_methods([make_job(copy, 0.05)], W0, problem, **kw)[0]
    for a, b in ((sgd, mine), (sgd, alone), (qmse, qmine)):
        for key in ("W", "loss", "first_success", "diverged"):
            assert torch.equal(a[key], b[key])
    assert not torch.equal(sgd["W"], qmse["W"])


def test_every_setting_of_a_job_sees_the_same_inputs_and_noise():
    """A job with two equal settings gives two equal halves (rows g·m + i), bit for bit: the
    same inputs, and for a random loss and a random update the same draws (each setting
    has its own copy of the method's stream)."""
    problem = make_problem(3)
    W0 = init_weights(range(4), 3, 3)
    for name, hyper in (("sgd", {}), ("qmse", {}), ("gradient-noise", {"sigma": [0.01] * 2})):
        r = run_method(name, W0, problem, steps=50, lr=[0.05, 0.05], hyper=hyper, quiet=True)
        assert torch.equal(r["W"][:4], r["W"][4:])


# PGD with a window of 10 steps, so that its kicks, reverts and held-out losses happen in a
# short run; with the built-in methods, every way a rule draws or keeps state
SHORT_PGD = dataclasses.replace(
    METHODS["pgd"], name="test-pgd-short", constants={"window": 10, "grad_threshold": 10.0}
)


@pytest.mark.parametrize("name", [*BUILTIN_METHODS, *EXTRA_METHODS, SHORT_PGD.name])
def test_each_setting_of_a_stacked_job_is_that_setting_run_alone(name):
    """Three settings stacked in one job give, row for row and bit for bit, what each gives
    run alone: its weights, outcome, first success, divergence and reports. At k = 6, n = 7
    the products of settings stacked per start (the engine before) differed in the last
    bits; a random loss or rule drew one stream across the settings."""
    method = register_method(SHORT_PGD) if name == SHORT_PGD.name else METHODS[name]
    problem, m = make_problem(6, 7), 4
    W0 = init_weights(range(m), 7, 6)
    lrs = [method.lr_grid[1] / 2, method.lr_grid[2] / 2, method.lr_grid[3] / 2]
    hyper = {h: [grid[0], grid[len(grid) // 2], grid[-1]] for h, grid in method.hyper.items()}
    kw = {"steps": 60, "batch": 16, "seed": 3, "quiet": True}
    stacked = run_method(method, W0, problem, lr=lrs, hyper=hyper, **kw)
    for g, lr in enumerate(lrs):
        alone = run_method(
            method, W0, problem, lr=lr, hyper={h: v[g] for h, v in hyper.items()}, **kw
        )
        for key, value in alone.items():
            assert torch.equal(stacked[key][g * m : (g + 1) * m], value), key
    if name == SHORT_PGD.name:
        assert stacked["perturbations"].sum() > 0  # its kicks happened


@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
def test_a_starts_numbers_do_not_depend_on_the_other_starts(generic):
    """Start 0 gives the same numbers, bit for bit, whatever the other starts' weights: its
    gradient alone (one start, its own batch) equals its row of a batch, and in a run with
    other neighbours every method gives it the same result, except PGD (its kicks and
    held-out losses are drawn when any start of the setting needs one)."""
    problem = get_problem("teacher-student")(6, 7)
    if generic:
        problem = dataclasses.replace(problem, native=None)
    m = 5
    W0 = problem.init(range(m)).float()
    other = torch.cat([W0[:1], problem.init(range(10, 10 + m - 1)).float()])
    x, y = problem.sample(m, 16, torch.Generator().manual_seed(0))
    gradient = problem_gradient if generic else job_gradient
    target = problem if generic else problem.native.to(torch.float32)
    job = make_job("sgd", [0.1, 0.2])
    batch = gradient(job, W0.repeat(2, 1, 1), x, y, target, None)
    for g in range(2):
        one = gradient(job, W0[:1].repeat(2, 1, 1), x[:1], y[:1], target, None)
        assert torch.equal(one[g], batch[g * m])
    kw = {"steps": 60, "batch": 16, "seed": 3, "method_seed": 4, "quiet": True}
    names = [n for n in (*BUILTIN_METHODS, *EXTRA_METHODS) if n != "pgd"]
    jobs = [make_job(n, METHODS[n].lr_grid[1] / 2) for n in names]
    for name, a, b in zip(
        names, run_methods(jobs, W0, problem, **kw), run_methods(jobs, other, problem, **kw)
    ):
        for key in a:
            assert torch.equal(a[key][0], b[key][0]), (name, key)


def test_rows_count_the_batch_gradients_their_steps_took():
    """`gradients` per row: one per step, and one more for every call of state["grad_at"]
    (SAM: two per step; a rule that asks at even steps only: one and a half)."""

    def every_other(W, grad, state, t, lr):
        return W - lr * (state["grad_at"](W) if t % 2 == 0 else grad), state

    method = register_method(Method("test-every-other", "mse", every_other, (0.1,)))
    problem, W0 = make_problem(3), init_weights(range(2), 3, 3)
    jobs = [make_job("sgd", 0.1), make_job("sam", [0.1, 0.2], {"rho": 0.05}), make_job(method, 0.1)]
    sgd, sam, mine = run_methods(
        jobs, W0, problem, steps=11, batch=4, seed=0, method_seed=1, quiet=True
    )
    assert sgd["gradients"].tolist() == [11] * 2
    assert sam["gradients"].tolist() == [22] * 4
    assert mine["gradients"].tolist() == [17] * 2


def test_sgd_learns_small_teacher_and_is_seeded():
    problem = make_problem(3)
    W0 = init_weights(range(6), 3, 3)
    a = run_method("sgd", W0, problem, steps=800, lr=0.3, batch=32, seed=1, quiet=True)
    b = run_method("sgd", W0, problem, steps=800, lr=0.3, batch=32, seed=1, quiet=True)
    assert torch.equal(a["loss"], b["loss"])
    assert (a["loss"] < STUCK_LOSS).all()
    assert ((a["first_success"] > 0) & (a["first_success"] <= 800)).all()
    torch.testing.assert_close(a["loss"], population_loss(a["W"].double(), problem))
    assert (a["moved"] > 0.01).all()


def test_divergence_is_recorded_as_failure_and_frozen():
    problem = make_problem(3)
    W0 = init_weights(range(4), 3, 3) * 3
    out = run_method("qmse", W0, problem, steps=50, lr=50.0, batch=16, quiet=True)
    assert out["diverged"].all() and torch.isinf(out["loss"]).all()
    assert (out["first_success"] == -1).all()
    assert torch.isfinite(out["W"]).all() and (out["W"].flatten(1).norm(dim=1) <= 1e4).all()


def test_bad_arguments_raise():
    problem = make_problem(3)
    W0 = init_weights(range(2), 3, 3)
    with pytest.raises(ValueError, match="not registered"):
        run_method("gd-population", W0, problem, steps=10, lr=0.1)
    with pytest.raises(ValueError, match="lr > 0"):
        run_method("sgd", W0, problem, steps=10, lr=-0.1)
    with pytest.raises(ValueError, match="no hyperparameter"):
        run_method("sgd", W0, problem, steps=10, lr=0.1, hyper={"sigma": 0.1})
    with pytest.raises(ValueError, match=r"expected \(m, 3, 3\)"):
        run_method("sgd", W0[:, :2], problem, steps=10, lr=0.1)


@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
def test_grad_at_is_the_gradient_on_the_steps_batch_and_noise(generic):
    """state["grad_at"], on both engine paths, with a random loss (label noise): at W it is
    the step's gradient bit for bit; at other weights, autograd of ½(y + ξ − f)² on the step's
    inputs with the step's ξ (both redrawn here from the engine's seeds); asking for it does
    not move the method's stream (the run is label-noise SGD's, bit for bit)."""
    sigma, m, B, lr, steps = 0.3, 3, 5, 0.05, 3
    seen = []

    def probe(W, grad, state, t, lr):
        shifted = W + 0.1 * torch.ones_like(W)
        seen.append((grad, state["grad_at"](W), state["grad_at"](shifted), shifted))
        return W - lr * grad, state

    method = Method("test-grad-at", "label-noise", probe, (0.05,), hyper={"sigma": (sigma,)})
    problem = get_problem("teacher-student")(3)
    native = problem.native.to(torch.float32)
    if generic:
        problem = dataclasses.replace(problem, native=None)
    W0 = problem.init(range(m))
    kw = {"steps": steps, "batch": B, "seed": 3, "method_seed": 4, "quiet": True}
    probed = run_method(method, W0, problem, lr=lr, **kw)
    plain = run_method("label-noise", W0, problem, lr=lr, hyper={"sigma": sigma}, **kw)
    assert torch.equal(probed["W"], plain["W"])
    gx, gm = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    for grad, again, at_shifted, shifted in seen:
        assert torch.equal(again, grad)
        x = sample_inputs(m, B, 3, generator=gx)
        xi = sigma * torch.randn(m, B, 1, generator=gm)  # one ξ per sample, (start, sample)
        V = shifted.clone().requires_grad_()
        y = outputs(native.V.expand(m, -1, -1), native.A_teacher, x)
        loss = (0.5 * (y + xi - outputs(V, native.A_student, x)) ** 2).sum(-1).mean(-1).sum()
        (ref,) = torch.autograd.grad(loss, V)
        torch.testing.assert_close(at_shifted, ref, rtol=1e-5, atol=1e-6)
        assert (at_shifted - grad).abs().max() > 1e-3  # another point, another gradient
    assert len(seen) == steps


def test_grad_at_refuses_weights_of_another_shape():
    def wrong(W, grad, state, t, lr):
        return W - lr * state["grad_at"](W[:, :1]), state

    with pytest.raises(UserError, match=r"grad_at'\] takes weights like W \(\(2, 3, 3\)"):
        run_method(
            Method("test-grad-at-shape", "mse", wrong, (0.1,)),
            init_weights(range(2), 3, 3),
            make_problem(3),
            steps=1,
            lr=0.1,
            quiet=True,
        )


def test_sam_on_a_manifold_takes_the_gradient_projected_at_the_ascent_point():
    """Burer–Monteiro on the product of spheres: g = P_W ∇L(W), W' = W + ρ g/‖g‖, one SAM
    step is W ← retract(W − lr·P_{W'} ∇L(W')), both gradients on the run's own batch."""
    problem = get_problem("burer-monteiro")(2)
    W0 = problem.init(range(4)).float()
    lr, rho, B, seed = 0.05, 0.2, 8, 3
    (one,) = run_methods([make_job("sam", lr, {"rho": rho})], W0, problem, steps=1, batch=B,
                         seed=seed, method_seed=0, quiet=True)  # fmt: skip
    x, y = problem.sample(4, B, torch.Generator().manual_seed(seed))

    def projected_grad(W):
        W = W.detach().requires_grad_()
        loss = 0.5 * ((problem.predict(W, x) - y) ** 2).sum(-1).mean(-1).sum()
        (grad,) = torch.autograd.grad(loss, W)
        return problem.project(W.detach(), grad)

    g = projected_grad(W0)
    ascent = W0 + rho * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    expected = problem.retract(W0 - lr * projected_grad(ascent))
    torch.testing.assert_close(one["W"], expected, rtol=1e-6, atol=1e-7)
    sgd = problem.retract(W0 - lr * g)
    assert not torch.allclose(expected, sgd, atol=1e-4)  # the ascent point matters
