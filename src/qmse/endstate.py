"""Where a finished run stopped: the diagnosis of a run directory's final checkpoint
(`qmse.diagnose.diagnose_model` on the run's model and data), cached in its diagnosis.json.

`diagnose_run` (`qmse diagnose RUN`) writes the model-level diagnosis; `diagnose_end` (the
grid's end-of-training diagnosis) two parts:

- `run_diagnosis` on a fixed subset of `samples` training images (the same
  images for every run of the same data): the paper's stopping case (sec. 2.2) with its
  tolerances, the gradient geometry, and the extreme Hessian eigenvalues (Lanczos) of MSE
  and of the run's own loss (its expectation for a random one). The subset keeps the
  per-sample Jacobians and the Hessian products cheap;
- `full_set_state` on the whole training (sub)set: the norm of the full-batch gradient of
  MSE and of the run's own loss, and the distribution of the residual norms ‖r_i‖ with the
  fraction of samples below each of RESIDUAL_THRESHOLDS.

The file is keyed by content (`qmse.rundir.run_key` of the run and the arguments), so a run
extended since, or other arguments, give a new diagnosis and never a stale one; it has one
writer, `write_diagnosis`, and keeps `qmse diagnose`'s layout.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad

from qmse import diagnose
from qmse.curvature import eval_mode, loss_fn
from qmse.errors import UserError
from qmse.loss import get_loss
from qmse.rundir import load_run, prepare_data, run_key
from qmse.runs import (
    atomic_write,
    claim,
    load_json,
    provenance,
    read_jsonl,
    save_figure,
    save_json,
)

# ‖r_i‖ thresholds counted on the full training set. 1e-3 is classify_stop's default
# tol_residual (case 1, the sample is fit); 0.1 is a sample fit to a tenth of the distance
# between two one-hot targets (√2).
RESIDUAL_THRESHOLDS = (1e-3, 1e-2, 1e-1)
CHUNK = 500  # samples per forward and backward pass on the full set


def run_criteria(run_loss: str) -> tuple[str, ...]:
    """The Hessian losses of a run trained with `run_loss`: MSE (the yardstick of sec. 2.2)
    and the run's own loss, or for a random one its registered mean-gradient loss (QMSE's is
    expected-QMSE, docs/theory.md "Its expectation over v")."""
    spec = get_loss(run_loss)
    own = spec.mean_gradient_loss if spec.random else spec.name
    if own is None:
        raise UserError(
            f"loss {run_loss!r} is random and registers no mean_gradient_loss to diagnose"
        )
    return ("mse",) if own == "mse" else ("mse", own)


def run_diagnosis(
    run_dir: str | os.PathLike,
    *,
    n_samples: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    quiet: bool = False,
    **options: Any,
) -> dict:
    """The diagnosis of a finished `qmse train` run on a fixed subset of its training set,
    computed (nothing is read from or written to a cache: see `diagnose_run`).

    The subset is `n_samples` training images drawn without replacement by a generator
    seeded with `seed` (the same images for every run of the same data: comparable). The
    Hessian losses are `run_criteria` of the run's loss. `options` go to `diagnose_model`."""
    run_dir = Path(run_dir)
    model, run_config = load_run(run_dir, device)
    data = prepare_data(run_config, device)
    n_train = data.x_train.shape[0]
    if not 1 <= n_samples <= n_train:
        raise UserError(f"n_samples={n_samples}; the run's training set has {n_train} images")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n_train, generator=gen)[:n_samples].sort().values.to(data.x_train.device)
    result = diagnose.diagnose_model(
        model,
        run_criteria(run_config["loss"]),
        (data.x_train[idx], data.y_train[idx]),
        seed=seed,
        quiet=quiet,
        **options,
    )
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    return {
        "config": {"run_dir": str(run_dir), "n_samples": n_samples, "seed": seed, **options},
        "run": {
            "loss": run_config["loss"],
            "lr": run_config.get("lr"),
            "epochs": run_config.get("epochs"),
            "seed": run_config.get("seed"),
            "final_metrics": metrics[-1] if metrics else None,
        },
        **result,
        "provenance": provenance(device),
    }


def cached_diagnosis(out_dir: str | os.PathLike, key: str) -> dict | None:
    """The diagnosis.json of `out_dir` if it was computed under `key` (the same run contents
    and arguments: not stale), else None."""
    path = Path(out_dir) / "diagnosis.json"
    if path.exists():
        held = load_json(path)
        if isinstance(held, dict) and held.get("key") == key:
            return held
    return None


def write_diagnosis(out_dir: str | os.PathLike, diagnosis: dict) -> None:
    """The one writer of diagnosis.json (and its summary diagnosis.txt), in a directory
    claimed as a diagnosis (or the train run it diagnoses)."""
    out_dir = Path(out_dir)
    with claim(out_dir, "diagnosis", accept=("train-run",)):
        save_json(out_dir / "diagnosis.json", diagnosis)
        atomic_write(out_dir / "diagnosis.txt", summary_text(diagnosis))


