"""qmse.escape.methods: the plug-in interface's checks, the registry, plug-in files."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qmse.cli import main
from qmse.errors import UserError
from qmse.escape import METHODS, Method, load_plugin, register_method, run_method
from qmse.escape.methods import check_grid, get_method, method_key
from qmse.escape.rules import BUILTIN_METHODS, EXTRA_METHODS, sgd
from qmse.teacher_student import init_weights, make_problem

DOCS = Path(__file__).resolve().parent.parent / "docs" / "escape.md"

PLUGIN = """
from qmse.escape import Method, register_method

def sign_sgd(W, grad, state, t, lr):      # W, grad: (S, n, d); lr: (S, 1, 1)
    return W - lr * grad.sign(), state

register_method(Method(name="sign-sgd", loss="mse", update=sign_sgd, lr_grid=(1e-3, 2e-3, 4e-3)))
"""


def test_builtins_are_registered_through_the_interface():
    assert set(BUILTIN_METHODS) | set(EXTRA_METHODS) <= set(METHODS)
    assert {"label-noise", "gradient-noise", "anticorrelated", "pgd", "restart"} <= set(METHODS)
    assert not set(EXTRA_METHODS) & set(BUILTIN_METHODS)  # not in the default run
    for name in BUILTIN_METHODS + EXTRA_METHODS:
        m = METHODS[name]
        check_grid(name, m.lr_grid)
        for h, grid in m.hyper.items():
            check_grid(h, grid)
            assert m.default(h) == grid[len(grid) // 2]
    assert METHODS["label-noise"].loss_params() == ("sigma",)  # σ goes to the loss
    assert METHODS["gradient-noise"].loss_params() == ()  # σ stays with the update
    spaces = {name: [p.name for p in METHODS[name].space().params] for name in EXTRA_METHODS}
    assert spaces == {
        "sgd-decay": ["lr", "floor"],
        "sam": ["lr", "rho"],
        "homotopy": ["lr", "sigma0"],
    }


@pytest.mark.parametrize(
    "grid",
    [(0.1, 0.3), (0.2, 0.1), (), (0.0, 0.1), (-1.0,)],
    ids=["3x", "down", "empty", "0", "<0"],
)
def test_grids_must_be_log_grids_at_most_2x_apart(grid):
    with pytest.raises(ValueError, match="lr_grid"):
        register_method(Method("test-bad-grid", "mse", sgd, grid))


def test_registration_errors_name_the_problem():
    with pytest.raises(ValueError, match="not registered in qmse.loss"):
        register_method(Method("test-bad-loss", "huber", sgd, (0.1,)))
    with pytest.raises(ValueError, match="reproduction"):
        register_method(Method("gd-population", "mse", sgd, (0.1,)))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("sgd", "qmse", sgd, (0.1,)))
    with pytest.raises(ValueError, match="name"):
        register_method(Method("a,b", "mse", sgd, (0.1,)))
    with pytest.raises(ValueError, match="may not be named"):
        register_method(Method("test-bad-hyper", "mse", sgd, (0.1,), hyper={"lr": (0.1,)}))
    with pytest.raises(ValueError, match="clash"):
        register_method(Method("test-bad-const", "mse", sgd, (0.1,), constants={"grad_at": 1.0}))
    assert register_method(METHODS["sgd"]) is METHODS["sgd"]  # the same definition again


def test_a_plugin_file_registers_its_methods_once(tmp_path):
    code = PLUGIN.replace('"sign-sgd"', '"sign-sgd-once"')  # a name no other test registers
    assert code != PLUGIN
    path = tmp_path / "plugin.py"
    path.write_text(code)
    assert load_plugin(path) == ["sign-sgd-once"]
    assert load_plugin(path) == ["sign-sgd-once"]  # imported once: no second registration
    copy = tmp_path / "copy.py"
    copy.write_text(code + "\n# the same definition in another file\n")
    assert load_plugin(copy) == []  # accepted, and adds nothing
    assert METHODS["sign-sgd-once"].lr_grid == (1e-3, 2e-3, 4e-3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plugin(tmp_path / "missing.py")


def test_method_key_follows_the_definition():
    a = Method("test-key", "mse", sgd, (0.1, 0.2))
    assert method_key(a) == method_key(Method("test-key", "mse", sgd, (0.1, 0.2)))
    assert method_key(a) != method_key(Method("test-key", "mse", sgd, (0.1, 0.15)))
    assert method_key(a) != method_key(Method("test-key", "qmse", sgd, (0.1, 0.2)))
    assert method_key(a) != method_key(METHODS["momentum"])
    assert method_key(a) != method_key(dataclasses.replace(a, version="2"))  # a changed rule


def test_the_fine_grid_plugin_reregisters_the_builtins_on_a_finer_grid():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "escape_fine_lr.py"
    names = load_plugin(path)
    assert names == [f"{name}-fine" for name in BUILTIN_METHODS]
    for name in BUILTIN_METHODS:
        base, fine = METHODS[name], METHODS[f"{name}-fine"]
        grid = np.array(fine.lr_grid)
        assert grid[0] == base.lr_grid[0]
        assert math.isclose(grid[-1], 4 * base.lr_grid[-1], rel_tol=1e-5)
        np.testing.assert_allclose(grid[1:] / grid[:-1], 2**0.25, rtol=1e-5)
        assert set(base.lr_grid) <= set(fine.lr_grid)  # the coarse values are swept again
        assert (fine.loss, fine.update, fine.hyper) == (base.loss, base.update, base.hyper)
        assert method_key(fine) != method_key(base)


@pytest.mark.parametrize(
    "source, line, what",
    [
        ("x = 1\ndef f(:\n", 2, "SyntaxError"),
        ("import not_a_module_anywhere_qmse\n", 1, "ModuleNotFoundError"),
        ("x = 1\n\nraise RuntimeError('boom')\n", 3, "RuntimeError: boom"),
    ],
)
def test_a_broken_plugin_is_one_line_naming_the_file_and_the_line(tmp_path, source, line, what):
    path = tmp_path / "broken.py"
    path.write_text(source)
    with pytest.raises(UserError, match=rf"plug-in {path}, line {line}: .*{what}") as err:
        load_plugin(path)
    assert err.value.__cause__ is not None  # the traceback is kept for a debugger


def test_a_plugin_that_fails_after_registering_leaves_nothing_registered(tmp_path):
    path = tmp_path / "half.py"
    path.write_text(PLUGIN.replace("sign-sgd", "half-sgd") + "\nraise ValueError('late')\n")
    with pytest.raises(UserError, match="late"):
        load_plugin(path)
    assert "half-sgd" not in METHODS


@pytest.mark.parametrize(
    "update, message",
    [
        (lambda W, g, s, t, lr: W - lr * g, "must return the pair"),
        (lambda W, g, s, t, lr: ((W - lr * g)[:, :1], s), r"shape \(4, 1, 3\)"),
        (lambda W, g, s, t, lr: ((W - lr * g).double(), s), "float64"),
        (lambda W, g, s, t, lr: (W * float("nan"), s), "non-finite"),
        (lambda W, g, s, t, lr: (W, None), r"\(Tensor, NoneType\)"),
    ],
)
def test_a_wrong_update_is_an_error_naming_the_method(update, message):
    problem = make_problem(3)
    W0 = init_weights(range(4), 3, 3)
    bad = Method("test-bad-update", "mse", update, (0.1,))
    with pytest.raises(UserError, match=rf"method 'test-bad-update': update returned .*{message}"):
        run_method(bad, W0, problem, steps=2, lr=0.1, batch=4)


def test_an_update_that_raises_is_one_line_naming_the_plugin_file(tmp_path):
    path = tmp_path / "raising.py"
    path.write_text(
        "from qmse.escape import Method, register_method\n\n"
        "def boom(W, grad, state, t, lr):\n"
        "    if t == 1:\n"
        "        raise KeyError('momentum buffer')\n"
        "    return W - lr * grad, state\n\n"
        "register_method(Method('test-boom', 'mse', boom, (0.1,)))\n"
    )
    load_plugin(path)
    problem = make_problem(3)
    with pytest.raises(UserError, match=rf"'test-boom' \({path}, line 5\) raised KeyError.*step 1"):
        run_method("test-boom", init_weights(range(2), 3, 3), problem, steps=3, lr=0.1, batch=4)


def test_a_builtin_methods_bug_keeps_its_traceback(monkeypatch):
    """Only code of a plug-in file becomes a one-line error; a bug of qmse's own passes."""
    from qmse.escape import engine

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "job_gradient", broken)
    with pytest.raises(KeyError, match="a bug"):
        run_method("sgd", init_weights(range(2), 3, 3), make_problem(3), steps=1, lr=0.1)


