"""qmse: why MSE training stops short of the global minimum, and whether QMSE gets it out."""

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
