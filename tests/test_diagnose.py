"""qmse.diagnose against independent references: full autograd Hessians and Jacobians,
torch.linalg.eigvalsh / svdvals, closed-form least squares and hand-built stopping points."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qmse import curvature, nullspace
from qmse import diagnose as dg
from qmse.models import MLP

DT = torch.float64


def _mlp(seed: int = 0, bias: bool = True, activation: str = "tanh") -> MLP:
    torch.manual_seed(seed)
    return MLP(3, [4], 2, activation=activation, bias=bias).to(DT)


def _data(n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _full_hessian(model: nn.Module, x, y, loss: str) -> torch.Tensor:
    w, loss_at = curvature.loss_fn(model, (x, y), loss=loss)
    return torch.autograd.functional.hessian(loss_at, w)  # (P, P)


def _per_sample_jacobians(model: nn.Module, x) -> torch.Tensor:
    w, f = curvature.model_fn(model)
    return torch.stack(
        [torch.autograd.functional.jacobian(lambda wv, xi=xi: f(wv, xi[None])[0], w) for xi in x]
    )  # (N, C, P)


class Product(nn.Module):
    """f(x) = a·b·x: a 1-1-1 linear network. With target 1 its MSE loss at a = b = 0 has
    Hessian [[0, −1], [−1, 0]] (x² − y² rotated by 45°) and J = 0: a saddle of case 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=DT))
        self.b = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x):  # (N, 1) -> (N, 1)
        return self.a * self.b * x


