"""Loss barriers between two ResNets at several widths, straight and matched, with and
without BatchNorm recomputation (docs/symmetry.md, section 6).

For each width multiplier w, two `qmse.models.ResNet`s (`--blocks` basic blocks a stage,
16w/32w/64w channels) are trained from seeds 0 and 1 on the first `--train` Fashion-MNIST
training images, zero-padded to 32×32 before normalising: ½‖r‖² on one-hot targets (the
project's MSE), SGD with momentum 0.9, batch 128, `--epochs` epochs, the step size rising
linearly to `--lr` over the first epoch and falling along a cosine to 0 at the end (without
the warm-up, width 4 at lr 0.1 blew up in its first steps), no augmentation. Then, on the
first `--eval` training images, at `--points` values of α:

  straight  (1 − α)·a + α·b;
  matched   (1 − α)·a + α·π(b), π from weight matching with the traced spec
            (`qmse.tracespec`, the residual streams sharing one permutation);

each with the BatchNorm statistics
  recompute at every α recomputed on the first `--stats` training images (one batch), as
            REPAIR's reset does (Jordan et al. 2022; `buffers="recompute"`);
  blend     the models' own running statistics blended like the weights (`buffers="blend"`).

Writes one JSON (`--out`): what was run, per width the training curves, test accuracy, the
four paths, their loss and accuracy barriers, the CPU seconds of each stage and the wall
seconds of the width; a width whose training loss turns non-finite (ResNet-20 at width 4) is
recorded with the step at which it did, and not interpolated. The JSON is rewritten after
every width; run again with the same arguments, the script keeps the widths already in it and
runs the rest. No checkpoints are written. The runs of docs/symmetry.md (ResNet-8, then
ResNet-20):

    OMP_NUM_THREADS=1 python -m benchmarks.symmetry_width --out docs/symmetry/width.json
    OMP_NUM_THREADS=1 python -m benchmarks.symmetry_width --blocks 3 \
        --out docs/symmetry/width-resnet20.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qmse import data as qdata
from qmse.landscape import barrier, interpolation_barriers, recompute_statistics
from qmse.loss import mse_loss_half
from qmse.models import ResNet
from qmse.rundir import prepare_data
from qmse.runs import provenance, save_json
from qmse.symmetry import permutation_spec


def padded_fashion_mnist(train: int, test: int):
    """The first `train` / `test` Fashion-MNIST images, zero-padded to 32×32, normalised with
    the padded training set's statistics: (x_train, y_train, x_test, y_test)."""
    ds = qdata.load("fashion-mnist")
    pad = dataclasses.replace(
        ds,
        train_images=F.pad(ds.train_images, (2, 2, 2, 2)),  # (60000, 1, 32, 32)
        test_images=F.pad(ds.test_images, (2, 2, 2, 2)),  # (10000, 1, 32, 32)
    )
    d = prepare_data(pad, train_subset=train, test_subset=test)
    return d.x_train, d.y_train, d.x_test, d.y_test


def train(width: int, blocks: int, seed: int, x, y, epochs: int, lr: float) -> tuple:
    """A ResNet trained on (x, y); returns (model in eval mode, mean ½‖r‖² per epoch, None),
    or, when a step's loss is not finite, (None, the finished epochs' curve, that step's
    number counted from 1): a diverged width is recorded, not an error."""
    torch.manual_seed(seed)
    model = ResNet(1, 10, width=width, blocks=blocks)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps, warm = epochs * math.ceil(len(x) / 128), math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    g = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=g).split(128):
            step += 1
            opt.zero_grad()
            loss = mse_loss_half(model(x[idx]), y[idx])
            if not math.isfinite(loss.item()):
                return None, curve, step
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item() * len(idx)
        curve.append(total / len(x))
    return model.eval(), curve, None


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--blocks", type=int, default=1, help="basic blocks a stage (3: ResNet-20)")
    p.add_argument("--train", type=int, default=2000, help="first N training images")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eval", type=int, default=500, help="images the paths are evaluated on")
    p.add_argument("--stats", type=int, default=500, help="images BN statistics come from")
    p.add_argument("--points", type=int, default=9, help="values of alpha in [0, 1]")
    p.add_argument("--test", type=int, default=1000, help="test images for accuracy")
    p.add_argument("--out", default="runs/symmetry-width/width.json")
    args = p.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    x, y, x_test, y_test = padded_fashion_mnist(args.train, args.test)
    x_eval, y_eval = x[: args.eval], y[: args.eval]
    x_stats = x[: args.stats]
    result = {"settings": vars(args), "torch_threads": torch.get_num_threads(), "widths": {}}
    if Path(args.out).exists():  # resume a run of the same settings
        done = json.loads(Path(args.out).read_text())
        if done["settings"] == result["settings"]:
            result["widths"] = done["widths"]
    for width in args.widths:
        if str(width) in result["widths"]:
            print(f"width {width}: in {args.out} already", flush=True)
            continue
        start, wall = time.process_time(), time.perf_counter()
        models, runs = [], []
        for seed in (0, 1):
            model, curve, diverged = train(width, args.blocks, seed, x, y, args.epochs, args.lr)
            if diverged:
                runs.append({"seed": seed, "train_loss": curve, "diverged_at_step": diverged})
                break
            models.append(model)
            runs.append({"seed": seed, "train_loss": curve,
                         "test_accuracy": accuracy(model, x_test, y_test)})  # fmt: skip
        train_cpu = time.process_time() - start
        if diverged:  # nothing to interpolate; the next run of the command skips it too
            result["widths"][str(width)] = {
                "runs": runs, "train_cpu_s": train_cpu, "wall_s": time.perf_counter() - wall,
            }  # fmt: skip
            save_json(args.out, {**result, "provenance": provenance("cpu")})
            print(f"width {width}, seed {seed}: step {diverged}'s loss not finite", flush=True)
            continue
        spec = permutation_spec(models[0])
        row = {"runs": runs, "train_cpu_s": train_cpu, "paths": {}}
        for mode in ("recompute", "blend"):
            start = time.process_time()
            res = interpolation_barriers(
                *models, "mse", (x_eval, y_eval), spec=spec, points=args.points, buffers=mode,
                bn_data=x_stats if mode == "recompute" else None,
            )  # fmt: skip
            for path in ("naive", "aligned"):
                row["paths"][f"{path}-{mode}"] = {
                    "loss": res[f"{path}_loss"].tolist(),
                    "accuracy": res[f"{path}_accuracy"].tolist(),
                    "barrier": res[f"{path}_barrier"],
                    "accuracy_drop": barrier(-res[f"{path}_accuracy"]),
                }
            row[f"eval_cpu_s_{mode}"] = time.process_time() - start
        ends = [recompute_statistics(m, x_stats) for m in models]
        row["test_accuracy_recomputed"] = [accuracy(m, x_test, y_test) for m in ends]
        row["permutations"] = len(spec.axes)
        row["wall_s"] = time.perf_counter() - wall
        result["widths"][str(width)] = row
        save_json(args.out, {**result, "provenance": provenance("cpu")})  # after every width
        print(
            f"width {width}: train {train_cpu:.0f} CPU s, barriers "
            + ", ".join(f"{k} {v['barrier']:.4f}" for k, v in row["paths"].items()),
            flush=True,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
