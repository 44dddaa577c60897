"""qmse.landscape against one-model-at-a-time references, closed forms and known permutations,
on qmse's models and on a model and criterion qmse does not define."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_images
from torch import nn

import qmse.landscape as landscape
from qmse import data as qdata
from qmse.cli import main
from qmse.curvature import eval_mode
from qmse.landscape import (
    barrier,
    evaluate_points,
    filter_normalized_direction,
    interpolate,
    interpolation_barriers,
    parameters_of,
    random_slice,
    recompute_statistics,
)
from qmse.landscapeplot import plot_interpolation, plot_slices
from qmse.loss import compute_loss, expected_qmse_loss, mse_loss_half
from qmse.models import MLP, SimpleCNN
from qmse.runs import save_figure
from qmse.symmetry import permute, random_permutation
from qmse.train import train_run


def _mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(4, [6, 5], 3, activation="tanh").double()


def _cnn(seed: int) -> SimpleCNN:
    torch.manual_seed(seed)
    return SimpleCNN(in_channels=1, image_size=8, num_classes=3, channels=(3, 4), hidden=5).double()


def _data(model, n: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 8, 8) if isinstance(model, SimpleCNN) else (n, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _reference(model, base, directions, coeffs, x, y, loss="mse"):
    """One model per point, loaded with load_state_dict: the plain Python loop vmap replaces."""
    losses, acc = [], []
    for c in coeffs:
        net = _mlp(0) if isinstance(model, MLP) else _cnn(0)
        net.load_state_dict(
            {k: base[k] + sum(ci * d[k] for ci, d in zip(c, directions)) for k in base}
        )
        with torch.no_grad():
            out = net(x)
        losses.append(compute_loss(loss, out, y).item())
        acc.append((out.argmax(-1) == y).double().mean().item())
    return np.array(losses), np.array(acc)


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("loss", ["mse", "expected-qmse", "ce"])
def test_evaluate_points_matches_one_model_at_a_time(make, loss):
    model = make(1)
    x, y = _data(model)
    g = torch.Generator().manual_seed(2)
    dirs = [filter_normalized_direction(model, g) for _ in range(2)]
    coeffs = torch.randn(7, 2, generator=g, dtype=torch.float64)
    # 7 points in groups of 3 and 37 samples in batches of 10: both remainders are exercised
    got = evaluate_points(
        model, loss, (x, y), parameters_of(model), dirs, coeffs, group_size=3, batch_size=10
    )
    want = _reference(model, parameters_of(model), dirs, coeffs, x, y, loss)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=0)


def test_evaluate_points_one_hot_targets_and_closed_forms():
    model = _mlp(3)
    x, labels = _data(model)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    base = parameters_of(model)
    zero = [{k: torch.zeros_like(v) for k, v in base.items()}]
    with torch.no_grad():
        out = model(x)
    for loss, ref in (("mse", mse_loss_half), ("expected-qmse", expected_qmse_loss)):
        got, acc = evaluate_points(model, loss, (x, onehot), base, zero, torch.zeros(1, 1))
        torch.testing.assert_close(got[0], ref(out, onehot).item(), rtol=1e-12, atol=0)
        assert acc[0] == (out.argmax(-1) == labels).double().mean().item()


def test_accuracy_only_where_the_targets_are_class_indices():
    """Sequence outputs (N, T, C) with (N, T) class indices: the share of hits over all
    positions; regression targets of the output's shape (not one-hot) and (N,) outputs with
    0/1 targets: NaN, not the argmax of numbers that are not classes."""
    torch.manual_seed(5)
    per_step = nn.Linear(4, 3).double()  # (N, T, 4) -> (N, T, 3)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (9, 5), generator=g)

    def token_ce(out, t):
        return nn.functional.cross_entropy(out.flatten(0, 1), t.flatten())

    base = parameters_of(per_step)
    _, acc = evaluate_points(per_step, token_ce, (x, labels), base, zero_of(per_step),
                             torch.zeros(1, 1), batch_size=4)  # fmt: skip
    with torch.no_grad():
        want = (per_step(x).argmax(-1) == labels).double().mean().item()
    assert acc[0] == pytest.approx(want, rel=1e-12) and 0 < want < 1
    model = _mlp(3)
    xm, _ = _data(model)
    regression = torch.rand(xm.shape[0], 3, generator=g, dtype=torch.float64)
    _, acc = evaluate_points(model, "mse", (xm, regression), parameters_of(model), zero_of(model),
                             torch.zeros(1, 1))  # fmt: skip
    assert np.isnan(acc).all()
    logit = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).double()  # (N,) logits
    bits = torch.randint(0, 2, (xm.shape[0],), generator=g)
    bce = nn.BCEWithLogitsLoss()
    res = random_slice(logit, lambda out, t: bce(out, t.double()), (xm, bits), dims=1, points=3)
    assert np.isnan(res["accuracy"]).all()


def zero_of(model):
    return [{k: torch.zeros_like(v) for k, v in parameters_of(model).items()}]


def test_evaluate_points_refuses_bad_input():
    model = _mlp(0)
    x, y = _data(model)
    base = parameters_of(model)
    with pytest.raises(ValueError, match='random.*"expected-qmse"'):
        evaluate_points(model, "qmse", (x, y), base, [base], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="coeffs"):
        evaluate_points(model, "mse", (x, y), base, [base], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="same N"):
        evaluate_points(model, "mse", (x, y[:3]), base, [base], torch.zeros(1, 1))


def test_filter_normalized_direction():
    model = _cnn(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = filter_normalized_direction(model, torch.Generator().manual_seed(5))
    again = filter_normalized_direction(model, torch.Generator().manual_seed(5))
    for name, w in model.named_parameters():
        assert torch.equal(d[name], again[name])
        if w.dim() == 1:
            assert torch.equal(d[name], torch.zeros_like(w))  # biases are not perturbed
        else:  # each filter (output unit) of d has the norm of the model's filter
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))
            assert not torch.allclose(d[name], w)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def _trained_mlp(seed: int) -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """A small MLP fitted to a synthetic 3-class task (so that its minimum has a basin)."""
    g = torch.Generator().manual_seed(100)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # (N,) classes 0..2
    model = _mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        mse_loss_half(model(x), y).backward()
        opt.step()
    return model, x, y


def test_interpolation_ends_and_permuted_copy():
    """a → permuted a climbs over a barrier; after weight matching the path is a single point."""
    a, x, y = _trained_mlp(6)
    b = permute(a, random_permutation(a, torch.Generator().manual_seed(7)))
    naive = interpolate(a, b, "mse", (x, y), points=11)
    with torch.no_grad():
        end_loss = mse_loss_half(a(x), y).item()
    np.testing.assert_allclose(naive["loss"][[0, -1]], end_loss, rtol=1e-12)
    np.testing.assert_allclose(naive["alphas"], np.linspace(0, 1, 11))
    res = interpolation_barriers(a, b, "mse", (x, y), points=11)
    np.testing.assert_allclose(res["naive_loss"], naive["loss"], rtol=1e-12)
    np.testing.assert_allclose(res["aligned_loss"], end_loss, rtol=1e-12)  # constant path
    assert abs(res["aligned_barrier"]) < 1e-12
    assert res["naive_barrier"] > 0.05
    assert res["naive_barrier"] == barrier(naive["loss"])


def test_barrier_is_the_height_above_the_line_between_the_ends():
    alphas = np.linspace(0, 1, 25)
    for monotone in (np.exp(-3 * alphas), alphas**2, 1 + (1 - alphas) ** 3):  # convex: ≤ chord
        assert barrier(monotone) == 0.0
    for h in (0.0, 0.01, 0.7):  # L(α) = α + 4hα(1 − α): a bump of height h over the chord α
        assert barrier(alphas + 4 * h * alphas * (1 - alphas)) == pytest.approx(h, abs=1e-15)
        even = np.linspace(0, 1, 24)  # α = ½ is not on this grid: h(1 − (1/23)²) at α = 11/23
        bump = barrier(even + 4 * h * even * (1 - even))
        assert bump == pytest.approx(h * (1 - 1 / 23**2), abs=1e-15) and bump <= h
    assert barrier(np.array([1.0, 3.0, 2.0])) == 1.5  # chord 1.5 at the middle
    assert barrier(np.array([2.0, 1.0, 0.0])) == 0.0  # a straight line
    with pytest.raises(ValueError, match="path"):
        barrier(np.array([1.0]))


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_random_slice_shapes_centre_and_consistency(make):
    model = make(8)
    x, y = _data(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = random_slice(model, "mse", (x, y), dims=1, points=5, span=0.5, seed=9)
    two = random_slice(model, "mse", (x, y), dims=2, points=5, span=0.5, seed=9, group_size=4)
    assert one["loss"].shape == (5,) and two["loss"].shape == (5, 5)
    np.testing.assert_allclose(one["coords"], [-0.5, -0.25, 0, 0.25, 0.5])
    with torch.no_grad():
        centre = mse_loss_half(model(x), y).item()
    torch.testing.assert_close(two["loss"][2, 2], centre, rtol=1e-12, atol=0)
    # the first direction of a 2-D slice is the 1-D slice's direction (same seed)
    np.testing.assert_allclose(two["loss"][:, 2], one["loss"], rtol=1e-12)
    np.testing.assert_allclose(two["accuracy"][:, 2], one["accuracy"], rtol=0, atol=0)
    assert not np.allclose(two["loss"][2, :], one["loss"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="dims"):
        random_slice(model, "mse", (x, y), dims=3)


def test_plots_write_files(tmp_path):
    model = _mlp(10)
    x, y = _data(model)
    res = interpolation_barriers(model, _mlp(11), "mse", (x, y), points=4)
    save_figure(tmp_path / "interp.png", plot_interpolation(res, title="t"))
    for dims in (1, 2):
        slices = {
            name: random_slice(m, "mse", (x, y), dims=dims, points=4)
            for name, m in (("a", model), ("b", _mlp(12)))
        }
        fig = plot_slices(slices, title="two")
        if dims == 2:  # one contour panel per slice, one colour bar
            assert len(fig.axes) == 3 and fig.axes[-1].get_ylabel() == "loss"
        save_figure(tmp_path / f"s{dims}.png", fig)
    for name in ("interp.png", "s1.png", "s2.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_points_resumes_after_an_interruption(tmp_path, monkeypatch):
    model = _cnn(12)
    x, y = _data(model)
    g = torch.Generator().manual_seed(13)
    dirs = [filter_normalized_direction(model, g)]
    coeffs = torch.linspace(-1, 1, 7, dtype=torch.float64).unsqueeze(1)
    kw = dict(group_size=3, batch_size=16)
    want = evaluate_points(model, "mse", (x, y), parameters_of(model), dirs, coeffs, **kw)

    def interrupted(groups, **_):
        it = iter(groups)
        yield next(it)
        raise KeyboardInterrupt  # killed after the first group

    resume = tmp_path / "partial.npz"
    monkeypatch.setattr(landscape, "progress", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_points(model, "mse", (x, y), parameters_of(model), dirs, coeffs,
                        resume_file=resume, **kw)  # fmt: skip
    assert int(np.load(resume)["done"]) == 3
    monkeypatch.undo()
    got = evaluate_points(
        model, "mse", (x, y), parameters_of(model), dirs, coeffs, resume_file=resume, **kw
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="different evaluation"):
        evaluate_points(
            model, "mse", (x, y), parameters_of(model), dirs, 2 * coeffs, resume_file=resume
        )


@pytest.mark.slow
def test_compiled_evaluation_matches_eager():
    model = _cnn(14).float()
    x, y = _data(model)
    x = x.float()
    dirs = [filter_normalized_direction(model, torch.Generator().manual_seed(15))]
    coeffs = torch.linspace(-1, 1, 6).unsqueeze(1)
    base = parameters_of(model)
    eager = evaluate_points(model, "mse", (x, y), base, dirs, coeffs, group_size=3)
    compiled = evaluate_points(model, "mse", (x, y), base, dirs, coeffs, group_size=3, compile=True)
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-5)


def _user_model(seed: int) -> nn.Sequential:
    """A model qmse does not define: Conv2d → ReLU → Flatten → Linear, 1 × 6 × 6 → 1 output."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 1)
    ).double()


