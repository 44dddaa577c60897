"""Training loops (placeholder module: the reproduction issue fills it in)."""

from __future__ import annotations

import torch

from qmse.loss import compute_loss, mse_loss_half
from qmse.models import MLP


def synthetic_demo(steps: int = 2000, seed: int = 0, lr: float = 0.05) -> dict[str, float]:
    """Train one small MLP on a synthetic 3-output regression task with MSE, QMSE and
    expected-QMSE from the same initialisation; return each final full-batch ½‖r‖²."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)  # (N, 8)
    torch.manual_seed(seed + 1)
    teacher = MLP(8, [16], 3, activation="tanh")
    with torch.no_grad():
        y = teacher(x)  # (N, 3)
    torch.manual_seed(seed + 2)
    init = MLP(8, [4], 3, activation="tanh").state_dict()
    out = {}
    for name in ("mse", "qmse", "expected-qmse"):
        model = MLP(8, [4], 3, activation="tanh")
        model.load_state_dict(init)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        vg = torch.Generator().manual_seed(seed + 3)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            compute_loss(name, model(x), y, generator=vg).backward()
            opt.step()
        with torch.no_grad():
            out[name] = mse_loss_half(model(x), y).item()
    return out
