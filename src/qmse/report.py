"""A grid's report and statistics (and its figures, `qmse.gridplot`) from its files alone.

Everything here reads a grid folder: grid.json (the runs, their configs and sets, the
step-size sweeps, the diagnosis settings) and per run metrics.jsonl, timings.jsonl and
diagnosis.json. No checkpoint is read, so a folder of those files (a
committed copy of a grid, docs/fmnist-end/) regenerates its report byte for byte
(`write_outputs`).

Runs with the same seed share their initial weights and batch order, so a method − MSE
difference is paired per seed; its mean gets a 95 % Student-t interval, and the verdict
says whether the method's value is higher or lower, or that the interval holds 0 (which
is not a finding of equality: that needs an equivalence test). Fewer than three pairs are
"undetermined", and differences that are the same in every seed are said to be,
rather than printed as an interval of zero width.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from qmse import runs
from qmse.config import TrainConfig
from qmse.endstate import RESIDUAL_THRESHOLDS
from qmse.errors import UserError
from qmse.gridplot import (
    write_figure,
    write_mse_figure,
    write_sweep_figure,
)
from qmse.results import RunResult, load_results, losses_of, lr_label, runs_of
from qmse.stats import mean_ci, mean_std, paired_log_ratio
from qmse.stepsize import SWEEP_DIR, Tuned, Tuning, replay_sweeps, yardstick

MIN_PAIRS = 3  # fewer paired seeds: the verdict is "undetermined"
NOT_DETERMINED = "not determined (the interval holds 0; equality is not shown)"
SHOWN_THRESHOLD = 0.1  # the ‖r_i‖ threshold of the report's fit column (RESIDUAL_THRESHOLDS)


# ---------------------------------------------------------------- reading a grid


# ---------------------------------------------------------------- statistics


def verdict(deltas: Sequence[float]) -> tuple[str, float, float, float]:
    """(word, mean, lo, hi) of paired differences: "higher", "lower" or "not determined"
    as the 95 % Student-t interval [lo, hi] excludes 0 or not (an interval holding 0 does not
    show equality). With fewer than MIN_PAIRS
    pairs the word is "undetermined" (the interval is still given from 2 pairs). When every
    difference is the same the word says so and lo = hi = nan: such an interval has no
    width to report."""
    n = len(deltas)
    if n == 0:
        return "undetermined (no paired seeds)", math.nan, math.nan, math.nan
    m, lo, hi = mean_ci(deltas)
    same = n >= 2 and max(deltas) == min(deltas)
    if same:
        lo = hi = math.nan
    if n < MIN_PAIRS:
        return f"undetermined ({n} paired seed{'s' * (n > 1)}; {MIN_PAIRS} needed)", m, lo, hi
    if same:
        word = "equal" if m == 0 else "higher" if m > 0 else "lower"
        return f"{word} in every seed (the same difference in all {n})", m, lo, hi
    if lo > 0:
        return "higher", m, lo, hi
    if hi < 0:
        return "lower", m, lo, hi
    return NOT_DETERMINED, m, lo, hi


def _precision(lo: float, hi: float, kind: str) -> int:
    """The digits that show the width of [lo, hi] to two significant digits, so that its
    ends never read the same: kind "pct" (a fraction shown in points: decimals, at least 2)
    or "g" (significant digits, at least 3)."""
    width = abs(hi - lo) * (100 if kind == "pct" else 1)
    if kind == "pct":
        return max(2, 1 - math.floor(math.log10(width))) if width > 0 else 2
    top = max(abs(lo), abs(hi))
    if width > 0 and top > 0:
        return max(3, math.floor(math.log10(top)) - math.floor(math.log10(width)) + 2)
    return 3


def _show(x: float, kind: str, digits: int) -> str:
    return f"{100 * x:.{digits}f}" if kind == "pct" else f"{x:.{digits}g}"


def interval_cell(deltas: Sequence[float], kind: str) -> str:
    """'mean [lo, hi]' of paired differences (`_precision` digits); the mean alone, said so,
    where there is no interval (one pair, or the same difference in every pair); '–'
    without pairs."""
    _, m, lo, hi = verdict(deltas)
    if not deltas:
        return "–"
    if len(deltas) == 1 or math.isnan(lo):
        mean = _show(m, kind, 2 if kind == "pct" else 4)
        return f"{mean} (1 pair)" if len(deltas) == 1 else f"{mean} (same in all {len(deltas)})"
    p = _precision(lo, hi, kind)
    return f"{_show(m, kind, p)} [{_show(lo, kind, p)}, {_show(hi, kind, p)}]"


def _mean_std(values: Sequence[float], kind: str) -> str:
    m, s = mean_std(values)
    if kind == "pct":
        return f"{100 * m:.2f} ± {100 * s:.2f}"
    return f"{m:.4g} ± {s:.2g}"


# ---------------------------------------------------------------- report.md


def _final(results: list[RunResult], loss: str, momentum: float) -> dict[int, dict]:
    """seed -> last metric row, for the complete runs of a setting."""
    return {r.config.seed: r.rows[-1] for r in runs_of(results, loss, momentum)}


def _diagnoses(results: list[RunResult], loss: str, momentum: float) -> dict[int, dict]:
    """seed -> diagnosis.json, for the complete and diagnosed runs of a setting."""
    return {
        r.config.seed: r.diagnosis
        for r in runs_of(results, loss, momentum)
        if r.diagnosis is not None
    }


def _diverged(results: list[RunResult], momentum: float) -> Counter:
    """loss -> number of diverged runs at `momentum`."""
    return Counter(r.config.loss for r in results if r.diverged and r.config.momentum == momentum)


def _cases(diagnoses: dict[int, dict]) -> str:
    """The stopping cases of the runs (whole subset) with their counts, e.g. 'null-space ×5'."""
    counts = Counter(d["stop"]["whole_set_label"] for d in diagnoses.values())
    return ", ".join(f"{case} ×{n}" for case, n in sorted(counts.items()))


def _final_table(results: list[RunResult]) -> list[str]:
    losses, momenta = losses_of(results), sorted({r.config.momentum for r in results})
    lines = [
        "| momentum | loss | lr (loss parameters) | seeds | train acc | test acc | train ½‖r‖² |",
        "|---|---|---|---|---|---|---|",
    ]
    for momentum in momenta:
        for loss in losses:
            final = _final(results, loss, momentum)
            lr = lr_label(results, loss, momentum).removeprefix("lr ")
            params = {
                f"{k} {v:g}" for r in runs_of(results, loss, momentum)
                for k, v in r.config.loss_params.items()
            }  # fmt: skip
            lr += f" ({', '.join(sorted(params))})" if params else ""
            lost = _diverged(results, momentum)[loss]
            seeds = f"{len(final)}" + (f" (+{lost} diverged)" if lost else "")
            if not final:
                lines.append(f"| {momentum:g} | {loss} | {lr or '–'} | {seeds} | – | – | – |")
                continue
            cells = [
                _mean_std([row[key] for row in final.values()], kind)
                for key, kind in (("train_acc", "pct"), ("test_acc", "pct"), ("train_mse", "g"))
            ]
            lines.append(f"| {momentum:g} | {loss} | {lr} | {seeds} | {' | '.join(cells)} |")
    return lines


def _diagnosis_table(results: list[RunResult]) -> list[str]:
    losses, momenta = losses_of(results), sorted({r.config.momentum for r in results})
    lines = [
        f"| momentum | loss | runs | stopping case | ‖∇ ½‖r‖²‖ (full set) | λ_max | λ_min | "
        f"‖r_i‖ < {SHOWN_THRESHOLD:g} (full set, %) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for momentum in momenta:
        for loss in losses:
            ds = _diagnoses(results, loss, momentum)
            if not ds:
                lines.append(f"| {momentum:g} | {loss} | 0 | – | – | – | – | – |")
                continue
            grads = [d["full_set"]["grad_norm"]["mse"] for d in ds.values()]
            top = [d["hessian"]["mse"]["top"][0] for d in ds.values()]
            bottom = [d["hessian"]["mse"]["bottom"][0] for d in ds.values()]
            fit = [d["full_set"]["fraction_below"][f"{SHOWN_THRESHOLD:g}"] for d in ds.values()]
            cells = [_mean_std(grads, "g"), _mean_std(top, "g"), _mean_std(bottom, "g")]
            lines.append(
                f"| {momentum:g} | {loss} | {len(ds)} | {_cases(ds)} | {' | '.join(cells)} | "
                f"{_mean_std(fit, 'pct')} |"
            )
    return lines


def _paired(results: list[RunResult], title: str) -> tuple[list[str], list[str]]:
    """The paired table against MSE and the verdict lines of one set of runs."""
    losses, momenta = losses_of(results), sorted({r.config.momentum for r in results})
    lines = [
        "| momentum | loss − MSE | pairs | Δ train ½‖r‖² [95 % CI] | "
        "train ½‖r‖² ÷ MSE's [95 % CI] | Δ train acc [95 % CI] | Δ test acc [95 % CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for momentum in momenta:
        base = _final(results, "mse", momentum)
        diagnosed = _diagnoses(results, "mse", momentum)
        if diagnosed:
            verdicts.append(
                f"- {title}, momentum {momentum:g}: MSE ended in the stopping case "
                f"{_cases(diagnosed)} (of {len(diagnosed)} diagnosed runs)."
            )
        if lost := _diverged(results, momentum):
            verdicts.append(
                f"- {title}, momentum {momentum:g}: diverged, so left out of the pairs: "
                + ", ".join(f"{loss} ×{n}" for loss, n in sorted(lost.items()))
                + "."
            )
        for loss in (x for x in losses if x != "mse"):
            other = _final(results, loss, momentum)
            paired = sorted(set(base) & set(other))
            cells = [
                interval_cell([other[s][key] - base[s][key] for s in paired], kind)
                for key, kind in (("train_mse", "g"), ("train_acc", "pct"), ("test_acc", "pct"))
            ]
            cells.insert(
                1,
                _ratio_cell(
                    [other[s]["train_mse"] for s in paired], [base[s]["train_mse"] for s in paired]
                ),
            )
            lines.append(f"| {momentum:g} | {loss} | {len(paired)} | {' | '.join(cells)} |")
            if loss != "qmse":
                continue
            for key, what, kind in (
                ("train_mse", "train ½‖r‖² (the MSE yardstick)", "g"),
                ("train_acc", "train accuracy", "pct"),
            ):
                deltas = [other[s][key] - base[s][key] for s in paired]
                verdicts.append(
                    f"- {title}, momentum {momentum:g}: QMSE's final {what} against MSE's: "
                    f"**{verdict(deltas)[0]}** (Δ = {interval_cell(deltas, kind)}"
                    f"{' points' if kind == 'pct' else ''}, {len(paired)} paired seeds)."
                )
    return lines, verdicts


def _ratio_cell(a: list[float], b: list[float]) -> str:
    """The geometric-mean ratio of paired positive values with its 95 % interval
    (`paired_log_ratio`): scale-free where the values differ 20x between settings."""
    if not a:
        return "–"
    if min(*a, *b) <= 0:
        return "– (a value ≤ 0)"
    ratio, lo, hi = paired_log_ratio(a, b)
    if len(a) == 1:
        return f"{ratio:.3g} (1 pair)"
    return f"{ratio:.3g} [{lo:.3g}, {hi:.3g}]"


def _sweep_lines(sweeps: list[tuple[TrainConfig, Tuned]], tuning: Tuning) -> list[str]:
    start = ""
    if tuning.start_step is not None:
        start = (
            f", every lr sweep starting at lr = {tuning.start_step:g}·(1 − momentum) (the "
            f"same step lr/(1 − momentum) for both momenta)"
        )
    lines = [
        f"Chosen on the held-out seed {tuning.seed} (not an evaluation seed), each point a "
        f"full run{start}, judged on the final train ½‖r‖² for every loss minimised where "
        f"the outputs equal the one-hot targets (MSE, QMSE, expected-QMSE, label noise: the "
        f"yardstick of the paper's claim, so that no method loses on it for a step size "
        f"chosen for another), on the run's own train loss otherwise (cross-entropy: its "
        f"minimum lies at infinite logits, where ½‖r‖² of the logits grows). Factor-2 grids "
        f"around each knob's start v, widened past an edge while the best point sits on it, "
        f"within v·2^±{1 + tuning.max_extend} (a choice at that limit is bounded out); "
        f"several knobs (lr, then σ) in turn until a pass changes nothing (at most "
        f"{tuning.max_passes} passes).",
        "",
        "| momentum | loss | judged on | chosen | sweeps: value → final score (✓ chosen) |",
        "|---|---|---|---|---|",
    ]
    for base, tuned in sweeps:
        if tuned.chosen is None:
            chosen = "none: every run diverged" if not tuned.need else "pending"
        else:
            chosen = ", ".join(
                [f"lr {tuned.chosen.lr:g}"]
                + [f"{k} {v:g}" for k, v in sorted(tuned.chosen.loss_params.items())]
            )
            last = {s["param"]: s for s in tuned.stages}  # each knob's final stage decides
            bounded = [knob for knob, s in last.items() if not s["interior"]]
            if bounded:
                chosen += f" (**bounded out**: {', '.join(bounded)} at the edge of the range)"
            if not tuned.converged:
                chosen += " (not converged)"
        steps = "; ".join(
            f"{s['param']}: "
            + ", ".join(
                ("diverged" if math.isinf(p["score"]) else f"{p['value']:g} → {p['score']:.4g}")
                + (" ✓" if p["value"] == s["chosen"] else "")
                for p in s["points"]
            )
            for s in tuned.stages
        )
        lines.append(
            f"| {base.momentum:g} | {base.loss} | {yardstick(base.loss)} | {chosen} | {steps} |"
        )
    return lines


def write_report(
    results: list[RunResult],
    path: str | Path,
    *,
    sets: Sequence[tuple[str, Sequence[str]]] = (),
    sweeps: Sequence[tuple[TrainConfig, Tuned]] = (),
    tuning: Tuning | None = None,
    sweep_wall_s: float = 0.0,
    figures: Sequence[str] = (),
) -> Path:
    """report.md: the setup, the step-size sweeps (if any), then for each set of runs
    ((title, run names); default one set of all) the final-epoch mean ± std per setting,
    the end-of-training diagnosis (where diagnosis.json exists), the paired method − MSE
    differences with 95 % intervals, and the verdict lines: which case MSE ended in, and
    QMSE's final train ½‖r‖² and train accuracy against MSE's."""
    path = Path(path)
    sets = list(sets) or [("", [r.name for r in results])]
    by_name = {r.name: r for r in results}
    cfg = results[0].config
    seeds = sorted({r.config.seed for r in results})
    wall = sum(r.wall_s for r in results)
    diagnosed = [r for r in results if r.diagnosis is not None]
    subset = f"first {cfg.train_subset}" if cfg.train_subset else "all"
    test = f"first {cfg.test_subset}" if cfg.test_subset else "all"
    every = (
        f"every {cfg.eval_every} epochs and after the last" if cfg.eval_every > 1 else "every epoch"
    )
    lines = [
        f"# QMSE vs MSE on {cfg.dataset}: the paper's grid (sec. 4)",
        "",
        f"SimpleCNN, SGD, batch {cfg.batch_size}, {cfg.epochs} epochs planned, seeds "
        f"{seeds[0]}–{seeds[-1]} ({len(seeds)}), training images: {subset}, test images: "
        f"{test}. {sum(r.complete for r in results)} of {len(results)} runs complete; "
        f"training + evaluation time summed over runs: {wall:.0f} s"
        + (f"; step-size sweep runs: {sweep_wall_s:.0f} s" if sweeps else "")
        + (
            f"; diagnoses: {sum(r.diagnosis['wall_s'] for r in diagnosed):.0f} s"
            if diagnosed
            else ""
        )
        + ".",
        f"Accuracies in %, ½‖r‖² per sample (mean), measured on the full (sub)sets in eval "
        f"mode {every}; the tables give the last epoch.",
    ]
    if any(r.config.loss == "ce" for r in results):
        lines += ["For CE, ½‖r‖² is measured on the raw logits (not probabilities)."]
    lines += ["", *(f"![{name}]({name})" for name in figures)] if figures else []
    if sweeps:
        lines += ["", "## Step sizes", "", *_sweep_lines(list(sweeps), tuning or Tuning())]
    if diagnosed:
        args = diagnosed[0].diagnosis["arguments"]
        tol = diagnosed[0].diagnosis["stop"]["tolerances"]
        lines += [
            "",
            "End-of-training diagnosis (`qmse.endstate`) of every final checkpoint: the "
            "stopping case (paper sec. 2.2; tolerances "
            + ", ".join(f"{k} {v:g}" for k, v in tol.items())
            + f") and the extreme eigenvalues of the MSE Hessian (Lanczos, "
            f"{args['lanczos_steps']} steps) on a fixed subset of {args['samples']} training "
            f"images; the norm of the MSE gradient and the fraction of samples with ‖r_i‖ < "
            f"{SHOWN_THRESHOLD:g} (a tenth of the distance √2 between two one-hot targets; "
            f"diagnosis.json also counts < "
            + ", ".join(f"{t:g}" for t in RESIDUAL_THRESHOLDS if t != SHOWN_THRESHOLD)
            + ") on the whole training subset. Mean ± std over seeds.",
        ]
    verdicts = []
    for title, names in sets:
        chosen = [by_name[n] for n in names if n in by_name]
        head = f"### {title}: " if title else "## "
        lines += ["", f"{head}Final epoch, mean ± std over seeds", "", *_final_table(chosen)]
        if any(r.diagnosis is not None for r in chosen):
            lines += ["", f"{head}Where the runs stopped", "", *_diagnosis_table(chosen)]
        paired, said = _paired(chosen, title or "All runs")
        lines += ["", f"{head}Paired differences against MSE (same seed: same initial "
                  f"weights and batch order)", "", *paired]  # fmt: skip
        verdicts += said
    diverged = [r.name for r in results if r.diverged]
    if diverged:
        lines += ["", f"Diverged (non-finite loss, excluded): {', '.join(diverged)}."]
    unfinished = [
        f"{r.name} ({len(r.rows)}/{r.config.epochs} epochs)"
        for r in results
        if not r.complete and not r.diverged
    ]
    if unfinished:
        lines += ["", f"Unfinished (excluded): {', '.join(unfinished)}."]
    lines += ["", "## Verdict", "", *verdicts, ""]
    runs.atomic_write(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------- a grid folder


def grid_sets(grid: dict) -> list[dict]:
    """grid.json's sets of runs ({"name", "title", "runs"}); an older grid.json: all runs."""
    return grid.get("sets") or [{"name": "all", "title": "", "runs": grid["runs"]}]


