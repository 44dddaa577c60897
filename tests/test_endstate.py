"""qmse.endstate: the full-set quantities against explicit formulas and a whole-batch
autograd gradient, and the diagnosis cached by content (reused as long as the run is the
same, recomputed once it changes)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn, tiny_config, write_tiny_mnist

from qmse import endstate
from qmse.rundir import prepare_data
from qmse.train import train_run


def test_full_set_state_is_the_whole_batch_gradient_and_residuals(monkeypatch, tiny_dataset):
    monkeypatch.setattr(endstate, "CHUNK", 7)  # several uneven chunks
    data = prepare_data(tiny_dataset)
    model = tiny_cnn(seed=3).train()  # eval mode inside, the flag restored
    state = endstate.full_set_state(model, data.x_train, data.y_train, ["mse", "expected-qmse"])
    assert model.training
    model.eval()
    out = model(data.x_train)  # (96, 3)
    r = F.one_hot(data.y_train, 3).float() - out  # (96, 3) residuals, written out
    norms = r.norm(dim=1).double()
    sq = (r * r).sum(1)
    for name, per_sample in (("mse", 0.5 * sq), ("expected-qmse", 0.25 * sq**2 + sq / 6)):
        g = torch.autograd.grad(per_sample.mean(), list(model.parameters()), retain_graph=True)
        ref = torch.cat([x.flatten() for x in g]).norm().item()
        assert math.isclose(state["grad_norm"][name], ref, rel_tol=1e-4)
    for t in endstate.RESIDUAL_THRESHOLDS:
        assert state["fraction_below"][f"{t:g}"] == (norms < t).double().mean().item()
    assert state["residual_norm"]["max"] == pytest.approx(norms.max().item())
    assert state["residual_norm"]["median"] == pytest.approx(norms.median().item(), rel=0.05)
    assert state["n_samples"] == 96


def test_the_diagnosis_is_cached_by_content(tmp_path, monkeypatch):
    data_dir = write_tiny_mnist(tmp_path / "data")
    cfg = tiny_config(dataset="mnist", data_dir=str(data_dir), allow_unverified_data=True)
    run = tmp_path / "run"
    train_run(cfg, run, quiet=True)
    kw = {"samples": 12, "lanczos_steps": 5, "trace_samples": 2}
    first = endstate.diagnose_end(run, **kw)
    assert set(first["hessian"]) == set(endstate.run_criteria("qmse")) == {"mse", "expected-qmse"}
    assert first["n_samples"] == 12 and first["full_set"]["n_samples"] == 48
    assert len(first["hessian"]["mse"]["slq"]) == 1 and first["stop"]["whole_set_label"]
    assert endstate.summary_text(first)  # `qmse diagnose`'s layout

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed a diagnosis whose key matches")

    monkeypatch.setattr(endstate, "run_diagnosis", refuse)
    assert endstate.diagnose_end(run, **kw) == first
    monkeypatch.undo()

    train_run(tiny_config(**{**cfg.__dict__, "epochs": 3}), run, quiet=True)  # extended
    again = endstate.diagnose_end(run, **kw)
    assert again["key"] != first["key"]
    assert again["run"]["final_metrics"]["epoch"] == 3
    other = endstate.diagnose_end(run, **{**kw, "samples": 10})  # other arguments
    assert other["n_samples"] == 10
    # one file, one key: `qmse diagnose` of the run replaces the end-of-training diagnosis
    run_only = endstate.diagnose_run(run, n_samples=10, lanczos_steps=5, quiet=True)
    assert run_only["key"] != other["key"] and "full_set" not in run_only
    assert "full_set" in endstate.diagnose_end(run, **{**kw, "samples": 10})
