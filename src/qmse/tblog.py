"""Training metrics to TensorBoard, for the tools people already use (optional extra).

`tensorboard_logger(log_dir)` gives the `on_epoch` hook of `qmse.train.train_run` and
`qmse.train.train_many`: every metric of a new metrics.jsonl row becomes a scalar at its
epoch, under the same name. It needs `pip install 'qmse[tensorboard]'`; without it the
error says so before anything is trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qmse.sweep import MissingExtraError


def summary_writer_class() -> Any:
    """torch's SummaryWriter, or a MissingExtraError that says how to install TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise MissingExtraError(
            "--tensorboard needs TensorBoard: pip install 'qmse[tensorboard]' (or pip install "
            "tensorboard), or leave --tensorboard out"
        ) from e
    return SummaryWriter


@contextlib.contextmanager
def tensorboard_logger(log_dir: str | Path) -> Iterator[Callable[[dict], None]]:
    """An `on_epoch` hook writing each row's metrics (all but "epoch") as TensorBoard
    scalars at step row["epoch"] into `log_dir`, flushed every epoch so a live TensorBoard
    sees them; the writer is closed when the block ends. A continued run appends to the
    same folder from its next epoch on."""
    writer = summary_writer_class()(log_dir=str(log_dir))

    def log(row: dict) -> None:
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, global_step=row["epoch"])
        writer.flush()

    try:
        yield log
    finally:
        writer.close()
