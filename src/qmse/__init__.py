"""qmse: why MSE training stops short of the global minimum, and whether QMSE gets it out.

The names below are `qmse.loss`'s, imported when first used, so that `import qmse.cli`
(and `qmse --help`) does not load torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    "Loss",
    "QMSELoss",
    "expected_qmse_loss",
    "get_loss",
    "mse_loss_half",
    "qmse_loss",
    "register_loss",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """The loss names of __all__, from qmse.loss on first use."""
    if name in __all__:
        return getattr(importlib.import_module("qmse.loss"), name)
    raise AttributeError(f"module 'qmse' has no attribute {name!r}")
