"""`qmse escape stability` through `qmse.cli.main`: the band it prints and writes is the
library's, its mean-map threshold the closed form 2(1 + β)/λ_max, and every mistake is one
line naming the option and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qmse import stability
from qmse import teacher_student as ts
from qmse.cli import build_parser, main
from qmse.cli import stability as cli_stability
from qmse.escape import problems

SMALL = ["--betas", "0.9", "--batch-sizes", "8", "--samples", "512", "--groups", "4"]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("qmse escape stability: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_saved_point_gets_the_librarys_band_and_the_closed_form_mean_threshold(tmp_path, capsys):
    """The teacher at k = 3 (the global minimum) as a user's point: the command's JSON is
    `stability_data`'s, its mean threshold 2(1 + β)/λ_max of the closed-form Hessian, and the
    band of the global minimum against itself is empty."""
    V = ts.make_problem(3).V
    torch.save({"W": V}, tmp_path / "teacher.pt")
    out = tmp_path / "band.json"
    argv = ["escape", "stability", "--teacher-width", "3", "--point", str(tmp_path / "teacher.pt"),
            *SMALL, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "a strict minimum" in printed
    data = json.loads(out.read_text())
    direct = stability.stability_data(problems.teacher_student(3), V, [0.9], [8], samples=512,
                                      groups=4)  # fmt: skip
    assert data["bands"] == json.loads(json.dumps(direct["bands"]))
    (row,) = data["bands"]
    lam = np.linalg.eigvalsh(ts.population_hessian(V, ts.make_problem(3)).numpy())[-1]
    assert row["minimum"]["mean"] == pytest.approx(2 * 1.9 / lam, rel=1e-10)
    assert row["band"] is None and "empty" in printed
    assert f"{row['minimum']['second']:9.4g}" in printed
    assert data["point"]["kind"] == "strict minimum" and data["point"]["objective"] < 1e-12


def test_a_seed_analyses_the_minimum_gd_population_certified(tmp_path, monkeypatch, capsys):
    """--seed S hands seed S to `certified_minima` and analyses the point it returns."""
    V = ts.make_problem(3).V
    asked = {}

    def certified(k, seeds):
        asked.update(k=k, seeds=list(seeds))
        return V[None], [5]

    monkeypatch.setattr(cli_stability, "certified_minima", certified)
    out = tmp_path / "band.json"
    assert main(["escape", "stability", "--teacher-width", "3", "--seed", "5", *SMALL,
                 "--out", str(out)]) == 0  # fmt: skip
    assert asked == {"k": 3, "seeds": [5]}
    assert "gd-population from Xavier seed 5" in capsys.readouterr().out
    assert json.loads(out.read_text())["point"]["source"] == "gd-population from Xavier seed 5"


def test_defaults_are_shown_in_the_help():
    parser = build_parser(["escape", "stability"])
    text = parser._subparsers._group_actions[0].choices["escape"]
    text = text._subparsers._group_actions[0].choices["stability"].format_help()
    for shown in ("(default: 8)", "(default: 0,0.9)", "(default: 16,64)", "(default: mse)",
                  "(default: 16384)"):  # fmt: skip
        assert shown in text, shown


def test_mistakes_are_one_line_naming_the_fix(tmp_path, capsys):
    V = ts.make_problem(3).V
    torch.save(V, tmp_path / "teacher.pt")
    torch.save(0.7 * V, tmp_path / "moved.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    cases = [
        (["--seed", "0", "--point", str(tmp_path / "teacher.pt")], ["--seed and --point"]),
        (["--point", str(tmp_path / "teacher.pt")], ["shape (3, 3)", "--teacher-width 8",
                                                     "give the width"]),
        (["--teacher-width", "3", "--point", str(tmp_path / "moved.pt")],
         ["not a stationary point", "gd_population"]),
        (["--teacher-width", "3", "--point", str(tmp_path / "other.pt")],
         ["holds no tensor", "torch.save"]),
        (["--teacher-width", "3", "--seed", "0"], ["no certified spurious minimum",
                                                   "another --seed"]),
        (["--betas", "1"], ["--betas", "< 1"]),
        (["--batch-sizes", "0"], ["--batch-sizes"]),
        (["--loss", "ce"], ["--loss", "invalid choice"]),
        (["--loss", "label-noise"], ["--loss-param sigma=VALUE"]),
        (["--samples", "6", "--groups", "4"], ["--samples 6", "8"]),
    ]  # fmt: skip
    for extra, fragments in cases:
        assert main(["escape", "stability", *extra]) == 2, extra
        one_line_error(capsys, *fragments)
