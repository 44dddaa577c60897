"""QMSE step time / MSE step time, measured in one run on one device.

A step is forward + loss + backward + SGD update of the paper's SimpleCNN on one batch, in
the memory layout training uses on the device (`qmse.train.memory_format`).
"qmse+resample" adds the paper's null-space check of v (sec. 3.1, `--resample-null`): one
per-sample VJP of the batch before the step.
The losses are timed interleaved (round-robin over repeats) so that drift in the machine's
speed hits all of them alike; the median of each is reported.

    python -m benchmarks.loss_overhead --device cpu --shape cifar
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qmse.loss import compute_loss, qmse_loss, sample_directions
from qmse.models import SimpleCNN
from qmse.nullspace import resample_null_v
from qmse.train import memory_format

SHAPES = {"mnist": (1, 28, 10), "cifar": (3, 32, 10), "cifar100": (3, 32, 100)}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer around it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(
    losses: list[str], shape: str, batch: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per training step for each loss, `repeats` interleaved measurements each."""
    channels, side, classes = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(0)
    layout = memory_format(device)
    x = torch.randn(batch, channels, side, side, device=device, generator=g)
    x = x.contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    models, opts = {}, {}
    for name in losses:
        torch.manual_seed(0)
        models[name] = SimpleCNN(channels, side, classes).to(device, memory_format=layout)
        opts[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3)
    times: dict[str, list[float]] = {name: [] for name in losses}
    for i in range(repeats + 5):  # the first 5 rounds warm up
        for name in losses:
            sync(device)
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            if name == "qmse+resample":
                v = sample_directions(batch, classes, generator=g, device=device)
                v, _ = resample_null_v(models[name], x, v, generator=g)
                loss = qmse_loss(models[name](x), y, noise=v)
            else:
                loss = compute_loss(name, models[name](x), y, generator=g)
            loss.backward()
            opts[name].step()
            sync(device)
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="cifar")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    device = torch.device(args.device)
    times = step_times(
        ["mse", "qmse", "expected-qmse", "qmse+resample"],
        args.shape,
        args.batch,
        args.repeats,
        device,
    )
    base = statistics.median(times["mse"])
    print(f"device {device}  shape {args.shape}  batch {args.batch}  repeats {args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>14s}  {1e3 * med:8.3f} ms/step   ratio to mse {med / base:6.3f}")


if __name__ == "__main__":
    main()
