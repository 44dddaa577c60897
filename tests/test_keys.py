"""qmse.keys: one content key for every cache; a method's key follows what it declares, and
the engine's thresholds are in every row's key."""

import dataclasses
import math

import torch

from qmse import keys
from qmse.escape import METHODS, Method, engine
from qmse.escape.cells import row_key
from qmse.escape.config import EscapeConfig, problem_of
from qmse.escape.methods import method_key
from qmse.escape.rules import momentum, sgd


def test_content_keys_follow_the_files_and_the_arguments(tmp_path):
    a, b = tmp_path / "config.json", tmp_path / "checkpoint.pt"
    a.write_text("{}")
    b.write_bytes(b"weights")
    key = keys.content_key({"samples": 256, "seed": 0}, files=[a, b])
    same = keys.content_key({"seed": 0, "samples": 256}, files=[a, b])
    assert key == same  # argument order is irrelevant
    assert key != keys.content_key({"samples": 128, "seed": 0}, files=[a, b])
    assert key != keys.content_key({"samples": 256, "seed": 0}, files=[b, a])
    b.write_bytes(b"weightz")  # same size, same name: the content decides
    assert key != keys.content_key({"samples": 256, "seed": 0}, files=[a, b])


def test_tensors_are_keyed_by_dtype_shape_and_bytes():
    x = torch.arange(6.0)
    assert keys.content_key(x) == keys.content_key(x.clone())
    assert keys.content_key(x) != keys.content_key(x.double())
    assert keys.content_key(x) != keys.content_key(x.view(2, 3))
    assert keys.content_key(0.1) != keys.content_key(math.nextafter(0.1, 1))  # floats exact


def test_a_stale_cache_says_why():
    assert keys.stale({"key": "k", "format": keys.FORMAT}, "k") is None
    assert "other inputs" in keys.stale({"key": "j", "format": keys.FORMAT}, "k")
    assert "older qmse" in keys.stale({"key": "j"}, "k")


def test_changing_a_rules_constant_changes_the_methods_key():
    pgd = METHODS["pgd"]
    assert pgd.constants == {"window": 500, "grad_threshold": 0.05}
    shorter = dataclasses.replace(pgd, constants={**pgd.constants, "window": 250})
    assert method_key(shorter) != method_key(pgd)
    assert method_key(dataclasses.replace(pgd, version="2")) != method_key(pgd)
    # the same declaration gives the same key, whatever its source formatting
    assert method_key(Method("m", "mse", sgd, (0.1,))) == method_key(
        Method("m", "mse", sgd, (0.1,))
    )
    assert method_key(Method("m", "mse", sgd, (0.1,))) != method_key(
        Method("m", "mse", momentum, (0.1,))
    )


def test_the_engines_thresholds_are_in_every_rows_key(monkeypatch):
    cfg = EscapeConfig(ks=[3], methods=["sgd"], protocols=["random-init"])
    problem = problem_of(cfg, 3)
    args = (METHODS["sgd"], "starts", problem, cfg, 1, 2, {"lr": 0.1})
    key = row_key(*args)
    assert row_key(*args) == key
    monkeypatch.setattr(engine, "STUCK_LOSS", 2e-3)
    assert row_key(*args) != key
    monkeypatch.undo()
    monkeypatch.setattr(engine, "DIVERGED_NORM", 1e5)
    assert row_key(*args) != key
