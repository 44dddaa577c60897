"""The run directory: what a training run is (its config) and the files it leaves.

A run directory holds
    config.json     the resolved TrainConfig, the model's constructor arguments, provenance
    metrics.jsonl   one row per epoch (train.METRIC_KEYS, plus "wall_s", the epoch's seconds)
    checkpoint.pt   model, optimizer, both generators' states, epoch and the metric rows
    diverged.json   written instead of a new epoch when the loss became non-finite
all written atomically. Every analysis (diagnose, landscape, symmetry) reads runs through
`load_run` and rebuilds their data with `prepare_data`, so none of them imports the trainer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from qmse import data as qdata
from qmse import runs
from qmse.distributed import is_main
from qmse.loss import LOSSES, Loss, sample_directions
from qmse.models import SimpleCNN

_INIT, _ORDER, _DIRECTIONS = 0, 1, 2  # sub-seed streams derived from the run's seed


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved, with the model's arguments, in config.json."""

    dataset: str = "fashion-mnist"  # a name in qmse.data.DATASETS
    data_dir: str | None = None  # None: qmse.data's default search
    train_subset: int | None = None  # train on the first n training images (None: all)
    test_subset: int | None = None  # measure test metrics on the first n test images
    loss: str = "qmse"  # a name in the registry qmse.loss.LOSSES
    loss_params: dict[str, float] = field(default_factory=dict)  # the loss's, e.g. {"sigma": 0.1}
    lr: float = 0.01  # SGD step size
    momentum: float = 0.0  # SGD momentum (PyTorch's convention)
    batch_size: int = 128
    epochs: int = 100
    seed: int = 0  # derives the initial weights, the batch order and QMSE's v
    channels: tuple[int, int] = (32, 64)  # SimpleCNN conv widths (the paper gives none)
    hidden: int = 128  # SimpleCNN hidden linear width
    resample_null: bool = False  # sec. 3.1: redraw QMSE's v_i while ‖J_iᵀv_i‖ ≤ 1e-6 (3 tries)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {tuple(LOSSES)}")
        self.loss_params = _check_loss_params(LOSSES[self.loss], self.loss_params)
        if self.resample_null and LOSSES[self.loss].draw is not sample_directions:
            raise ValueError(
                f"resample_null redraws directions on the unit sphere; loss {self.loss!r} draws "
                f"no such directions (it applies to losses drawn by qmse.loss.sample_directions)"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr}; the learning rate must be a positive number")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}; expected 0 <= momentum < 1")
        for name in ("batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected None or n >= 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}; expected a non-negative integer")
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) != 2:
            raise ValueError(f"channels={self.channels}; expected two conv widths")

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
        raise ValueError(
            f"loss {spec.name!r} needs {', '.join(missing)} in loss_params (qmse train: "
            f"{' '.join(f'--{p}' for p in missing)})"
        )
    if extra := sorted(set(params) - set(spec.params)):
        takes = f"takes only {list(spec.params)}" if spec.params else "takes no parameters"
        raise ValueError(f"loss {spec.name!r} {takes}; got {', '.join(extra)}")
    out = {}
    for name in spec.params:
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"loss parameter {name}={value!r}; expected a number")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"loss parameter {name}={value}; expected a finite number >= 0")
        out[name] = float(value)
    return out


def resolve_device(device: str) -> torch.device:
    """ "auto" → CUDA when available, else CPU; anything else as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_name(cfg: TrainConfig) -> str:
    """A run directory's name within a grid, e.g. "qmse-m0.9-s3"."""
    return f"{cfg.loss}-m{cfg.momentum:g}-s{cfg.seed}"


def subseed(seed: int, stream: int) -> int:
    """A 32-bit seed for `stream` derived from the run's `seed` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class Data(NamedTuple):
    """A dataset ready for training: normalised float32 images and int64 labels on a device."""

    x_train: Tensor  # (N, Ch, H, W)
    y_train: Tensor  # (N,)
    x_test: Tensor  # (M, Ch, H, W)
    y_test: Tensor  # (M,)
    num_classes: int


def channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images (N, Ch, H, W) scaled to [0, 1], each (Ch,)."""
    x = images.to(torch.float64) / 255
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (N, Ch, H, W) → float32 (x/255 − mean) / std per channel.

    The training code uses the mean and std of the full training set (`channel_stats`), also
    when it trains on a subset, so every run of a dataset sees the same inputs.
    """
    x = images.to(torch.float32) / 255
    shape = (1, -1, 1, 1)
    return (x - mean.to(x).view(shape)) / std.to(x).clamp_min(1e-8).view(shape)


def prepare_data(
    source: Any,
    device: torch.device | str = "cpu",
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Data:
    """Training tensors on `device` from a `qmse.data.Dataset`, or from a run's config.

    `source` is a Dataset, or a config (TrainConfig, or the dict of a config.json); a config
    loads its dataset with `qmse.data.load(dataset, data_dir)` and uses its subsets.
    Images are normalised with `normalize` (full-train-set channel statistics); a subset is
    the first `train_subset` training (`test_subset` test) images. Use it to rebuild exactly
    the data a run saw.
    """
    if isinstance(source, (TrainConfig, Mapping)):
        cfg = source if isinstance(source, TrainConfig) else TrainConfig.from_dict(source)
        source = qdata.load(cfg.dataset, cfg.data_dir)
        train_subset, test_subset = cfg.train_subset, cfg.test_subset
    for name in ("train_images", "train_labels", "test_images", "test_labels", "num_classes"):
        if not hasattr(source, name):
            raise TypeError(
                f"source must be a qmse.data.Dataset or a run config, got "
                f"{type(source).__name__} (no attribute {name!r})"
            )
    if source.train_images.dtype != torch.uint8 or source.train_images.dim() != 4:
        raise TypeError(
            f"train_images must be uint8 (N, Ch, H, W), got {source.train_images.dtype} of "
            f"shape {tuple(source.train_images.shape)}"
        )
    n, m = source.train_images.size(0), source.test_images.size(0)
    if train_subset is not None and not 1 <= train_subset <= n:
        raise ValueError(f"train_subset={train_subset}; the training set has {n} images")
    if test_subset is not None and not 1 <= test_subset <= m:
        raise ValueError(f"test_subset={test_subset}; the test set has {m} images")
    mean, std = channel_stats(source.train_images)
    return Data(
        normalize(source.train_images[:train_subset], mean, std).to(device),
        source.train_labels[:train_subset].to(device, torch.int64),
        normalize(source.test_images[:test_subset], mean, std).to(device),
        source.test_labels[:test_subset].to(device, torch.int64),
        int(source.num_classes),
    )


def model_args(cfg: TrainConfig, data: Data) -> dict[str, Any]:
    """SimpleCNN's constructor arguments for `cfg` on `data` (stored in config.json)."""
    _, ch, h, w = data.x_train.shape
    if h != w:
        raise ValueError(f"SimpleCNN needs square images, got {h}×{w}")
    return {
        "in_channels": ch,
        "image_size": h,
        "num_classes": data.num_classes,
        "channels": list(cfg.channels),
        "hidden": cfg.hidden,
    }


