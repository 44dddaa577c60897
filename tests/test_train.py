"""qmse.train against hand-written references: a manual first epoch, per-sample metrics,
Monte Carlo for QMSE's expected loss, and a SIGKILL in the middle of an epoch."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TESTS, tiny_config
from conftest import tiny_images as tiny_dataset
from torch.func import stack_module_state

from qmse import runs, train
from qmse.config import TrainConfig
from qmse.loss import compute_loss, qmse_loss, sample_directions
from qmse.rundir import (
    NonFiniteLossError,
    build_model,
    channel_stats,
    load_run,
    normalize,
    prepare_data,
    run_generators,
    run_key,
    save_epoch,
    subseed,
)
from qmse.runs import DirectoryBusyError
from qmse.stacked import stacked_forwards
from qmse.train import METRIC_KEYS, evaluate, train_many, train_run

TINY_MODEL = {"in_channels": 1, "image_size": 8, "num_classes": 3, "channels": [2, 4], "hidden": 8}


def test_subseed_is_deterministic_and_separates_streams():
    assert subseed(3, 1) == subseed(3, 1)
    assert len({subseed(s, k) for s in range(4) for k in range(3)}) == 12


def test_config_rejects_bad_values():
    for bad in (dict(loss="l1"), dict(lr=0.0), dict(momentum=1.0), dict(batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_normalize_matches_numpy_reference():
    ds = tiny_dataset()
    mean, std = channel_stats(ds.train_images)
    x = ds.train_images.numpy().astype("float64") / 255
    assert math.isclose(mean.item(), x.mean(), rel_tol=1e-12)
    assert math.isclose(std.item(), x.std(ddof=1), rel_tol=1e-12)
    z = normalize(ds.train_images, mean, std)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), torch.from_numpy((x - x.mean()) / x.std(ddof=1)))


def test_prepare_data_subset_uses_full_set_statistics():
    ds = tiny_dataset()
    full = prepare_data(ds)
    sub = prepare_data(ds, train_subset=10, test_subset=5)
    assert sub.x_train.shape == (10, 1, 8, 8) and sub.y_train.dtype == torch.int64
    torch.testing.assert_close(sub.x_train, full.x_train[:10])
    torch.testing.assert_close(sub.x_test, full.x_test[:5])
    torch.testing.assert_close(sub.y_test, full.y_test[:5])
    with pytest.raises(ValueError, match="train_subset"):
        prepare_data(ds, train_subset=1000)


def test_prepare_data_from_a_config_loads_through_qmse_data(monkeypatch):
    from qmse import data as qdata

    seen = []
    monkeypatch.setattr(
        qdata, "load", lambda name, data_dir=None: seen.append(name) or tiny_dataset()
    )
    config = {"dataset": "tiny", "data_dir": None, "train_subset": 7, "loss": "mse", "lr": 0.1}
    d = prepare_data(config)
    assert seen == ["tiny"] and d.x_train.shape[0] == 7


def test_build_model_is_seeded_and_float32_whatever_the_default_dtype():
    args = {"in_channels": 1, "image_size": 8, "num_classes": 3, "channels": [2, 4], "hidden": 8}
    state = torch.random.get_rng_state()
    a, b, c = build_model(args, 0), build_model(args, 0), build_model(args, 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q) and not torch.equal(p, r)


@pytest.mark.parametrize("loss", ["mse", "qmse", "expected-qmse", "ce", "label-noise"])
def test_evaluate_matches_per_sample_reference(loss):
    """Two stacked models, `loss` and MSE, each against its own per-sample reference."""
    d = prepare_data(tiny_dataset())
    models = [build_model(TINY_MODEL, seed) for seed in (0, 1)]
    params = {"sigma": 0.3} if loss == "label-noise" else {}
    cfgs = [tiny_config(loss=loss, loss_params=params), tiny_config(loss="mse")]
    stacked, _ = stack_module_state(models)
    _, forward = stacked_forwards(TINY_MODEL, "loop")
    got, got_mse = evaluate(forward, stacked, d.x_test, d.y_test, cfgs)
    out = models[0](d.x_test).detach().double()  # (N, C)
    onehot = F.one_hot(d.y_test, 3).double()
    r2 = ((onehot - out) ** 2).sum(-1)
    assert math.isclose(got["acc"], (out.argmax(-1) == d.y_test).double().mean().item())
    assert math.isclose(got["mse"], 0.5 * r2.mean().item(), rel_tol=1e-5)
    if loss == "qmse":  # expectation over v: Monte Carlo within 5 standard errors
        g = torch.Generator().manual_seed(0)
        draws = torch.stack(
            [
                qmse_loss(
                    out, onehot, noise=sample_directions(len(out), 3, generator=g, dtype=out.dtype)
                )
                for _ in range(4000)
            ]
        )
        se = draws.std().item() / math.sqrt(len(draws))
        assert abs(got["loss"] - draws.mean().item()) < 5 * se
    elif loss == "label-noise":  # E ½‖r + ξ‖² = ½‖r‖² + Cσ²/2 (E ξ = 0, E ξξᵀ = σ²I)
        assert math.isclose(got["loss"], 0.5 * r2.mean().item() + 3 * 0.3**2 / 2, rel_tol=1e-5)
    else:
        target = d.y_test if loss == "ce" else onehot
        assert math.isclose(got["loss"], compute_loss(loss, out, target).item(), rel_tol=1e-5)
    other = models[1](d.x_test).detach().double()
    r2 = ((onehot - other) ** 2).sum(-1)
    assert math.isclose(got_mse["acc"], (other.argmax(-1) == d.y_test).double().mean().item())
    assert math.isclose(got_mse["loss"], 0.5 * r2.mean().item(), rel_tol=1e-5)


@pytest.mark.parametrize("loss", ["mse", "qmse", "ce", "label-noise"])
def test_first_epoch_matches_a_hand_written_loop(tmp_path, loss):
    """Same seeds, same permutation and noise (QMSE's v, label noise's ξ), written out by hand
    with the losses' formulas."""
    ds = tiny_dataset()
    sigma = 0.3
    params = {"sigma": sigma} if loss == "label-noise" else {}
    cfg = tiny_config(loss=loss, epochs=1, loss_params=params)
    rows = train_run(cfg, tmp_path, dataset=ds, quiet=True)
    model, config = load_run(tmp_path)

    d = prepare_data(ds)
    ref = build_model(config["model"], cfg.seed)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(subseed(cfg.seed, 1)))
    gv = torch.Generator().manual_seed(subseed(cfg.seed, 2))
    z = torch.randn(96, 3, generator=gv, dtype=torch.float32)
    v, xi = F.normalize(z, dim=-1), sigma * z
    correct, norms, loss_sum = 0, [], 0.0
    for s in range(0, 96, 16):
        idx = perm[s : s + 16]
        out = ref(d.x_train[idx])
        r = F.one_hot(d.y_train[idx], 3).float() - out
        if loss == "mse":
            batch_loss = 0.5 * (r * r).sum(-1).mean()
        elif loss == "qmse":
            batch_loss = 0.5 * (((r + v[s : s + 16]).detach() * r).sum(-1) ** 2).mean()
        elif loss == "label-noise":
            batch_loss = 0.5 * ((r + xi[s : s + 16]) ** 2).sum(-1).mean()
        else:
            batch_loss = -F.log_softmax(out, -1)[torch.arange(16), d.y_train[idx]].mean()
        opt.zero_grad()
        batch_loss.backward()
        norms.append(torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item())
        opt.step()
        correct += (out.argmax(-1) == d.y_train[idx]).sum().item()
        loss_sum += batch_loss.item() * 16
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    row = rows[0]
    assert set(METRIC_KEYS) == set(row)
    assert row["running_train_acc"] == correct / 96
    assert math.isclose(row["grad_norm"], sum(norms) / len(norms), rel_tol=1e-5)
    assert math.isclose(row["running_train_loss"], loss_sum / 96, rel_tol=1e-5)
    assert row["train_acc"] == (ref(d.x_train).argmax(-1) == d.y_train).double().mean().item()
    assert runs.read_jsonl(tmp_path / "metrics.jsonl") == rows


