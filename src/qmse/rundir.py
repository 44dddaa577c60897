"""The run directory: the files a training run leaves (its config is `qmse.config`'s).

A run directory holds
    kind.json       {"kind": "train-run"} (`qmse.runs.claim`; .lock is the writer's lock)
    config.json     the resolved TrainConfig, the model's constructor arguments, the data
                    read (path, each file's MD5, a fingerprint of the tensors), provenance
    metrics.jsonl   one row per epoch (train.METRIC_KEYS; the full-set ones only in the
                    epochs evaluated, every eval_every and the last): a function of the
                    config alone, so byte-identical whether or not the run was killed
                    and continued
    timings.jsonl   one row per epoch: {"epoch", "wall_s"}, the epoch's seconds
    checkpoint.pt   model, optimizer, both generators' states, the metric and timing rows
    diverged.json   written instead of a new epoch when the loss became non-finite
all written atomically. A run continues from its checkpoint when the same config (epochs
aside) and the same data come again; anything else is refused with what differs. Every
analysis (diagnose, landscape, symmetry) reads runs through `load_run` and rebuilds their
data with `prepare_data`, so none of them imports the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from qmse import data as qdata
from qmse import runs
from qmse.config import TrainConfig
from qmse.distributed import is_main
from qmse.errors import QmseError, UserError
from qmse.keys import content_key
from qmse.models import SimpleCNN

_INIT, _ORDER, _DIRECTIONS = 0, 1, 2  # sub-seed streams derived from the run's seed


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" → CUDA when available, else CPU; anything else as torch.device, checked to
    exist: a CUDA device that is not visible is a ValueError saying what to use instead."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:0 or auto"
        ) from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {device}: no CUDA device is visible (torch {torch.__version__}, built "
                f"for CUDA {torch.version.cuda}); use --device cpu, or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


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


def load_dataset(cfg: TrainConfig) -> qdata.Dataset:
    """cfg's dataset read from disk (`qmse.data.load`), every file checked against its
    published MD5 unless cfg.allow_unverified_data."""
    if cfg.allow_unverified_data:
        return qdata.load(cfg.dataset, cfg.data_dir, allow_unverified=True)
    return qdata.load(cfg.dataset, cfg.data_dir)


def data_record(dataset: Any) -> dict[str, Any]:
    """What config.json records of the data a run read: the folder or archive, each file's
    MD5 and whether it verified (a qmse.data.Dataset; none for data given in memory), and
    the fingerprint of the tensors."""
    return {
        "path": getattr(dataset, "source", "") or None,
        "files": dict(getattr(dataset, "files", {}) or {}),
        "fingerprint": qdata.fingerprint(dataset),
    }


def prepare_data(
    source: Any,
    device: torch.device | str = "cpu",
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Data:
    """Training tensors on `device` from a `qmse.data.Dataset`, or from a run's config.

    `source` is a Dataset, or a config (TrainConfig, or the dict of a config.json); a config
    loads its dataset with `load_dataset` and uses its subsets, and the dict of a run's
    config.json must find the data the run was trained on (its recorded fingerprint).
    Images are normalised with `normalize` (full-train-set channel statistics); a subset is
    the first `train_subset` training (`test_subset` test) images. Use it to rebuild exactly
    the data a run saw.
    """
    if isinstance(source, (TrainConfig, Mapping)):
        cfg = source if isinstance(source, TrainConfig) else TrainConfig.from_dict(source)
        recorded = (
            source.get("data", {}).get("fingerprint") if isinstance(source, Mapping) else None
        )
        source = load_dataset(cfg)
        if recorded is not None and (found := qdata.fingerprint(source)) != recorded:
            raise UserError(
                f"the {cfg.dataset} data found now (data_dir={cfg.data_dir!r}) is not the data "
                f"the run was trained on (fingerprint {found}, recorded {recorded}); point "
                f"data_dir (--data-dir) at the data the run used"
            )
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
        raise UserError(f"train_subset={train_subset}; the training set has {n} images")
    if test_subset is not None and not 1 <= test_subset <= m:
        raise UserError(f"test_subset={test_subset}; the test set has {m} images")
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
        raise UserError(f"SimpleCNN needs square images, got {h}×{w}")
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


class NonFiniteLossError(QmseError, RuntimeError):
    """Training produced a non-finite loss; the run directory keeps the last good epoch."""


def resolved_config(
    cfg: TrainConfig, data: Data, device: torch.device, dataset: Any
) -> dict[str, Any]:
    """config.json of a run: cfg, the model's arguments, the data read from `dataset`
    (`data_record`), the set sizes and provenance."""
    return {
        **dataclasses.asdict(cfg),
        "channels": list(cfg.channels),
        "model": model_args(cfg, data),
        "num_train": data.x_train.size(0),
        "num_test": data.x_test.size(0),
        "data": data_record(dataset),
        "provenance": runs.provenance(device),
    }


# what may change when a run continues: its length, where the data lies, the data check
_MAY_CHANGE = ("epochs", "data_dir", "allow_unverified_data")


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Config fields that differ between two runs (except _MAY_CHANGE); a field missing from
    an older config.json counts as its default."""
    defaults = {f.name: _default(f) for f in dataclasses.fields(TrainConfig)}
    keys = [k for k in defaults if k not in _MAY_CHANGE]
    return [k for k in keys + ["model"] if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k))]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def is_train_run(directory: Path) -> bool:
    """Whether `directory` holds a train run written before runs recorded their kind."""
    try:
        config = runs.load_json(directory / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "loss", "seed"} <= set(config)