def test_user_model_and_criterion_against_direct_evaluation():
    """interpolate, barrier, random_slice on a user's Sequential with torch's HuberLoss on
    regression targets (accuracy then NaN), against models built and run one by one."""
    a, b = _user_model(30), _user_model(31)
    g = torch.Generator().manual_seed(32)
    x = torch.randn(23, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randn(23, 1, generator=g, dtype=torch.float64)
    huber = nn.HuberLoss(delta=0.5)
    res = interpolate(a, b, huber, (x, y), points=6, batch_size=7)
    want = []
    for alpha in np.linspace(0, 1, 6):
        net = _user_model(0)
        pa, pb = a.state_dict(), b.state_dict()
        net.load_state_dict({k: (1 - alpha) * pa[k] + alpha * pb[k] for k in pa})
        with torch.no_grad():
            want.append(huber(net(x), y).item())
    np.testing.assert_allclose(res["loss"], want, rtol=1e-12)
    assert barrier(res["loss"]) == pytest.approx(
        max(w - ((1 - t) * want[0] + t * want[-1]) for t, w in zip(np.linspace(0, 1, 6), want))
    )
    res = interpolation_barriers(a, permute(a, random_permutation(a, g)), huber, (x, y), points=5)
    assert abs(res["aligned_barrier"]) < 1e-12  # matching undoes the permutation exactly
    one = random_slice(a, lambda out, t: (out - t).abs().mean(), (x, y), dims=1, points=3)
    with torch.no_grad():
        assert one["loss"][1] == pytest.approx((a(x) - y).abs().mean().item(), rel=1e-12)
    assert np.isnan(one["accuracy"]).all()


def test_cli_match_and_landscape_on_two_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: tiny_images())
    for seed in (0, 1):
        cfg = tiny_config(loss="mse", epochs=2, seed=seed)
        train_run(cfg, tmp_path / f"s{seed}", dataset=tiny_images(), quiet=True)
    out = tmp_path / "match"
    argv = ["symmetry", "match", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]
    assert main([*argv, "--points", "5", "--samples", "40"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    arrays = np.load(out / "interpolation.npz")
    assert summary["naive_barrier"] == barrier(arrays["naive_loss"])
    assert summary["aligned_barrier"] == barrier(arrays["aligned_loss"])
    assert summary["naive_max_accuracy_drop"] == barrier(-arrays["naive_accuracy"])
    assert summary["samples"] == 40 and "provenance" in summary
    assert summary["buffers"] == "blend"  # a SimpleCNN: no running statistics
    ends = arrays["naive_loss"][[0, -1]]  # b and permuted b: equal up to float32 rounding
    np.testing.assert_allclose(ends, arrays["aligned_loss"][[0, -1]], rtol=1e-6)
    assert (out / "interpolation.png").exists()
    for dims in (1, 2):
        ls = tmp_path / f"ls{dims}"
        argv = ["landscape", str(tmp_path / "s0"), "--dims", str(dims), "--out", str(ls)]
        assert main([*argv, "--points", "5", "--samples", "40", "--quiet"]) == 0
        res = np.load(ls / f"landscape-{dims}d.npz")
        assert res["loss"].shape == (5,) * dims
        centre = res["loss"][(2,) * dims]
        torch.testing.assert_close(float(centre), summary["end_a"]["loss"], rtol=1e-6, atol=0)
        assert (ls / f"landscape-{dims}d.png").exists()
        assert not (ls / f"partial-{dims}d.npz").exists()
        assert json.loads((ls / "summary.json").read_text())["buffers"] == "blend"
    both = tmp_path / "both"
    argv = ["landscape", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(both)]
    assert main([*argv, "--points", "3", "--samples", "20", "--quiet"]) == 0
    assert (both / "landscape-2d.png").exists()
    for run in ("s0", "s1"):
        assert np.load(both / run / "landscape-2d.npz")["loss"].shape == (3, 3)
    assert main(["landscape", str(tmp_path / "s0"), "--loss", "qmse"]) == 2
    assert '"expected-qmse"' in capsys.readouterr().err
    assert main(["symmetry", "example"]) == 0


def test_every_writing_command_claims_its_directory(tmp_path, monkeypatch, capsys):
    """Each pair of analysis commands on one --out: the second is refused in one line and
    the first's files stay; a diverged checkpoint and a non-finite span are refused too."""
    monkeypatch.setattr(qdata, "load", lambda name, data_dir=None: tiny_images())
    for seed in (0, 1):
        cfg = tiny_config(loss="mse", epochs=1, seed=seed)
        train_run(cfg, tmp_path / f"s{seed}", dataset=tiny_images(), quiet=True)
    runs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    small = ["--points", "3", "--samples", "20"]
    commands = {
        "weight-matching": lambda out: ["symmetry", "match", *runs, "--out", out, *small],
        "landscape": lambda out: ["landscape", runs[0], "--out", out, *small, "--quiet"],
        "convexity": lambda out: ["diagnose", "convexity", "--out", out, "--segments", "5"],
        "diagnosis": lambda out: ["diagnose", runs[0], "--out", out, "--samples", "16"],
        "escape-benchmark": lambda out: ["escape", "--report-only", "--out", out],
    }
    committed = Path(__file__).resolve().parent.parent / "docs" / "escape-2" / "k6"
    for first, make in commands.items():
        out = str(tmp_path / f"out-{first}")
        if first == "escape-benchmark":  # a committed benchmark, its outputs rewritten
            shutil.copytree(committed, out, ignore=shutil.ignore_patterns("*.png"))
        assert main(make(out)) == 0, first
        held = sorted(p.name for p in Path(out).iterdir())
        for second, other in commands.items():
            if second == first:
                continue
            capsys.readouterr()
            assert main(other(out)) == 2, (first, second)
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"holds a {first}" in err, (first, second, err)
        assert sorted(p.name for p in Path(out).iterdir()) == held
    state = torch.load(tmp_path / "s1" / "checkpoint.pt", weights_only=True)
    next(v for v in state["model"].values() if v.is_floating_point())[0] = float("nan")
    torch.save(state, tmp_path / "s1" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["landscape", runs[1], "--out", str(tmp_path / "nan"), *small]) == 2
    assert "non-finite weights" in capsys.readouterr().err
    assert main(["landscape", runs[0], "--out", str(tmp_path / "span"), "--span", "nan"]) == 2


def _bn_net(seed: int, conv: bool) -> nn.Module:
    """A small network with BatchNorm (1-D after a Linear, or 2-D after a Conv2d), float64."""
    torch.manual_seed(seed)
    if conv:
        layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                  nn.Linear(3 * 4 * 4, 2)]  # fmt: skip
    else:
        layers = [nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)]
    return nn.Sequential(*layers).double()


