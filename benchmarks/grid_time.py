"""Wall time of the paper's grid, run as `qmse reproduce` runs it, on random data.

The grid: MNIST, CIFAR-10 and CIFAR-100 × {MSE, QMSE} × momentum {0, 0.9} × seeds, trained
by `qmse.reproduce.run_grid` (evaluation of the full train and test sets after every epoch,
checkpoints, figure and report) on uniformly random uint8 images and labels of each data
set's real size and shape: the real files are not needed, and the time does not depend on
the pixels. Prints the measured seconds per data set and, scaled linearly in epochs × seeds,
the projection to the paper's 100 epochs × 5 seeds.

    python -m benchmarks.grid_time --device cuda --epochs 100 --seeds 5 --parallel 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import torch

from qmse.reproduce import grid_configs, run_grid
from qmse.rundir import resolve_device

SHAPES = {  # dataset -> (train images, test images, channels, side, classes)
    "mnist": (60000, 10000, 1, 28, 10),
    "cifar10": (50000, 10000, 3, 32, 10),
    "cifar100": (50000, 10000, 3, 32, 100),
}


def random_dataset(name: str, seed: int = 0) -> SimpleNamespace:
    """A qmse.data.Dataset stand-in: random uint8 images and labels of `name`'s shape."""
    n_train, n_test, ch, side, classes = SHAPES[name]
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, ch, side, side), generator=g, dtype=torch.uint8)

    return SimpleNamespace(
        name=name,
        train_images=images(n_train),
        train_labels=torch.randint(0, classes, (n_train,), generator=g),
        test_images=images(n_test),
        test_labels=torch.randint(0, classes, (n_test,), generator=g),
        num_classes=classes,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (auto)")
    p.add_argument("--datasets", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--epochs", type=int, default=1, help="epochs per run (1)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per setting (1)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained at once (1)")
    args = p.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.epochs} epochs × {args.seeds} seeds, --parallel {args.parallel}, random data"
    )
    scale = 100 * 5 / (args.epochs * args.seeds)
    total = 0.0
    for dataset in args.datasets:
        configs = grid_configs(dataset, seeds=args.seeds, epochs=args.epochs)
        data = random_dataset(dataset)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            run_grid(configs, out, dataset=data, device=device, parallel=args.parallel, quiet=True)
            seconds = time.perf_counter() - t0
        total += seconds
        print(
            f"{dataset:<10}{len(configs):>4} runs {seconds:>10.1f} s   "
            f"projected to 100 epochs × 5 seeds: {seconds * scale / 60:>8.1f} min"
        )
    print(f"{'all':<10}{'':>9} {total:>10.1f} s   projected: {total * scale / 60:.1f} min")


if __name__ == "__main__":
    main()
