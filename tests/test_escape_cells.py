"""qmse.escape.cells through `qmse escape`: rows, tables, figures, resume, keyed caches,
plug-ins, fixed step sizes, and errors that do not block the corrected call."""

import json
import math

import pytest

from qmse.cli import main
from qmse.escape import parse_hyper, parse_values
from qmse.stats import wilson

TINY = [
    "--population-seeds", "6", "--sample-seeds", "4", "--steps", "60", "--protocols", "random-init",
    "--tune-seeds", "3", "--max-gd-steps", "3000", "--batch-size", "16", "--quiet",
]  # fmt: skip

PLUGIN = """
from qmse.escape import Method, register_method

def sign_sgd(W, grad, state, t, lr):      # W, grad: (S, n, d); lr: (S, 1, 1)
    return W - lr * grad.sign(), state

register_method(Method(name="sign-sgd", loss="mse", update=sign_sgd, lr_grid=(1e-3, 2e-3, 4e-3)))

def plain(W, grad, state, t, lr):
    return W - lr * grad, state

register_method(Method(name="plain-sgd", loss="mse", update=plain, lr_grid=(0.1, 0.2)))
"""


def _rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


def test_cli_writes_rows_table_figures_and_resumes(tmp_path):
    out = tmp_path / "esc"
    argv = ["escape", "--teacher-widths", "3,4", "--methods", "gd-population,sgd,qmse,label-noise",
            "--tune-k", "3", "--out", str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(out)
    assert {(r["k"], r["method"]) for r in rows} == {
        (k, m) for k in (3, 4) for m in ("gd-population", "sgd", "qmse", "label-noise")
    }
    for r in rows:
        assert (r["ci95_low"], r["ci95_high"]) == pytest.approx(wilson(r["failures"], r["seeds"]))
        assert math.isclose(r["failure_rate"], r["failures"] / r["seeds"])
        assert "failed" not in r  # per-start outcomes stay in rows/
    label = next(r for r in rows if r["method"] == "label-noise" and r["k"] == 4)
    assert set(label["hyper"]) == {"sigma"} and label["grad_evals"] == 60 * 16
    assert label["tuning"]["tuned_at_k"] == 3 and label["tuning"]["tune_starts"] == 3
    assert set(label["paired"]) == {"sgd", "qmse"}
    sweep = json.loads((out / "tuning" / "random-init_label-noise_k3_n3_C1.json").read_text())
    assert [s["param"] for s in sweep["stages"]][:2] == ["lr", "sigma"]
    assert all(len(p["params"]) == 2 for p in sweep["points"])
    for name in ("table.md", "figure.png", "sweeps.png", "timings.json", "kind.json"):
        assert (out / name).stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "#### Exploratory: paired against sgd" in table
    assert "#### Declared comparisons (random-init)" in table and "| qmse:sgd | 3 |" in table
    tests = json.loads((out / "results.json").read_text())["comparisons"]
    assert {(t["comparison"], t["k"]) for t in tests} == {
        (c, k) for c in ("qmse:sgd", "qmse:label-noise") for k in (3, 4)
    }
    assert all(t["family"] == "primary" and "p_holm" in t for t in tests)
    assert sweep["budget"] == 32 and len(sweep["points"]) == 32  # the whole budget, no more
    assert "published" not in (out / "table.md").read_text()  # S&S give no rate for k < 6
    row_file = out / "rows" / "random-init_sgd_k4_n4_C1.json"
    stamp = row_file.stat().st_mtime_ns
    assert main(argv) == 0  # every piece cached: nothing recomputed
    assert row_file.stat().st_mtime_ns == stamp
    assert _rows(out) == rows
    assert main([*argv, "--batch-size", "8"]) == 2  # a finished benchmark keeps its settings


def test_the_plugin_example_runs_through_the_cli(tmp_path):
    """The interface's example as a file; a method with SGD's update and loss at SGD's lr
    reproduces SGD's outcomes start by start (common random numbers)."""
    plugin = tmp_path / "plugin.py"
    plugin.write_text(PLUGIN)
    out = tmp_path / "esc"
    argv = ["escape", "--teacher-widths", "3", "--plugin", str(plugin), "--methods",
            "sign-sgd,plain-sgd,sgd", "--lr", "plain-sgd=0.2,sgd=0.2", "--out", str(out),
            *TINY]  # fmt: skip
    assert main(argv) == 0
    rows = {r["method"]: r for r in _rows(out)}
    assert set(rows) == {"sign-sgd", "plain-sgd", "sgd"}
    assert rows["sign-sgd"]["tuning"]["fixed"] is False  # swept on its own grid
    assert rows["sgd"]["tuning"] == {"fixed": True} and rows["sgd"]["lr"] == 0.2
    assert not (out / "tuning" / "random-init_sgd_k3_n3_C1.json").exists()
    cells = {m: json.loads((out / "rows" / f"random-init_{m}_k3_n3_C1.json").read_text())
             for m in ("plain-sgd", "sgd")}  # fmt: skip
    assert cells["plain-sgd"]["failed"] == cells["sgd"]["failed"]
    assert cells["plain-sgd"]["median_loss"] == cells["sgd"]["median_loss"]
    assert rows["plain-sgd"]["paired"]["sgd"] == {"worse": 0, "better": 0, "p": 1.0}
    assert "| sgd | 0.2* |" in (out / "table.md").read_text()


def test_a_changed_argument_recomputes_instead_of_serving_stale_rows(tmp_path):
    out = tmp_path / "esc"
    base = [
        "escape",
        "--teacher-widths",
        "3",
        "--methods",
        "sgd",
        "--lr",
        "sgd=0.2",
        "--out",
        str(out),
    ]
    assert main([*base, *TINY]) == 0
    (out / "config.json").unlink()
    (out / "results.json").unlink()
    tiny = [a if a != "60" else "30" for a in TINY]  # --steps 30
    assert main([*base, *tiny]) == 0
    (row,) = _rows(out)
    assert row["steps"] == 30


def test_an_invalid_call_leaves_nothing_that_blocks_the_corrected_call(tmp_path, capsys):
    out = tmp_path / "esc"
    base = ["escape", "--teacher-widths", "3", "--methods", "sgd,pgd", "--out", str(out), *TINY]
    assert main([*base, "--lr", "sgd=-1"]) == 2
    assert "lr > 0" in capsys.readouterr().err and not (out / "config.json").exists()
    assert main([*base, "--lr", "sgd=0.2", "--radius", "sgdd=1"]) == 2
    assert "sgdd" in capsys.readouterr().err
    assert main([*base, "--lr", "sgd:0.2"]) == 2
    assert "NAME=NUMBER" in capsys.readouterr().err
    assert main([*base, "--methods", "sgd,nosuch"]) == 2
    assert "not registered" in capsys.readouterr().err
    assert main([*base, "--lr", "sgd=0.2,pgd=0.2", "--radius", "pgd=0.5"]) == 0
    pgd = next(r for r in _rows(out) if r["method"] == "pgd")
    assert (pgd["lr"], pgd["hyper"]) == (0.2, {"radius": 0.5}) and pgd["tuning"]["fixed"]


def test_spurious_minima_with_fixed_step_sizes_and_a_wider_student(tmp_path):
    """The acceptance command's shape at a small budget: seed 0 at k = 8 is a certified
    minimum; no tuning is needed when every step size is fixed. And n = k + 1 runs."""
    out = tmp_path / "minima"
    argv = ["escape", "--teacher-widths", "8", "--methods", "sgd,qmse", "--lr",
            "sgd=0.3,qmse=0.03", "--protocols", "spurious-minima", "--batch-size", "8",
            "--steps", "100", "--sample-seeds", "123", "--population-seeds", "1",
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    rows = _rows(out)
    assert [r["method"] for r in rows] == ["sgd", "qmse"]
    for r in rows:
        assert {"k", "n", "method", "protocol", "seeds", "failures", "failure_rate",
                "ci95_low", "ci95_high", "diverged", "lr"} <= set(r)  # fmt: skip
        assert r["seeds"] >= 1 and r["k"] == 8 and r["n"] == 8
    assert not (out / "tuning").exists() and (out / "minima" / "k8_n8_C1.json").exists()
    wide = tmp_path / "wide"
    assert main(["escape", "--teacher-widths", "3", "--n-extra", "1", "--methods",
                 "gd-population,sgd", "--out", str(wide), *TINY]) == 0  # fmt: skip
    assert {r["n"] for r in _rows(wide)} == {4}


def test_parse_values_and_hyper():
    assert parse_values("sgd=0.3, qmse=3e-2", "--lr") == {"sgd": 0.3, "qmse": 0.03}
    assert parse_values(None, "--lr") == {}
    assert parse_hyper("pgd.radius=0.5,label-noise.sigma=0.2") == {
        "pgd": {"radius": 0.5},
        "label-noise": {"sigma": 0.2},
    }
    with pytest.raises(ValueError, match="METHOD.NAME"):
        parse_hyper("pgd=0.5")
    with pytest.raises(ValueError, match="NAME=NUMBER"):
        parse_values("sgd=fast", "--lr")
