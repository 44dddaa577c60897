"""qmse escape on registered problems: the vector-output teacher–student problem end to end
(minima found, certified and deduplicated), planted copies of one minimum counted once,
tuning minima kept apart from the evaluation minima, rank-1 matrix sensing through the CLI
(its spurious minimum's closed forms), and the errors of a configuration that cannot run."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from qmse import teacher_student as ts
from qmse.cli import main
from qmse.errors import UserError
from qmse.escape import EscapeConfig, config, register_problem
from qmse.escape.problems import PROBLEMS, SIZES, Problem, teacher_student

DT = torch.float64
# Certified minima of teacher–student, to 4 decimals (Newton's method finishes them): k = 3,
# n = 2, scalar output (gd-population from seed 0); k = 3, C = 3, problem seed 0 (seeds 6
# and 22), two distinct minima with losses 0.094943 and 0.317707.
SCALAR = [[0.9463, 0.9463, -0.2438], [0.0896, 0.0896, 1.3179]]
VECTOR_A = [[-0.2675, -0.0001, 0.0552], [0.0196, 1.0027, 0.0059], [-0.3171, -0.0001, 0.8922]]
VECTOR_B = [[0.7096, 0.0010, -0.6645], [0.0001, 1.0260, 0.0719], [0.0099, 0.0008, -0.2276]]
# k = 3, C = 3, problem seeds 2 and 3 (other teachers): a minimum of each, losses 0.147803
# (gd-population from seed 3) and 0.068235 (seed 14).
TEACHER_2 = [[0.9014, -0.0095, -0.1585], [-0.0145, 0.9036, -0.1592], [-0.0016, -0.0017, -0.0603]]
TEACHER_3 = [[1.0693, 0.2201, 0.0177], [0.0216, -0.1531, 0.0059], [-0.002, -0.1809, 0.9112]]


def newton(W: list, problem: ts.Problem) -> torch.Tensor:
    """A critical point of the population loss near W, by Newton's method."""
    W = torch.tensor(W, dtype=DT)
    for _ in range(8):
        g = ts.population_grad(W, problem).reshape(-1)
        W = W - torch.linalg.solve(ts.population_hessian(W, problem), g).view_as(W)
    assert ts.population_grad(W, problem).norm() < 1e-12
    return W


def planted(monkeypatch, points: dict[str, torch.Tensor | list[torch.Tensor]]) -> None:
    """gd-population's end points replaced by `points` (tag -> (M, n, d), or a list of
    them, one per teacher), all converged."""

    def population(out, cfg, k, *, tag, quiet=False):
        found = points[tag] if isinstance(points[tag], list) else [points[tag]]
        return [
            {"W": W, "loss": p.objective(W), "converged": torch.ones(len(W), dtype=torch.bool)}
            for p, W in zip(config.problems_of(cfg, k), found, strict=True)
        ]

    monkeypatch.setattr(config, "population", population)


@pytest.fixture
def narrow():
    """A registered problem sized by k: teacher–student with n = k − 1 student units."""
    register_problem("test-narrow", lambda k: teacher_student(k, k - 1), size="k")
    yield "test-narrow"
    PROBLEMS.pop("test-narrow")
    SIZES.pop("test-narrow")


def test_permuted_copies_of_a_minimum_are_one_distinct_minimum(tmp_path, monkeypatch, narrow):
    """k = 3, n = 2, scalar output: the student's two units and the teacher's three (with
    the input coordinates) are interchangeable, so W, W with its rows swapped and W with
    two columns swapped are one certified minimum; every start is labelled with it."""
    W = newton(SCALAR, ts.make_problem(3, 2))
    copies = torch.stack([W, W[[1, 0]], W[:, [2, 1, 0]]])
    assert not torch.allclose(copies[0], copies[1]) and not torch.allclose(copies[0], copies[2])
    planted(monkeypatch, {"eval": copies})
    cfg = EscapeConfig(ks=[3], problem=narrow, methods=["sgd"])
    found = config.minima(tmp_path, cfg, 3, tag="eval")
    assert len(found["certificates"]) == 1 and found["labels"].tolist() == [0, 0, 0]
    (certificate,) = found["certificates"]
    assert certificate["kind"] == "strict minimum" and certificate["min_eigenvalue"] > 1e-3
    assert torch.equal(found["W"], copies) and found["stuck"] == 3 and found["excluded"] == []
    other = newton(VECTOR_A, ts.make_problem(3, outputs=3))  # not a minimum of this problem
    planted(monkeypatch, {"eval": torch.cat([copies, other[:2].unsqueeze(0)])})
    found = config.minima(tmp_path, cfg, 3, tag="eval")
    assert found["excluded"] == ["not stationary"] and len(found["W"]) == 3


