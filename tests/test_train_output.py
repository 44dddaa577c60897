"""What a run measures and tells: evaluation every few epochs (the same numbers as every
epoch, training untouched), one line per epoch when stderr is not a terminal, on_epoch hooks,
and TensorBoard (skipped without the optional extra)."""

import sys

import pytest
from conftest import tiny_config, tiny_images

from qmse.cli import main
from qmse.sweep import MissingExtraError
from qmse.tblog import summary_writer_class, tensorboard_logger
from qmse.train import EVAL_KEYS, METRIC_KEYS, RUNNING_KEYS, train_many, train_run


def test_evaluating_every_few_epochs_gives_the_same_numbers(tmp_path):
    every = train_run(tiny_config(epochs=5), tmp_path / "every", dataset=tiny_images(), quiet=True)
    cfg = tiny_config(epochs=5, eval_every=3)
    rows = train_run(cfg, tmp_path / "sparse", dataset=tiny_images(), quiet=True)
    assert [set(r) for r in rows] == [
        {"epoch", *RUNNING_KEYS} if e not in (3, 5) else set(METRIC_KEYS) for e in range(1, 6)
    ]
    for sparse, full in zip(rows, every):  # evaluation neither draws nor changes anything
        assert sparse == {k: v for k, v in full.items() if k in sparse}
    # continued from epoch 5 to 7: 6 is not evaluated, 7 is the last one
    more = train_run(tiny_config(epochs=7, eval_every=3), tmp_path / "sparse", quiet=True,
                     dataset=tiny_images())  # fmt: skip
    assert more[:5] == rows and "train_acc" in more[6] and "train_acc" in more[5]
    with pytest.raises(ValueError, match="eval_every"):
        tiny_config(eval_every=0)


def test_train_many_evaluates_when_train_run_does(tmp_path):
    cfgs = [
        tiny_config(loss="mse", epochs=4, eval_every=2),
        tiny_config(loss="label-noise", loss_params={"sigma": 0.2}, epochs=4, eval_every=2),
    ]
    many = train_many(cfgs, [tmp_path / "a", tmp_path / "b"], dataset=tiny_images(), quiet=True)
    alone = train_run(cfgs[1], tmp_path / "c", dataset=tiny_images(), quiet=True)
    assert [set(r) for r in many[1]] == [set(r) for r in alone]
    assert "train_acc" not in many[0][0] and "train_acc" in many[0][1]
    for a, b in zip(many[1], alone):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_a_line_per_epoch_off_a_terminal_and_hooks_see_every_row(tmp_path, capsys):
    seen = []
    rows = train_run(tiny_config(epochs=3, eval_every=2), tmp_path / "run", quiet=False,
                     dataset=tiny_images(), on_epoch=seen.append)  # fmt: skip
    assert seen == rows
    assert not sys.stderr.isatty()  # pytest's capture: as under nohup or tee
    lines = [x for x in capsys.readouterr().err.splitlines() if ": epoch " in x]
    assert [x.split(": epoch ")[1].split(" ")[0] for x in lines] == ["1/3", "2/3", "3/3"]
    assert lines[0].startswith("run: epoch 1/3 running loss ") and "train ½‖r‖²" not in lines[0]
    assert f"train ½‖r‖² {rows[1]['train_mse']:.5g} acc {rows[1]['train_acc']:.4f}" in lines[1]
    train_run(tiny_config(epochs=4), tmp_path / "run2", dataset=tiny_images(), quiet=True)
    assert ": epoch " not in capsys.readouterr().err

    many = [[], []]
    cfgs = [tiny_config(epochs=2, seed=s) for s in (0, 1)]
    train_many(cfgs, [tmp_path / "m0", tmp_path / "m1"], dataset=tiny_images(),
               on_epoch=[many[0].append, many[1].append])  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("m0: epoch ") == 2 and err.count("m1: epoch ") == 2
    assert [len(h) for h in many] == [2, 2]


def test_tensorboard_missing_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import → ImportError
    with pytest.raises(MissingExtraError, match=r"qmse\[tensorboard\]"):
        summary_writer_class()
    argv = ["train", "--dataset", "mnist", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main([*argv, "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("qmse train: error: --tensorboard needs TensorBoard") and "Trace" not in err
    )
    assert not (tmp_path / "r").exists()


def test_tensorboard_gets_every_metric_of_every_epoch(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    with tensorboard_logger(tmp_path / "tb") as log:
        rows = train_run(tiny_config(epochs=3, eval_every=2), tmp_path / "run", quiet=True,
                         dataset=tiny_images(), on_epoch=log)  # fmt: skip
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for key in (*RUNNING_KEYS, *EVAL_KEYS):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["epoch"], pytest.approx(r[key])) for r in rows if key in r]
