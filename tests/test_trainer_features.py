"""The Trainer's metrics, monitor/mode, EarlyStopping, gradient accumulation, mixed precision,
test/predict, the resume line and the LR schedule of an extended run, each against plain torch."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainpatterns import Callback, EarlyStopping, Trainer, VirtualEpochs
from trainpatterns.checkpoint import CheckpointManager

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def classes(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long()


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def accuracy(out, y):
    return (out.argmax(1) == y).float().mean()


def batches(n_batches, rows, seed=0):
    """A list of (x, y) regression batches: an iterable, so the order is known to the reference."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 3, generator=g), torch.randn(rows, 1, generator=g)) for _ in range(n_batches)]


def test_metrics_are_row_weighted_over_odd_batches_and_pick_the_best(tmp_path):
    model = net()
    val = classes(37, 1)  # 37 rows in batches of 1024 (one batch) and as an iterable of 5-row batches
    t = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.5), classes(64, 0), val,
                checkpoint_dir=tmp_path, plan=VirtualEpochs(64, 16, stop_point=4, num_checkpoints=4),
                metrics={"val_acc": accuracy, "val_err": lambda o, y: 1.0 - float(accuracy(o, y))},
                monitor="val_acc", mode="max", keep_last=1, progress=False)
    history = t.fit()
    with torch.no_grad():
        out = model.eval()(val[0])
    assert history[-1]["val_acc"] == pytest.approx(float((out.argmax(1) == val[1]).double().mean()), abs=1e-7)
    assert history[-1]["val_acc"] + history[-1]["val_err"] == pytest.approx(1.0, abs=1e-7)
    assert history[-1]["val_loss"] == pytest.approx(float(F.cross_entropy(out.double(), val[1])), rel=1e-6)
    # an iterable of odd batches gives the same row-weighted means
    pieces = [(val[0][i:i + 5], val[1][i:i + 5]) for i in range(0, 37, 5)]
    assert t.test(pieces)["val_acc"] == pytest.approx(t.test(val)["val_acc"], abs=1e-7)
    best = max(history, key=lambda m: (m["val_acc"], -m["step"]))
    assert t.best["step"] == best["step"] and [m["step"] for m in history if m["best"]][-1] == best["step"]
    written = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["val_acc"] for m in written] == [m["val_acc"] for m in history]
    # the directory records the monitor: load_weights("best") needs no metric= and no key=
    fresh = net(seed=5)
    CheckpointManager(tmp_path).load_weights(fresh, "best")
    t.restore_best()
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_metric_and_monitor_errors():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="monitor 'val_acc' is not a recorded metric"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), monitor="val_acc", batch_size=16)
    with pytest.raises(ValueError, match="metric name 'val_loss'"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), metrics={"val_loss": accuracy}, batch_size=16)
    with pytest.raises(ValueError, match="mode must be"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), mode="up", batch_size=16)
    with pytest.raises(ValueError, match="precision must be"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), precision="fp8", batch_size=16)
    with pytest.raises(ValueError, match="accumulate must be"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), accumulate=0, batch_size=16)
    with pytest.raises(ValueError, match="does not split evenly"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), global_batch_size=15, accumulate=2)
    with pytest.raises(ValueError, match="is not global_batch_size"):
        Trainer(model, F.cross_entropy, opt, classes(64, 0), global_batch_size=16, batch_size=4)
    t = Trainer(model, F.cross_entropy, opt, classes(64, 0), classes(8, 1), metrics={"bad": lambda o, y: o},
                plan=VirtualEpochs(64, 16, 1, 1), progress=False)
    with pytest.raises(ValueError, match="metric 'bad' returned a tensor of shape"):
        t.fit()


def test_global_batch_size_sets_the_plan_and_the_rows_per_step():
    model = net()
    t = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0),
                global_batch_size=16, accumulate=2, progress=False)
    assert t.batch_size == 8 and t.plan.batch_size == 16 and t.plan.total_steps == 10 * 64 // 16


class Constant(Callback):
    """Feeds EarlyStopping a flat metric from epoch 2 on."""

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["flat"] = 1.0 if epoch else 2.0