def test_tuning_minima_are_other_distinct_minima_where_there_are_any(tmp_path, monkeypatch):
    """C = 3: minima A and B. Evaluation at A (twice); a tuning pool at A and B tunes on B
    alone (disjoint); a pool at A alone has no other, so it tunes on A and says so."""
    problem = ts.make_problem(3, outputs=3)
    A, B = newton(VECTOR_A, problem), newton(VECTOR_B, problem)
    cfg = EscapeConfig(ks=[3], outputs=3, methods=["sgd"])
    planted(monkeypatch, {"eval": torch.stack([A, A]), "tune": torch.stack([A, B, A])})
    W, owner, info = config.tuning_minima(tmp_path, cfg, 3)
    assert torch.equal(W, B.unsqueeze(0)) and owner.tolist() == [0]
    assert info == {"disjoint_minima": True, "tune_minima": 1, "eval_minima": 1}
    planted(monkeypatch, {"eval": torch.stack([A, A]), "tune": torch.stack([A])})
    W, owner, info = config.tuning_minima(tmp_path, cfg, 3)
    assert torch.equal(W, A.unsqueeze(0))
    assert info == {"disjoint_minima": False, "tune_minima": 1, "eval_minima": 1}


def test_teachers_pool_their_minima_and_never_share_one(tmp_path, monkeypatch):
    """Two teachers (problem seeds 2 and 3) in one cell: teacher 2's minimum planted twice
    and teacher 3's once are two distinct minima, labelled per start and owned by their
    teachers; teacher 2's minimum planted for teacher 3 is not a critical point there. The
    tuning pool's minimum of teacher 3 is kept apart from the evaluation set only where
    teacher 3's evaluation set has it; sample_seeds counts starts per teacher."""
    M2 = newton(TEACHER_2, ts.make_problem(3, outputs=3, seed=2))
    M3 = newton(TEACHER_3, ts.make_problem(3, outputs=3, seed=3))
    cfg = EscapeConfig(ks=[3], outputs=3, problem_seed=2, teachers=2, methods=["sgd"])
    planted(monkeypatch, {"eval": [torch.stack([M2, M2]), torch.stack([M3, M2])]})
    found = config.minima(tmp_path, cfg, 3, tag="eval")
    assert found["labels"].tolist() == [0, 0, 1] and found["owner"].tolist() == [0, 0, 1]
    assert [round(c["objective"], 6) for c in found["certificates"]] == [0.147803, 0.068235]
    assert found["excluded"] == ["not stationary"] and found["stuck"] == 4
    assert found["forms"][:, 0].tolist() == [0.0, 1.0]  # each form after its teacher
    assert config.instance_of(cfg, 3)["seed"] == [2, 3]
    planted(monkeypatch, {"eval": [torch.stack([M2, M2]), torch.stack([M3])],
                          "tune": [torch.stack([M2]), torch.stack([M3])]})  # fmt: skip
    W, owner, info = config.tuning_minima(tmp_path, cfg, 3)
    assert owner.tolist() == [0, 1] and info["disjoint_minima"] is False  # no other minimum
    planted(monkeypatch, {"eval": [torch.stack([M2]), M3[None][:0]],
                          "tune": [M2[None][:0], torch.stack([M3])]})  # fmt: skip
    W, owner, info = config.tuning_minima(tmp_path, cfg, 3)
    assert torch.equal(W, M3.unsqueeze(0)) and owner.tolist() == [1]
    assert info == {"disjoint_minima": True, "tune_minima": 1, "eval_minima": 1}
    planted(monkeypatch, {"eval": [torch.stack([M2, M2]), torch.stack([M3])]})
    one = EscapeConfig(ks=[3], outputs=3, problem_seed=2, teachers=2, sample_seeds=1)
    W, owner = config.starts(tmp_path, one, 3, "spurious-minima", tuning=False)
    assert owner.tolist() == [0, 1] and torch.equal(W, torch.stack([M2, M3]))
    W, owner = config.starts(tmp_path, one, 3, "random-init", tuning=False)
    assert owner.tolist() == [0, 1] and torch.equal(W[0], W[1])  # the same seed, each teacher
    with pytest.raises(UserError, match="several teachers need teacher-student with outputs"):
        EscapeConfig(ks=[3], teachers=2)


