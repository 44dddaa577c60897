"""What every subcommand shares: the help formatter and common options."""

from __future__ import annotations

import argparse

Formatter = argparse.ArgumentDefaultsHelpFormatter


def add_backend_args(p: argparse.ArgumentParser, ray_unit: str) -> None:
    """--backend/--address/--cpus-per-task/--gpus-per-task of the sweep commands."""
    p.add_argument(
        "--backend",
        default="local",
        choices=["local", "ray"],
        help=f"local: this process; {ray_unit}",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster: auto, HOST:PORT; default: $RAY_ADDRESS, else a new local instance",
    )
    p.add_argument("--cpus-per-task", type=float, default=1, help="Ray: CPUs (threads) per task")
    p.add_argument("--gpus-per-task", type=float, default=0, help="Ray: GPUs per task (0.25 ok)")


def add_unverified(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-unverified-data",
        action="store_true",
        help="train on data files whose MD5 is not the published one (recorded in config.json)",
    )
