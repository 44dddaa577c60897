"""What defines a training run: `TrainConfig`, saved with every run in its config.json, and
the paper's learning rates. Each field carries the help text of the option that fills it, so
the command line is declared from this class."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qmse.errors import UserError
from qmse.loss import LOSSES, Loss, sample_directions

# the paper's learning rate per dataset (sec. 4: 0.01 for MNIST, 0.1 for CIFAR)
PAPER_LR = {"mnist": 0.01, "fashion-mnist": 0.01, "cifar10": 0.1, "cifar100": 0.1}


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved, with the model's arguments, in config.json. Each
    field's metadata["help"] is the help of the `qmse train` option that fills it."""

    dataset: str = field(default="fashion-mnist", metadata={"help": "a name in qmse.data.DATASETS"})
    data_dir: str | None = field(
        default=None, metadata={"help": "data folder; None: $QMSE_DATA, else ~/.cache/qmse"}
    )
    train_subset: int | None = field(
        default=None, metadata={"help": "train on the first N training images (None: all)"}
    )
    test_subset: int | None = field(
        default=None, metadata={"help": "measure the test metrics on the first N test images"}
    )
    loss: str = field(default="qmse", metadata={"help": "a name in the registry qmse.loss.LOSSES"})
    loss_params: dict[str, float] = field(
        default_factory=dict, metadata={"help": "the loss's parameters, e.g. label noise's sigma"}
    )
    lr: float | None = field(
        default=None,
        metadata={
            "help": "SGD step size; None: the paper's for the dataset (PAPER_LR: 0.01 for "
            "MNIST and Fashion-MNIST, 0.1 for CIFAR), filled in when the config is made"
        },
    )
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum (PyTorch's convention)"})
    batch_size: int = field(default=128, metadata={"help": "SGD minibatch size"})
    epochs: int = field(default=100, metadata={"help": "passes over the training set"})
    eval_every: int = field(
        default=1,
        metadata={"help": "measure the full (sub)sets every N epochs and at the last one"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "derives the initial weights, the batch order, the loss's noise"},
    )
    channels: tuple[int, int] = field(
        default=(32, 64), metadata={"help": "SimpleCNN conv widths (the paper gives none)"}
    )
    hidden: int = field(default=128, metadata={"help": "SimpleCNN hidden linear width"})
    resample_null: bool = field(
        default=False,
        metadata={
            "help": "QMSE (paper sec. 3.1): redraw v_i while ‖J_iᵀv_i‖ ≤ 1e-6, 3 tries (costly, "
            "see docs)"
        },
    )
    allow_unverified_data: bool = field(
        default=False,
        metadata={
            "help": "train on data files whose MD5 is not the published one (recorded in "
            "config.json)"
        },
    )

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"loss={self.loss!r}; expected one of {tuple(LOSSES)}")
        self.loss_params = _check_loss_params(LOSSES[self.loss], self.loss_params)
        if self.resample_null and LOSSES[self.loss].draw is not sample_directions:
            raise UserError(
                f"resample_null redraws directions on the unit sphere; loss {self.loss!r} draws "
                f"no such directions (it applies to losses drawn by qmse.loss.sample_directions)"
            )
        if self.lr is None:
            if self.dataset not in PAPER_LR:
                raise UserError(f"dataset {self.dataset!r} has no paper learning rate; give lr")
            self.lr = PAPER_LR[self.dataset]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr={self.lr}; the learning rate must be a positive number")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum={self.momentum}; expected 0 <= momentum < 1")
        for name in ("batch_size", "epochs", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name}={getattr(self, name)}; expected a positive integer")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}; expected None or n >= 1")
        if self.seed < 0:
            raise UserError(f"seed={self.seed}; expected a non-negative integer")
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 2:
            raise UserError(f"channels={self.channels}; expected two conv widths")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """The TrainConfig stored in a config.json (extra keys such as provenance ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _check_loss_params(spec: Loss, params: Mapping[str, Any]) -> dict[str, float]:
    """`params` as floats, exactly the parameters `spec` takes (each required), each a finite
    number >= 0 (the registered ones are scales, e.g. label noise's σ)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"loss_params must be a dict of numbers, got {type(params).__name__}")
    if missing := [p for p in spec.params if p not in params]:
        raise UserError(
            f"loss {spec.name!r} needs {', '.join(missing)} in loss_params (qmse train: "
            f"{' '.join(f'--loss-param {p}=VALUE' for p in missing)})"
        )
    if extra := sorted(set(params) - set(spec.params)):
        takes = f"takes only {list(spec.params)}" if spec.params else "takes no parameters"
        raise UserError(f"loss {spec.name!r} {takes}; got {', '.join(extra)}")
    out = {}
    for name in spec.params:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"loss parameter {name}={value!r}; expected a number")
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"loss parameter {name}={value}; expected a finite number >= 0")
        out[name] = float(value)
    return out