def test_teachers_through_the_cli(tmp_path):
    """`qmse escape --outputs 3 --problem-seed 2 --teachers 2`: gd-population per teacher,
    one certified minimum each (the planted ones above), pooled in one row per method."""
    out = tmp_path / "teachers"
    argv = ["escape", "--outputs", "3", "--problem-seed", "2", "--teachers", "2",
            "--teacher-widths", "3", "--population-seeds", "20", "--max-gd-steps", "1000",
            "--protocols", "spurious-minima", "--methods", "sgd", "--lr", "sgd=0.2",
            "--steps", "40", "--batch-size", "8", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "minima" / "k3_n3_C3.json").read_text())
    assert report["distinct_per_teacher"] == [1, 1] and report["of_seeds"] == 40
    assert report["distinct_losses"] == pytest.approx([0.147803, 0.068235], abs=1e-6)
    assert report["instance"]["seed"] == [2, 3]
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert (row["seeds"], row["minima"], row["instance"]["seed"]) == (2, [1, 1], [2, 3])
    assert sorted(p.name for p in (out / "gd-population").iterdir()) == [
        "eval_seed2_k3_n3_C3.pt", "eval_seed3_k3_n3_C3.pt"
    ]  # fmt: skip
    assert "seed=[2, 3]" in (out / "table.md").read_text()


VECTOR = [
    "escape", "--problem", "teacher-student", "--outputs", "3", "--teacher-widths", "3",
    "--population-seeds", "23", "--max-gd-steps", "5000", "--protocols", "spurious-minima",
    "--methods", "sgd,qmse", "--lr", "sgd=0.2,qmse=0.05", "--steps", "40", "--batch-size", "8",
    "--quiet",
]  # fmt: skip


def test_vector_outputs_find_certify_and_deduplicate_minima(tmp_path):
    """`qmse escape --problem teacher-student --outputs 3`: gd-population from seeds 0-22
    ends stuck at seeds 0 and 22 (one minimum) and 4, 6, 15, 17, 20 (another), seeds 0 and 4
    finished by Newton's method where the 5,000-step cap stopped gradient descent; both
    certified; the rows count them, with failures per distinct minimum and the weighted
    rate."""
    out = tmp_path / "vector"
    assert main([*VECTOR, "--out", str(out)]) == 0
    report = json.loads((out / "minima" / "k3_n3_C3.json").read_text())
    assert (report["stuck"], report["count"], report["distinct"]) == (7, 7, 2)
    assert report["starts_per_minimum"] == [2, 5] and report["excluded"] == []
    assert report["distinct_losses"] == pytest.approx([0.317707, 0.094943], abs=1e-6)
    assert min(report["min_hessian_eigenvalues"]) > 0.01
    rows = json.loads((out / "results.json").read_text())["rows"]
    for r in rows:
        assert (r["problem"], r["outputs"], r["minima"]) == ("teacher-student", 3, [2, 5])
        assert r["instance"] == {"k": 3, "n": 3, "outputs": 3, "seed": 0, "teacher": "identity"}
        assert sum(r["minima_failures"]) == r["failures"]
        rates = [f / n for f, n in zip(r["minima_failures"], r["minima"])]
        assert r["weighted_failure_rate"] == pytest.approx(sum(rates) / 2)
        saved = json.loads(
            (out / "rows" / f"spurious-minima_{r['method']}_k3_n3_C3.json").read_text()
        )
        assert saved["failed"].count("1") == r["failures"]
        failed = [int(c) for c in saved["failed"]]  # seeds 0, 4, 6, 15, 17, 20, 22
        assert failed[0] + failed[6] == r["minima_failures"][0]
    table = (out / "table.md").read_text()
    assert "Problem: teacher-student (k=3: n=3, outputs=3, seed=0, teacher=identity)" in table
    assert "Distinct minima modulo symmetry (starts at each): k=3: 2 (2, 5)." in table
    assert "#### Escape per distinct minimum (spurious-minima)" in table


