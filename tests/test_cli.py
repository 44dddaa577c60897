"""The `qmse` command line. What the user or the environment got wrong ends in one line
naming the option or the file and the fix, exit status 2, no traceback, before any work (a
bug keeps its traceback); options that fill a config dataclass take their default and help
from its field; one vocabulary across commands; `qmse --help` answers without torch."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_mnist

from qmse import runs
from qmse.cli import COMMANDS, build_parser, main
from qmse.cli import common as cli_common
from qmse.cli import escape as cli_escape
from qmse.cli import run as cli_run
from qmse.config import PAPER_LR, TrainConfig
from qmse.errors import UserError
from qmse.escape import EscapeConfig
from qmse.stepsize import Tuning


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("data"))


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", "mnist", "--data-dir", str(data_dir), "--allow-unverified-data",
        "--loss", "mse", "--lr", "0.05", "--epochs", "1", "--batch-size", "16",
        "--channels", "2", "4", "--hidden", "8", "--device", "cpu", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip


def one_line_error(capsys, *fragments: str, command: str = "train") -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"qmse {command}: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_run_then_the_same_call_continues_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(data_dir, out)) == 0
    assert f"{out}: epoch 1 train acc" in capsys.readouterr().out
    assert runs.load_json(out / "kind.json") == {"kind": "train-run"}
    config = runs.load_json(out / "config.json")
    assert config["allow_unverified_data"] is True
    assert config["data"]["path"] == str(data_dir / "mnist")
    assert all(f["verified"] is False for f in config["data"]["files"].values())
    assert main(train_args(data_dir, out, "--epochs", "2")) == 0  # no --resume needed
    assert len(runs.read_jsonl(out / "metrics.jsonl")) == 2


def test_data_that_does_not_verify_needs_the_flag(data_dir, tmp_path, capsys):
    args = [a for a in train_args(data_dir, tmp_path / "run") if a != "--allow-unverified-data"]
    assert main(args) == 2
    one_line_error(capsys, "train-images-idx3-ubyte.gz: MD5", "--allow-unverified-data")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_out_under_proc_is_one_line(data_dir, capsys):
    assert main(train_args(data_dir, Path("/proc/x"))) == 2
    one_line_error(capsys, "/proc/x", "No such file or directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(data_dir, tmp_path, capsys):
    argv = train_args(data_dir, tmp_path / "run")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 2
    one_line_error(capsys, "device cuda: no CUDA device is visible", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_an_unreadable_data_dir_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(train_args(not_a_dir, tmp_path / "a")) == 2
    one_line_error(capsys, "mnist not found", str(not_a_dir / "mnist"))
    # no permission to read (simulated: chmod does not stop root)
    real = Path.is_file

    def denied(self: Path) -> bool:
        if self.is_relative_to(data_dir):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    assert main(train_args(data_dir, tmp_path / "b")) == 2
    one_line_error(capsys, str(data_dir / "mnist"), "Permission denied", "check its permissions")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_data_dir_without_read_permission_is_one_line(data_dir, tmp_path, capsys):
    folder = data_dir / "mnist"
    folder.chmod(0)
    try:
        assert main(train_args(data_dir, tmp_path / "run")) == 2
    finally:
        folder.chmod(0o755)
    one_line_error(capsys, str(folder), "Permission denied")


def test_a_full_disk_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    def full(fd: int, payload: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "_write_all", full)
    assert main(train_args(data_dir, tmp_path / "run")) == 2
    one_line_error(capsys, str(tmp_path / "run"), "No space left on device", "free space")


def test_other_kinds_and_damaged_run_directories_are_one_line(data_dir, tmp_path, capsys):
    grid = tmp_path / "grid"
    with runs.claim(grid, "grid"):
        pass
    assert main(train_args(data_dir, grid)) == 2
    one_line_error(capsys, f"{grid} holds a grid (kind.json), not a train-run")
    run = tmp_path / "run"
    assert main(train_args(data_dir, run)) == 0
    capsys.readouterr()
    config = runs.load_json(run / "config.json")
    runs.save_json(run / "config.json", {k: v for k, v in config.items() if k != "model"})
    assert main(train_args(data_dir, run, "--epochs", "2")) == 2
    one_line_error(capsys, f"{run / 'config.json'}: not the config.json of a qmse train run")
    runs.save_json(run / "config.json", config)
    (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:100])
    assert main(train_args(data_dir, run, "--epochs", "2")) == 2
    one_line_error(capsys, f"{run / 'checkpoint.pt'}: unreadable checkpoint", "truncated")


def test_a_bug_keeps_its_traceback(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_run, "train_run", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(train_args(data_dir, tmp_path / "run"))


def test_the_installed_command_prints_one_line_without_a_traceback(data_dir, tmp_path):
    """The same through the console script in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "qmse.cli", *train_args(data_dir, Path("/proc/x"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "qmse train: error: /proc/x: No such file or directory; check the path"
    ]


def test_loss_choices_come_from_the_registry_and_loss_params_are_checked(
    data_dir, tmp_path, capsys
):
    help_text = command_parser("train").format_help()
    assert "label-noise" in help_text and "--loss-param NAME=VALUE" in help_text
    assert "label-noise: sigma" in help_text  # the registry's declared params
    assert main(train_args(data_dir, tmp_path / "a", "--loss", "label-noise")) == 2
    one_line_error(capsys, "loss 'label-noise' needs sigma", "--loss-param sigma=VALUE")
    argv = train_args(data_dir, tmp_path / "b", "--loss", "label-noise")
    assert main([*argv, "--loss-param", "sigma=0.2"]) == 0
    assert runs.load_json(tmp_path / "b" / "config.json")["loss_params"] == {"sigma": 0.2}
    assert main([*argv, "--loss-param", "sigma=0.2", "--loss-param", "sigma=0.3"]) == 2
    one_line_error(capsys, "--loss-param sigma given twice")
    assert main(train_args(data_dir, tmp_path / "c", "--loss-param", "sigma=0.2")) == 2
    one_line_error(capsys, "--loss-param sigma: no loss trained here (mse) takes it")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_the_lr_default_is_the_papers_for_the_dataset(data_dir, tmp_path):
    """--lr's default is TrainConfig's: None, resolved to PAPER_LR in config.json."""
    argv = train_args(data_dir, tmp_path / "run")
    del argv[argv.index("--lr") : argv.index("--lr") + 2]
    assert main(argv) == 0
    assert runs.load_json(tmp_path / "run" / "config.json")["lr"] == PAPER_LR["mnist"] == 0.01
    assert TrainConfig(dataset="cifar10").lr == 0.1 and TrainConfig(lr=0.3).lr == 0.3
    with pytest.raises(UserError, match="dataset 'tiny' has no paper learning rate; give lr"):
        TrainConfig(dataset="tiny")


# --- the parser: lazy, declared from the configs, one vocabulary -------------------------


def command_parser(words: str) -> argparse.ArgumentParser:
    """The parser of the command `words` ("train", "diagnose convexity", "symmetry match")."""
    parser = build_parser(words.split())
    for word in words.split():
        parser = parser._subparsers._group_actions[0].choices[word]
    return parser


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return parser._option_string_actions[flag]


def compact(text: str) -> str:
    return "".join(text.split())  # argparse wraps lines, also at hyphens


@functools.cache
def loaded_modules(code: str) -> frozenset[str]:
    """The modules a fresh interpreter holds after `code`."""
    done = subprocess.run(
        [sys.executable, "-c", f"{code}; import sys; print(' '.join(sys.modules))"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return frozenset(done.stdout.split())


def best_of_3(argv: list[str]) -> float:
    """The least wall time of three runs of `argv`, seconds."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=120)
        times.append(time.perf_counter() - start)
    return min(times)


def test_importing_the_command_line_loads_neither_torch_nor_matplotlib():
    package, command_line = loaded_modules("import qmse"), loaded_modules("import qmse.cli")
    added = {m for m in command_line - package if m.startswith("qmse")}
    assert added <= {"qmse.cli", "qmse.cli.common", "qmse.errors"}, added
    assert not {"torch", "matplotlib"} & command_line


def test_help_answers_in_under_half_the_time_of_importing_torch():
    done = subprocess.run([sys.executable, "-m", "qmse.cli"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: qmse" in done.stderr  # no command: the help
    assert all(f"    {c}" in done.stderr for c in COMMANDS if " " not in c)
    help_s = best_of_3([sys.executable, "-m", "qmse.cli", "--help"])
    torch_s = best_of_3([sys.executable, "-c", "import torch"])
    assert help_s < 0.5 * torch_s, (help_s, torch_s)


def test_only_the_command_run_is_built():
    """The other commands are listed with their help alone (their modules not consulted)."""
    parser = build_parser(["diagnose", "convexity"])
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {c for c in COMMANDS if " " not in c}
    assert (
        option(commands["train"], "-h") and "--lr" not in commands["train"]._option_string_actions
    )
    assert "--segments" in command_parser("diagnose convexity")._option_string_actions


TRAIN_FIELDS = [
    "dataset", "data_dir", "lr", "batch_size", "epochs", "train_subset", "test_subset",
    "eval_every", "allow_unverified_data", "loss", "momentum", "seed", "channels", "hidden",
    "resample_null",
]  # fmt: skip
DECLARED = (
    [("train", TrainConfig, name, "--" + name.replace("_", "-")) for name in TRAIN_FIELDS]
    + [("reproduce", TrainConfig, name, "--" + name.replace("_", "-")) for name in TRAIN_FIELDS[:9]]
    + [
        ("reproduce", Tuning, "seed", "--sweep-seed"),
        ("reproduce", Tuning, "start_step", "--sweep-start-step"),
        ("reproduce", Tuning, "max_extend", "--max-extend"),
        ("escape", EscapeConfig, "ks", "--teacher-widths"),
        ("escape", EscapeConfig, "seeds", "--population-seeds"),
        ("escape", EscapeConfig, "batch", "--batch-size"),
        ("escape", EscapeConfig, "plugins", "--plugin"),
    ]
    + [
        ("escape", EscapeConfig, name, "--" + name.replace("_", "-"))
        for name in (
            "n_extra", "outputs", "sample_seeds", "methods", "lr", "hyper", "protocols",
            "steps", "tune_k", "tune_seeds", "tune_pool", "max_gd_steps", "problem_seed",
            "references",
        )
    ]
)  # fmt: skip


@pytest.mark.parametrize("command, config, name, flag", DECLARED)
def test_options_take_default_and_help_from_their_field(command, config, name, flag):
    spec = {f.name: f for f in dataclasses.fields(config)}[name]
    parser = command_parser(command)
    assert compact(spec.metadata["help"]) in compact(parser.format_help())
    assert option(parser, flag).help.startswith(spec.metadata["help"])
    required = ["--out", "x"] if command == "escape" else []
    args = build_parser([command]).parse_args([command, *required])
    value = getattr(args, option(parser, flag).dest)
    if spec.default is not dataclasses.MISSING:
        assert value == spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        assert value == spec.default_factory()
    else:
        assert name == "ks" and value == [6, 8, 10, 12]  # the CLI's: the field has none


def test_every_field_of_the_configs_has_help():
    for config in (TrainConfig, Tuning, EscapeConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(config)), config


def all_parsers():
    """(words, parser) of every command and subcommand."""
    for words in COMMANDS:
        parser = command_parser(words)
        actions = parser._subparsers._group_actions if parser._subparsers else []
        yield words, parser
        for name, sub in actions[0].choices.items() if actions else ():
            yield f"{words} {name}", sub


def test_one_vocabulary_across_commands():
    seen = {}
    for words, parser in all_parsers():
        flags = parser._option_string_actions
        if "--device" in flags:  # one default, one check
            assert flags["--device"].default == "auto", words
            assert flags["--device"].type is cli_common.device_name, words
            seen.setdefault("--device", []).append(words)
        if "--seeds" in flags:
            assert flags["--seeds"].help == cli_run.SEEDS_HELP, words
            seen.setdefault("--seeds", []).append(words)
        for gone in ("--k", "--batch", "--sigma", "--resume"):
            assert gone not in flags, (words, gone)
        assert not parser.allow_abbrev, words  # --batch is not --batch-size
    assert sorted(seen["--seeds"]) == ["demo", "reproduce"]
    assert len(seen["--device"]) == 7  # demo train reproduce escape diagnose match landscape


# --- validated before any work --------------------------------------------------------------

ESCAPE = ["escape", "--out", "x"]
BAD_VALUES = [
    (["train", "--channels", "0", "0"], "--channels"),
    (["train", "--hidden", "-3"], "--hidden"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "0"], "--lr"),
    (["train", "--momentum", "1"], "--momentum"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--train-subset", "0"], "--train-subset"),
    (["train", "--eval-every", "zero"], "--eval-every"),
    (["train", "--loss-param", "sigma"], "--loss-param"),
    (["train", "--loss-param", "sigma=inf"], "--loss-param"),
    (["train", "--device", "frob"], "--device"),
    ([*ESCAPE, "--threads", "0"], "--threads"),
    ([*ESCAPE, "--teacher-widths", "6,0"], "--teacher-widths"),
    ([*ESCAPE, "--teacher-widths", "6,6"], "--teacher-widths"),
    ([*ESCAPE, "--population-seeds", "0"], "--population-seeds"),
    ([*ESCAPE, "--batch-size", "0"], "--batch-size"),
    ([*ESCAPE, "--n-extra", "-1"], "--n-extra"),
    ([*ESCAPE, "--lr", "sgd=0.05,sgd=0.2"], "--lr"),
    ([*ESCAPE, "--lr", "sgd=nan"], "--lr"),
    ([*ESCAPE, "--hyper", "pgd=0.5"], "--hyper"),
    ([*ESCAPE, "--hyper", "pgd.radius=0.5,pgd.radius=0.6"], "--hyper"),
    ([*ESCAPE, "--protocols", "from-nowhere"], "--protocols"),
    ([*ESCAPE, "--references", ""], "--references"),
    ([*ESCAPE, "--methods", "sgd,,qmse"], "--methods"),
    ([*ESCAPE, "--cpus-per-task", "0"], "--cpus-per-task"),
    ([*ESCAPE, "--gpus-per-task", "-1"], "--gpus-per-task"),
    ([*ESCAPE, "--device", "frob"], "--device"),
    (["symmetry", "example", "--samples", "0"], "--samples"),
    (["symmetry", "match", "a", "b", "--points", "1"], "--points"),
    (["landscape", "r", "--span", "nan"], "--span"),
    (["landscape", "r", "--span", "-1"], "--span"),
    (["landscape", "r", "--group-size", "0"], "--group-size"),
    (["reproduce", "--max-extend", "-3"], "--max-extend"),
    (["reproduce", "--diagnose-samples", "0"], "--diagnose-samples"),
    (["reproduce", "--lanczos-steps", "0"], "--lanczos-steps"),
    (["reproduce", "--losses", ""], "--losses"),
    (["reproduce", "--losses", "mse,hinge"], "--losses"),
    (["reproduce", "--losses", "mse,mse"], "--losses"),
    (["reproduce", "--seeds", "0"], "--seeds"),
    (["reproduce", "--parallel", "0"], "--parallel"),
    (["reproduce", "--sweep-start-step", "inf"], "--sweep-start-step"),
    (["demo", "--seeds", "0"], "--seeds"),
    (["diagnose", "r", "--eigenvalues", "0"], "--eigenvalues"),
    (["diagnose", "r", "--lanczos-steps", "0"], "--lanczos-steps"),
    (["diagnose", "r", "--tol-ratio", "-1"], "--tol-ratio"),
    (["diagnose", "convexity", "--points", "2"], "--points"),
    (["diagnose", "convexity", "--segments", "0"], "--segments"),
]
GONE = [  # renamed or removed options, and abbreviations, are refused
    (["train", "--resume"], "--resume"),
    (["train", "--sigma", "0.1"], "--sigma"),
    (["reproduce", "--sigma", "0.1"], "--sigma"),
    ([*ESCAPE, "--k", "6"], "--k"),
    ([*ESCAPE, "--batch", "8"], "--batch"),
    ([*ESCAPE, "--seeds", "8"], "--seeds"),
    (["diagnose", "r", "--k", "3"], "--k"),
    (["diagnose", "convexity", "--samples", "3"], "--samples"),  # only its own options
]


@pytest.mark.parametrize("argv, flag", BAD_VALUES + GONE)
def test_a_bad_value_is_one_line_naming_the_option(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("qmse "), err
    named = f": error: argument {flag}: " if (argv, flag) in BAD_VALUES else f" {flag}"
    assert named in err, err
    assert not list(tmp_path.iterdir())  # refused before any work


REFUSED_BEFORE_WORK = [
    (["reproduce", "--losses", "mse,label-noise"], "loss 'label-noise' needs sigma"),
    (["reproduce", "--loss-param", "sigma=0.1"], "no loss trained here (mse, qmse) takes it"),
    (
        [*ESCAPE, "--methods", "sgd,qmse", "--references", "momentum"],
        "--references momentum: not among the sample-based --methods (sgd,qmse)",
    ),
    (
        [*ESCAPE, "--radius", "pgd=0.5", "--hyper", "pgd.radius=0.3"],
        "--radius pgd and --hyper pgd.radius: give one",
    ),
    ([*ESCAPE, "--backend", "ray", "--device", "cuda"], "give each task a GPU, --gpus-per-task"),
]


@pytest.mark.parametrize("argv, message", REFUSED_BEFORE_WORK)
def test_what_the_values_contradict_is_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--device", "cpu"] if "--device" not in argv else argv) == 2
    one_line_error(capsys, message, command=argv[0])
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [["train"], ["reproduce"], ["demo"], ESCAPE, ["diagnose", "r"], ["symmetry", "match", "a",
     "b"], ["landscape", "r"]],
)  # fmt: skip
def test_cuda_without_cuda_is_the_same_line_in_every_command(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--device", "cuda"]) == 2
    one_line_error(
        capsys, "device cuda: no CUDA device is visible", "--device cpu", command=argv[0]
    )
    assert not list(tmp_path.iterdir())


# --- the renamed options reach the library --------------------------------------------------


def test_escape_options_fill_the_config(tmp_path, monkeypatch, capsys):
    seen = {}

    def run_benchmark(out, cfg, **kwargs):
        seen["cfg"] = cfg

    def write_outputs(out):
        (tmp_path / "table.md").write_text("table")
        return {"table": tmp_path / "table.md"}

    monkeypatch.setattr(cli_escape, "run_benchmark", run_benchmark)
    monkeypatch.setattr(cli_escape, "write_outputs", write_outputs)
    argv = [
        "escape", "--teacher-widths", "3,4", "--population-seeds", "7", "--batch-size", "9",
        "--methods", "gd-population,sgd,pgd,label-noise", "--references", "sgd",
        "--lr", "sgd=0.2", "--radius", "pgd=0.5", "--hyper", "label-noise.sigma=0.3",
        "--device", "cpu", "--out", str(tmp_path / "b"),
    ]  # fmt: skip
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.ks, cfg.seeds, cfg.batch, cfg.device) == ([3, 4], 7, 9, "cpu")
    assert cfg.references == ["sgd"] and cfg.lr == {"sgd": 0.2}
    assert cfg.hyper == {"pgd": {"radius": 0.5}, "label-noise": {"sigma": 0.3}}


def test_reproduce_options_fill_the_grid(monkeypatch, capsys):
    seen = {}

    def run_grid(configs, out, **kwargs):
        seen.update(configs=configs, out=out, **kwargs)
        return {}

    monkeypatch.setattr(cli_run, "run_grid", run_grid)
    monkeypatch.setattr(cli_run, "grid_outputs", lambda out: {})
    argv = ["reproduce", "--losses", "mse,label-noise", "--loss-param", "sigma=0.3", "--seeds",
            "2", "--tune", "--sweep-seed", "7", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    params = {c.loss: c.loss_params for c in seen["configs"]}
    assert params == {"mse": {}, "label-noise": {"sigma": 0.3}}
    assert {c.lr for c in seen["configs"]} == {PAPER_LR["fashion-mnist"]}
    assert {c.seed for c in seen["configs"]} == {0, 1}
    assert seen["tuning"] == Tuning(seed=7)  # the other fields' defaults: Tuning's
    assert seen["device"] == torch.device("cpu") and seen["out"] == "runs/reproduce-fashion-mnist"


def test_diagnose_convexity_is_a_subcommand_with_its_own_options():
    run_help = command_parser("diagnose").format_help()
    convexity_help = command_parser("diagnose convexity").format_help()
    assert "qmsediagnoseconvexity" in compact(run_help) and "--segments" not in run_help
    assert "--segments" in convexity_help and "--samples" not in convexity_help
    assert "--eigenvalues" in run_help


def test_qmse_debug_raises_a_user_error_with_its_traceback(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("x = (\n")
    argv = ["escape", "--plugin", str(bad), "--methods", "sgd", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"plug-in {bad}, line 1" in err
    monkeypatch.setenv("QMSE_DEBUG", "1")
    with pytest.raises(UserError, match="SyntaxError") as raised:
        main(argv)
    assert isinstance(raised.value.__cause__, SyntaxError)


def test_the_escape_protocol_options_fill_the_config(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli_escape, "run_benchmark", lambda out, cfg, **kw: seen.update(cfg=cfg))
    monkeypatch.setattr(cli_escape, "write_outputs", lambda out: {"table": Path(os.devnull)})
    argv = ["escape", "--methods", "sgd,qmse", "--tune-budget", "none", "--comparisons",
            "qmse:sgd", "--equivalence-margin", "0.1", "--out", "unused"]  # fmt: skip
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.tune_budget is None and cfg.comparisons == ["qmse:sgd"]
    assert cfg.equivalence_margin == 0.1 and cfg.declared_comparisons() == [("qmse", "sgd")]
    assert main([*argv[:-2], "--tune-budget", "24", "--out", "unused"]) == 0
    assert seen["cfg"].tune_budget == 24


# --- user losses: --plugin, and the paths each command wrote ------------------------------


@pytest.fixture
def loss_registry():
    """The loss registry as it was before the test (plug-ins add to it)."""
    from qmse.loss import LOSSES

    saved = dict(LOSSES)
    yield LOSSES
    LOSSES.clear()
    LOSSES.update(saved)


def documented_plugin(tmp_path: Path, name: str = "my-huber") -> Path:
    """docs/diagnostics.md's myloss.py, registering its loss under `name` (a new file
    content per name: a plug-in is imported once per content and process)."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "diagnostics.md").read_text()
    section = doc.split("### A loss of your own", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"my-huber"' in code
    path = tmp_path / "myloss.py"
    path.write_text(code.replace('"my-huber"', f'"{name}"'))
    return path


def wrote(out: str) -> list[Path]:
    """The paths a command's "wrote PATH" lines name."""
    return [Path(line.split(" ", 1)[1].split(" (")[0]) for line in out.splitlines()
            if line.startswith("wrote ")]  # fmt: skip


def test_train_diagnose_landscape_with_a_plugin_loss(data_dir, tmp_path, capsys, loss_registry):
    plugin = documented_plugin(tmp_path)
    run = tmp_path / "run"
    assert main(train_args(data_dir, run, "--loss", "my-huber")) == 2  # not registered yet
    one_line_error(capsys, "argument --loss: my-huber: not a registered loss", "--plugin FILE.py")
    assert not run.exists()
    assert main(train_args(data_dir, run, "--plugin", str(plugin), "--loss", "my-huber")) == 0
    paths = wrote(capsys.readouterr().out)
    assert paths == [run / n for n in ("config.json", "metrics.jsonl", "timings.jsonl",
                                       "checkpoint.pt")]  # fmt: skip
    assert all(p.is_file() for p in paths)
    assert runs.load_json(run / "config.json")["loss"] == "my-huber"
    diagnose = ["diagnose", str(run), "--samples", "12", "--lanczos-steps", "4",
                "--slq-vectors", "1", "--trace-samples", "2", "--quiet", "--device",
                "cpu"]  # fmt: skip
    assert main([*diagnose, "--plugin", str(plugin)]) == 0
    printed = capsys.readouterr().out
    assert "[my-huber] λ_max" in printed and "[mse] λ_max" in printed
    line = f"diagnosis: {run / 'diagnosis.json'}, {run / 'diagnosis.txt'} (in the run folder)"
    assert line in printed and (run / "diagnosis.json").is_file()
    out = tmp_path / "slice"
    landscape = ["landscape", str(run), "--plugin", str(plugin), "--loss", "my-huber",
                 "--dims", "1", "--points", "3", "--samples", "48", "--quiet", "--device",
                 "cpu", "--out", str(out)]  # fmt: skip
    assert main(landscape) == 0
    paths = wrote(capsys.readouterr().out)
    assert paths == [out / n for n in ("landscape-1d.npz", "landscape-1d.png", "summary.json")]
    assert all(p.is_file() for p in paths)
    # the run was trained and measured with the plug-in's loss: its train_loss (all 48
    # training images) is my-huber at the final weights, the slice's centre, not ½‖r‖²
    last = runs.read_jsonl(run / "metrics.jsonl")[-1]
    centre = runs.load_json(out / "summary.json")["centre_loss"]
    assert math.isclose(last["train_loss"], centre, rel_tol=1e-5)
    assert not math.isclose(last["train_loss"], last["train_mse"], rel_tol=1e-2)
    other = tmp_path / "other"  # a run of a loss no plug-in loaded here registers
    other.mkdir()
    config = runs.load_json(run / "config.json")
    runs.save_json(other / "config.json", {**config, "loss": "their-huber"})
    assert main([*diagnose[:1], str(other), *diagnose[2:]]) == 2
    one_line_error(capsys, f"{other} was trained with loss 'their-huber'", "--plugin FILE.py",
                   command="diagnose")  # fmt: skip


def test_every_command_prints_the_paths_it_wrote(data_dir, tmp_path, capsys):
    for seed in ("0", "1"):
        assert main(train_args(data_dir, tmp_path / f"s{seed}", "--seed", seed)) == 0
    capsys.readouterr()
    a, b = str(tmp_path / "s0"), str(tmp_path / "s1")
    small = ["--samples", "10", "--device", "cpu"]
    diag = [*small, "--lanczos-steps", "3", "--slq-vectors", "1", "--trace-samples", "2",
            "--quiet"]  # fmt: skip
    commands = {
        "match": ["symmetry", "match", a, b, "--points", "3", *small, "--out",
                  str(tmp_path / "m")],
        "landscape": ["landscape", a, b, "--dims", "1", "--points", "3", "--quiet", *small,
                      "--out", str(tmp_path / "l")],
        "compare": ["diagnose", "--compare", a, b, *diag, "--out", str(tmp_path / "c")],
    }  # fmt: skip
    expected = {
        "match": [tmp_path / "m" / n for n in ("interpolation.png", "interpolation.npz",
                                               "summary.json")],
        "landscape": [tmp_path / "l" / r / n for r in ("s0", "s1")
                      for n in ("landscape-1d.npz", "landscape-1d.png", "summary.json")]
        + [tmp_path / "l" / "landscape-1d.png"],
        "compare": [tmp_path / "c" / n for n in ("comparison.json", "comparison.txt",
                                                 "diagnose-spectra.png")],
    }  # fmt: skip
    for name, argv in commands.items():
        assert main(argv) == 0, name
        out = capsys.readouterr().out
        assert wrote(out) == expected[name], name
        assert all(p.is_file() for p in expected[name]), name
    for run in (a, b):  # --compare diagnoses each run into its own folder, and says so
        assert f"diagnosis: {Path(run) / 'diagnosis.json'}" in out
        assert (Path(run) / "diagnosis.json").is_file()


def test_a_plugin_that_fails_is_one_line_and_registers_nothing(tmp_path, capsys, loss_registry):
    bad = tmp_path / "half.py"
    bad.write_text(
        "from qmse import Loss, register_loss\n"
        "register_loss(Loss('half-done', lambda o, t, n: (o - t).abs().sum(-1)))\n"
        "raise RuntimeError('no data for the second loss')\n"
    )
    argv = ["train", "--plugin", str(bad), "--loss", "half-done", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    one_line_error(capsys, f"plug-in {bad}, line 3: RuntimeError: no data for the second loss")
    assert "half-done" not in loss_registry and not (tmp_path / "r").exists()
    taken = tmp_path / "taken.py"
    taken.write_text("from qmse import Loss, register_loss\n"
                     "register_loss(Loss('mse', lambda o, t, n: o.sum(-1)))\n")  # fmt: skip
    assert main(["landscape", "r", "--plugin", str(taken)]) == 2
    one_line_error(capsys, f"plug-in {taken}, line 2", "'mse' is already registered",
                   command="landscape")  # fmt: skip
    assert main(["symmetry", "match", "a", "b", "--loss", "hinge"]) == 2
    one_line_error(capsys, "argument --loss: hinge: not a registered loss", command="symmetry")


def test_reproduce_takes_a_plugin_loss_in_this_process_only(tmp_path, monkeypatch, capsys,
                                                            loss_registry):  # fmt: skip
    seen = {}
    monkeypatch.setattr(cli_run, "run_grid", lambda configs, out, **kw: seen.update(c=configs))
    monkeypatch.setattr(cli_run, "grid_outputs", lambda out: {})
    plugin = documented_plugin(tmp_path, "grid-huber")
    argv = ["reproduce", "--plugin", str(plugin), "--losses", "mse,grid-huber", "--seeds", "1",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert sorted({c.loss for c in seen["c"]}) == ["grid-huber", "mse"]
    assert main([*argv, "--backend", "ray"]) == 2
    one_line_error(capsys, "--plugin with --backend ray", "--backend local", command="reproduce")


def test_load_plugin_imports_a_file_once_and_takes_back_what_a_failed_one_added(
    tmp_path, monkeypatch
):
    """qmse.plugins.load_plugin on two registries of a module the plug-ins import."""
    from types import ModuleType

    from qmse.plugins import load_plugin

    reg = ModuleType("plugin_registries")
    reg.A, reg.B, reg.imports = {"kept": 0}, {}, []
    monkeypatch.setitem(sys.modules, "plugin_registries", reg)
    good = tmp_path / "good.py"
    good.write_text("import plugin_registries as r\nr.imports.append(1)\nr.A['a'] = 1\n"
                    "r.B['b'] = 2\n")  # fmt: skip
    assert load_plugin(good, reg.A, reg.B) == ["a", "b"]
    assert load_plugin(good, reg.A, reg.B) == ["a", "b"] and reg.imports == [1]  # once
    bad = tmp_path / "bad.py"
    bad.write_text("import plugin_registries as r\nr.A['c'] = 3\nr.B['d'] = 4\n1 / 0\n")
    with pytest.raises(UserError, match=rf"plug-in {bad}, line 4: ZeroDivisionError") as e:
        load_plugin(bad, reg.A, reg.B)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    assert reg.A == {"kept": 0, "a": 1} and reg.B == {"b": 2}  # c and d taken back
    with pytest.raises(FileNotFoundError, match="plug-in .*missing.py does not exist"):
        load_plugin(tmp_path / "missing.py", reg.A)