def diagnose_run(
    run_dir: str | os.PathLike,
    *,
    n_samples: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    out_dir: str | os.PathLike | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict:
    """`run_diagnosis`, cached in `out_dir` (default: the run directory): a diagnosis.json
    with the same key (the run's config.json and checkpoint.pt, and these arguments) is
    returned as it is; else the diagnosis is computed and written there (`write_diagnosis`,
    with its key)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    key = run_key(run_dir, diagnosis="run", n_samples=n_samples, seed=seed, **options)
    if (held := cached_diagnosis(out_dir, key)) is not None:
        return held
    result = run_diagnosis(
        run_dir, n_samples=n_samples, seed=seed, device=device, quiet=quiet, **options
    )
    result = {"key": key, **result}
    write_diagnosis(out_dir, result)
    return result


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _summary_rows(d: dict) -> list[tuple[str, str]]:
    ws, ps, st = d["geometry"]["whole_set"], d["geometry"]["per_sample"], d["stop"]
    fm = (d.get("run") or {}).get("final_metrics") or {}
    rows = [
        ("run loss", str((d.get("run") or {}).get("loss", "-"))),
        ("epochs", str(fm.get("epoch", "-"))),
        ("train acc (full set)", _fmt(fm["train_acc"]) if "train_acc" in fm else "-"),
        ("test acc", _fmt(fm["test_acc"]) if "test_acc" in fm else "-"),
        ("samples / params", f"{d['n_samples']} / {d['n_params']}"),
        ("stop case (whole set)", f"{st['whole_set_case']} {st['whole_set_label']}"),
        ("per-sample cases", " ".join(f"{k}={v}" for k, v in st["per_sample_counts"].items())),
        ("½‖r‖² mean", _fmt(ws["mse"])),
        ("‖∇ mean ½‖r‖²‖", _fmt(ws["mse_grad_norm"])),
        ("‖𝐉‖₂ (set)", _fmt(ws["jacobian_spec"])),
        ("ratio ‖𝐉ᵀR‖/(‖𝐉‖₂‖R‖)", _fmt(ws["ratio"])),
        ("per-sample ‖r‖ median", _fmt(ps["residual_norm"]["median"])),
        ("per-sample ratio median", _fmt(ps["ratio"]["median"])),
        ("per-sample ratio min", _fmt(ps["ratio"]["min"])),
        ("per-sample σ_min(J) min", _fmt(ps["jacobian_smin"]["min"])),
    ]
    for loss, h in d["hessian"].items():
        rows += [
            (f"[{loss}] loss", _fmt(h["loss"])),
            (f"[{loss}] ‖∇loss‖", _fmt(h["grad_norm"])),
            (f"[{loss}] λ_max", _fmt(h["top"][0])),
            (f"[{loss}] λ_min", _fmt(h["bottom"][0])),
            (f"[{loss}] label", h["label"]),
            (f"[{loss}] trace ± se", f"{_fmt(h['trace'])} ± {_fmt(h['trace_se'])}"),
        ]
    return rows


def summary_text(d: dict) -> str:
    """A short human-readable summary of a `diagnose_model`/`diagnose_run` result."""
    rows = _summary_rows(d)
    width = max(len(k) for k, _ in rows)
    tol = d["stop"]["tolerances"]
    head = "tolerances: " + ", ".join(f"{k}={v:g}" for k, v in tol.items())
    return "\n".join([head, *(f"{k:<{width}}  {v}" for k, v in rows)]) + "\n"


def compare_text(a: dict, b: dict, names: tuple[str, str]) -> str:
    """Two diagnoses side by side (rows present in either; '-' where one lacks a row)."""
    ra, rb = dict(_summary_rows(a)), dict(_summary_rows(b))
    keys = list(ra) + [k for k in rb if k not in ra]
    width = max(len(k) for k in keys)
    col = max(12, *(len(v) for v in (*ra.values(), *rb.values(), *names)))
    lines = [f"{'':<{width}}  {names[0]:<{col}}  {names[1]:<{col}}"]
    lines += [f"{k:<{width}}  {ra.get(k, '-'):<{col}}  {rb.get(k, '-'):<{col}}" for k in keys]
    return "\n".join(lines) + "\n"


def compare_runs(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> str:
    """Diagnose two runs on the same subset (`diagnose_run`, each into its own directory)
    and return them side by side; with `out_dir`, also write comparison.json (both
    diagnoses, provenance), comparison.txt and diagnose-spectra.png
    (`qmse.diagnose.plot_spectra`) there, a directory claimed as a diagnosis."""
    a, b = diagnose_run(run_a, **kwargs), diagnose_run(run_b, **kwargs)
    names = (Path(run_a).name or str(run_a), Path(run_b).name or str(run_b))
    if names[0] == names[1]:
        names = (str(run_a), str(run_b))
    text = compare_text(a, b, names)
    if out_dir is None:
        return text
    out = Path(out_dir)
    with claim(out, "diagnosis", recognise=lambda d: (d / "comparison.json").exists()):
        device = kwargs.get("device", "cpu")
        save_json(out / "comparison.json",
                  {"runs": [str(run_a), str(run_b)], "diagnoses": [a, b],
                   "provenance": provenance(device)})  # fmt: skip
        atomic_write(out / "comparison.txt", text)
        save_figure(out / "diagnose-spectra.png", diagnose.plot_spectra(dict(zip(names, (a, b)))))
    return text


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
    `seed`, `lanczos_steps` and `trace_samples` go to `diagnose_run` (one
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
    if (held := cached_diagnosis(run_dir, key)) is not None:
        return held
    t0 = time.perf_counter()
    result = run_diagnosis(
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
    criteria = run_criteria(config["loss"])
    result = {
        "key": key,
        **result,
        "arguments": arguments,
        "full_set": full_set_state(model, data.x_train, data.y_train, criteria),
        "wall_s": time.perf_counter() - t0,
    }
    write_diagnosis(run_dir, result)
    return result