def test_matrix_sensing_runs_through_the_cli(tmp_path):
    """`qmse escape --problem matrix-sensing` at δ = 0.7, n = 3: rows for both protocols,
    named by the problem; its certified minimum is the constructed one, f = 1 − δ² with
    smallest Hessian eigenvalue 4(1 + δ)(2δ − 1); a second run in another directory gives
    the same rows (seeded)."""
    argv = [
        "escape", "--problem", "matrix-sensing", "--problem-args", "delta=0.7,seed=1",
        "--teacher-widths", "3", "--methods", "gd-population,sgd,qmse", "--lr",
        "sgd=0.1,qmse=0.1", "--population-seeds", "12", "--sample-seeds", "6", "--steps", "100",
        "--batch-size", "8", "--max-gd-steps", "2000", "--quiet",
    ]  # fmt: skip
    runs = []
    for name in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text())["rows"])
    rows = runs[0]
    assert {(r["protocol"], r["method"]) for r in rows} == {
        ("random-init", "gd-population"), ("random-init", "sgd"), ("random-init", "qmse"),
        ("spurious-minima", "sgd"), ("spurious-minima", "qmse"),
    }  # fmt: skip
    for r in rows:
        assert r["problem"] == "matrix-sensing" and r["instance"]["delta"] == 0.7
        assert r["k"] == 3 and r["n"] == 3 and r["instance"]["n"] == 3 and r["seeds"] > 0
    assert rows == runs[1]
    report = json.loads((tmp_path / "a" / "minima" / "k3_n3_C1_matrix-sensing.json").read_text())
    assert report["distinct"] == 1 and report["count"] >= 1
    assert report["distinct_losses"] == pytest.approx([1 - 0.7**2], abs=1e-9)
    assert report["min_hessian_eigenvalues"] == pytest.approx([4 * 1.7 * 0.4], abs=1e-6)
    assert (
        "Problem: matrix-sensing (k=3: delta=0.7, n=3, seed=1"
        in (tmp_path / "a" / "table.md").read_text()
    )