def _bn_data(conv: bool, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 6, 6) if conv else (n, 3), generator=g, dtype=torch.float64)
    return 1.5 * x + 0.7, torch.randn(n, 2, generator=g, dtype=torch.float64)


def _reset_bn(model: nn.Module, loader) -> nn.Module:
    """The reference: torch's own update_bn (train mode, momentum None) on a copy."""
    model = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, model)
    return model.eval()


def _own_loss(model: nn.Module, x, y) -> float:
    with eval_mode(model), torch.no_grad():
        return mse_loss_half(model(x), y).item()


def _mix(a: nn.Module, b: nn.Module, alpha: float, buffers: bool) -> nn.Module:
    """(1 − α)·a + α·b, parameters (and floating buffers if `buffers`), as a new model."""
    sa, sb = a.state_dict(), b.state_dict()
    names = {k for k, _ in a.named_parameters()}
    mixed = copy.deepcopy(a)
    mixed.load_state_dict({
        k: (1 - alpha) * v + alpha * sb[k]
        if k in names or (buffers and v.is_floating_point()) else v
        for k, v in sa.items()
    })  # fmt: skip
    return mixed


@pytest.mark.parametrize("conv", [False, True])
def test_bn_interpolation_recomputes_statistics_at_every_point(conv):
    """Default for BN models: at each α the running statistics are those of bn_data (REPAIR's
    reset). Ends: a's and b's own losses, their statistics being those of the same inputs;
    midpoint: torch's update_bn on the averaged network. Batches of a DataLoader average."""
    x, y = _bn_data(conv)
    stats_x = _bn_data(conv, n=32, seed=1)[0]
    loader = torch.utils.data.DataLoader(stats_x, batch_size=8)
    a, b = (_reset_bn(_bn_net(s, conv), [stats_x]) for s in (0, 1))
    res = interpolate(a, b, "mse", (x, y), points=5, bn_data=stats_x, group_size=2)
    assert res["buffers"] == "recompute"
    np.testing.assert_allclose(res["loss"][[0, -1]], [_own_loss(a, x, y), _own_loss(b, x, y)],
                               rtol=1e-10)  # fmt: skip
    for i, alpha in ((1, 0.25), (2, 0.5)):
        want = _own_loss(_reset_bn(_mix(a, b, alpha, buffers=False), [stats_x]), x, y)
        assert res["loss"][i] == pytest.approx(want, rel=1e-10)
    blended = _own_loss(_mix(a, b, 0.5, buffers=True), x, y)
    assert abs(res["loss"][2] - blended) > 1e-3  # recomputing is not blending here
    batched = interpolate(a, b, "mse", (x, y), points=3, bn_data=loader)
    want = _own_loss(_reset_bn(_mix(a, b, 0.5, buffers=False), loader), x, y)
    assert batched["loss"][1] == pytest.approx(want, rel=1e-10)
    default = interpolate(a, b, "mse", (x, y), points=3)  # bn_data: the inputs x, one batch
    want = _own_loss(_reset_bn(_mix(a, b, 0.5, buffers=False), [x]), x, y)
    assert default["loss"][1] == pytest.approx(want, rel=1e-10)
    again = recompute_statistics(b, stats_x)
    torch.testing.assert_close(again.state_dict(), b.state_dict(), rtol=1e-12, atol=1e-14)


