"""Useful overfitting: the one-batch overfit check (report, untouched caller state, failure for a
too-small model), interpolation mode and max error, and the distillation loss against a
hand-written formula."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainpatterns as tp
from trainpatterns.overfit import (DistillationLoss, disable_regularization, distill, distillation_loss, interpolate,
                                   max_error, overfit_check)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mlp(d_in=10, hidden=64, d_out=7, p=0.5):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p),
                         nn.Linear(hidden, d_out))


def batch(n=32, d_in=10, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_overfit_check_passes_and_reports():
    torch.manual_seed(0)
    model = mlp()
    x, y = batch()
    report = overfit_check(model, (x, y), nn.CrossEntropyLoss(), steps=200, lr=1e-2)
    assert report.passed and bool(report)
    assert report.num_classes == 7 and report.expected_initial_loss == pytest.approx(math.log(7))
    # the loss at init is the copy's loss with dropout off: recompute it independently
    ref = copy.deepcopy(model)
    ref[3].p = 0.0
    ref.train()
    assert report.initial_loss == pytest.approx(F.cross_entropy(ref(x), y).item(), rel=1e-5)
    assert report.target == pytest.approx(0.01 * report.initial_loss)
    assert report.final_loss <= report.target
    assert report.steps_to_target == report.steps == len(report.losses) - 1
    assert report.losses[report.steps_to_target] <= report.target < min(report.losses[:report.steps_to_target])
    assert "PASS" in str(report) and "log 7" in str(report)


def test_overfit_check_leaves_the_callers_state_untouched():
    torch.manual_seed(1)
    model = mlp()
    opt = tp.FusedAdamW(model.parameters(), lr=1e-3, weight_decay=0.3)
    x, y = batch()
    for _ in range(3):  # give the optimizer state to lose
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    rng_before = torch.get_rng_state()
    grads_before = [p.grad.clone() for p in model.parameters()]
    report = overfit_check(model, (x, y), F.cross_entropy, steps=200, optimizer=opt, lr=1e-2)
    assert report.passed
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    after = opt.state_dict()
    assert after["param_groups"] == opt_before["param_groups"]
    for i, st in opt_before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model.training and model[3].p == 0.5
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))


def test_overfit_check_disables_dropout_and_weight_decay():
    made = []

    def factory(params):
        made.append(torch.optim.AdamW(params, lr=1e-2, weight_decay=10.0))
        return made[-1]

    torch.manual_seed(2)
    model = mlp(p=0.9)  # 90% dropout and heavy decay: hopeless unless both are switched off
    report = overfit_check(model, batch(), nn.CrossEntropyLoss(), steps=200, optimizer=factory)
    assert report.passed, str(report)
    assert all(g["weight_decay"] == 0.0 for g in made[0].param_groups)
    assert model[3].p == 0.9


def test_too_small_model_fails_without_raising():
    torch.manual_seed(3)
    x, y = batch(n=256, d_in=4, classes=10)  # random labels: a linear model cannot fit them
    report = overfit_check(nn.Linear(4, 10), (x, y), nn.CrossEntropyLoss(), steps=100, lr=1e-2)
    assert not report.passed and report.steps_to_target is None and report.steps == 100
    assert report.final_loss > report.target
    assert "FAIL" in str(report) and report.notes and "too small" in report.notes[0]


def test_overfit_check_reports_a_diverging_loss():
    model = nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    report = overfit_check(model, (x, y), F.mse_loss, steps=200,
                           optimizer=lambda ps: torch.optim.SGD(ps, lr=1e6))
    assert not report.passed and "became" in report.notes[0]
    assert report.expected_initial_loss is None  # regression: no log C


def test_overfit_check_notes_a_bad_initial_scale():
    torch.manual_seed(4)
    model = nn.Linear(10, 7)
    with torch.no_grad():
        model.weight.mul_(50)
    report = overfit_check(model, batch(), nn.CrossEntropyLoss(), steps=5)
    assert any("far from log 7" in n for n in report.notes)


def test_overfit_check_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        overfit_check(nn.Linear(2, 2), batch(d_in=2), F.cross_entropy, steps=0)
    with pytest.raises(ValueError, match="pair"):
        overfit_check(nn.Linear(2, 2), torch.randn(3, 2), F.cross_entropy)


# ----- interpolation -------------------------------------------------------------------------------

def test_disable_regularization():
    model = nn.Sequential(nn.Dropout(0.3), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2), nn.AlphaDropout(0.1))
    opt = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    disable_regularization(model, opt)
    model.train()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)  # deterministic in train mode
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_max_error_matches_numpy():
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    x, y = torch.randn(1001, 3), torch.randn(1001, 2)
    with torch.no_grad():
        ref = np.abs(x.numpy() @ model.weight.numpy().T + model.bias.numpy() - y.numpy()).max()
    assert max_error(model, x, y, batch_size=97) == pytest.approx(float(ref), rel=1e-6)
    with pytest.raises(ValueError, match="rows"):
        max_error(model, x, y[:5])


def test_interpolate_fits_noise_free_data_in_float64():
    torch.manual_seed(6)
    x = torch.linspace(-1, 1, 257).unsqueeze(1)
    y = torch.sin(2 * x)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
    with torch.no_grad():
        initial = (model.eval()(x) - y).abs().max().item()
    report = interpolate(model, x, y, steps=400, lr=2e-2)
    assert report.dtype == torch.float64 and model[0].weight.dtype == torch.float64
    assert report.history[-1][0] == 400 and len(report.history) == 10  # no early stopping: every step ran
    with torch.no_grad():
        out = model.eval()(x.double())
    assert report.max_error == pytest.approx((out - y.double()).abs().max().item(), rel=1e-9)
    assert report.mse == pytest.approx(((out - y.double()) ** 2).mean().item(), rel=1e-9)
    assert report.max_error < 0.3 * initial, str(report)
    assert model[2].p == 0.0


# ----- distillation --------------------------------------------------------------------------------

def _reference_kd(s, t, y, T, alpha):
    """Hinton's loss written out in float64 numpy: alpha T^2 KL(p_t || p_s) + (1 - alpha) CE."""
    s, t = s.astype(np.float64), t.astype(np.float64)

    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp_s, lp_t = log_softmax(s / T), log_softmax(t / T)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(axis=1).mean()
    if y is None:
        return T * T * kl
    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (7.0, 1.0)])
