"""Everything that needs a GPU, in one command: the CUDA tests and the speed benchmarks at
small sizes, in one report (`make gpu-check`).

1. `pytest -m cuda`: every device path against the CPU (tests/test_cuda.py);
2. benchmarks.loss_overhead: QMSE's step time against MSE's on CIFAR-shaped batches;
3. benchmarks.train_speed: loop styles, layouts, torch.compile, TF32, vmap/loop batching;
4. benchmarks.grid_time: the paper's grid, as `qmse reproduce` runs it, on random data.

Each part runs in its own process under a time limit, so the whole stays under 8 minutes;
a part that fails or runs out of time is reported as such and the others still run. The
report (Markdown) holds the device, versions, commands and their outputs. Without a CUDA
device it prints one line and exits 0; otherwise the exit status is 1 if a part failed.

    python -m benchmarks.gpu_check --out runs/gpu-check/report.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from qmse import runs

# (title, command, seconds allowed): the limits add up to 7 minutes
PARTS = [
    ("CUDA tests", ["-m", "pytest", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs"], 180),
    (
        "QMSE's step against MSE's",
        ["-m", "benchmarks.loss_overhead", "--device", "cuda", "--repeats", "30"],
        45,
    ),
    (
        "training loop styles",
        ["-m", "benchmarks.train_speed", "--device", "cuda", "--samples", "8192"]
        + ["--models", "8", "32", "--repeats", "2"],
        120,
    ),
    (
        "the paper's grid on random data",
        ["-m", "benchmarks.grid_time", "--device", "cuda", "--datasets", "mnist", "cifar10"]
        + ["--epochs", "1", "--seeds", "1", "--parallel", "4"],
        75,
    ),
]


def run_part(argv: list[str], limit: float, cwd: Path) -> tuple[str, float, str]:
    """(status, seconds, output) of `python argv` run in `cwd` for at most `limit` seconds."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=limit
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = f"stopped after {limit:.0f} s"
        output = "".join(
            b.decode(errors="replace") if isinstance(b, bytes) else b or ""
            for b in (e.stdout, e.stderr)
        )
    return status, time.perf_counter() - t0, output


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/gpu-check/report.md", help="the report (Markdown)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device is visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}); nothing to check"
        )
        return 0
    root = Path(__file__).resolve().parent.parent
    out = Path(args.out)
    lines = [
        "# qmse gpu-check",
        "",
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}, git {runs.git_commit()}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; command: `make gpu-check`.",
        "",
    ]
    with runs.claim(out.parent, "benchmark", recognise=lambda d: (d / out.name).exists()):
        failed = _run_parts(lines, root, out)
    print(f"gpu-check: report in {out}" + (" (a part failed)" if failed else ""))
    return 1 if failed else 0


def _run_parts(lines: list[str], root: Path, out: Path) -> bool:
    """Run every part, rewriting the report after each; whether a part failed."""
    failed = False
    for title, argv, limit in PARTS:
        print(f"gpu-check: {title} ...", file=sys.stderr, flush=True)
        status, seconds, output = run_part(argv, limit, root)
        failed |= status != "ok"
        tail = "\n".join(output.strip().splitlines()[-60:])
        lines += [
            f"## {title}: {status}, {seconds:.0f} s",
            "",
            f"    python {' '.join(argv)}",
            "",
            "```",
            tail,
            "```",
            "",
        ]
        runs.atomic_write(out, "\n".join(lines))  # what is done so far survives a kill
    return failed


if __name__ == "__main__":
    sys.exit(main())