def claim_run(out: Path) -> contextlib.AbstractContextManager:
    """`qmse.runs.claim(out, "train-run")` on rank 0, the rank that writes; nothing elsewhere."""
    if not is_main():
        return contextlib.nullcontext(out)
    return runs.claim(out, "train-run", recognise=is_train_run)


def _config(path: Path) -> dict[str, Any]:
    """A run's config.json, checked to be one (a dict with the model and the seed)."""
    config = runs.load_json(path)
    if not isinstance(config, dict) or not {"model", "seed", "loss"} <= set(config):
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise UserError(
            f"{path}: not the config.json of a qmse train run (needs model, seed and loss; "
            f"has {keys}); restore it, or delete the directory to start afresh"
        )
    return config


_CHECKPOINT_KEYS = {"model", "optimizer", "order_rng", "direction_rng", "metrics"}


def load_checkpoint(path: Path) -> dict[str, Any]:
    """checkpoint.pt of a run on the CPU (`qmse.runs.load_torch`: weights only), checked for
    its keys; load_state_dict moves weights and optimizer state to the model's device."""
    ckpt = runs.load_torch(path)
    if not isinstance(ckpt, dict) or not set(ckpt) >= _CHECKPOINT_KEYS:
        raise UserError(
            f"{path}: not a qmse checkpoint (needs {sorted(_CHECKPOINT_KEYS)}); restore it, or "
            f"delete the directory to start afresh"
        )
    return ckpt