def write_outputs(out_dir: str | Path) -> dict[str, Path]:
    """figure.png (accuracy of the first set), figure-<set>.png (the others), figure-mse.png
    (train ½‖r‖², every set), figure-sweeps.png (the step-size sweeps) and report.md of the
    grid in `out_dir`, from grid.json and the runs' metrics, timings and diagnosis files; no
    checkpoint is read. The step-size choices are recomputed from the sweep runs' metrics
    and must equal those grid.json records.
    Returns the paths written, by kind ("figure", "report", "figure-mse", ...)."""
    out = Path(out_dir)
    grid = runs.load_json(out / "grid.json")
    configs = [TrainConfig.from_dict(c) for c in grid["configs"]]
    results = load_results(out, configs, grid["runs"])
    by_name = {r.name: r for r in results}
    sweeps = replay_sweeps(out, grid)
    recorded = (grid.get("tuning") or {}).get("chosen")
    if recorded is not None:
        replayed = [None if t.chosen is None else asdict(t.chosen) for _, t in sweeps]
        if json.loads(json.dumps(replayed)) != recorded:
            raise UserError(
                f"{out / 'grid.json'} records other step-size choices than its sweep runs give "
                f"(in {out / SWEEP_DIR}); the folder mixes two grids: rerun the grid in its own "
                f"directory"
            )
    sets = grid_sets(grid)
    paths: dict[str, Path] = {}
    figures = []
    for i, s in enumerate(sets):
        chosen = [by_name[n] for n in s["runs"] if by_name[n].complete]
        if not chosen:
            continue
        name = "figure.png" if i == 0 else f"figure-{s['name']}.png"
        paths["figure" if i == 0 else f"figure-{s['name']}"] = write_figure(
            chosen, out / name, f", {s['title']}" if s["title"] else ""
        )
        figures.append(name)
    drawn = {s["title"] or "all runs": [by_name[n] for n in s["runs"]] for s in sets}
    if any(r.complete for r in results):
        paths["figure-mse"] = write_mse_figure(drawn, out / "figure-mse.png")
        figures.append("figure-mse.png")
    if (path := write_sweep_figure(sweeps, out / "figure-sweeps.png")) is not None:
        paths["figure-sweeps"] = path
        figures.append(path.name)
    sweep_wall = sum(
        t["wall_s"]
        for path in sorted((out / SWEEP_DIR).glob("*/timings.jsonl"))
        for t in runs.read_jsonl(path)
    )
    paths["report"] = write_report(
        results,
        out / "report.md",
        sets=[(s["title"], s["runs"]) for s in sets],
        sweeps=sweeps,
        tuning=Tuning(**grid["tuning"]["settings"]) if grid.get("tuning") else None,
        sweep_wall_s=sweep_wall,
        figures=figures,
    )
    return paths