def test_early_stopping_stops_after_patience_and_stays_stopped(tmp_path):
    def run():
        model = net()
        t = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0),
                    checkpoint_dir=tmp_path, plan=VirtualEpochs(64, 16, stop_point=8, num_checkpoints=8),
                    callbacks=[Constant(), EarlyStopping("flat", patience=2, min_delta=0.0)], progress=False)
        return t, t.fit()

    t, history = run()
    # epoch 1 sets best 2.0, epoch 2 improves to 1.0, epochs 3 and 4 do not: stop after epoch 4 of 8
    assert [m["epoch"] for m in history] == [1, 2, 3, 4] and t.stop_training
    assert t.callbacks[1].stopped_epoch == 4
    again, history2 = run()
    assert again.step == t.step == 16 and history2 == history  # resumed: stays stopped, trains nothing


def test_early_stopping_bad_input():
    for kwargs in ({"patience": 0}, {"min_delta": -1.0}, {"mode": "up"}):
        with pytest.raises(ValueError):
            EarlyStopping(**kwargs)
    model = net()
    t = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0),
                plan=VirtualEpochs(64, 16, 1, 1), callbacks=[EarlyStopping("val_nothing")], progress=False)
    with pytest.raises(ValueError, match="EarlyStopping monitors 'val_nothing'"):
        t.fit()