def qmse_epoch_by_hand(model, opt, d, batch_size, order_gen, direction_gen) -> None:
    """One QMSE epoch with torch.optim.SGD: the run's permutation and directions drawn from
    its generators, the loss ½⟨r + v, r⟩² with r + v held constant, written out."""
    n = d.x_train.size(0)
    perm = torch.randperm(n, generator=order_gen)
    v = F.normalize(torch.randn(n, 3, generator=direction_gen), dim=-1)
    for s in range(0, n, batch_size):
        idx = perm[s : s + batch_size]
        r = F.one_hot(d.y_train[idx], 3).float() - model(d.x_train[idx])
        loss = 0.5 * (((r + v[s : s + batch_size]).detach() * r).sum(-1) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_qmse_with_momentum_matches_torch_sgd_and_continues_its_checkpoint(tmp_path):
    """Two epochs of QMSE at momentum 0.9 against torch.optim.SGD by hand; the second
    continues from a checkpoint.pt holding the reference's own state_dicts (channels_last
    weights, SGD's momentum buffers: what train_run wrote before its engine was stacked),
    and the checkpoint it writes loads back into torch.optim.SGD."""
    ds, cfg = tiny_dataset(), tiny_config(loss="qmse", momentum=0.9, epochs=1)
    d = prepare_data(ds)
    ref = build_model(TINY_MODEL, cfg.seed).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gens = run_generators(cfg.seed)

    def assert_matches(ckpt: dict) -> None:
        for name, p in ref.named_parameters():
            torch.testing.assert_close(ckpt["model"][name], p, rtol=1e-5, atol=1e-6)
        back = torch.optim.SGD(build_model(TINY_MODEL, 0).parameters(), lr=0.5)
        back.load_state_dict(ckpt["optimizer"])  # SGD's own format
        assert back.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        for i, p in enumerate(ref.parameters()):
            got = back.state_dict()["state"][i]["momentum_buffer"]
            torch.testing.assert_close(got, opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6)

    rows = train_run(cfg, tmp_path, dataset=ds, quiet=True)
    qmse_epoch_by_hand(ref, opt, d, cfg.batch_size, *gens)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert_matches(ckpt)
    save_epoch(tmp_path, ref.state_dict(), opt.state_dict(), gens, rows, ckpt["timings"])
    train_run(dataclasses.replace(cfg, epochs=2), tmp_path, dataset=ds, quiet=True)
    qmse_epoch_by_hand(ref, opt, d, cfg.batch_size, *gens)
    assert_matches(torch.load(tmp_path / "checkpoint.pt", weights_only=True))


# Metrics of train_run(tiny_config(loss="qmse", epochs=2), dataset=tiny_images()) recorded
# before training read the loss registry: (train_loss, running_train_loss) per epoch. The
# running loss depends on every v drawn, so any change in the draw order shows here.
RECORDED_QMSE = [
    (0.3114614089330037, 0.548848882317543),
    (0.13654731710751852, 0.2996581196784973),
]


def test_qmse_run_reproduces_the_numbers_recorded_before_the_registry(tmp_path):
    rows = train_run(tiny_config(loss="qmse"), tmp_path, dataset=tiny_dataset(), quiet=True)
    got = [(r["train_loss"], r["running_train_loss"]) for r in rows]
    assert got == [pytest.approx(pair, rel=1e-6) for pair in RECORDED_QMSE]


def test_loss_params_are_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="needs sigma"):
        tiny_config(loss="label-noise")
    with pytest.raises(ValueError, match="takes no parameters; got sigma"):
        tiny_config(loss="mse", loss_params={"sigma": 0.1})
    with pytest.raises(ValueError, match="finite number >= 0"):
        tiny_config(loss="label-noise", loss_params={"sigma": -1.0})
    with pytest.raises(ValueError, match="unit sphere"):
        tiny_config(loss="label-noise", loss_params={"sigma": 0.1}, resample_null=True)
    cfg = tiny_config(loss="label-noise", loss_params={"sigma": 0.2}, epochs=1)
    train_run(cfg, tmp_path, dataset=tiny_dataset(), quiet=True)
    assert runs.load_json(tmp_path / "config.json")["loss_params"] == {"sigma": 0.2}


