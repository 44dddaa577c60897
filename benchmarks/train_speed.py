"""Seconds per model-epoch of SimpleCNN training, several loop styles, measured in one run.

An epoch here is `--samples` random images of MNIST or CIFAR shape, batch 128, training
steps only (no evaluation). Styles:
  naive            DataLoader(shuffle=True) on CPU tensors, each batch copied to the device,
                   loss read with .item() every step (the usual tutorial loop)
  resident         qmse.train's loop with one model (train_run): data on the device in
                   `memory_format(device)`, index slices of a seeded permutation, metrics
                   accumulated on the device and read once per epoch (MSE, then QMSE)
  resident NCHW / resident channels_last
                   the resident MSE loop in the other memory layout (an option measured)
  resident compile the resident MSE loop with its forward under torch.compile
  resident tf32    (CUDA only) with TF32 matmuls and convolutions allowed
  vmap M, loop M   the same loop with M MSE models stacked and trained at once (train_many),
                   batching="vmap" (one batched model) and "loop" (models one after another)
Each style runs one warm-up epoch, then `--repeats` timed epochs, round-robin over the
styles; the median is reported, with the naive loop's time divided by each and the resident
MSE loop's (sequential runs: one model after another) divided by each (higher is faster).

    python -m benchmarks.train_speed --device cpu --shape mnist --samples 2048 --models 8 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.loss_overhead import SHAPES, sync
from qmse.config import TrainConfig
from qmse.loss import compute_loss
from qmse.rundir import Data, build_model, run_generators
from qmse.stacked import stack_parameters, stacked_forwards
from qmse.train import _train_epoch, memory_format


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _interleaved(epochs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each epoch function, after one warm-up call each, timed round-robin
    so that drift in the machine's speed (other jobs) hits every style alike."""
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for i in range(repeats + 1):
        for name, epoch_fn in epochs.items():
            sync(device)
            t0 = time.perf_counter()
            epoch_fn()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(
    shape: str, samples: int, models: list[int], repeats: int, device: torch.device
) -> dict[str, float]:
    """Seconds per model-epoch for each style (see the module docstring)."""
    channels, side, classes = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(samples, channels, side, side, generator=g)
    y_cpu = torch.randint(0, classes, (samples,), generator=g)
    args = {
        "in_channels": channels,
        "image_size": side,
        "num_classes": classes,
        "channels": [32, 64],
        "hidden": 128,
    }
    layout = memory_format(device)
    other = torch.contiguous_format if layout == torch.channels_last else torch.channels_last
    other_name = "NCHW" if other == torch.contiguous_format else "channels_last"

    def stacked(
        loss: str, fmt: torch.memory_format, M: int, batching: str, wrap: Callable = lambda f: f
    ) -> Callable:
        x = x_cpu.to(device).contiguous(memory_format=fmt)
        data = Data(x, y_cpu.to(device), x[:1], y_cpu[:1].to(device), classes)
        params = stack_parameters([build_model(args, s).to(device) for s in range(M)], fmt)
        bufs = {k: torch.zeros_like(p) for k, p in params.items()}
        cfgs = [TrainConfig(dataset="random", loss=loss, lr=0.01, seed=s) for s in range(M)]
        forward = wrap(stacked_forwards(args, batching)[0])
        gens = [run_generators(s) for s in range(M)]
        return partial(_train_epoch, forward, params, bufs, cfgs, data, gens, _NoBar())

    def resident(loss: str, fmt: torch.memory_format, wrap: Callable = lambda f: f) -> Callable:
        return stacked(loss, fmt, 1, "loop", wrap)

    model = build_model(args, 0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_cpu, y_cpu), batch_size=128, shuffle=True
    )

    def naive() -> None:
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = compute_loss("mse", model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()

    epochs: dict[str, Callable] = {
        "naive": naive,
        "resident mse": resident("mse", layout),
        "resident qmse": resident("qmse", layout),
        f"resident {other_name}": resident("mse", other),
        "resident compile": resident("mse", layout, torch.compile),
    }
    if device.type == "cuda":
        mse = resident("mse", layout)

        def tf32() -> None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            try:
                mse()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        epochs["resident tf32"] = tf32
    for M in models:
        for batching in ("vmap", "loop"):
            epochs[f"{batching} M={M}"] = stacked("mse", layout, M, batching)
    times = _interleaved(epochs, repeats, device)
    return {k: v / int(k.split("=")[1]) if "=" in k else v for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cifar", help="default: cifar")
    p.add_argument("--samples", type=int, default=50000, help="images per epoch (50000)")
    p.add_argument("--models", type=int, nargs="+", default=[8, 32, 128], help="(8 32 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per style (3)")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.shape}-shaped, {args.samples} samples/epoch, batch 128"
    )
    times = measure(args.shape, args.samples, args.models, args.repeats, device)
    per_sample = {k: v / args.samples for k, v in times.items()}
    full = {"mnist": 60000, "cifar": 50000, "cifar100": 50000}[args.shape]
    print(
        f"{'style':<24}{'s/model-epoch':>15}{'(full epoch)':>14}{'naive/this':>12}{'seq/this':>10}"
    )
    for k, v in times.items():
        print(
            f"{k:<24}{v:>15.4f}{per_sample[k] * full:>14.3f}{times['naive'] / v:>12.2f}"
            f"{times['resident mse'] / v:>10.2f}"
        )
    print(f"QMSE/MSE (resident): {times['resident qmse'] / times['resident mse']:.3f}")


if __name__ == "__main__":
    main()