def _reference_steps(model, data, accumulate, lr, precision=None):
    """Plain torch: SGD steps over the mean loss of each group of ``accumulate`` batches."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for i in range(0, len(data), accumulate):
        opt.zero_grad()
        for x, y in data[i:i + accumulate]:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(model(x), y) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("precision", [None, "bf16", "fp16"])
def test_accumulation_and_precision_match_plain_torch(accumulate, precision):
    data = batches(6, 5)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    steps = len(data) // accumulate
    t = Trainer(model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), data,
                plan=VirtualEpochs(steps * 5 * accumulate, 5 * accumulate, 1, 1), accumulate=accumulate,
                precision=precision, progress=False)
    t.fit()
    _reference_steps(reference, data, accumulate, 0.1, precision)
    assert t.step == steps
    tol = 1e-6 if precision is None else 1e-3
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    assert (t.stepper.scaler is not None) == (precision == "fp16")


def test_bf16_forward_runs_under_autocast():
    seen = []

    class Probe(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            seen.append(out.dtype)
            return out

    model = Probe(3, 1)
    Trainer(model, lambda o, y: F.mse_loss(o.float(), y), torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4),
            plan=VirtualEpochs(8, 4, 1, 1), precision="bf16", progress=False).fit()
    assert seen and set(seen) == {torch.bfloat16}


def test_predict_keeps_order_and_handles_odd_sizes():
    model = net()
    t = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0), batch_size=16,
                progress=False)
    x, y = classes(1037, 3)
    with torch.no_grad():
        want = model.eval()(x)
    torch.testing.assert_close(t.predict(x), want)
    torch.testing.assert_close(t.predict((x, y)), want)
    torch.testing.assert_close(t.predict(iter([x[:5], x[5:6], x[6:]])), want)  # an iterable of batches
    assert t.predict([]) == []
    scores = t.test((x, y))
    assert scores == {"test_loss": pytest.approx(float(F.cross_entropy(want.double(), y)), rel=1e-6)}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_resume_says_where_it_resumed_from(tmp_path):
    def trainer(epochs):
        model = net()
        return Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0),
                       checkpoint_dir=tmp_path, plan=VirtualEpochs(64, 16, stop_point=epochs, num_checkpoints=epochs),
                       progress=False)

    trainer(2).fit()
    log, said = logging.getLogger("trainpatterns.train"), Lines()
    level = log.level
    log.addHandler(said)
    log.setLevel(logging.INFO)
    try:
        trainer(3).fit()
    finally:
        log.removeHandler(said)
        log.setLevel(level)
    resumed = [line for line in said.lines if line.startswith("resumed")]
    assert len(resumed) == 1 and resumed[0].startswith("resumed from step 8 (") and str(tmp_path) in resumed[0]
    epochs = [line for line in said.lines if line.startswith("epoch ")]
    assert len(epochs) == 1 and epochs[0].startswith("epoch 3/3  step 12  train_loss")


def _cosine_run(tmp_path, stop_point, rescale):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    plan = VirtualEpochs(64, 16, stop_point=stop_point, num_checkpoints=stop_point)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.total_steps)
    lrs = []

    class Record(Callback):
        def on_step_end(self, trainer, step, loss):
            lrs.append(opt.param_groups[0]["lr"])

    t = Trainer(model, F.cross_entropy, opt, classes(64, 0), checkpoint_dir=tmp_path, plan=plan, scheduler=sched,
                callbacks=[Record()], rescale_schedule=rescale, progress=False)
    t.fit()
    return lrs


def test_an_extended_run_warns_or_rescales_its_schedule(tmp_path):
    _cosine_run(tmp_path / "a", 2, False)
    with pytest.warns(RuntimeWarning, match="T_max=8.*rescale_schedule=True"):
        climbed = _cosine_run(tmp_path / "a", 4, False)
    assert climbed[-1] > climbed[0]  # the old cosine repeats: the LR climbs back
    _cosine_run(tmp_path / "b", 2, False)
    lrs = _cosine_run(tmp_path / "b", 4, True)
    want = [0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(9, 17)]  # the 16-step cosine from step 9
    assert lrs == pytest.approx(want, abs=1e-12)


def test_a_checkpoint_of_another_model_names_keys_and_shapes_on_one_line(tmp_path):
    model = net()
    Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), classes(64, 0), checkpoint_dir=tmp_path,
            plan=VirtualEpochs(64, 16, 1, 1), progress=False).fit()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2), nn.Linear(2, 2))
    t = Trainer(other, F.cross_entropy, torch.optim.SGD(other.parameters(), lr=0.1), classes(64, 0),
                checkpoint_dir=tmp_path, plan=VirtualEpochs(64, 16, 2, 2), progress=False)
    with pytest.raises(ValueError) as info:
        t.fit()
    message = str(info.value)
    assert "\n" not in message
    for part in ("missing keys ['3.weight', '3.bias']", "0.weight: checkpoint (8, 4) vs model (9, 4)",
                 "2.weight: checkpoint (2, 8) vs model (2, 9)"):
        assert part in message, message


def test_fp16_with_a_fused_optimizer_unscales_in_its_step_like_torch_adamw():
    from trainpatterns.optim import FusedAdamW

    data = batches(4, 6, seed=3)
    torch.manual_seed(0)
    model, reference = nn.Linear(3, 1), nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    t = Trainer(model, F.mse_loss, FusedAdamW(model.parameters(), lr=0.05), data, plan=VirtualEpochs(24, 6, 1, 1),
                precision="fp16", progress=False)
    t.fit()
    opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu")
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(reference(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert t.stepper.scaler.get_scale() == scaler.get_scale()


def test_interpolation_ends_with_the_lbfgs_finish_in_the_last_checkpoint(tmp_path):
    from trainpatterns.checkpoint import load_weights
    from trainpatterns.overfit import max_error

    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 2, generator=g) * 2 - 1
    y = torch.stack([torch.sin(2 * x[:, 0]) * x[:, 1], torch.cos(x[:, 0] + x[:, 1])], 1)
    last = {}
    for finish in (False, {"max_iter": 200}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        t = Trainer(model, F.mse_loss, None, (x, y), checkpoint_dir=tmp_path / str(bool(finish)),
                    plan=VirtualEpochs(256, 32, 4, 2), interpolation=True, interpolation_finish=finish, progress=False)
        history = t.fit()
        assert history[-1]["max_error"] == max_error(model, x, y)  # the record is the finished model's
        saved = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        load_weights(saved, t.manager.list()[-1].path)
        assert all(torch.equal(p, q) for p, q in zip(saved.parameters(), model.parameters()))
        last[bool(finish)] = history
    assert last[True][0]["max_error"] == last[False][0]["max_error"]  # the same Adam epochs before the finish
    assert last[True][-1]["max_error"] < 0.2 * last[False][-1]["max_error"]
