"""Where a finished run stopped: the end-of-training diagnosis of its final checkpoint.

Two parts, written together to the run directory's diagnosis.json:

- `qmse.diagnose.diagnose_run` on a fixed subset of `samples` training images (the same
  images for every run of the same data): the paper's stopping case (sec. 2.2) with its
  tolerances, the gradient geometry, and the extreme Hessian eigenvalues (Lanczos) of MSE
  and of the run's own loss (its expectation for a random one). The subset keeps the
  per-sample Jacobians and the Hessian products cheap;
- `full_set_state` on the whole training (sub)set: the norm of the full-batch gradient of
  MSE and of the run's own loss, and the distribution of the residual norms ‖r_i‖ with the
  fraction of samples below each of RESIDUAL_THRESHOLDS.

The file is keyed by content (`qmse.rundir.run_key` of the run and the arguments), so a run
extended since, or other arguments, give a new diagnosis and never a stale one; it has one
writer, `qmse.diagnose.write_diagnosis`, and keeps `qmse diagnose`'s layout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import grad

from qmse import diagnose
from qmse.curvature import eval_mode, loss_fn
from qmse.loss import get_loss
from qmse.rundir import load_run, prepare_data, run_key

# ‖r_i‖ thresholds counted on the full training set. 1e-3 is classify_stop's default
# tol_residual (case 1, the sample is fit); 0.1 is a sample fit to a tenth of the distance
# between two one-hot targets (√2).
RESIDUAL_THRESHOLDS = (1e-3, 1e-2, 1e-1)
CHUNK = 500  # samples per forward and backward pass on the full set


def full_set_state(
    model: nn.Module, x: Tensor, labels: Tensor, criteria: Sequence[str]
) -> dict[str, object]:
    """On all of (x, labels), in eval mode: the norm of the gradient of each criterion's mean
    (registered deterministic loss names; "mse" is ½‖r‖², eq. 3), the min/median/max of the
    residual norms ‖r_i‖ = ‖onehot(y_i) − f(x_i)‖ and the fraction of samples with ‖r_i‖
    below each of RESIDUAL_THRESHOLDS. Chunked: the gradient is the sum of the chunks'
    gradients weighted by their share of the samples."""
    n, mse = x.size(0), get_loss("mse")
    norms = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, n, CHUNK):
            out = model(x[start : start + CHUNK]).double()  # (b, C)
            norms.append(
                (2 * mse.expected(out, labels[start : start + CHUNK])).sqrt()
            )  # (b,) ‖r_i‖
    r = torch.cat(norms)  # (n,)
    grad_norms = {}
    for criterion in criteria:
        total = None
        for start in range(0, n, CHUNK):
            batch = (x[start : start + CHUNK], labels[start : start + CHUNK])
            w, loss_at = loss_fn(model, criterion, batch)
            with eval_mode(model):
                g = grad(loss_at)(w) * (batch[0].size(0) / n)  # (P,)
            total = g if total is None else total + g
        grad_norms[criterion] = total.double().norm().item()
    q = torch.quantile(r, torch.tensor([0.0, 0.5, 1.0], dtype=r.dtype)).tolist()
    return {
        "n_samples": n,
        "grad_norm": grad_norms,
        "residual_norm": dict(zip(("min", "median", "max"), q)),
        "fraction_below": {f"{t:g}": (r < t).double().mean().item() for t in RESIDUAL_THRESHOLDS},
    }


def diagnose_end(
    run_dir: str | Path,
    *,
    samples: int = 256,
    seed: int = 0,
    lanczos_steps: int = 20,
    trace_samples: int = 4,
    device: torch.device | str = "cpu",
    quiet: bool = True,
) -> dict:
    """The end-of-training diagnosis of the run in `run_dir` (module docstring), from
    diagnosis.json when its key matches, else computed and written there. `samples`,
    `seed`, `lanczos_steps` and `trace_samples` go to `qmse.diagnose.diagnose_run` (one
    Lanczos run per loss: its Ritz values are the extremes and the spectral density; the
    extremes converge first, and a negative Ritz value proves a negative eigenvalue). About
    30 s for a SimpleCNN run with two losses on one loaded CPU core."""
    run_dir = Path(run_dir)
    arguments = {
        "samples": samples,
        "seed": seed,
        "lanczos_steps": lanczos_steps,
        "trace_samples": trace_samples,
        "thresholds": list(RESIDUAL_THRESHOLDS),
    }
    key = run_key(run_dir, diagnosis="end", **arguments)
    if (held := diagnose.cached_diagnosis(run_dir, key)) is not None:
        return held
    t0 = time.perf_counter()
    result = diagnose.run_diagnosis(
        run_dir,
        n_samples=samples,
        seed=seed,
        device=device,
        quiet=quiet,
        lanczos_steps=lanczos_steps,
        slq_vectors=1,
        trace_samples=trace_samples,
    )
    model, config = load_run(run_dir, device)
    data = prepare_data(config, device)
    criteria = diagnose.run_criteria(config["loss"])
    result = {
        "key": key,
        **result,
        "arguments": arguments,
        "full_set": full_set_state(model, data.x_train, data.y_train, criteria),
        "wall_s": time.perf_counter() - t0,
    }
    diagnose.write_diagnosis(run_dir, result)
    return result
