"""Every device path against the CPU on small cases: the losses, train_run, train_many
(vmap), a reproduce grid of one run, the Hessian tools, landscapes, and the escape
benchmark's gd-population and one sample method. Marked `cuda` and skipped without CUDA;
`make gpu-check` runs them (and the speed benchmarks) on a machine with a GPU.

TF32 is switched off inside these tests (`exact_float32`), so CUDA's float32 is compared
with the CPU's at float32 tolerances; training itself runs with PyTorch's defaults. The last
test checks that `make gpu-check` skips cleanly where there is no CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn, tiny_config, tiny_images, tiny_mlp

from benchmarks.gpu_check import run_part
from qmse import curvature, landscape, runs
from qmse.escape import gd_population, make_job, run_method
from qmse.escape.engine import job_gradient, teacher_outputs
from qmse.loss import LOSSES, get_loss, qmse_loss, sample_directions
from qmse.report import write_outputs
from qmse.reproduce import run_grid
from qmse.rundir import load_run, prepare_data, run_name
from qmse.teacher_student import init_weights, make_problem, sample_inputs
from qmse.train import METRIC_KEYS, train_many, train_run

CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parent.parent


def on_cuda(test):
    """Mark `test` as a CUDA check (`pytest -m cuda`), skipped without CUDA, run without TF32."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(pytest.mark.usefixtures("exact_float32")(test)))


@pytest.fixture
def exact_float32():
    """No TF32 in matmuls and convolutions while a test runs; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def close_rows(a: list[dict], b: list[dict], n_train: int, n_test: int) -> None:
    """Metric rows of the same run on two devices: losses to 1e-4 relative, accuracies to
    one sample (a sample on the decision boundary may flip)."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in METRIC_KEYS:
            if key.endswith("_acc"):
                n = n_test if key.startswith("test") else n_train
                assert abs(x[key] - y[key]) <= 1 / n + 1e-12, (x["epoch"], key)
            else:
                assert math.isclose(x[key], y[key], rel_tol=1e-4, abs_tol=1e-6), (x["epoch"], key)


@pytest.mark.parametrize("name", sorted(LOSSES))
@on_cuda
def test_losses_and_their_gradients_match_the_cpu(name):
    spec = get_loss(name)
    params = {p: 0.3 for p in spec.params}
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    noise = spec.draw(64, 5, generator=g, **params) if spec.random else None
    results = []
    for device in ("cpu", CUDA):
        x = f.to(device).requires_grad_()
        t = F.one_hot(y, 5).float().to(device)
        n = None if noise is None else noise.to(device)
        loss = spec(x, t, noise=n, **params)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.cpu(), grad.cpu(), spec.expected(x.detach(), t, **params).cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@on_cuda
def test_qmse_loss_checks_run_on_the_device():
    """Class indices and v's norm are checked by asserts on the device, without a sync."""
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(32, 4, generator=g), torch.randint(0, 4, (32,), generator=g)
    v = sample_directions(32, 4, generator=g)
    cpu = qmse_loss(f, y, noise=v)
    gpu = qmse_loss(f.to(CUDA), y.to(CUDA), noise=v.to(CUDA))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)
    draws = qmse_loss(f.to(CUDA), y.to(CUDA), generator=torch.Generator(CUDA).manual_seed(0))
    assert draws.isfinite().item()


@pytest.mark.parametrize("loss", ["qmse", "mse", "label-noise"])
@on_cuda
def test_train_run_on_cuda_is_the_cpu_run(tmp_path, loss):
    """The generators live on the CPU, so both devices draw the same batches and noise."""
    params = {"sigma": 0.3} if loss == "label-noise" else {}
    cfg = tiny_config(loss=loss, loss_params=params)
    cpu = train_run(cfg, tmp_path / "cpu", dataset=tiny_images(), device="cpu", quiet=True)
    gpu = train_run(cfg, tmp_path / "gpu", dataset=tiny_images(), device="cuda", quiet=True)
    close_rows(gpu, cpu, 96, 40)
    assert runs.load_json(tmp_path / "gpu" / "config.json")["provenance"]["device"] == "cuda"
    a, _ = load_run(tmp_path / "cpu")
    b, _ = load_run(tmp_path / "gpu")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    more = dataclasses.replace(cfg, epochs=3)  # a CUDA checkpoint continues
    assert len(train_run(more, tmp_path / "gpu", dataset=tiny_images(), device="cuda")) == 3


@on_cuda
def test_train_many_with_vmap_on_cuda_is_the_cpu_runs(tmp_path):
    configs = [
        tiny_config(loss="qmse", momentum=0.9, seed=0),
        tiny_config(loss="mse", momentum=0.0, seed=1, lr=0.1),
        tiny_config(loss="ce", momentum=0.9, seed=2),
        tiny_config(loss="label-noise", loss_params={"sigma": 0.3}, seed=3),
    ]
    dirs = [tmp_path / f"v{m}" for m in range(len(configs))]
    many = train_many(configs, dirs, dataset=tiny_images(), device="cuda", quiet=True)
    assert runs.load_json(dirs[0] / "config.json")["provenance"]["device"] == "cuda"
    for m, cfg in enumerate(configs):
        alone = train_run(cfg, tmp_path / f"s{m}", dataset=tiny_images(), quiet=True)
        close_rows(many[m], alone, 96, 40)


@on_cuda
def test_a_grid_of_one_run_on_cuda_is_the_cpu_grid(tmp_path):
    cfg = tiny_config(loss="qmse", momentum=0.9, seed=0)
    for device in ("cpu", "cuda"):
        grid = run_grid([cfg], tmp_path / device, dataset=tiny_images(), device=device, quiet=True)
        paths = write_outputs(grid)
        assert paths["figure"].exists() and paths["report"].exists()
    close_rows(
        runs.read_jsonl(tmp_path / "cuda" / run_name(cfg) / "metrics.jsonl"),
        runs.read_jsonl(tmp_path / "cpu" / run_name(cfg) / "metrics.jsonl"),
        96,
        40,
    )


