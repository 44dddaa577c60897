"""The paper's experiment grid (sec. 4) trained to its end, diagnosed, and reported.

Grid: losses (any registered: MSE, QMSE, expected-QMSE, label noise, cross-entropy) × SGD
momentum {0, 0.9} × seeds. Runs with the same seed share their initial weights and batch
order, so a method − MSE difference is paired per seed (`qmse.report`).

Every method runs at the grid's common lr (the paper's unless given), and, with a
`qmse.stepsize.Tuning`, also at its own lr (and loss parameters, e.g. label noise's σ)
chosen by a sweep on a held-out seed, so that no method loses only for a step size chosen
for another. After the last epoch every evaluation run's final checkpoint can be diagnosed
(`qmse.endstate`). The grid folder holds

    grid.json                   the runs, their configs and sets, the sweeps, provenance
    <run name>/                 the evaluation runs (`qmse.train` run directories)
    sweep/<sweep run name>/     the sweeps' runs
    report.md, figure*.png      `qmse.report.write_outputs`, from those files alone (the
                                command line writes them after each piece)

Long grids run in pieces (`piece`): "sweep" or "sweep-m<momentum>" (the sweeps), "seed<k>"
(the evaluation runs of seed k, after the sweeps), "all"; every piece resumes what a killed
call left, and each ends by writing the report of what is finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qmse import runs
from qmse.config import PAPER_LR, TrainConfig
from qmse.data import DATASETS
from qmse.endstate import diagnose_end
from qmse.errors import UserError
from qmse.loss import get_loss
from qmse.results import load_results
from qmse.rundir import (
    differing_keys,
    load_dataset,
    resolve_device,
    run_name,
)
from qmse.stepsize import SWEEP_DIR, Tuning, replay_sweeps, sweep_name
from qmse.sweep import run_tasks
from qmse.tblog import summary_writer_class, tensorboard_logger
from qmse.train import train_many, train_task

PAPER_LOSSES = ("mse", "qmse")  # the paper's comparison
ABLATION = ("expected-qmse", "ce")
END_LOSSES = ("mse", "qmse", "expected-qmse", "label-noise", "ce")  # the end-of-training grid
MOMENTA = (0.0, 0.9)


def loss_params_for(losses: Sequence[str], given: Mapping[str, float]) -> dict[str, dict]:
    """{loss: its parameters} from the values `given` by parameter name (e.g. {"sigma": 0.1}),
    for the losses that take any; a loss whose parameter is not given is an error."""
    out = {}
    for loss in losses:
        spec = get_loss(loss)
        if missing := [p for p in spec.params if p not in given]:
            raise UserError(
                f"loss {loss!r} needs {', '.join(missing)}: give "
                f"{' '.join(f'--loss-param {p}=VALUE' for p in missing)} (with tuning: its "
                f"start value)"
            )
        if spec.params:
            out[loss] = {p: given[p] for p in spec.params}
    return out


def grid_configs(
    dataset: str,
    *,
    seeds: int = 5,
    epochs: int = 100,
    lr: float | None = None,
    losses: Sequence[str] = PAPER_LOSSES,
    with_ablation: bool = False,
    loss_params: Mapping[str, Mapping[str, float]] | None = None,
    momenta: Sequence[float] = MOMENTA,
    batch_size: int = 128,
    train_subset: int | None = None,
    test_subset: int | None = None,
    eval_every: int = 1,
    data_dir: str | None = None,
    allow_unverified_data: bool = False,
) -> list[TrainConfig]:
    """The grid's run configs: losses (+ ABLATION with `with_ablation`) × momenta × seeds
    0..seeds−1, at the paper's learning rate for `dataset` (PAPER_LR) unless `lr` is given,
    each loss with its `loss_params` ({loss: {name: value}}, e.g. label noise's sigma)."""
    if seeds < 1:
        raise UserError(f"seeds={seeds}; need at least one seed (the report wants >= 3)")
    if lr is None:
        if dataset not in PAPER_LR:
            raise UserError(f"no paper learning rate for dataset {dataset!r}; pass lr")
        lr = PAPER_LR[dataset]
    losses = list(dict.fromkeys([*losses, *(ABLATION if with_ablation else ())]))
    params = dict(loss_params or {})
    return [
        TrainConfig(
            dataset=dataset,
            data_dir=data_dir,
            train_subset=train_subset,
            test_subset=test_subset,
            loss=loss,
            loss_params=dict(params.get(loss, {})),
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            epochs=epochs,
            eval_every=eval_every,
            seed=seed,
            allow_unverified_data=allow_unverified_data,
        )
        for seed in range(seeds)  # seed-major: an interrupted grid has whole seeds
        for momentum in momenta
        for loss in losses
    ]


@dataclasses.dataclass
class _Trainer:
    """How run_grid trains: the data, the device, stacking, the backend, logging."""

    dataset: Any
    device: torch.device
    remote_device: str
    parallel: int
    backend: str
    address: str | None
    cpus_per_task: float
    gpus_per_task: float
    tensorboard: Path | None
    quiet: bool


def run_grid(
    configs: Sequence[TrainConfig],
    out_dir: str | Path,
    *,
    tuning: Tuning | None = None,
    common_lr: bool = True,
    diagnosis: Mapping[str, Any] | None = None,
    piece: str = "all",
    tensorboard: str | Path | None = None,
    dataset: Any = None,
    device: torch.device | str = "auto",
    parallel: int = 1,
    backend: str = "local",
    address: str | None = None,
    cpus_per_task: float = 1,
    gpus_per_task: float = 0,
    quiet: bool = False,
) -> Path:
    """Train the grid of `configs` into `out_dir` (finished runs are skipped, unfinished
    ones continued) and return the grid folder, whose files `qmse.report.write_outputs`
    turns into figures and report.md. `out_dir` is claimed as a grid (`qmse.runs.claim`)
    for the whole call; a run in it that holds other settings is refused before anything is trained.

    `configs` are the runs at the common lr. With `tuning`, each (loss, momentum) of them is
    also run at its own lr and loss parameters, chosen by `qmse.stepsize.tune` on the
    held-out seed tuning.seed (its runs in out_dir/sweep); the common-lr runs then use the
    chosen loss parameters, and `common_lr=False` leaves them out. `diagnosis` (keyword
    arguments of `qmse.endstate.diagnose_end`, {} for its defaults) diagnoses every finished
    evaluation run. `piece` trains a part: "sweep", "sweep-m<momentum>", "seed<k>" or
    "all" (module docstring). `tensorboard`: a folder; each run logs its metrics to
    <tensorboard>/<run folder> (`qmse.tblog`, optional extra; local backend only).

    `backend="ray"` trains each group of runs as a Ray task (`qmse.sweep.run_tasks`: the
    cluster at `address`, else a local one; `cpus_per_task` CPUs and `gpus_per_task` GPUs
    each; a task whose worker dies is retried and resumes). Its workers read the data set
    from the configs' data_dir and resolve `device` themselves; the files are the same.
    `dataset` (a qmse.data.Dataset) is loaded once from configs[0] when not given.
    `parallel` > 1 trains up to that many runs at once with `train_many` (one stacked model);
    the run directories are the same either way.
    """
    if parallel < 1:
        raise UserError(f"parallel={parallel}; expected a positive number of runs at once")
    if backend != "local" and dataset is not None:
        raise UserError("dataset= is for backend='local'; Ray workers load it from data_dir")
    if not configs:
        raise UserError("configs is empty; grid_configs makes the paper's grid")
    if tensorboard is not None:
        if backend != "local":
            raise UserError("tensorboard logs from this process: use it with backend='local'")
        summary_writer_class()  # a missing extra fails before anything is trained
    if not common_lr and tuning is None:
        raise UserError("common_lr=False leaves no runs without tuning; give tuning")
    if tuning is not None and tuning.seed in {c.seed for c in configs}:
        raise UserError(
            f"the sweeps' held-out seed {tuning.seed} is an evaluation seed; choose another "
            f"(--sweep-seed), e.g. {max(c.seed for c in configs) + 100}"
        )
    if diagnosis is not None and configs[0].dataset not in DATASETS:
        raise UserError(
            f"diagnosis reads each run's data from disk (qmse.endstate.diagnose_run), and "
            f"{configs[0].dataset!r} is not a data set qmse reads: leave diagnosis out"
        )
    _check_piece(piece, configs, tuning)
    out, remote_device = Path(out_dir), str(device)
    # Ray workers resolve `device` themselves; this process only writes files then
    device = resolve_device(device) if backend == "local" else torch.device("cpu")
    if dataset is None and backend == "local":
        dataset = load_dataset(configs[0])
    trainer = _Trainer(dataset, device, remote_device, parallel, backend, address, cpus_per_task,
                       gpus_per_task, None if tensorboard is None else Path(tensorboard),
                       quiet)  # fmt: skip
    with runs.claim(out, "grid", recognise=lambda d: (d / "grid.json").exists()):
        return _run_grid(configs, out, tuning, common_lr, diagnosis, piece, trainer)


def _check_piece(piece: str, configs: Sequence[TrainConfig], tuning: Tuning | None) -> None:
    momenta = sorted({c.momentum for c in configs})
    seeds = sorted({c.seed for c in configs})
    pieces = ["all", *(["sweep"] + [f"sweep-m{m:g}" for m in momenta] if tuning else [])]
    pieces += [f"seed{s}" for s in seeds]
    if piece not in pieces:
        raise UserError(f"piece={piece!r}; this grid's pieces are {', '.join(pieces)}")


def _run_grid(
    configs: Sequence[TrainConfig],
    out: Path,
    tuning: Tuning | None,
    common_lr: bool,
    diagnosis: Mapping[str, Any] | None,
    piece: str,
    trainer: _Trainer,
) -> Path:
    """run_grid's work once its directory is claimed."""
    bases = _bases(configs)
    t0 = time.perf_counter()
    if tuning is not None and (piece == "all" or piece.startswith("sweep")):
        momentum = None if piece in ("all", "sweep") else float(piece.removeprefix("sweep-m"))
        _sweep([b for b in bases if momentum in (None, b.momentum)], out, tuning, trainer)
    grid = _grid_record(configs, bases, out, tuning, common_lr, diagnosis, trainer.device)
    if piece == "all" or piece.startswith("seed"):
        if tuning is not None and any(t["need"] for t in _replayed(out, grid)):
            raise UserError(
                f"the step-size sweeps in {out / SWEEP_DIR} are not finished, so the runs at "
                f"each method's own lr are not known yet: run the sweep pieces first "
                f"(--piece sweep, or one per momentum)"
            )
        seed = None if piece == "all" else int(piece.removeprefix("seed"))
        todo = [
            (name, cfg)
            for name, cfg in zip(grid["runs"], grid["configs"])
            if seed is None or cfg["seed"] == seed
        ]
        cfgs = [TrainConfig.from_dict(c) for _, c in todo]
        runs.save_json(out / "grid.json", grid)
        _train(cfgs, [out / n for n, _ in todo], trainer, "grid", out)
        if diagnosis is not None:
            _diagnose(cfgs, [out / n for n, _ in todo], diagnosis, trainer)
    runs.save_json(out / "grid.json", grid)
    if not trainer.quiet:
        print(f"{out}: piece {piece} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def _bases(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """One config per (loss, loss parameters, momentum), in the grid's order: what a sweep
    tunes (its seed is replaced by the held-out one)."""
    seen: dict[tuple, TrainConfig] = {}
    for c in configs:
        seen.setdefault((c.loss, json.dumps(c.loss_params, sort_keys=True), c.momentum), c)
    return list(seen.values())


def _replayed(out: Path, grid: dict) -> list[dict]:
    return [{"need": t.need, "chosen": t.chosen} for _, t in replay_sweeps(out, grid)]


def _sweep(bases: list[TrainConfig], out: Path, tuning: Tuning, trainer: _Trainer) -> None:
    """Train the sweeps of `bases` until each has chosen: every round trains the runs the
    replayed rule (`qmse.stepsize.tune`) asks for next, all settings together."""
    grid = {"tuning": {"settings": asdict(tuning), "bases": [asdict(b) for b in bases]}}
    asked: set[str] = set()
    while True:
        need = {sweep_name(c): c for t in _replayed(out, grid) for c in t["need"]}
        if not need:
            return
        if again := asked & set(need):
            raise RuntimeError(f"sweep runs {sorted(again)} were trained but give no score")
        asked |= set(need)
        _train(list(need.values()), [out / SWEEP_DIR / n for n in need], trainer, "sweep", out)


def _evaluation_sets(
    configs: Sequence[TrainConfig], chosen: dict[tuple, TrainConfig | None] | None, common: bool
) -> list[tuple[str, str, list[tuple[str, TrainConfig]]]]:
    """(name, title, [(run folder, config)]) of each set of evaluation runs: at each
    method's own lr (when tuned), at the common lr (unless common is False)."""
    base_lr = configs[0].lr
    if chosen is None:
        return [("all", "", [(run_name(c), c) for c in configs])]
    sets = []
    own = []
    for c in configs:
        best = chosen[_key(c)]
        if best is not None:
            cfg = dataclasses.replace(c, lr=best.lr, loss_params=dict(best.loss_params))
            suffix = "" if cfg.lr == base_lr else f"-lr{cfg.lr:g}"
            own.append((run_name(cfg) + suffix, cfg))
    sets.append(("own-lr", "At each method's own lr", own))
    if common:
        at_common = []
        for c in configs:
            best = chosen[_key(c)]
            params = dict(best.loss_params) if best is not None else dict(c.loss_params)
            at_common.append((run_name(c), dataclasses.replace(c, loss_params=params)))
        paper = " (the paper's)" if PAPER_LR.get(configs[0].dataset) == base_lr else ""
        sets.append(("common-lr", f"At lr {base_lr:g}{paper} for every method", at_common))
    return sets


def _key(c: TrainConfig) -> tuple:
    return (c.loss, json.dumps(c.loss_params, sort_keys=True), c.momentum)


def _grid_record(
    configs: Sequence[TrainConfig],
    bases: list[TrainConfig],
    out: Path,
    tuning: Tuning | None,
    common_lr: bool,
    diagnosis: Mapping[str, Any] | None,
    device: torch.device,
) -> dict:
    """grid.json: the evaluation runs known now (in order, each once), their configs and
    sets, the sweeps' settings, bases and choices (None while pending), the diagnosis
    arguments, provenance."""
    record: dict[str, Any] = {"tuning": None}
    chosen = None
    if tuning is not None:
        record["tuning"] = {"settings": asdict(tuning), "bases": [asdict(b) for b in bases]}
        replayed = _replayed(out, record)
        chosen = {_key(b): t["chosen"] for b, t in zip(bases, replayed)}
        record["tuning"]["chosen"] = [
            None if t["chosen"] is None else asdict(t["chosen"]) for t in replayed
        ]
    sets = _evaluation_sets(configs, chosen, common_lr)
    unique: dict[str, TrainConfig] = {}
    for _, _, members in sets:
        for name, cfg in members:
            if unique.setdefault(name, cfg) != cfg:
                raise UserError(f"two runs of this grid would share the folder {name}")
    record = {
        "runs": list(unique),
        "configs": [asdict(c) for c in unique.values()],
        "sets": [{"name": n, "title": t, "runs": [m for m, _ in ms]} for n, t, ms in sets],
        **record,
        "diagnosis": None if diagnosis is None else dict(diagnosis),
        "provenance": runs.provenance(device),
    }
    return json.loads(json.dumps(record))  # tuples as JSON lists, as read back


def _train(
    cfgs: list[TrainConfig], dirs: list[Path], trainer: _Trainer, what: str, out: Path
) -> None:
    """Train `cfgs` into `dirs`, folders of the grid `out` (finished and diverged runs
    skipped, unfinished continued); TensorBoard logs mirror the folders."""
    groups = _groups(cfgs, dirs, trainer.parallel)  # checks the runs already there first
    if trainer.backend != "local":  # the loop below then finds every run finished or diverged
        tasks = [
            {
                "configs": [asdict(c) for c, _ in group],
                "out_dirs": [str(d) for _, d in group],
                "device": trainer.remote_device,
            }
            for group in groups
        ]
        run_tasks(train_task, tasks, backend=trainer.backend, address=trainer.address,
                  num_cpus_per_task=trainer.cpus_per_task,
                  num_gpus_per_task=trainer.gpus_per_task, quiet=trainer.quiet,
                  desc=what)  # fmt: skip
        groups = _groups(cfgs, dirs, trainer.parallel)  # what the tasks left: diverged runs
    bar = runs.progress(total=len(cfgs), quiet=trainer.quiet, desc=what, unit="run")
    for group in groups:
        group_cfgs, group_dirs = [c for c, _ in group], [d for _, d in group]
        kw = {"dataset": trainer.dataset, "device": trainer.device, "quiet": trainer.quiet}
        with contextlib.ExitStack() as stack:
            hooks = [
                None
                if trainer.tensorboard is None
                else stack.enter_context(
                    tensorboard_logger(trainer.tensorboard / d.relative_to(out))
                )
                for d in group_dirs
            ]
            rows = train_many(group_cfgs, group_dirs, on_epoch=hooks, **kw)
        for d, r in zip(group_dirs, rows):
            if (d / "diverged.json").exists():  # in this call: _groups left out the others
                bar.write(f"diverged: {runs.load_json(d / 'diverged.json')['message']}")
            elif not trainer.quiet and r:
                bar.write(
                    f"{what} {d.name}: epoch {r[-1]['epoch']} train ½‖r‖² "
                    f"{r[-1]['train_mse']:.5g} train acc {r[-1]['train_acc']:.4f} test acc "
                    f"{r[-1]['test_acc']:.4f}"
                )
        bar.update(len(group))
    bar.close()


def _groups(
    cfgs: Sequence[TrainConfig], dirs: Sequence[Path], parallel: int
) -> list[list[tuple[TrainConfig, Path]]]:
    """The runs still to train, in order, in groups `train_many` accepts: same epoch reached,
    at most `parallel` each. Finished and diverged runs are left out; a diverged one is
    reported by `qmse.report`. A folder holding a run with other settings is an error."""
    by_epoch: dict[int, list[tuple[TrainConfig, Path]]] = {}
    for cfg, run in zip(cfgs, dirs, strict=True):
        if (run / "config.json").exists():
            saved = runs.load_json(run / "config.json")
            wanted = json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists
            if diff := [k for k in differing_keys(saved, wanted) if k != "model"]:
                settings = ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
                raise UserError(
                    f"{run} holds a run with other settings ({settings}); use another "
                    f"output directory for this grid"
                )
        done = len(runs.read_jsonl(run / "metrics.jsonl"))
        if done < cfg.epochs and not (run / "diverged.json").exists():
            by_epoch.setdefault(done, []).append((cfg, run))
    return [
        group[i : i + parallel]
        for group in by_epoch.values()
        for i in range(0, len(group), parallel)
    ]


def _diagnose(
    cfgs: list[TrainConfig], dirs: list[Path], arguments: Mapping[str, Any], trainer: _Trainer
) -> None:
    """The end-of-training diagnosis of every finished evaluation run (cached per run)."""
    results = load_results(dirs[0].parent, cfgs, [d.name for d in dirs]) if dirs else []
    finished = [d for d, r in zip(dirs, results) if r.complete]
    bar = runs.progress(finished, quiet=trainer.quiet, desc="diagnose", unit="run")
    for run in bar:
        t0 = time.perf_counter()
        d = diagnose_end(run, device=trainer.device, quiet=True, **arguments)
        if not trainer.quiet:
            bar.write(
                f"diagnosed {run.name}: {d['stop']['whole_set_label']}, ‖∇ ½‖r‖²‖ "
                f"{d['full_set']['grad_norm']['mse']:.3g}, λ_max "
                f"{d['hessian']['mse']['top'][0]:.4g}, λ_min "
                f"{d['hessian']['mse']['bottom'][0]:.4g} ({time.perf_counter() - t0:.0f} s)"
            )
