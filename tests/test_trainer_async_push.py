"""What a worker of the Trainer's asynchronous strategy pushes: the gradient clipped by its norm over
the whole model when the given fused optimizer clips, unscaled by torch.amp.GradScaler under fp16
(no push when it holds inf), and what the servers' rebuilt optimizers keep of the given one.

The servers are replaced by a recorder of each push: the references are torch's own
``clip_grad_norm_`` and a plain GradScaler loop over the same model and batch.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainpatterns import FusedAdamW, FusedSGD
from trainpatterns._train_async import _Push, optimizer_factory


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter is neither clipped nor pushed
    return model


def _recorder(model: torch.nn.Module) -> SimpleNamespace:
    pushes: list = []
    return SimpleNamespace(module=model, pushes=pushes,
                           step=lambda: pushes.append([None if p.grad is None else p.grad.clone()
                                                       for p in model.parameters()]))


def _batch(scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    return torch.randn(33, 7, generator=g) * scale, torch.randn(33, 3, generator=g)


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6])
def test_the_push_is_the_gradient_clipped_over_the_whole_model(max_norm):
    model, reference = _model(), _model()
    adp = _recorder(model)
    push = _Push(adp, max_norm)
    x, y = _batch(10.0)
    for m in (model, reference):
        torch.nn.functional.mse_loss(m(x), y).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], max_norm)
    push.step()
    assert len(adp.pushes) == 1
    for got, p in zip(adp.pushes[0], reference.parameters()):
        if p.grad is None:
            assert got is None
        else:
            torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("poison", [False, True])
def test_fp16_scaler_unscales_before_the_push_and_skips_inf(poison):
    model, reference = _model(), _model()
    adp = _recorder(model)
    push = _Push(adp, 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batch()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(push)
    scaler.update()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.requires_grad], 0.5)
    if poison:
        assert adp.pushes == [] and scaler.get_scale() == 512.0  # skipped, and the scale backs off
        return
    assert len(adp.pushes) == 1
    for got, p in zip(adp.pushes[0], reference.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


def test_servers_rebuild_the_optimizer_with_its_settings_but_not_its_clipping():
    params = list(_model().parameters())
    given = FusedAdamW(params, lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1, max_grad_norm=1.0, master_weights=True)
    shard = [torch.nn.Parameter(torch.zeros(5))]
    rebuilt = optimizer_factory(given)(shard)
    assert type(rebuilt) is FusedAdamW and rebuilt.master_weights and rebuilt.max_grad_norm is None
    expected = {k: v for k, v in given.param_groups[0].items() if k != "params"}
    assert {k: v for k, v in rebuilt.param_groups[0].items() if k != "params"} == expected
    plain = optimizer_factory(torch.optim.SGD(params, lr=0.1, momentum=0.9))(shard)
    assert type(plain) is torch.optim.SGD and plain.param_groups[0]["momentum"] == 0.9
    def factory(ps):
        return FusedSGD(ps, lr=0.1)
    assert optimizer_factory(factory) is factory  # a factory is used as given
