"""qmse.convexity against closed forms: the chord gap of a quadratic, convex losses that never
rise above a chord, and the hidden-unit swap that proves an MLP's loss is not convex."""

from __future__ import annotations

import json

import pytest
import torch

from qmse import convexity
from qmse.cli import main
from qmse.curvature import loss_fn

DT = torch.float64


def test_segment_losses_closed_form_for_a_quadratic():
    g = torch.Generator().manual_seed(9)
    w_a, w_b = torch.randn(4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT)
    t, loss, chord = convexity.segment_losses(lambda w: 0.5 * (w * w).sum(), w_a, w_b, points=11)
    torch.testing.assert_close(loss - chord, -0.5 * t * (1 - t) * (w_b - w_a).pow(2).sum())


def test_a_hidden_unit_swap_is_a_segment_above_the_chord():
    """f = w₂ᵀ tanh(W₁x) and its swapped copy have the same loss; a convex loss would then be
    at most that value on the segment between them, the midpoint (W₁ rows averaged) is not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
    model = model.to(DT)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[1.0, -2.0]]))
        model[2].bias.zero_()
    x = torch.linspace(-2, 2, 9, dtype=DT).unsqueeze(1)
    with torch.no_grad():
        y = model(x)  # the model fits its own outputs: loss 0 at w_a
    w_a, loss_at = loss_fn(model, "mse", (x, y))
    w_b = w_a.clone()
    w_b[[0, 1]], w_b[[4, 5]] = w_a[[1, 0]], w_a[[5, 4]]  # rows of W₁ and entries of w₂ swapped
    t, loss, chord = convexity.segment_losses(loss_at, w_a, w_b, points=5)
    assert loss[0].item() == 0 and abs(loss[-1].item()) < 1e-28 and loss[2] > 0.1
    assert (loss - chord)[2] > 0.1  # the midpoint is above the chord: not convex


def test_convexity_demo_separates_convex_and_mlp_losses():
    result = convexity.convexity_demo(segments=30, seed=0)
    assert result["linear-regression"]["violating_segments"] == 0
    assert result["logistic-regression"]["violating_segments"] == 0
    assert result["linear-regression"]["max_gap"] < 0
    assert result["logistic-regression"]["max_gap"] <= 1e-9
    mlp = result["mlp-1-hidden"]
    assert mlp["violating_segments"] > 0 and mlp["max_gap"] > 0
    seg = mlp["worst_segment"]
    assert max(a - b for a, b in zip(seg["loss"], seg["chord"])) == pytest.approx(mlp["max_gap"])
    assert convexity.convexity_demo(segments=30, seed=0) == result  # seeded


def test_cli_convexity_writes_its_report(tmp_path, capsys):
    assert main(["diagnose", "convexity", "--segments", "10", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "diagnose-convexity.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "convexity.json").read_text())
    assert saved["config"]["segments"] == 10 and "provenance" in saved
    assert "mlp-1-hidden" in capsys.readouterr().out