def open_run(out: Path, resolved: dict[str, Any], device: torch.device) -> dict | None:
    """Check `out` against the run `resolved` describes and write its config.json; return the
    checkpoint to continue from, or None for a new run. The caller holds `out`'s claim.

    A checkpoint of the same config (epochs aside) trained on the same data (fingerprint) is
    continued; a smaller `epochs` than it holds, other settings or other data are refused,
    with what differs. A run that diverged is refused when asked again with its settings;
    with other settings it is judged on them: a directory without a checkpoint (it diverged
    in its first epoch, or a call failed before) starts afresh.
    """
    ckpt_path, config_path, diverged = (
        out / n for n in ("checkpoint.pt", "config.json", "diverged.json")
    )
    saved = _config(config_path) if config_path.exists() else None
    diff = differing_keys(saved, resolved) if saved is not None else []
    if diverged.exists():
        if saved is not None and not diff:
            raise NonFiniteLossError(runs.load_json(diverged)["message"])
        if not ckpt_path.exists() and is_main():
            diverged.unlink()
    if not ckpt_path.exists():
        if is_main():
            runs.save_json(config_path, resolved)
        return None
    if saved is None:
        raise UserError(
            f"{out} holds checkpoint.pt but no config.json; restore config.json, or delete "
            f"{out} to start afresh"
        )
    if diff:
        ended = ""
        if diverged.exists():
            ended = f" (it diverged in epoch {runs.load_json(diverged).get('epoch')})"
        raise UserError(
            f"{out} holds a run with other settings{ended}: "
            + ", ".join(f"{k} {saved.get(k)!r} there, {resolved.get(k)!r} now" for k in diff)
            + "; give the same settings to continue it, or write elsewhere (another --out)"
        )
    before, now = saved.get("data", {}).get("fingerprint"), resolved["data"]["fingerprint"]
    if before is not None and before != now:
        raise UserError(
            f"{out} was trained on other data: fingerprint {before} (from "
            f"{saved['data'].get('path')}), now {now} (from {resolved['data']['path']}); "
            f"continue it with the data it was trained on, or write elsewhere (another --out)"
        )
    ckpt = load_checkpoint(ckpt_path)  # on the CPU: generator states must stay there
    done, epochs = len(ckpt["metrics"]), resolved["epochs"]
    if done > epochs:
        raise UserError(
            f"{out} holds {done} epochs, more than epochs={epochs} (--epochs): give "
            f"--epochs {done} or more to continue it (its first {epochs} epochs are the first "
            f"rows of metrics.jsonl), or write elsewhere (another --out)"
        )
    if is_main():
        if done < epochs:
            saved.setdefault("resumed", []).append(runs.provenance(device))
            saved["epochs"] = epochs
            runs.save_json(config_path, saved)
        _heal(out, ckpt)
    return ckpt


def _heal(out: Path, ckpt: dict) -> None:
    """Rewrite metrics.jsonl and timings.jsonl from the checkpoint where they differ (a kill
    between the checkpoint's write and theirs)."""
    for name, rows in (("metrics.jsonl", ckpt["metrics"]), ("timings.jsonl", ckpt.get("timings"))):
        if rows is not None and runs.read_jsonl(out / name) != rows:
            runs.write_jsonl(out / name, rows)


def save_epoch(
    out: Path,
    model_state: dict,
    optimizer_state: dict,
    gens: tuple[torch.Generator, torch.Generator],
    rows: list[dict],
    timings: list[dict],
) -> None:
    """checkpoint.pt then metrics.jsonl and timings.jsonl, each atomically (a continued run
    rewrites the latter from the checkpoint, so a kill between the writes loses nothing).
    Under torchrun only rank 0 writes."""
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
            "timings": timings,
        },
    )
    runs.write_jsonl(out / "metrics.jsonl", rows)
    runs.write_jsonl(out / "timings.jsonl", timings)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a run directory (eval mode, on `device`) and its config dict.

    Rebuild the run's data with `prepare_data(config, device)`. A missing, damaged or foreign
    config.json or checkpoint.pt, or one holding non-finite weights, is an error naming the
    file.
    """
    run_dir = Path(run_dir)
    for name in ("config.json", "checkpoint.pt"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name} not found; is {run_dir} a qmse run?")
    config = _config(run_dir / "config.json")
    model = build_model(config["model"], config["seed"])
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"{run_dir / 'checkpoint.pt'}: its weights do not fit the model of config.json "
            f"({str(e).splitlines()[0]}); the two files come from different runs"
        ) from e
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise UserError(
            f"{run_dir / 'checkpoint.pt'}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}: the run diverged; diagnose a run that finished"
        )
    return model.to(device).eval(), config


def run_key(run_dir: str | Path, **arguments: Any) -> str:
    """The content key (`qmse.keys.content_key`) of a result computed from the run in
    `run_dir` with `arguments`: it changes when the run's config.json or checkpoint.pt do
    (an extended run, another run written there), so a cache stored with it is not served
    stale."""
    run_dir = Path(run_dir)
    return content_key(arguments, files=[run_dir / "config.json", run_dir / "checkpoint.pt"])


def run_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The batch-order and noise generators of a run. They live on the CPU whatever the run's
    device (a draw is made once per epoch and moved), so a run draws the same batches and
    the same noise on every device."""
    order_gen = torch.Generator().manual_seed(subseed(seed, _ORDER))
    direction_gen = torch.Generator().manual_seed(subseed(seed, _DIRECTIONS))
    return order_gen, direction_gen