def test_run_directory_contract(tmp_path):
    ds = tiny_dataset()
    rows = train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)
    config = json.loads((tmp_path / "config.json").read_text())
    keys = ("dataset", "data_dir", "loss", "seed", "lr", "momentum", "train_subset", "model")
    for key in keys:
        assert key in config
    assert config["provenance"]["device"] == "cpu"
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"model", "optimizer", "order_rng", "direction_rng"}
    model, _ = load_run(tmp_path)
    assert not model.training
    d = prepare_data(ds)
    assert (model(d.x_test).argmax(-1) == d.y_test).double().mean().item() == rows[-1]["test_acc"]


def test_an_existing_run_continues_with_the_same_settings_and_data_only(tmp_path, capsys):
    ds = tiny_dataset()
    first = train_run(tiny_config(epochs=1), tmp_path, dataset=ds)
    assert train_run(tiny_config(epochs=1), tmp_path, dataset=ds) == first  # finished: as is
    assert "the run is finished (1 epochs)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"other settings: lr 0.05 there, 0.1 now, seed 0 th"):
        train_run(tiny_config(epochs=2, lr=0.1, seed=1), tmp_path, dataset=ds, quiet=True)
    other = tiny_dataset()
    other.train_labels[:10] = (other.train_labels[:10] + 1) % 3  # poisoned labels
    with pytest.raises(ValueError, match="trained on other data: fingerprint"):
        train_run(tiny_config(epochs=2), tmp_path, dataset=other, quiet=True)
    extended = train_run(tiny_config(epochs=2), tmp_path, dataset=ds)
    assert "continuing the run from epoch 1 of 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"holds 2 epochs, more than epochs=1.*--epochs 2 or more"):
        train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)
    fresh = train_run(tiny_config(epochs=2), tmp_path / "fresh", dataset=ds, quiet=True)
    assert extended == fresh
    assert (tmp_path / "metrics.jsonl").read_bytes() == (
        tmp_path / "fresh/metrics.jsonl"
    ).read_bytes()
    timings = runs.read_jsonl(tmp_path / "timings.jsonl")
    assert [t["epoch"] for t in timings] == [1, 2] and all(t["wall_s"] > 0 for t in timings)
    config = runs.load_json(tmp_path / "config.json")
    assert config["epochs"] == 2 and len(config["resumed"]) == 1