def build_model(args: Mapping[str, Any], seed: int) -> SimpleCNN:
    """SimpleCNN(**args) in float32, initialised from `seed` on the CPU (same on any device),
    leaving the global RNG and default dtype as they were."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subseed(seed, _INIT))
        torch.set_default_dtype(torch.float32)
        try:
            return SimpleCNN(**{**args, "channels": tuple(args["channels"])})
        finally:
            torch.set_default_dtype(dtype)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; the run directory keeps the last good epoch."""


def resolved_config(cfg: TrainConfig, data: Data, device: torch.device) -> dict[str, Any]:
    return {
        **dataclasses.asdict(cfg),
        "channels": list(cfg.channels),
        "model": model_args(cfg, data),
        "num_train": data.x_train.size(0),
        "num_test": data.x_test.size(0),
        "provenance": runs.provenance(device),
    }


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Config fields that differ between two runs (epochs and data_dir may change on resume);
    a field missing from an older config.json counts as its default."""
    defaults = {f.name: _default(f) for f in dataclasses.fields(TrainConfig)}
    keys = [k for k in defaults if k not in ("epochs", "data_dir")]
    return [k for k in keys + ["model"] if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k))]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def open_run(
    out: Path, resolved: dict[str, Any], device: torch.device, resume: bool
) -> dict | None:
    """Check `out` and write its config.json; return its checkpoint, or None for a new run."""
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise ValueError(
            f"{out} already holds a run (checkpoint.pt); resume it with resume=True "
            f"(--resume) or choose another output directory"
        )
    if (out / "diverged.json").exists():
        raise NonFiniteLossError(runs.load_json(out / "diverged.json")["message"])
    if not ckpt_path.exists():
        if is_main():
            runs.save_json(out / "config.json", resolved)
        return None
    saved = runs.load_json(out / "config.json")
    if diff := differing_keys(saved, resolved):
        raise ValueError(
            f"{out} holds a run with different {', '.join(diff)} "
            f"({', '.join(f'{k}={saved.get(k)!r}' for k in diff)}); choose another "
            f"output directory or the same settings"
        )
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    if is_main():
        saved.setdefault("resumed", []).append(runs.provenance(device))
        saved["epochs"] = resolved["epochs"]
        runs.save_json(out / "config.json", saved)
        runs.write_jsonl(out / "metrics.jsonl", ckpt["metrics"])  # heals a kill between writes
    return ckpt


def save_epoch(
    out: Path,
    model_state: dict,
    optimizer_state: dict,
    gens: tuple[torch.Generator, torch.Generator],
    rows: list[dict],
) -> None:
    """checkpoint.pt then metrics.jsonl, each atomically (resume rewrites the metrics from
    the checkpoint, so a kill between the two writes loses nothing). Under torchrun only
    rank 0 writes."""
    if not is_main():
        return
    runs.save_torch(
        out / "checkpoint.pt",
        {
            "model": model_state,
            "optimizer": optimizer_state,
            "order_rng": gens[0].get_state(),
            "direction_rng": gens[1].get_state(),
            "epoch": rows[-1]["epoch"],
            "metrics": rows,
        },
    )
    runs.write_jsonl(out / "metrics.jsonl", rows)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a run directory (eval mode, on `device`) and its config dict.

    Rebuild the run's data with `prepare_data(config, device)`.
    """
    run_dir = Path(run_dir)
    for name in ("config.json", "checkpoint.pt"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found; is {run_dir} a qmse run?")
    config = runs.load_json(run_dir / "config.json")
    model = build_model(config["model"], config["seed"])
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def run_generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The batch-order and QMSE-direction generators of a run, on its device."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    order_gen = torch.Generator(gen_device).manual_seed(subseed(seed, _ORDER))
    direction_gen = torch.Generator(gen_device).manual_seed(subseed(seed, _DIRECTIONS))
    return order_gen, direction_gen
