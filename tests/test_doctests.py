"""The Examples of the public API's docstrings run as doctests: every listed function has a
Shape: and an Examples: section, its examples run, and they print what the docstring says."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
DOCUMENTED = {
    "qmse.curvature": ("hessian_operator", "hessian_eigs", "hutchinson_trace"),
    "qmse.diagnose": ("diagnose_model",),
    "qmse.loss": ("QMSELoss", "expected_qmse_loss", "mse_loss_half", "qmse_loss"),
    "qmse.symmetry": ("count_equivalent", "permute", "weight_matching"),
}


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED))
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    for name in DOCUMENTED[module_name]:
        doc = getattr(module, name).__doc__
        assert "\n    Shape:\n" in doc and "\n    Examples::\n" in doc, f"{name}: no Shape/Examples"
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    attempted = {}
    with torch.random.fork_rng(devices=[]):  # the examples seed the global RNG; not for others
        for test in doctest.DocTestFinder().find(module):
            attempted[test.name] = runner.run(test, out=report.append).attempted
    assert runner.failures == 0, "".join(report)
    for name in DOCUMENTED[module_name]:
        assert attempted.get(f"{module_name}.{name}", 0) >= 1, f"{name} has no examples"