def test_a_run_written_before_kinds_were_recorded_continues(tmp_path):
    ds = tiny_dataset()
    train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)
    (tmp_path / "kind.json").unlink()  # as an older qmse left it
    assert len(train_run(tiny_config(epochs=2), tmp_path, dataset=ds, quiet=True)) == 2
    assert runs.load_json(tmp_path / "kind.json") == {"kind": "train-run"}


def test_a_key_computed_from_a_run_changes_when_the_run_is_extended(tmp_path):
    """What a cache of a run's analysis (a diagnosis, a landscape) must store: run_key."""
    ds = tiny_dataset()
    train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)
    key = run_key(tmp_path, samples=256)
    assert run_key(tmp_path, samples=256) == key and run_key(tmp_path, samples=64) != key
    train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)  # finished: unchanged
    assert run_key(tmp_path, samples=256) == key
    train_run(tiny_config(epochs=2), tmp_path, dataset=ds, quiet=True)
    assert run_key(tmp_path, samples=256) != key  # a cached diagnosis would be stale


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ds = tiny_dataset()
    train_run(tiny_config(epochs=1), tmp_path, dataset=ds, quiet=True)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["model"]["fc2.bias"][0] = math.inf  # the next epoch's loss is non-finite
    runs.save_torch(tmp_path / "checkpoint.pt", ckpt)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*lr.*epoch \(1\) is kept.*another"):
        train_run(tiny_config(epochs=2), tmp_path, dataset=ds, quiet=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert len(runs.read_jsonl(tmp_path / "metrics.jsonl")) == 1
    assert runs.load_json(tmp_path / "diverged.json")["epoch"] == 2
    with pytest.raises(NonFiniteLossError):  # remembered: not retried
        train_run(tiny_config(epochs=2), tmp_path, dataset=ds, quiet=True)
    with pytest.raises(ValueError, match=r"other settings \(it diverged in epoch 2\): lr"):
        train_run(tiny_config(epochs=2, lr=0.01), tmp_path, dataset=ds, quiet=True)


def test_a_diverged_first_epoch_does_not_block_a_corrected_lr(tmp_path):
    ds = tiny_dataset()
    with pytest.raises(NonFiniteLossError, match=r"nothing was saved.*smaller --lr \(here"):
        train_run(tiny_config(loss="mse", lr=1e6), tmp_path, dataset=ds, quiet=True)
    assert not (tmp_path / "checkpoint.pt").exists()
    with pytest.raises(NonFiniteLossError, match="nothing was saved"):  # the same settings
        train_run(tiny_config(loss="mse", lr=1e6), tmp_path, dataset=ds, quiet=True)
    rows = train_run(tiny_config(loss="mse", lr=0.05), tmp_path, dataset=ds, quiet=True)
    assert len(rows) == 2 and not (tmp_path / "diverged.json").exists()
    assert runs.load_json(tmp_path / "config.json")["lr"] == 0.05


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import tiny_config, tiny_images as tiny_dataset
    from qmse import runs, train

    mode, out, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if mode == "kill-me":  # block at step 3 of epoch 2 until the parent sends SIGKILL
        real = runs.progress
        def progress(iterable=None, **kw):
            bar = real(iterable, **kw)
            if kw.get("desc") == "epoch 2":
                update, count = bar.update, [0]
                def trap(n=1):
                    count[0] += 1
                    if count[0] == 3:
                        marker.write_text("in epoch 2")
                        time.sleep(600)
                    return update(n)
                bar.update = trap
            return bar
        runs.progress = progress
    cfg = tiny_config(epochs=3)
    train.train_run(cfg, out, dataset=tiny_dataset(), quiet=True)
    if mode == "again":
        train.train_run(cfg, out.parent / "uninterrupted", dataset=tiny_dataset(), quiet=True)
    """
)


@pytest.mark.integration
def test_sigkill_mid_epoch_then_a_rerun_gives_byte_identical_metrics(tmp_path):
    """kill -9 in epoch 2 of 3; the same call again continues on its own (no flag) and
    writes metrics.jsonl byte for byte as an uninterrupted run (timings go elsewhere)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    run, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, script, "kill-me", run, marker], env=env)
    try:
        while not marker.exists():
            assert child.poll() is None, "child exited before reaching epoch 2"
            time.sleep(0.05)
        other = tiny_config(loss="mse", seed=2, lr=0.01, epochs=3)  # a second writer
        with pytest.raises(DirectoryBusyError, match=rf"{run} is being written by pid {child.pid}"):
            train_run(other, run, dataset=tiny_dataset(), quiet=True)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    assert len(runs.read_jsonl(run / "metrics.jsonl")) == 1  # epoch 1 saved, 2 lost
    subprocess.run([sys.executable, script, "again", run, marker], env=env, check=True)
    resumed = (run / "metrics.jsonl").read_bytes()
    assert resumed == (tmp_path / "uninterrupted" / "metrics.jsonl").read_bytes()
    assert len(runs.read_jsonl(run / "metrics.jsonl")) == 3
    assert [t["epoch"] for t in runs.read_jsonl(run / "timings.jsonl")] == [1, 2, 3]
    assert len(runs.load_json(run / "config.json")["resumed"]) == 1


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_train_many_matches_separate_runs(tmp_path, batching):
    """M runs trained as one stack give each run's metrics and weights of separate runs."""
    ds = tiny_dataset()
    configs = [
        tiny_config(loss="qmse", momentum=0.9, seed=0),
        tiny_config(loss="mse", momentum=0.0, seed=1, lr=0.1),
        tiny_config(loss="ce", momentum=0.9, seed=2),
        tiny_config(loss="qmse", momentum=0.0, seed=3),
        tiny_config(loss="label-noise", loss_params={"sigma": 0.3}, seed=4),
    ]
    dirs = [tmp_path / f"v{m}" for m in range(len(configs))]
    many = train_many(configs, dirs, dataset=ds, quiet=True, batching=batching)
    for m, cfg in enumerate(configs):
        alone = train_run(cfg, tmp_path / f"s{m}", dataset=ds, quiet=True)
        assert [r["epoch"] for r in many[m]] == [1, 2]
        for a, b in zip(many[m], alone):
            for key in METRIC_KEYS:
                assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (m, key)
        assert runs.read_jsonl(tmp_path / f"v{m}" / "metrics.jsonl") == many[m]
        vec, _ = load_run(tmp_path / f"v{m}")
        sep, _ = load_run(tmp_path / f"s{m}")
        for p, q in zip(vec.parameters(), sep.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_train_many_resumes_and_its_runs_resume_alone(tmp_path):
    ds = tiny_dataset()
    configs = [tiny_config(seed=0, epochs=1), tiny_config(loss="mse", seed=1, epochs=1)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    train_many(configs, dirs, dataset=ds, quiet=True)
    longer = [dataclasses.replace(c, epochs=3) for c in configs]
    resumed = train_many(longer, dirs, dataset=ds, quiet=True)
    fresh = train_run(longer[1], tmp_path / "fresh", dataset=ds, quiet=True)
    for a, b in zip(resumed[1], fresh):
        assert all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6) for k in METRIC_KEYS)
    alone = train_run(dataclasses.replace(configs[0], epochs=4), dirs[0], dataset=ds, quiet=True)
    assert [r["epoch"] for r in alone] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="epoch"):
        train_many([dataclasses.replace(c, epochs=5) for c in configs], dirs, dataset=ds)
    with pytest.raises(ValueError, match="batch_size"):
        train_many([configs[0], tiny_config(batch_size=8)], [tmp_path / "c", tmp_path / "d"])
    with pytest.raises(ValueError, match="batching"):
        train_many(configs, [tmp_path / "e", tmp_path / "f"], dataset=ds, batching="grouped")