def test_the_docs_sam_plugin_runs_through_the_cli_and_is_the_builtin_sam(tmp_path):
    """docs/escape.md's SAM plug-in, written to a file as printed: it runs through
    `qmse escape --plugin`, and at the built-in's lr and ρ gives its outcomes start by start
    and its weights bit for bit."""
    section = DOCS.read_text().split("#### SAM as a plug-in", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(snippet.strip().splitlines()) < 15
    plugin = tmp_path / "sam.py"
    plugin.write_text(snippet)
    out = tmp_path / "esc"
    argv = ["escape", "--teacher-widths", "3", "--plugin", str(plugin), "--methods", "sam,my-sam",
            "--lr", "sam=0.2,my-sam=0.2", "--hyper", "sam.rho=0.1,my-sam.rho=0.1",
            "--population-seeds", "6", "--sample-seeds", "4", "--steps", "60", "--protocols",
            "random-init", "--batch-size", "16", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cells = {m: json.loads((out / "rows" / f"random-init_{m}_k3_n3_C1.json").read_text())
             for m in ("sam", "my-sam")}  # fmt: skip
    assert cells["my-sam"]["failed"] == cells["sam"]["failed"]
    assert cells["my-sam"]["median_loss"] == cells["sam"]["median_loss"]
    assert cells["sam"]["grad_evals"] == cells["my-sam"]["grad_evals"] == 2 * 60 * 16  # counted
    assert (
        "= 960 sample gradients per start (sam: 1920, my-sam: 1920)"
        in (out / "table.md").read_text()
    )
    W0, problem = init_weights(range(4), 3, 3), make_problem(3)
    kw = {"steps": 20, "lr": 0.2, "hyper": {"rho": 0.1}, "batch": 8, "quiet": True}
    mine, builtin = run_method("my-sam", W0, problem, **kw), run_method("sam", W0, problem, **kw)
    assert torch.equal(mine["W"], builtin["W"])
    assert not torch.equal(builtin["W"], run_method("sgd", W0, problem, **kw | {"hyper": {}})["W"])


def test_a_declared_upper_end_bounds_the_search_and_the_key():
    """Heavy ball's 1 − β and the decay floor never pass 1 in a widened search; an upper end
    is part of the method's key, and a grid past it or an unknown name is refused."""
    for name in ("momentum", "sgd-decay"):
        m = get_method(name)
        (param,) = [p for p in m.space().params if p.name in m.upper]
        assert param.limits[1] == 1.0 and param.window(1.0)[-1] == 1.0
    sgd = get_method("sgd")
    assert all(p.limits[1] == p.grid[-1] * 2**8 for p in sgd.space().params)
    bounded = dataclasses.replace(get_method("momentum"), name="momentum-bounded-test")
    unbounded = dataclasses.replace(bounded, upper={})
    assert method_key(bounded) != method_key(unbounded)
    with pytest.raises(UserError, match="not hyperparameters"):
        register_method(dataclasses.replace(bounded, upper={"beta": 1.0}))
    with pytest.raises(UserError, match="domain's end"):
        register_method(dataclasses.replace(bounded, upper={"one_minus_beta": 0.1}))
