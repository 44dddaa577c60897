"""qmse.diagnose against independent references: per-sample autograd Jacobians, dense
Hessians, torch.linalg.svdvals, closed-form least squares and hand-built stopping points; on
qmse's MLP, on models qmse does not define, with registered and user criteria."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import (
    TESTS,
    dense_hessian,
    leaves_untouched,
    per_sample_jacobians,
    tiny_config,
    tiny_images,
)
from torch import nn

from qmse import curvature, endstate
from qmse import data as qdata
from qmse import diagnose as dg
from qmse.cli import main
from qmse.hessian import hessian_summary
from qmse.loss import get_loss
from qmse.models import MLP
from qmse.train import train_run

DT = torch.float64


def _mlp(seed: int = 0, bias: bool = True, activation: str = "tanh") -> MLP:
    torch.manual_seed(seed)
    return MLP(3, [4], 2, activation=activation, bias=bias).to(DT)


def _data(n: int = 7, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _full_hessian(model: nn.Module, x, y, criterion) -> torch.Tensor:
    w, loss_at = curvature.loss_fn(model, criterion, (x, y))
    return torch.autograd.functional.hessian(loss_at, w)  # (P, P)


class Product(nn.Module):
    """f(x) = a·b·x: a 1-1-1 linear network. With target 1 its MSE loss at a = b = 0 has
    Hessian [[0, −1], [−1, 0]] (x² − y² rotated by 45°) and J = 0: a saddle of case 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros((), dtype=DT))
        self.b = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x):  # (N, 1) -> (N, 1)
        return self.a * self.b * x


def test_gradient_geometry_matches_brute_force_jacobians():
    model = _mlp()
    x, y = _data()
    geo = dg.gradient_geometry(model, x, y)
    J = per_sample_jacobians(model, x)  # (N, C, P)
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
    top, bottom = curvature.hessian_eigs(curvature.hessian_operator(model, "mse", (X, Y)), k=1)
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
    top, bottom = curvature.hessian_eigs(curvature.hessian_operator(model, "mse", (x, y)), k=1)
    assert math.isclose(bottom.item(), -1.0) and math.isclose(top.item(), 1.0)
    assert dg.label_curvature(bottom.item(), top.item()) == "saddle"
    assert dg.classify_stop(dg.gradient_geometry(model, x, y))["whole_set_case"] == 2


def test_label_curvature_thresholds():
    assert dg.label_curvature(-1e-6, 1.0) == "flat"
    assert dg.label_curvature(2e-3, 1.0) == "minimum"
    assert dg.label_curvature(-2e-3, 1.0) == "saddle"
    with pytest.raises(ValueError, match="rel_tol"):
        dg.label_curvature(0.0, 1.0, rel_tol=-1)


def test_model_is_left_untouched():
    model = _mlp()
    model.layers[0].bias.requires_grad_(False)
    model.train()
    model.layers[1].eval()  # a mixed state must be restored exactly
    x, y = _data()
    with leaves_untouched(model):
        dg.diagnose_model(model, "mse", (x, y), k=1, lanczos_steps=3, trace_samples=2, quiet=True)


