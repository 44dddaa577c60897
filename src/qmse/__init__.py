"""qmse: why MSE training stops short of the global minimum, and whether QMSE gets it out."""

from qmse.loss import QMSELoss, expected_qmse_loss, mse_loss_half, qmse_loss

__all__ = ["QMSELoss", "expected_qmse_loss", "mse_loss_half", "qmse_loss"]
__version__ = "0.1.0"