def test_train_many_stops_saving_a_diverged_run_and_goes_on(tmp_path):
    ds = tiny_dataset()
    configs = [tiny_config(loss="mse", lr=1e6, seed=0), tiny_config(loss="mse", seed=1)]
    rows = train_many(configs, [tmp_path / "bad", tmp_path / "good"], dataset=ds, quiet=True)
    assert rows[0] == [] and runs.load_json(tmp_path / "bad" / "diverged.json")["epoch"] == 1
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
    alone = train_run(configs[1], tmp_path / "alone", dataset=ds, quiet=True)
    assert [r["train_acc"] for r in rows[1]] == pytest.approx([r["train_acc"] for r in alone])


def test_resample_null_never_fires_with_an_output_bias(tmp_path):
    """SimpleCNN's output bias puts an identity block in every J_i, so no v_i is in the left
    null space: with --resample-null the run redraws nothing and matches the plain run."""
    data = tiny_dataset()
    plain = train_run(tiny_config(epochs=1), tmp_path / "plain", dataset=data, quiet=True)
    checked = train_run(
        tiny_config(epochs=1, resample_null=True), tmp_path / "checked", dataset=data, quiet=True
    )
    assert [r.pop("resampled_v") for r in checked] == [0]
    assert (checked) == (plain)
    with pytest.raises(ValueError, match="resample_null takes one run"):
        train_many([tiny_config(resample_null=True), tiny_config(seed=1)],
                   [tmp_path / "m0", tmp_path / "m1"], dataset=data)  # fmt: skip


def test_torchrun_takes_one_run_and_no_resample_null(tmp_path, monkeypatch):
    """Under a process group of two ranks (faked: the check comes before any collective)."""
    monkeypatch.setattr(train, "world", lambda: (0, 2))
    data, dirs = tiny_dataset(), [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="one run at a time, got 2: call train_run per run"):
        train_many([tiny_config(seed=0), tiny_config(seed=1)], dirs, dataset=data)
    with pytest.raises(ValueError, match="resample_null is not supported under torchrun"):
        train_run(tiny_config(resample_null=True), dirs[0], dataset=data)
    assert not dirs[0].exists() and not dirs[1].exists()