def _hessian_tools(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    value, grad, hvp = curvature.loss_gradient_hessian(model, "mse", (x, y))
    P = grad.numel()
    top, bottom = curvature.hessian_eigs(hvp, P, k=3, steps=P, dtype=torch.float64)
    trace, _ = curvature.hutchinson_trace(hvp, P, samples=8, dtype=torch.float64)
    (nodes, weights), *_ = curvature.spectral_density(hvp, P, steps=10, vectors=1)
    probe = torch.linspace(-1, 1, P, dtype=torch.float64, device=x.device)
    return {
        "value": value.cpu(),
        "grad": grad.cpu(),
        "hvp": hvp(probe).cpu(),
        "top": top.cpu(),
        "bottom": bottom.cpu(),
        "trace": torch.tensor(trace),
        "nodes": nodes.cpu(),
        "weights": weights.cpu(),
    }


@on_cuda
def test_hessian_tools_on_cuda_match_the_cpu():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,))
    cpu = _hessian_tools(tiny_mlp(0), x, y)
    gpu = _hessian_tools(tiny_mlp(0).to(CUDA), x.to(CUDA), y.to(CUDA))
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-6, atol=1e-9, msg=key)


@on_cuda
def test_landscape_points_on_cuda_match_the_cpu():
    data = prepare_data(tiny_images(), train_subset=48)
    model = tiny_cnn(0)
    base = landscape.parameters_of(model)
    dirs = [
        landscape.filter_normalized_direction(model, torch.Generator().manual_seed(s))
        for s in (1, 2)
    ]
    coeffs = torch.tensor([[0.0, 0.0], [0.5, -0.5], [1.0, 0.25], [-1.0, 1.0]])
    args = ("mse", (data.x_train, data.y_train))
    cpu = landscape.evaluate_points(model, *args, base, dirs, coeffs, group_size=3)
    model_gpu = tiny_cnn(0).to(CUDA)
    gpu = landscape.evaluate_points(
        model_gpu,
        "mse",
        (data.x_train.to(CUDA), data.y_train.to(CUDA)),
        {k: v.to(CUDA) for k, v in base.items()},
        [{k: v.to(CUDA) for k, v in d.items()} for d in dirs],
        coeffs.to(CUDA),
        group_size=3,
    )
    torch.testing.assert_close(
        torch.from_numpy(gpu[0]), torch.from_numpy(cpu[0]), rtol=1e-5, atol=1e-7
    )
    assert (abs(gpu[1] - cpu[1]) <= 1 / 48 + 1e-12).all()


@on_cuda
def test_gd_population_on_cuda_matches_the_cpu():
    """Safran & Shamir's gradient descent is deterministic: float64 on both devices."""
    problem = make_problem(4, 5)
    W0 = init_weights(range(6), 5, 4)  # (6, 5, 4)
    cpu = gd_population(W0, problem, max_steps=400, quiet=True)
    gpu = gd_population(W0.to(CUDA), problem.to(device=CUDA), max_steps=400, quiet=True)
    for key in ("W", "loss", "grad_norm"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-9, atol=1e-12, msg=key)
    assert torch.equal(gpu["steps"].cpu(), cpu["steps"])


@on_cuda
def test_a_sample_method_on_cuda():
    """SGD on the teacher-student problem: its gradient on the same inputs matches the CPU's;
    a run on CUDA draws its own batches (the engine's generators live on W0's device), so it
    is checked to run, stay finite and reach a loss like the CPU run's."""
    problem = make_problem(3, 4)
    W0 = init_weights(range(8), 4, 3).float()  # (8, 4, 3)
    x = sample_inputs(8, 32, 3, generator=torch.Generator().manual_seed(0))  # (8, 32, 3)
    job = make_job("sgd", 0.05)
    grads = []
    for device in ("cpu", CUDA):
        p = problem.to(dtype=torch.float32, device=device)
        xd = x.to(device)
        grad = job_gradient(
            job, W0.to(device), xd, teacher_outputs(xd, p), p, torch.Generator(device)
        )
        grads.append(grad.cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    losses = {}
    for device in ("cpu", CUDA):
        result = run_method(
            "sgd", W0.to(device), problem.to(device=device), steps=300, lr=0.05, batch=32,
            quiet=True,
        )  # fmt: skip
        assert not result["diverged"].any() and torch.isfinite(result["loss"]).all()
        losses[str(device)] = result["loss"].cpu().median().item()
    assert abs(losses["cuda"] - losses["cpu"]) <= 0.5 * max(losses.values()) + 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "report.md")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip().splitlines() == [
        f"gpu-check: no CUDA device is visible to torch {torch.__version__} (built for CUDA "
        f"{torch.version.cuda}); nothing to check"
    ]
    assert not (tmp_path / "report.md").exists()


def test_gpu_check_runs_each_part_under_its_time_limit(tmp_path):
    status, seconds, output = run_part(["-c", "print('done')"], 30, tmp_path)
    assert (status, output) == ("ok", "done\n")
    status, seconds, output = run_part(
        ["-c", "import time; print('x', flush=True); time.sleep(60)"], 1, tmp_path
    )
    assert status == "stopped after 1 s" and seconds < 30 and output == "x\n"
    status, _, _ = run_part(["-c", "raise SystemExit(3)"], 30, tmp_path)
    assert status == "failed (exit 3)"