def test_bn_interpolation_blending_buffers_ends_at_the_models_themselves():
    """buffers="blend": statistics move like parameters, so L(0), L(1) are a's and b's own
    losses with their own (different) statistics; keeping a's buffers, as the library did
    before, would miss b's loss at α = 1."""
    x, y = _bn_data(False)
    a, b = _bn_net(0, False), _bn_net(1, False)
    for model, shift in ((a, 0.3), (b, -1.0)):  # different running statistics, not x's
        model.train()
        model(x + shift)
        model.eval()
    res = interpolate(a, b, "mse", (x, y), points=3, buffers="blend")
    assert res["buffers"] == "blend"
    path = (a, _mix(a, b, 0.5, buffers=True), b)
    np.testing.assert_allclose(res["loss"], [_own_loss(m, x, y) for m in path], rtol=1e-10)
    direction = {k: v - w for (k, v), w in zip(parameters_of(b).items(), parameters_of(a).values())}
    kept, _ = evaluate_points(a, "mse", (x, y), parameters_of(a), [direction], torch.ones(1, 1))
    assert abs(kept[0] - _own_loss(b, x, y)) > 1e-3


def test_bn_dropout_stays_off_and_models_are_untouched():
    """The statistics pass runs norm layers in train mode only: Dropout stays off, so two
    recomputations agree; neither model nor its flags change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.Linear(6, 2))
    model = model.double().train()
    x, y = _bn_data(False)
    before = copy.deepcopy(model.state_dict())
    one, two = recompute_statistics(model, x), recompute_statistics(model, x)
    torch.testing.assert_close(one.state_dict(), two.state_dict(), rtol=0, atol=0)
    with torch.no_grad():
        h = model[0](x)  # the BatchNorm's inputs with Dropout off: (N, 6)
    torch.testing.assert_close(one[2].running_mean, h.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one[2].running_var, h.var(0), rtol=1e-12, atol=1e-14)
    random_slice(model, "mse", (x, y), dims=1, points=3)
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_bn_random_slice_recomputes_or_keeps_statistics():
    x, y = _bn_data(True)
    model = _bn_net(3, True)
    res = random_slice(model, "mse", (x, y), dims=2, points=3, span=0.5)
    assert res["buffers"] == "recompute"
    assert res["loss"][1, 1] == pytest.approx(_own_loss(_reset_bn(model, [x]), x, y), rel=1e-10)
    kept = random_slice(model, "mse", (x, y), dims=1, points=3, span=0.5, buffers="blend")
    assert kept["buffers"] == "blend"
    assert kept["loss"][1] == pytest.approx(_own_loss(model, x, y), rel=1e-12)


class _Scaled(nn.Module):
    """A Linear with a buffer that is not a running statistic."""

    def __init__(self, dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(dtype)
        self.bn = nn.BatchNorm1d(2).to(dtype)
        self.register_buffer("scale", torch.ones(2, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.bn(self.lin(x)) * self.scale


def test_buffers_that_cannot_be_carried_are_refused():
    x, y = _bn_data(False)
    a, b = _Scaled(torch.float64), _Scaled(torch.float64)
    b.scale.fill_(2.0)
    with pytest.raises(ValueError, match=r"buffer 'scale' differs .* buffers='blend'"):
        interpolate(a, b, "mse", (x, y), points=3)
    res = interpolate(a, b, "mse", (x, y), points=3, buffers="blend")
    assert res["loss"][-1] == pytest.approx(_own_loss(b, x, y), rel=1e-12)
    b.steps.fill_(3)
    with pytest.raises(ValueError, match=r"buffer 'steps' \(torch.int64\) differs"):
        interpolate(a, b, "mse", (x, y), points=3, buffers="blend")
    mlp = _mlp(0)
    xm, ym = _data(mlp)
    with pytest.raises(ValueError, match="no norm layer with running statistics"):
        interpolate(mlp, mlp, "mse", (xm, ym), points=3, buffers="recompute")
    with pytest.raises(ValueError, match="expected one of"):
        random_slice(mlp, "mse", (xm, ym), dims=1, buffers="keep")
    with pytest.raises(ValueError, match="bn_data is used only"):
        interpolate(a, a, "mse", (x, y), points=3, buffers="blend", bn_data=x)
    with pytest.raises(ValueError, match="bn_data must be"):
        interpolate(a, a, "mse", (x, y), points=3, bn_data=[])
    assert interpolate(mlp, mlp, "mse", (xm, ym), points=3)["buffers"] == "blend"