def test_burer_monteiro_keeps_its_degenerate_minima_and_sweeps_through_the_cli(tmp_path):
    """`qmse escape --problem burer-monteiro` at p = 2 (its size): gradient descent returns
    every start to the spurious set (cost 0, Hessian singular), which the problem's value
    test calls stuck, so the degenerate points are kept and the table says they are not
    isolated; SGD's step is swept on tuning minima of their own (no --lr), the record
    names its problem, and the row uses the chosen step."""
    out = tmp_path / "bm"
    argv = ["escape", "--problem", "burer-monteiro", "--teacher-widths", "2",
            "--population-seeds", "8", "--tune-pool", "8", "--max-gd-steps", "3000",
            "--protocols", "spurious-minima", "--methods", "sgd", "--tune-seeds", "4",
            "--tune-budget", "6", "--sample-seeds", "4", "--steps", "100", "--batch-size", "8",
            "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "minima" / "k2_n4_C2_burer-monteiro.json").read_text())
    assert report["stuck"] == report["count"] == report["distinct"] == 8
    assert report["excluded"] == [] and report["isolated"] is False
    assert max(abs(v) for v in report["distinct_losses"]) < 1e-12  # all on the set f = 0
    assert max(abs(v) for v in report["min_hessian_eigenvalues"]) < 1e-12  # degenerate
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    sweep = out / "tuning" / "spurious-minima_sgd_k2_n4_C2_burer-monteiro.json"
    sweep = json.loads(sweep.read_text())
    assert (sweep["problem"], len(sweep["points"])) == ("burer-monteiro", 6)
    assert row["lr"] == sweep["chosen"]["lr"] and row["tuning"]["fixed"] is False
    assert row["tuning"]["disjoint_minima"] and row["minima_isolated"] is False
    assert "Not isolated at k=2" in (out / "table.md").read_text()


def test_a_configuration_that_cannot_run_says_why(tmp_path):
    with pytest.raises(UserError, match="options are n_extra, outputs"):
        EscapeConfig(ks=[3], problem_args={"delta": 0.7})
    register_problem("test-sizeless", lambda: ring(True))
    try:
        with pytest.raises(UserError, match="one cell: give one size"):
            EscapeConfig(ks=[1, 2], problem="test-sizeless", methods=["sgd"]).check_methods()
    finally:
        PROBLEMS.pop("test-sizeless")
        SIZES.pop("test-sizeless")
    with pytest.raises(UserError, match="not registered"):
        EscapeConfig(ks=[1], problem="no-such-problem", methods=["sgd"]).check_methods()
    with pytest.raises(UserError, match="with arguments"):
        config.problem_of(EscapeConfig(ks=[2], problem="matrix-sensing",
                                       problem_args={"width": 3}), 2)  # fmt: skip
    with pytest.raises(UserError, match="takes its size n from the sizes"):
        EscapeConfig(ks=[3], problem="matrix-sensing", problem_args={"n": 3}).check_methods()
    sweep = ["escape", "--problem", "matrix-sensing", "--teacher-widths", "1", "--methods",
             "sgd", "--protocols", "random-init", "--sample-seeds", "2", "--tune-seeds", "2",
             "--steps", "5", "--quiet", "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(sweep) == 2  # n = 1: matrix sensing needs n >= 2, said before anything runs
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_benchmark_written_before_problems_were_named_resumes(tmp_path):
    """A finished directory whose config.json has no problem fields ran teacher–student: the
    same settings are accepted, another problem is refused."""
    from qmse.escape.cells import _check_config

    cfg = EscapeConfig(ks=[3], methods=["sgd"])
    saved = {k: v for k, v in asdict(cfg).items() if k not in ("problem", "problem_args")}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "results.json").write_text("{}")
    _check_config(tmp_path, cfg)
    with pytest.raises(UserError, match="problem: 'teacher-student' there, 'matrix-sensing' now"):
        _check_config(tmp_path, EscapeConfig(ks=[3], methods=["sgd"], problem="matrix-sensing"))
    assert config.load_config(tmp_path) == cfg  # the missing fields read as what ran
    (tmp_path / "config.json").write_text(json.dumps(saved | {"tempo": 3}))
    with pytest.raises(UserError, match=r"settings this version does not know: \['tempo'\]"):
        config.load_config(tmp_path)


def test_every_committed_benchmark_loads_as_the_config_it_records():
    root = Path(__file__).resolve().parent.parent / "docs"
    dirs = [d for d in sorted(root.glob("escape-*/*")) if config.is_benchmark_dir(d)]
    assert len(dirs) >= 10
    for d in dirs:
        cfg = config.load_config(d)
        assert asdict(cfg) == config.saved_settings(d), d


def ring(value_test: bool) -> Problem:
    """f(w) = (‖w‖² − 1)² + 1 on R²: every point of the unit circle is a minimum (Hessian
    8wwᵀ, singular along the circle), none isolated; success is never reached."""

    def objective(W):
        return ((W * W).sum(-1) - 1) ** 2 + 1

    return Problem(
        name="test-ring",
        instance={},
        shape=(2,),
        outputs=1,
        init=lambda seeds: torch.randn(len(seeds), 2, dtype=DT),
        sample=lambda m, b, g: (torch.zeros(m, b, 1), torch.zeros(m, b, 1)),
        predict=lambda W, x: x,
        objective=objective,
        success=0.5,
        stuck=(lambda W: objective(W) > 0.5) if value_test else None,
    )


@pytest.mark.parametrize("value_test", [True, False])
def test_minima_that_are_not_isolated_count_only_where_the_problem_decides_by_value(
    tmp_path, monkeypatch, value_test
):
    """Points of a circle of minima certify as degenerate: kept (and said not isolated)
    for a problem with a `stuck` test of the value, left out for one without."""
    register_problem("test-ring", lambda: ring(value_test))
    try:
        angles = torch.tensor([0.0, 1.0, 1.0 + 1e-9])
        points = torch.stack([angles.cos(), angles.sin()], 1).double()
        planted(monkeypatch, {"eval": points})
        cfg = EscapeConfig(ks=[1], problem="test-ring", methods=["sgd"])
        found = config.minima(tmp_path, cfg, 1, tag="eval")
    finally:
        PROBLEMS.pop("test-ring")
        SIZES.pop("test-ring")
    if value_test:
        assert found["labels"].tolist() == [0, 1, 1] and not found["isolated"]
        assert [c["kind"] for c in found["certificates"]] == ["degenerate"] * 2
    else:
        assert len(found["W"]) == 0 and found["excluded"] == ["degenerate"] * 2


def test_tables_count_distinct_minima_and_weigh_them_equally(tmp_path):
    """Two distinct minima with 8 and 2 starts: 6/8 and 0/2 fail, so 6/10 = 0.600 per start
    but (0.75 + 0)/2 = 0.375 with each minimum weighing the same; the tuning line says the
    tuning minima were the evaluation ones; the not-isolated note appears when said."""
    from qmse.escape.report import write_table
    from qmse.escape.rows import Row

    def row(isolated):
        return Row(
            k=5, n=5, outputs=3, method="sgd", protocol="spurious-minima", seeds=10,
            failures=6, failure_rate=0.6, ci95_low=0.3, ci95_high=0.8, diverged=0, lr=0.1,
            hyper={}, batch=8, steps=10, median_loss=0.1, problem="teacher-student",
            instance={"k": 5, "n": 5, "outputs": 3}, minima=[8, 2], minima_failures=[6, 0],
            weighted_failure_rate=0.375,
            tuning={"fixed": False, "tuned_at_k": 5, "disjoint_minima": False,
                    "tune_minima": 2},
            extra={"minima_isolated": isolated,
                   "minima_excluded": {} if isolated else {"saddle": 1}},
        )  # fmt: skip

    text = write_table([row(True)], tmp_path / "t.md")
    assert "Problem: teacher-student (k=5: n=5, outputs=3)." in text
    assert "Distinct minima modulo symmetry (starts at each): k=5: 2 (8, 2)." in text
    assert "| sgd | 0.375 (per start 0.600): 6/8, 0/2 |" in text
    assert "6/10 = 0.600 [0.300, 0.800]; weighted 0.375 over 2 distinct minima |" in text
    assert "the same as evaluation minima (the problem has no other at k=5)" in text
    assert "Not isolated" not in text
    assert "Stuck points left out" not in text
    text = write_table([row(False)], tmp_path / "t.md")
    assert (
        "Not isolated at k=5" in text
        and "left out, not certified strict minima: k=5: 1 saddle" in text
    )


LINEAR = '''
import torch
from qmse.escape.problems import Problem, register_problem

def linear(width, shift=1.0):
    """Least squares y = ⟨x, w*⟩, x ~ N(0, I), w* = shift·1: population loss ½‖w − w*‖²."""
    target = torch.full((width,), float(shift), dtype=torch.float64)
    def sample(m, B, generator):
        x = torch.randn(m, B, width, generator=generator)
        return x, (x @ target.float()).unsqueeze(-1)
    return Problem(
        name="test-linear", instance={"width": width, "shift": shift}, shape=(width,),
        outputs=1, init=lambda seeds: torch.zeros(len(seeds), width, dtype=torch.float64),
        sample=sample, predict=lambda W, x: (x.to(W) @ W.unsqueeze(-1)),
        objective=lambda W: 0.5 * ((W - target) ** 2).sum(-1), success=1e-6,
    )

register_problem("test-linear", linear, size="width")
'''


def test_a_plugin_registers_a_problem_that_runs_through_the_cli(tmp_path):
    plugin = tmp_path / "linear.py"
    plugin.write_text(LINEAR)
    out = tmp_path / "linear"
    argv = ["escape", "--plugin", str(plugin), "--problem", "test-linear", "--problem-args",
            "shift=2", "--teacher-widths", "2,3", "--methods", "gd-population,sgd", "--lr",
            "sgd=0.1", "--protocols", "random-init", "--population-seeds", "3",
            "--sample-seeds", "4", "--steps", "300", "--batch-size", "16", "--quiet",
            "--out", str(out)]  # fmt: skip
    try:
        assert main(argv) == 0
    finally:
        PROBLEMS.pop("test-linear", None)
        SIZES.pop("test-linear", None)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["method"], r["k"]) for r in rows} == {
        (m, k) for m in ("gd-population", "sgd") for k in (2, 3)
    }
    for r in rows:
        assert r["problem"] == "test-linear" and r["instance"] == {"width": r["k"], "shift": 2}
        assert r["failures"] == 0 and r["n"] == r["k"]  # least squares: every start succeeds
    assert (
        "Problem: test-linear (k=2: width=2, shift=2; k=3: width=3, shift=2)."
        in (out / "table.md").read_text()
    )
