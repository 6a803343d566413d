"""Useful overfitting: the one-batch overfit check (report, untouched caller state, failure for a
too-small model or one with nothing to train, the mis-scaled-logits warning), interpolation mode,
max error and the L-BFGS finish (against plain torch loops), and the distillation loss against a
hand-written formula."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies
import torch.nn.functional as F
from torch import nn

import trainpatterns as tp
from trainpatterns.overfit import (DistillationLoss, disable_regularization, distill, distillation_loss, interpolate,
                                   lbfgs_finish, max_error, overfit_check)


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
    assert report.target == pytest.approx(0.01 * min(report.initial_loss, math.log(7)))
    assert not report.initial_loss_suspect and "WARNING" not in str(report)
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


def test_overfit_check_flags_logits_50x_too_large_even_when_the_batch_is_fitted():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        model[2].weight.mul_(50)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    assert initial > 5 * math.log(10)
    report = overfit_check(model, (x, y), nn.CrossEntropyLoss(), steps=300, lr=1e-2)
    assert report.initial_loss == pytest.approx(initial, rel=1e-5)
    # the target is 1% of log C, not 1% of the inflated loss at init (which a barely fitted batch meets)
    assert report.target == pytest.approx(0.01 * math.log(10)) and report.target < 0.2 * (0.01 * initial)
    assert report.passed and report.final_loss <= report.target
    assert report.initial_loss_suspect
    first_line = str(report).splitlines()[0]
    assert "PASS" in first_line and "WARNING" in first_line
    assert any("far from log 10" in n for n in report.notes)


def test_overfit_check_reports_a_model_with_nothing_to_train():
    x, y = batch(n=16, d_in=7, classes=7)
    frozen = nn.Linear(7, 7)
    frozen.requires_grad_(False)
    before = copy.deepcopy(frozen.state_dict())

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(7, 7)

        def forward(self, inp):
            return self.lin(inp).detach()

    for model, says in ((frozen, "no trainable parameters"), (nn.Identity(), "no trainable parameters"),
                        (Detached(), "does not depend on any trainable parameter")):
        report = overfit_check(model, (x, y), nn.CrossEntropyLoss(), steps=20)
        with torch.no_grad():
            expected = F.cross_entropy(model(x), y).item()
        assert not report.passed and report.steps == 0 and report.steps_to_target is None
        assert report.initial_loss == pytest.approx(expected, rel=1e-6) and report.losses == [report.initial_loss]
        assert report.num_classes == 7 and "FAIL" in str(report)
        assert any(says in n for n in report.notes), report.notes
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k])


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
    report = interpolate(model, x, y, steps=400, lr=2e-2, finish=None)
    assert report.dtype == torch.float64 and model[0].weight.dtype == torch.float64
    assert report.history[-1][0] == 400 and len(report.history) == 10  # no early stopping: every step ran
    assert report.finish is None and not report.stalled
    with torch.no_grad():
        out = model.eval()(x.double())
    assert report.max_error == pytest.approx((out - y.double()).abs().max().item(), rel=1e-9)
    assert report.mse == pytest.approx(((out - y.double()) ** 2).mean().item(), rel=1e-9)
    assert report.max_error < 0.3 * initial, str(report)
    assert model[2].p == 0.0


def smooth_2d(n=256):
    """A smooth, noise-free function of two variables on [-1, 1]^2, in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] * x[:, 1:]


def tanh_mlp(seed, width=24, d_in=2, d_out=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, d_out))


def plain_adam(model, x, y, steps, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def torch_max_error(model, x, y):
    with torch.no_grad():
        return (model(x) - y).abs().max().item()


def test_lbfgs_finish_beats_adam_alone_on_a_smooth_2d_function():
    x, y = smooth_2d()
    reference = tanh_mlp(0).double()
    ours = copy.deepcopy(reference)
    plain_adam(reference, x, y, 2000)
    plain_adam(ours, x, y, 200)
    before = torch_max_error(ours, x, y)
    report = lbfgs_finish(ours, x, y, max_iter=600)
    assert report.iterations == 600 and report.stopped == "max_iter" and report.improved
    assert report.initial_max_error == pytest.approx(before, rel=1e-12)
    assert report.max_error == pytest.approx(torch_max_error(ours, x, y), rel=1e-12)
    with torch.no_grad():
        assert report.mse == pytest.approx(((ours(x) - y) ** 2).mean().item(), rel=1e-9)
    # fewer gradient evaluations in all, and a max error several times smaller than Adam's alone
    assert 200 + report.evaluations < 2000
    assert report.max_error < 0.25 * torch_max_error(reference, x, y), (report, torch_max_error(reference, x, y))
    times = [t for t, _ in report.history]
    errs = [e for _, e in report.history]
    assert times == sorted(times) and all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] == pytest.approx(report.max_error, rel=1e-12) and 0 < times[-1] <= report.seconds