class Tied(nn.Module):
    """Two identical outputs s = wᵀx: J_iᵀv = (v₁ + v₂) x_i, null for v ∝ (1, −1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))

    def forward(self, x):  # (N, 3) -> (N, 2)
        s = x @ self.w
        return torch.stack([s, s], dim=-1)


@pytest.mark.parametrize("loss", ["mse", "expected-qmse", "ce"])
def test_hvp_matches_autograd_hessian(loss):
    model = _mlp()
    x, y = _data()
    if loss == "ce":
        y = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    H = _full_hessian(model, x, y, loss)
    hvp, P = curvature.hessian_operator(model, (x, y), loss=loss)
    v = torch.randn(P, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(hvp(v), H @ v, rtol=1e-10, atol=1e-12)


def test_hvp_over_batches_is_the_sample_weighted_mean():
    model = _mlp()
    x, y = _data(9)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    whole, _ = curvature.hessian_operator(model, (x, y))
    split, _ = curvature.hessian_operator(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    torch.testing.assert_close(split(v), whole(v), rtol=1e-10, atol=1e-12)


def test_lanczos_full_run_gives_the_hessian_spectrum():
    model = _mlp()
    x, y = _data()
    exact = torch.linalg.eigvalsh(_full_hessian(model, x, y, "mse"))
    hvp, P = curvature.hessian_operator(model, (x, y))
    top, bottom = curvature.hessian_eigs(hvp, P, k=3, steps=P, dtype=DT)
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
    exact = torch.trace(_full_hessian(model, x, y, "mse")).item()
    hvp, P = curvature.hessian_operator(model, (x, y))
    est, se = curvature.hutchinson_trace(hvp, P, samples=200, seed=4, dtype=DT)
    assert se > 0 and abs(est - exact) < 3 * se
    assert curvature.hutchinson_trace(hvp, P, samples=200, seed=4, dtype=DT) == (est, se)


def test_spectral_density_matches_the_exact_spectrum():
    model = _mlp()
    x, y = _data()
    exact = torch.linalg.eigvalsh(_full_hessian(model, x, y, "mse"))
    hvp, P = curvature.hessian_operator(model, (x, y))
    runs = curvature.spectral_density(hvp, P, steps=P, vectors=4, dtype=DT)
    assert len(runs) == 4
    for nodes, weights in runs:
        assert math.isclose(weights.sum().item(), 1.0, rel_tol=1e-12)
        used = nodes[weights > 1e-10]
        assert (used[:, None] - exact[None]).abs().amin(1).max() < 1e-7  # nodes are eigenvalues
    top, _ = curvature.hessian_eigs(hvp, P, k=1, steps=P, dtype=DT)
    assert runs[0][0][-1] == top[0]  # same seed, same first start vector
    grid = torch.linspace(exact[0] - 1, exact[-1] + 1, 4001, dtype=DT)
    density = curvature.density_on_grid(runs, grid, sigma=0.05)
    assert math.isclose(torch.trapezoid(density, grid).item(), 1.0, rel_tol=1e-4)


def test_gradient_geometry_matches_brute_force_jacobians():
    model = _mlp()
    x, y = _data()
    geo = dg.gradient_geometry(model, x, y)
    J = _per_sample_jacobians(model, x)  # (N, C, P)
    with torch.no_grad():
        r = y - model(x)  # (N, C)
    ps, ws = geo["per_sample"], geo["whole_set"]
    grads = torch.einsum("ncp,nc->np", J, r)
    torch.testing.assert_close(ps["grad_norm"], grads.norm(dim=1))
    torch.testing.assert_close(ps["output_grad_norms"], J.norm(dim=2))
    sv = torch.linalg.svdvals(J)  # (N, C)
    torch.testing.assert_close(ps["jacobian_spec"], sv[:, 0])
    torch.testing.assert_close(ps["jacobian_smin"], sv[:, -1])
    torch.testing.assert_close(ps["ratio"], grads.norm(dim=1) / (sv[:, 0] * r.norm(dim=1)))
    stacked = J.reshape(-1, J.shape[-1])  # (N·C, P)
    assert math.isclose(ws["grad_norm"], grads.sum(0).norm().item(), rel_tol=1e-10)
    assert math.isclose(ws["jacobian_spec"], torch.linalg.svdvals(stacked)[0].item(), rel_tol=1e-8)
    assert math.isclose(ws["jacobian_fro"], stacked.norm().item(), rel_tol=1e-10)
    assert math.isclose(ws["residual_norm"], r.norm().item(), rel_tol=1e-12)


def test_least_squares_with_residual_is_case_3_for_the_set():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(20, 3, generator=g, dtype=DT)
    Y = torch.randn(20, 1, generator=g, dtype=DT)
    model = nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    geo = dg.gradient_geometry(model, X, Y)
    out = dg.classify_stop(geo, tol_residual=1e-6, tol_gradient=1e-9, tol_ratio=1e-8)
    assert geo["whole_set"]["residual_norm"] > 1 and geo["whole_set"]["ratio"] < 1e-12
    assert out["whole_set_case"] == 3 and out["whole_set_label"] == "null-space"
    # per sample J_iᵀ r_i = x_i r_i ≠ 0: no single sample is stuck, only their sum cancels
    assert out["per_sample_counts"]["not-stationary"] == 20
    assert out["tolerances"] == {"tol_residual": 1e-6, "tol_gradient": 1e-9, "tol_ratio": 1e-8}
    hvp, P = curvature.hessian_operator(model, (X, Y))
    top, bottom = curvature.hessian_eigs(hvp, P, k=1, dtype=DT)
    assert dg.label_curvature(bottom.item(), top.item()) == "minimum"


def test_interpolating_fit_is_case_1():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(3, 5, generator=g, dtype=DT)  # fewer samples than weights
    Y = torch.randn(3, 2, generator=g, dtype=DT)
    model = nn.Linear(5, 2, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    out = dg.classify_stop(dg.gradient_geometry(model, X, Y), tol_residual=1e-9)
    assert out["whole_set_case"] == 1
    assert out["per_sample_case"].tolist() == [1, 1, 1]


def test_all_dead_relu_network_is_case_2():
    model = _mlp(bias=False, activation="relu")
    with torch.no_grad():
        model.layers[0].weight.copy_(-model.layers[0].weight.abs())
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(7), dtype=DT) + 0.1
    y = torch.ones(6, 2, dtype=DT)
    geo = dg.gradient_geometry(model, x, y)
    out = dg.classify_stop(geo)
    assert out["whole_set_case"] == 2 and out["per_sample_counts"]["zero-jacobian"] == 6
    assert geo["per_sample"]["residual_norm"].min() > 1


def test_product_network_origin_is_a_case_2_saddle():
    model = Product()
    x, y = torch.ones(4, 1, dtype=DT), torch.ones(4, 1, dtype=DT)
    hvp, P = curvature.hessian_operator(model, (x, y))
    top, bottom = curvature.hessian_eigs(hvp, P, k=1, dtype=DT)
    assert math.isclose(bottom.item(), -1.0) and math.isclose(top.item(), 1.0)
    assert dg.label_curvature(bottom.item(), top.item()) == "saddle"
    assert dg.classify_stop(dg.gradient_geometry(model, x, y))["whole_set_case"] == 2


def test_label_curvature_thresholds():
    assert dg.label_curvature(-1e-6, 1.0) == "flat"
    assert dg.label_curvature(2e-3, 1.0) == "minimum"
    assert dg.label_curvature(-2e-3, 1.0) == "saddle"
    with pytest.raises(ValueError, match="rel_tol"):
        dg.label_curvature(0.0, 1.0, rel_tol=-1)


def test_null_space_mask_matches_brute_force():
    model = _mlp()
    x, _ = _data(8)
    v = torch.nn.functional.normalize(torch.randn(8, 2, dtype=DT), dim=1)
    J = _per_sample_jacobians(model, x)
    norms = torch.einsum("ncp,nc->np", J, v).norm(dim=1)
    tol = norms.median().item()
    assert nullspace.null_space_mask(model, x, v, tol).tolist() == (norms <= tol).tolist()


def test_resample_null_v_redraws_only_null_directions():
    model = Tied()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    v = torch.nn.functional.normalize(torch.randn(6, 2, dtype=DT), dim=1)
    v[[1, 4]] = torch.tensor([1.0, -1.0], dtype=DT) / math.sqrt(2)
    assert nullspace.null_space_mask(model, x, v).tolist() == [
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    new, n = nullspace.resample_null_v(model, x, v, generator=torch.Generator().manual_seed(0))
    assert n == 2 and not nullspace.null_space_mask(model, x, new).any()
    torch.testing.assert_close(new[[0, 2, 3, 5]], v[[0, 2, 3, 5]])
    torch.testing.assert_close(new.norm(dim=1), torch.ones(6, dtype=DT))
    again, _ = nullspace.resample_null_v(model, x, v, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, new)


def test_resample_null_v_gives_up_after_max_tries():
    model = Tied()
    x = torch.zeros(3, 3, dtype=DT)  # J_i = 0: every direction is null (case 2)
    v = torch.nn.functional.normalize(torch.ones(3, 2, dtype=DT), dim=1)
    _, n = nullspace.resample_null_v(model, x, v, generator=torch.Generator(), max_tries=4)
    assert n == 12


def test_model_is_left_untouched():
    model = _mlp()
    model.layers[0].bias.requires_grad_(False)
    model.train()
    model.layers[1].eval()  # a mixed state must be restored exactly
    before = {k: p.clone() for k, p in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    x, y = _data()
    geo = dg.gradient_geometry(model, x, y)
    dg.classify_stop(geo)
    v = torch.nn.functional.normalize(torch.randn(7, 2, dtype=DT), dim=1)
    nullspace.resample_null_v(model, x, v, generator=torch.Generator())
    hvp, P = curvature.hessian_operator(model, (x, y))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == P  # the frozen bias enters as a constant
    curvature.hessian_eigs(hvp, P, k=2, dtype=DT)
    curvature.hutchinson_trace(hvp, P, samples=3, dtype=DT)
    for k, p in model.state_dict().items():
        assert torch.equal(p, before[k])
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_named():
    model = _mlp()
    x, y = _data()
    with pytest.raises(ValueError, match="qmse"):
        curvature.hessian_operator(model, (x, y), loss="qmse")
    with pytest.raises(ValueError, match="target shape"):
        dg.gradient_geometry(model, x, y[:, :1])
    with pytest.raises(ValueError, match="tol_ratio"):
        dg.classify_stop(dg.gradient_geometry(model, x, y), tol_ratio=-1)
    with pytest.raises(ValueError, match="steps"):
        curvature.lanczos(lambda v: v, 3, 4)
    with torch.no_grad():
        model.layers[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.2\.bias.*non-finite"):
        dg.gradient_geometry(model, x, y)


def test_segment_losses_closed_form_for_a_quadratic():
    g = torch.Generator().manual_seed(9)
    w_a, w_b = torch.randn(4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    t, loss, chord = dg.segment_losses(lambda w: 0.5 * (w * w).sum(), w_a, w_b, points=11)
    torch.testing.assert_close(loss - chord, -0.5 * t * (1 - t) * (w_b - w_a).pow(2).sum())


def test_convexity_demo_separates_convex_and_mlp_losses(tmp_path):
    result = dg.convexity_demo(segments=30, seed=0)
    assert result["linear-regression"]["violating_segments"] == 0
    assert result["logistic-regression"]["violating_segments"] == 0
    assert result["linear-regression"]["max_gap"] < 0
    mlp = result["mlp-1-hidden"]
    assert mlp["violating_segments"] > 0 and mlp["max_gap"] > 0
    seg = mlp["worst_segment"]
    assert max(a - b for a, b in zip(seg["loss"], seg["chord"])) == pytest.approx(mlp["max_gap"])
    dg.plot_convexity(result, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnose_model_is_json_ready_and_seeded():
    model = _mlp()
    x, y = _data()
    kw = dict(losses=("mse", "expected-qmse"), k=2, lanczos_steps=8, trace_samples=4, quiet=True)
    d = dg.diagnose_model(model, x, y, **kw)
    assert json.loads(json.dumps(d)) == d
    assert d == dg.diagnose_model(model, x, y, **kw)
    exact = torch.linalg.eigvalsh(_full_hessian(model, x, y, "mse"))
    h = d["hessian"]["mse"]
    assert exact[0] <= h["bottom"][0] <= h["top"][0] <= exact[-1]  # Ritz values interlace
    ws = d["geometry"]["whole_set"]  # the same numbers by another route (VJP of residuals)
    assert math.isclose(h["grad_norm"], ws["mse_grad_norm"], rel_tol=1e-9)
    assert math.isclose(h["loss"], ws["mse"], rel_tol=1e-12)
    text = dg.summary_text(d)
    assert "stop case (whole set)" in text and "[expected-qmse] λ_min" in text
    assert "[mse] label" in dg.compare_text(d, d, ("A", "B"))


def _tiny_images(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.randint(0, 3, (n,), generator=g)
        rows = torch.arange(8).view(1, 1, 8, 1)
        band = (rows * 3 // 8) == labels.view(n, 1, 1, 1)  # class k lights band k
        return (torch.randint(0, 120, (n, 1, 8, 8), generator=g) + 120 * band).byte(), labels

    (xtr, ytr), (xte, yte) = make(48), make(16)
    return SimpleNamespace(name="tiny", train_images=xtr, train_labels=ytr, test_images=xte,
                           test_labels=yte, num_classes=3)  # fmt: skip


def test_diagnose_run_writes_and_reuses_its_diagnosis(tmp_path, monkeypatch):
    from qmse import data as qdata
    from qmse.rundir import TrainConfig
    from qmse.train import train_run

    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: _tiny_images())
    cfg = TrainConfig(dataset="tiny", loss="qmse", lr=0.05, batch_size=16, epochs=1,
                      channels=(2, 4), hidden=8)  # fmt: skip
    train_run(cfg, tmp_path / "run", dataset=_tiny_images(), quiet=True)
    opts = dict(n_samples=20, lanczos_steps=6, slq_vectors=1, trace_samples=3, quiet=True)
    d = dg.diagnose_run(tmp_path / "run", **opts)
    assert (tmp_path / "run" / "diagnosis.txt").exists()
    assert set(d["hessian"]) == {"mse", "expected-qmse"} and d["n_samples"] == 20
    assert d["run"]["loss"] == "qmse" and "git_commit" in d["provenance"]
    stamp = (tmp_path / "run" / "diagnosis.json").stat().st_mtime_ns
    assert dg.diagnose_run(tmp_path / "run", **opts) == d
    assert (tmp_path / "run" / "diagnosis.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_samples"):
        dg.diagnose_run(tmp_path / "run", out_dir=tmp_path / "other", n_samples=10**6)


def test_cli_convexity_and_argument_errors(tmp_path, capsys):
    from qmse.cli import main

    assert main(["diagnose", "convexity", "--segments", "10", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "diagnose-convexity.png").exists()
    saved = json.loads((tmp_path / "convexity.json").read_text())
    assert saved["config"]["segments"] == 10 and "provenance" in saved
    assert "mlp-1-hidden" in capsys.readouterr().out
    assert main(["diagnose"]) == 2
    assert "exactly one of RUN_DIR" in capsys.readouterr().err


def test_cli_compare_two_runs(tmp_path, monkeypatch, capsys):
    from qmse import data as qdata
    from qmse.cli import main
    from qmse.rundir import TrainConfig
    from qmse.train import train_run

    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: _tiny_images())
    for loss in ("mse", "qmse"):
        cfg = TrainConfig(dataset="tiny", loss=loss, lr=0.05, batch_size=16, epochs=1,
                          channels=(2, 4), hidden=8)  # fmt: skip
        train_run(cfg, tmp_path / loss, dataset=_tiny_images(), quiet=True)
    args = ["--samples", "12", "--lanczos-steps", "5", "--slq-vectors", "1"]
    args += ["--trace-samples", "2", "--quiet", "--out", str(tmp_path / "cmp")]
    assert (
        main(["diagnose", "--compare", str(tmp_path / "mse"), str(tmp_path / "qmse"), *args]) == 0
    )
    out = capsys.readouterr().out
    assert "run loss" in out and "expected-qmse" in out
    assert (tmp_path / "cmp" / "comparison.json").exists()
    assert (tmp_path / "cmp" / "diagnose-spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "mse" / "diagnosis.json").exists()


def test_output_bias_keeps_every_direction_out_of_the_null_space():
    model = _mlp(activation="relu")  # output layer has a bias: ∂f/∂b = I is a block of J_i
    x, y = _data(8)
    geo = dg.gradient_geometry(model, x, y)
    assert geo["per_sample"]["jacobian_smin"].min() >= 1 - 1e-12
    v = torch.nn.functional.normalize(torch.randn(8, 2, dtype=DT), dim=1)
    assert not nullspace.null_space_mask(model, x, v, tol=0.999).any()
