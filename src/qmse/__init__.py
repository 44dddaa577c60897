"""qmse: why MSE training stops short of the global minimum, and whether QMSE gets it out.

The names below are `qmse.loss`'s and `qmse.hessian`'s, imported when first used, so that
`import qmse.cli` (and `qmse --help`) does not load torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmse.hessian import HessianSummary, hessian_summary
    from qmse.loss import (
        Loss,
        QMSELoss,
        expected_qmse_loss,
        get_loss,
        mse_loss_half,
        qmse_loss,
        register_loss,
    )

__all__ = [
    "HessianSummary",
    "Loss",
    "QMSELoss",
    "expected_qmse_loss",
    "get_loss",
    "hessian_summary",
    "mse_loss_half",
    "qmse_loss",
    "register_loss",
]
__version__ = "0.1.0"
_HESSIAN = ("HessianSummary", "hessian_summary")  # from qmse.hessian; the others qmse.loss's


def __getattr__(name: str) -> Any:
    """The names of __all__, from their module on first use."""
    if name in __all__:
        module = "qmse.hessian" if name in _HESSIAN else "qmse.loss"
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'qmse' has no attribute {name!r}")