def test_distillation_loss_matches_the_formula(T, alpha):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(13, 11, generator=g) * 3, torch.randn(13, 11, generator=g) * 3
    y = torch.randint(0, 11, (13,), generator=g)
    got = distillation_loss(s, t, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(_reference_kd(s.numpy(), t.numpy(), y.numpy(), T, alpha), rel=1e-5)
    soft = distillation_loss(s, t, temperature=T)
    assert soft.item() == pytest.approx(_reference_kd(s.numpy(), t.numpy(), None, T, alpha), rel=1e-5)
    assert DistillationLoss(T, alpha)(s, t, y).item() == pytest.approx(got.item(), rel=1e-6)


def test_distillation_loss_with_positions_and_no_teacher_gradient():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    got = distillation_loss(s, t, temperature=3.0)
    rows = lambda z: z.detach().movedim(1, -1).reshape(-1, 5).numpy()
    assert got.item() == pytest.approx(_reference_kd(rows(s), rows(t), None, 3.0, 1.0), rel=1e-5)
    got.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=0)


def test_distill_trains_the_student_and_leaves_the_teacher_alone():
    torch.manual_seed(9)
    teacher = mlp(d_in=6, hidden=48, d_out=5, p=0.3)
    teacher.train()
    x = torch.randn(512, 6)
    with torch.no_grad():
        teacher.eval()
        y = teacher(x).argmax(1)
        teacher.train()
    student = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 5))
    before = copy.deepcopy(teacher.state_dict())
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    opt = tp.FusedAdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    with torch.no_grad():
        agree_before = (student(x).argmax(1) == y).float().mean().item()
    history = distill(teacher, student, data, opt, epochs=8, temperature=2.0, alpha=0.7)
    assert len(history) == 8 and history[-1] < 0.8 * history[0]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN statistics included: the teacher ran in eval mode
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # its mode is restored
    with torch.no_grad():
        agree = (student(x).argmax(1) == y).float().mean().item()
    assert agree > 0.8 and agree > agree_before + 0.3, (agree_before, agree)
    with pytest.raises(ValueError, match="same module"):
        distill(student, student, data, opt)
