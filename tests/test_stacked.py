"""qmse.stacked against the models one at a time: outputs and gradients of the stacked
forwards, each model's loss from the losses' formulas, kernels laid out as a model's own,
and momentum buffers in torch.optim.SGD's own state_dict."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch.func import stack_module_state

from qmse.rundir import build_model
from qmse.stacked import (
    grouped_losses,
    loss_groups,
    momentum_buffers,
    sgd_state_dict,
    stack_parameters,
    stacked_forwards,
)

ARGS = {"in_channels": 1, "image_size": 8, "num_classes": 3, "channels": [2, 4], "hidden": 8}


def _models(M: int) -> list[torch.nn.Module]:
    return [build_model(ARGS, seed) for seed in range(M)]


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_stacked_forwards_give_each_models_outputs_and_gradients(batching, layout):
    models = _models(3)
    params = stack_parameters(models, layout)
    train_forward, eval_forward = stacked_forwards(ARGS, batching)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 1, 8, 8, generator=g)  # a batch per model
    shared = torch.randn(7, 1, 8, 8, generator=g)
    out = train_forward(params, x)  # (3, 5, 3)
    weights = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    with torch.no_grad():
        together = eval_forward(params, shared)  # (3, 7, 3)
    for m, model in enumerate(models):
        alone = model(x[m])
        torch.testing.assert_close(out[m], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together[m], model(shared), rtol=1e-5, atol=1e-6)
        ref = torch.autograd.grad((alone * weights[m]).sum(), list(model.parameters()))
        for got, want in zip(grads, ref, strict=True):
            torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batching"):
        stacked_forwards(ARGS, "grouped")


def test_stack_parameters_lays_kernels_out_as_a_models_own():
    models = _models(2)
    plain, _ = stack_module_state(models)
    laid = stack_parameters(models, torch.channels_last)
    own = build_model(ARGS, 0).to(memory_format=torch.channels_last)
    for (name, p), q in zip(own.named_parameters(), laid.values(), strict=True):
        assert q.is_leaf and q.requires_grad and q.shape == (2, *p.shape)
        assert q[1].stride() == p.stride(), name
        assert torch.equal(q, plain[name])
    assert laid["conv2.weight"][0].is_contiguous(memory_format=torch.channels_last)


def test_grouped_losses_give_each_model_its_own_loss():
    """Four models under three losses (two share QMSE) against the losses' formulas."""
    cfgs = [
        tiny_config(loss="qmse"),
        tiny_config(loss="mse"),
        tiny_config(loss="label-noise", loss_params={"sigma": 0.3}),
        tiny_config(loss="qmse", seed=1),
    ]
    groups = loss_groups(cfgs, torch.device("cpu"))
    assert [g.spec.name for g in groups] == ["qmse", "mse", "label-noise"]
    g = torch.Generator().manual_seed(1)
    out = torch.randn(4, 6, 3, generator=g)
    onehot = F.one_hot(torch.randint(0, 3, (4, 6), generator=g), 3).float()
    noise = torch.randn(4, 6, 3, generator=g)
    noise[[0, 3]] = F.normalize(noise[[0, 3]], dim=-1)  # QMSE's unit directions
    got = grouped_losses(groups, out, onehot, noise)  # (4, 6)
    r = onehot - out
    want = torch.stack(
        [
            0.5 * ((r[0] + noise[0]) * r[0]).sum(-1) ** 2,
            0.5 * (r[1] ** 2).sum(-1),
            0.5 * ((r[2] + noise[2]) ** 2).sum(-1),
            0.5 * ((r[3] + noise[3]) * r[3]).sum(-1) ** 2,
        ]
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_state_dict_is_torch_sgds_own(momentum):
    """After two real steps of torch.optim.SGD, its state_dict rebuilt from the buffers, and
    the buffers read back from it."""
    model = build_model(ARGS, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    saved = opt.state_dict()
    count = len(list(model.parameters()))
    buffers = momentum_buffers(saved, count)
    if not momentum:
        assert buffers is None and saved["state"] == {}
        buffers = [torch.zeros_like(p) for p in model.parameters()]  # what a trainer holds
    rebuilt = sgd_state_dict(build_model(ARGS, 1), buffers, 0.05, momentum)
    assert rebuilt["param_groups"] == saved["param_groups"]
    assert rebuilt["state"].keys() == saved["state"].keys()
    for i, state in saved["state"].items():
        assert torch.equal(rebuilt["state"][i]["momentum_buffer"], state["momentum_buffer"])
    assert momentum_buffers({"state": {}}, count) is None