def test_bad_arguments_are_named():
    model = _mlp()
    x, y = _data()
    with pytest.raises(ValueError, match='random.*"expected-qmse"'):
        dg.diagnose_model(model, "qmse", (x, y), quiet=True)
    with pytest.raises(ValueError, match="share a label"):
        dg.diagnose_model(model, [lambda o, t: o.sum(), lambda o, t: o.mean()], (x, y))
    with pytest.raises(ValueError, match="target shape"):
        dg.gradient_geometry(model, x, y[:, :1])
    with pytest.raises(ValueError, match="tol_ratio"):
        dg.classify_stop(dg.gradient_geometry(model, x, y), tol_ratio=-1)
    with torch.no_grad():
        model.layers[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.2\.bias.*non-finite"):
        dg.gradient_geometry(model, x, y)


def test_diagnose_model_is_json_ready_and_seeded():
    model = _mlp()
    x, y = _data()
    kw = dict(k=2, lanczos_steps=8, trace_samples=4, quiet=True)
    d = dg.diagnose_model(model, ["mse", "expected-qmse"], (x, y), **kw)
    assert json.loads(json.dumps(d)) == d
    assert d == dg.diagnose_model(model, ["mse", "expected-qmse"], (x, y), **kw)
    exact = torch.linalg.eigvalsh(_full_hessian(model, x, y, "mse"))
    h = d["hessian"]["mse"]
    assert exact[0] <= h["bottom"][0] <= h["top"][0] <= exact[-1]  # Ritz values interlace
    ws = d["geometry"]["whole_set"]  # the same numbers by another route (VJP of residuals)
    assert math.isclose(h["grad_norm"], ws["mse_grad_norm"], rel_tol=1e-9)
    assert math.isclose(h["loss"], ws["mse"], rel_tol=1e-12)
    text = endstate.summary_text(d)
    assert "stop case (whole set)" in text and "[expected-qmse] λ_min" in text
    assert "[mse] label" in endstate.compare_text(d, d, ("A", "B"))


def test_diagnose_model_on_a_user_model_and_criterion():
    """nn.Sequential with Conv2d/Flatten/Linear (not a qmse model), torch's HuberLoss and a
    user function: the Hessian part against dense Hessians, the MSE part against autograd."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
    ).to(DT)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 1, 3, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)

    def huber_on_one_hot(out, labels):
        return nn.functional.huber_loss(out, nn.functional.one_hot(labels, 3).to(out))

    P = sum(p.numel() for p in model.parameters())
    d = dg.diagnose_model(
        model, [huber_on_one_hot, "mse"], (x, y), k=3, lanczos_steps=P, trace_samples=2, quiet=True
    )
    assert set(d["hessian"]) == {"huber_on_one_hot", "mse"} and d["n_params"] == P
    for name, crit in (("huber_on_one_hot", huber_on_one_hot), ("mse", "mse")):
        exact = torch.linalg.eigvalsh(_full_hessian(model, x, y, crit))  # full Lanczos: exact
        h = d["hessian"][name]
        torch.testing.assert_close(torch.tensor(h["top"], dtype=DT), exact.flip(0)[:3])
        torch.testing.assert_close(torch.tensor(h["bottom"], dtype=DT), exact[:3])
    with torch.no_grad():
        out = model(x)
    assert math.isclose(d["hessian"]["huber_on_one_hot"]["loss"], huber_on_one_hot(out, y).item())
    one_hot = nn.functional.one_hot(y, 3).to(DT)
    assert math.isclose(
        d["geometry"]["whole_set"]["mse"], 0.5 * ((out - one_hot) ** 2).sum(1).mean().item()
    )
    huber = dg.diagnose_model(model, nn.HuberLoss(), (x, one_hot), k=1, lanczos_steps=4,
                              trace_samples=2, quiet=True)  # fmt: skip
    assert math.isclose(
        huber["hessian"]["HuberLoss()"]["loss"], nn.HuberLoss()(out, one_hot).item()
    )


def test_run_criteria_read_the_registry():
    assert endstate.run_criteria("mse") == ("mse",)
    assert endstate.run_criteria("qmse") == ("mse", "expected-qmse")  # its registered expectation
    assert endstate.run_criteria("label-noise") == ("mse",)
    assert endstate.run_criteria("ce") == ("mse", "ce")


def test_diagnose_run_writes_and_reuses_its_diagnosis(tmp_path, monkeypatch):
    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: tiny_images())
    train_run(tiny_config(loss="qmse", epochs=1), tmp_path / "run", dataset=tiny_images(),
              quiet=True)  # fmt: skip
    opts = dict(n_samples=20, lanczos_steps=6, slq_vectors=1, trace_samples=3, quiet=True)
    d = endstate.diagnose_run(tmp_path / "run", **opts)
    assert (tmp_path / "run" / "diagnosis.txt").exists()
    assert set(d["hessian"]) == {"mse", "expected-qmse"} and d["n_samples"] == 20
    assert d["run"]["loss"] == "qmse" and "git_commit" in d["provenance"]
    stamp = (tmp_path / "run" / "diagnosis.json").stat().st_mtime_ns
    assert endstate.diagnose_run(tmp_path / "run", **opts) == d
    assert (tmp_path / "run" / "diagnosis.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_samples"):
        endstate.diagnose_run(tmp_path / "run", out_dir=tmp_path / "other", n_samples=10**6)
    # The run is extended: the cached diagnosis is stale and is computed again.
    train_run(tiny_config(loss="qmse", epochs=2), tmp_path / "run", dataset=tiny_images(),
              quiet=True)  # fmt: skip
    again = endstate.diagnose_run(tmp_path / "run", **opts)
    assert again["key"] != d["key"] and again["run"]["final_metrics"]["epoch"] == 2
    assert again["geometry"] != d["geometry"]


def test_cli_compare_two_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: tiny_images())
    for loss in ("mse", "qmse"):
        train_run(tiny_config(loss=loss, epochs=1), tmp_path / loss, dataset=tiny_images(),
                  quiet=True)  # fmt: skip
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
    assert main(["diagnose"]) == 2
    assert "exactly one of RUN_DIR" in capsys.readouterr().err


def test_readme_own_model_section_runs(capsys):
    """The README's "Your own model and loss" snippets, run as written, in one namespace."""
    readme = (TESTS.parent / "README.md").read_text()
    section = readme.split("## Your own model and loss", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    label, true, bar = capsys.readouterr().out.splitlines()
    assert label.startswith("not-stationary") and true == "True" and float(bar) >= 0


def test_without_geometry_any_output_shape_is_diagnosed(case):
    """geometry=False: the Hessian part alone, for (N,) logits as for (N, C) outputs; the
    numbers are hessian_summary's, the Ritz values interlace the dense spectrum."""
    kw = dict(k=1, lanczos_steps=6, slq_vectors=1, trace_samples=3, quiet=True)
    d = dg.diagnose_model(case.model, case.criterion, (case.x, case.y), geometry=False, **kw)
    label = curvature.criterion_name(case.criterion)
    assert set(d) == {"n_samples", "n_params", "hessian"} and set(d["hessian"]) == {label}
    assert json.loads(json.dumps(d)) == d
    h = d["hessian"][label]
    s = hessian_summary(case.model, case.criterion, (case.x, case.y), k=1, lanczos_steps=6,
                        slq_vectors=1, trace_samples=3)  # fmt: skip
    assert h["top"] == list(s.top) and h["bottom"] == list(s.bottom)
    assert (h["trace"], h["loss"], h["slq"][0]["nodes"]) == (s.trace, s.loss, list(s.density[0][0]))
    crit = case.criterion
    reference = crit if callable(crit) else (lambda out, t: get_loss(crit)(out, t))
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, reference, case.x, case.y))
    assert exact[0] - 1e-12 <= h["bottom"][0] <= h["top"][0] <= exact[-1] + 1e-12
    assert d["n_params"] == s.size and d["n_samples"] == case.x.shape[0]
    if case.name == "scalar-bce":  # (N,) logits: the geometry is refused, naming the way out
        with pytest.raises(ValueError, match=r"needs model outputs \(N, C\).*geometry=False"):
            dg.diagnose_model(case.model, case.criterion, (case.x, case.y), **kw)
    else:  # with the geometry: the same Hessian part
        full = dg.diagnose_model(case.model, case.criterion, (case.x, case.y), **kw)
        assert full["hessian"] == d["hessian"] and full["n_params"] == d["n_params"]