def test_lbfgs_finish_converges_on_tiny_losses():
    """torch's LBFGS drops every curvature pair with y.s <= 1e-10; on a well-fitted model's tiny
    loss it crawls as steepest descent. The finish scales the loss and keeps converging."""
    x, y = smooth_2d()
    y = y * 1e-4  # the same problem, 10^8 times smaller losses
    model = tanh_mlp(1, width=16).double()
    with torch.no_grad():
        model[4].weight.mul_(1e-4)
        model[4].bias.mul_(1e-4)
    plain_adam(model, x, y, 300, lr=1e-2)
    reference = copy.deepcopy(model)
    start = torch_max_error(model, x, y)
    opt = torch.optim.LBFGS(reference.parameters(), max_iter=200, tolerance_grad=0, tolerance_change=0,
                            history_size=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((reference(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    report = lbfgs_finish(model, x, y, max_iter=200)
    assert report.max_error == pytest.approx(torch_max_error(model, x, y), rel=1e-12)
    assert torch_max_error(reference, x, y) > 0.8 * start  # plain torch barely moves
    assert report.max_error < 0.4 * start, report


def test_lbfgs_finish_is_deterministic_and_works_on_a_float32_model():
    x, y = smooth_2d()
    x32, y32 = x.float(), y.float()
    model = tanh_mlp(2)
    plain_adam(model, x32, y32, 100, lr=1e-2)
    twin = copy.deepcopy(model)
    in_float64 = copy.deepcopy(model).double()  # the same search, run on a float64 model and data
    before = torch_max_error(model, x32, y32)
    first = lbfgs_finish(model, x32, y32, max_iter=150)
    second = lbfgs_finish(twin, x32, y32, max_iter=150)
    wide = lbfgs_finish(in_float64, x32.double(), y32.double(), max_iter=150)
    for p, q, r in zip(model.parameters(), twin.parameters(), in_float64.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q) and torch.equal(p, r.float())
    assert [e for _, e in first.history] == [e for _, e in second.history] == [e for _, e in wide.history]
    assert (first.iterations, first.evaluations, first.max_error) == (second.iterations, second.evaluations,
                                                                       second.max_error)
    assert first.dtype == torch.float64 and first.improved
    assert first.initial_max_error == pytest.approx(before, rel=1e-6)
    assert first.max_error == torch_max_error(model, x32, y32) < 0.6 * before  # measured in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lbfgs_finish_on_a_cuda_model():
    x, y = smooth_2d()
    model = tanh_mlp(2).cuda()
    plain_adam(model, x.float().cuda(), y.float().cuda(), 100, lr=1e-2)
    before = torch_max_error(model, x.float().cuda(), y.float().cuda())
    report = lbfgs_finish(model, x.float(), y.float(), max_iter=150)  # CPU data: moved to the model's device
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())
    assert report.improved and report.max_error == torch_max_error(model, x.float().cuda(), y.float().cuda())
    assert report.max_error < 0.6 * before


def test_lbfgs_finish_keeps_the_model_when_it_cannot_improve():
    # y = w x at x = 1, 2 with targets 1, 4: the max error is smallest at w = 5/3 (2/3), the MSE at
    # w = 9/5, where the max error is 0.8. Minimising the MSE from w = 5/3 only worsens the max error.
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(5.0 / 3.0)
    model.weight.grad = torch.full_like(model.weight, 7.0)
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [4.0]])
    before = model.weight.detach().clone()
    report = lbfgs_finish(model, x, y, max_iter=50)
    assert not report.improved and report.evaluations > 1
    assert torch.equal(model.weight, before) and torch.equal(model.weight.grad, torch.full_like(before, 7.0))
    assert report.max_error == report.initial_max_error == pytest.approx(torch_max_error(model, x, y))
    # stopped at once: nothing evaluated, nothing changed
    quick = lbfgs_finish(model, x, y, time_limit=0)
    assert quick.stopped == "time limit" and quick.evaluations == 0 and not quick.improved
    assert torch.equal(model.weight, before)


@settings(max_examples=20, deadline=None)
@given(seed=strategies.integers(0, 2**16), width=strategies.integers(1, 6), rows=strategies.integers(1, 24),
       double=strategies.booleans(), max_iter=strategies.integers(1, 25))
def test_lbfgs_finish_never_worsens_the_model(seed, width, rows, double, max_iter):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(rows, 3, generator=g, dtype=dtype)
    y = torch.randn(rows, 2, generator=g, dtype=dtype)  # noise: often more than the model can fit
    model = tanh_mlp(seed, width=width, d_in=3, d_out=2).to(dtype)
    frozen = model[2].weight
    frozen.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = torch_max_error(model, x, y)
    report = lbfgs_finish(model, x, y, max_iter=max_iter)
    after = torch_max_error(model, x, y)
    assert after <= start and after == report.max_error
    assert torch.equal(frozen, before["2.weight"])
    if not report.improved:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    else:
        assert after < start
    assert report.iterations <= max_iter and model[0].weight.dtype == dtype


def test_lbfgs_finish_bad_arguments():
    model, x, y = nn.Linear(2, 1), torch.randn(4, 2), torch.randn(4, 1)
    for kwargs, match in (({"max_iter": 0}, "max_iter"), ({"time_limit": -1.0}, "time_limit"),
                          ({"time_limit": math.nan}, "time_limit"), ({"dtype": torch.int64}, "dtype"),
                          ({"history_size": 0}, "history_size")):
        with pytest.raises(ValueError, match=match):
            lbfgs_finish(model, x, y, **kwargs)
    with pytest.raises(ValueError, match="rows"):
        lbfgs_finish(model, x, y[:3])
    with pytest.raises(ValueError, match="shape"):
        lbfgs_finish(model, x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="no trainable parameters"):
        lbfgs_finish(nn.Linear(2, 1).requires_grad_(False), x, y)


def test_interpolate_with_torch_lbfgs_matches_a_plain_torch_loop():
    x, y = smooth_2d(128)
    model = tanh_mlp(3, width=8)
    reference = copy.deepcopy(model).double()
    opt = torch.optim.LBFGS(model.parameters(), line_search_fn="strong_wolfe")
    report = interpolate(model, x, y, steps=5, optimizer=opt, finish=None)
    ref_opt = torch.optim.LBFGS(reference.parameters(), line_search_fn="strong_wolfe")

    def closure():
        ref_opt.zero_grad()
        loss = F.mse_loss(reference(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        ref_opt.step(closure)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.dtype == torch.float64 and torch.equal(p, q)
    assert report.steps == 5 and report.max_error == pytest.approx(torch_max_error(reference, x, y), rel=1e-12)


def test_interpolate_hands_over_to_lbfgs_when_adam_stalls():
    x, y = smooth_2d()
    adam_only = tanh_mlp(4)
    finished = copy.deepcopy(adam_only)
    plain = interpolate(adam_only, x, y, steps=1500, lr=1e-2, finish=None)
    report = interpolate(finished, x, y, steps=1500, lr=1e-2, eval_every=100, stall=0.2, finish_max_iter=300)
    assert report.finish is not None and report.finish.iterations == 300
    steps, errs = zip(*report.history)
    assert steps == tuple(range(100, report.steps + 1, 100))
    # it stopped at the first measurement that lowered the best max error by less than 20%
    stalled_at = next((i for i in range(1, len(errs)) if errs[i] > 0.8 * min(errs[:i])), None)
    assert report.stalled == (stalled_at is not None)
    assert report.steps == (steps[stalled_at] if report.stalled else 1500)
    assert report.finish.initial_max_error == pytest.approx(errs[-1], rel=1e-12)
    assert report.max_error == pytest.approx(torch_max_error(finished, x, y), rel=1e-12)
    assert report.max_error < 0.25 * plain.max_error, (report, plain)
    with pytest.raises(ValueError, match="finish"):
        interpolate(finished, x, y, finish="newton")


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
