"""qmse.nullspace against brute-force per-sample Jacobians and a model whose null directions
are known in closed form."""

from __future__ import annotations

import math

import torch
from conftest import per_sample_jacobians
from torch import nn

from qmse import nullspace
from qmse.models import MLP

DT = torch.float64


def _mlp(seed: int = 0, activation: str = "tanh") -> MLP:
    torch.manual_seed(seed)
    return MLP(3, [4], 2, activation=activation).to(DT)


def _inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)


class Tied(nn.Module):
    """Two identical outputs s = wᵀx: J_iᵀv = (v₁ + v₂) x_i, null for v ∝ (1, −1)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))

    def forward(self, x):  # (N, 3) -> (N, 2)
        s = x @ self.w
        return torch.stack([s, s], dim=-1)


def test_null_space_mask_matches_brute_force():
    model = _mlp()
    x = _inputs()
    v = torch.nn.functional.normalize(torch.randn(8, 2, dtype=DT), dim=1)
    J = per_sample_jacobians(model, x)
    norms = torch.einsum("ncp,nc->np", J, v).norm(dim=1)
    tol = norms.median().item()
    assert nullspace.null_space_mask(model, x, v, tol).tolist() == (norms <= tol).tolist()


def test_params_take_the_place_of_the_models_weights():
    """The mask of one model's module with another's weights passed as params is the other
    model's, by brute force; the module's own weights are untouched."""
    model, other = _mlp(0), _mlp(5)
    x = _inputs()
    v = torch.nn.functional.normalize(torch.randn(8, 2, dtype=DT), dim=1)
    norms = torch.einsum("ncp,nc->np", per_sample_jacobians(other, x), v).norm(dim=1)
    own = torch.einsum("ncp,nc->np", per_sample_jacobians(model, x), v).norm(dim=1)
    tol = norms.median().item()
    weights = {k: p.detach() for k, p in other.named_parameters()}
    got = nullspace.null_space_mask(model, x, v, tol, params=weights)
    assert got.tolist() == (norms <= tol).tolist() != (own <= tol).tolist()


def test_resample_null_v_redraws_only_null_directions():
    model = Tied()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(8), dtype=DT)
    v = torch.nn.functional.normalize(torch.randn(6, 2, dtype=DT), dim=1)
    v[[1, 4]] = torch.tensor([1.0, -1.0], dtype=DT) / math.sqrt(2)
    mask = nullspace.null_space_mask(model, x, v).tolist()
    assert mask == [False, True, False, False, True, False]
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


def test_output_bias_keeps_every_direction_out_of_the_null_space():
    """∂f/∂b = I is a block of J_i, so ‖J_iᵀv‖ ≥ ‖v‖ = 1 for every unit v."""
    model = _mlp(activation="relu")
    x = _inputs()
    J = per_sample_jacobians(model, x)
    assert torch.linalg.svdvals(J)[:, -1].min() >= 1 - 1e-12
    v = torch.nn.functional.normalize(torch.randn(8, 2, dtype=DT), dim=1)
    assert not nullspace.null_space_mask(model, x, v, tol=0.999).any()


def test_model_is_left_untouched():
    model = _mlp()
    model.train()
    before = {k: p.clone() for k, p in model.state_dict().items()}
    x = _inputs(7)
    v = torch.nn.functional.normalize(torch.randn(7, 2, dtype=DT), dim=1)
    nullspace.resample_null_v(model, x, v, generator=torch.Generator())
    assert all(torch.equal(p, before[k]) for k, p in model.state_dict().items())
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
