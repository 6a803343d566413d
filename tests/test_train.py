"""The Trainer: virtual epochs, metrics.jsonl, best-by-validation, exact resume from the checkpoint
directory, callbacks (order, stop_training, gradual unfreezing), interpolation mode, bad input."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainpatterns as tp
from trainpatterns import Callback, Trainer, VirtualEpochs
from trainpatterns.transfer import GradualUnfreezing, freeze


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def data(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return x, torch.sin(x[:, :2]) + 0.5 * x[:, 2:4]


def setup(seed=0, width=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 2))
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def plan(n=203, epochs=4):
    return VirtualEpochs(n, 16, stop_point=epochs * 12 * 16 / n, num_checkpoints=epochs)  # 12 steps each


def test_fit_writes_metrics_and_checkpoints(tmp_path):
    model, opt = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)
    t = Trainer(model, F.mse_loss, opt, data(), data(64, seed=1), checkpoint_dir=tmp_path, plan=plan(),
                scheduler=sched, progress=False, async_save=False)
    init = t.evaluate(data(64, seed=1))
    history = t.fit()
    assert [m["epoch"] for m in history] == [1, 2, 3, 4] and [m["step"] for m in history] == [12, 24, 36, 48]
    lines = [json.loads(s) for s in open(tmp_path / "metrics.jsonl")]
    assert lines == json.loads(json.dumps(history))
    assert history[-1]["val_loss"] < 0.5 * init
    best = min(history, key=lambda m: m["val_loss"])
    assert t.best["step"] == best["step"] and best["best"]
    assert all(m["samples_per_s"] > 0 for m in history)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 4)  # the scheduler ran every step
    steps = [i.step for i in t.manager.list() if i.valid]
    assert best["step"] in steps and 48 in steps


class StopAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch == self.epoch:
            trainer.stop_training = True


def test_resume_is_exact(tmp_path):
    """An interrupted run resumed from its checkpoint directory ends bitwise equal to an
    uninterrupted one (loader position, RNG, optimizer, scheduler, plan all restored)."""
    def run(directory, callbacks=()):
        model, opt = setup()
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=48)
        t = Trainer(model, F.mse_loss, opt, data(), checkpoint_dir=directory, plan=plan(), scheduler=sched,
                    callbacks=list(callbacks), progress=False)
        t.fit()
        return model, t

    full, _ = run(tmp_path / "a")
    part, t1 = run(tmp_path / "b", [StopAt(1)])
    assert t1.step == 24
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), part.parameters()))
    resumed, t2 = run(tmp_path / "b")
    assert t2.step == 48
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert [m["epoch"] for m in t2.history] == [1, 2, 3, 4]
    assert len(open(tmp_path / "b" / "metrics.jsonl").readlines()) == 4


TIME_FIELDS = ("time_s", "samples_per_s", "elapsed_s")


def records(path):
    """metrics.jsonl record by record, without the timing fields (every line must be one whole
    record, the last one included)."""
    text = open(path).read()
    assert text.endswith("\n"), "the last record is torn"
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS} for line in text.splitlines()]


def damage(path, how, reference):
    """What a killed run leaves in metrics.jsonl after its checkpoint at step 24 (lines: 12, 24) or
    with no checkpoint at all; ``reference``: the uninterrupted run's lines 12, 24, 36, 48."""
    lines = open(path).readlines()
    past, last = reference[2], reference[3]
    if how == "torn":  # records past the checkpoint, then a torn tail
        text = lines + [past, last[: len(last) // 2]]
    elif how == "glued":  # a torn line with the next record glued on
        text = lines + [past[:20] + past, last]
    elif how == "missing":  # killed after the checkpoint's commit, before its record was appended
        text = lines[:1]
    elif how == "duplicated":  # an earlier resume that appended the repeated epochs again
        text = lines + [past, lines[1], past]
    else:  # killed before any checkpoint committed
        text = reference[:1] + [reference[1][:10]]
    with open(path, "w") as f:
        f.writelines(text)


@pytest.mark.parametrize("how", ["torn", "glued", "missing", "duplicated", "no_checkpoint"])
def test_resume_tidies_metrics_jsonl(tmp_path, how):
    """A resumed run's metrics.jsonl holds exactly the uninterrupted run's records, whatever the
    killed run left in it."""
    def run(directory, callbacks=()):
        model, opt = setup()
        t = Trainer(model, F.mse_loss, opt, data(), data(64, seed=1), checkpoint_dir=directory, plan=plan(),
                    callbacks=list(callbacks), progress=False)
        t.fit()
        return t

    run(tmp_path / "a")
    reference = open(tmp_path / "a" / "metrics.jsonl").readlines()
    assert len(reference) == 4
    killed = tmp_path / "b"
    if how == "no_checkpoint":
        killed.mkdir()
        (killed / "metrics.jsonl").write_text("")
    else:
        assert run(killed, [StopAt(1)]).step == 24
    damage(killed / "metrics.jsonl", how, reference)
    resumed = run(killed)
    assert resumed.step == 48
    assert records(killed / "metrics.jsonl") == records(tmp_path / "a" / "metrics.jsonl")
    assert not os.path.exists(killed / "metrics.jsonl.tmp")


def test_cli_resume_tidies_metrics_jsonl(tmp_path, capsys):
    """``trainpatterns train --resume`` (which restores before fit) tidies metrics.jsonl too."""
    import shutil

    from trainpatterns.cli import main

    args = ["train", "--samples", "256", "--steps", "40", "--batch-size", "32", "--hidden", "16",
            "--checkpoints", "4", "--no-progress"]
    assert main(args + ["--run-dir", str(tmp_path / "a")]) == 0
    reference = open(tmp_path / "a" / "metrics.jsonl").readlines()
    assert [json.loads(r)["step"] for r in reference] == [10, 20, 30, 40]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in os.listdir(tmp_path / "b"):  # the killed run committed nothing after step 20
        if name.startswith("step_") and int(name[5:]) > 20:
            shutil.rmtree(tmp_path / "b" / name)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(reference[3][:15])
    assert main(["train", "--resume", "--run-dir", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert records(tmp_path / "b" / "metrics.jsonl") == records(tmp_path / "a" / "metrics.jsonl")


def test_checkpoint_of_another_model_is_a_clear_error_and_nothing_changes(tmp_path):
    model, opt = setup()
    Trainer(model, F.mse_loss, opt, data(), checkpoint_dir=tmp_path, plan=plan(epochs=2), progress=False).fit()
    before = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(tmp_path) for p in fs}
    other, opt2 = setup(width=24)
    t = Trainer(other, F.mse_loss, opt2, data(), checkpoint_dir=tmp_path, plan=plan(epochs=4), progress=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        t.fit()
    after = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(tmp_path) for p in fs}
    assert after == before


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_fit_start(self, trainer):
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start {epoch}")

    def on_step_end(self, trainer, step, loss):
        assert loss.dim() == 0 and not loss.requires_grad
        self.events.append(f"step {step}")

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(f"epoch_end {epoch}")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


def test_callback_order_with_iterable_data():
    x, y = data(64)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]  # 4 batches, cycled
    model, opt = setup()
    rec = Recorder()
    p = VirtualEpochs(64, 16, stop_point=1.5, num_checkpoints=2)  # 3 steps per virtual epoch
    Trainer(model, F.mse_loss, opt, batches, plan=p, callbacks=[rec], progress=False).fit()
    assert rec.events == ["fit_start", "epoch_start 0", "step 1", "step 2", "step 3", "epoch_end 0",
                          "epoch_start 1", "step 4", "step 5", "step 6", "epoch_end 1", "fit_end"]


def test_gradual_unfreezing_in_the_trainer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    freeze(model, ["0", "2"])
    opt = tp.FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    snaps = []

    class Snap(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            snaps.append([p.detach().clone() for p in model.parameters()])

    cb = GradualUnfreezing(["2", "0"], every=1)
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, F.mse_loss, opt, data(), plan=plan(epochs=3), callbacks=[cb, Snap()], progress=False).fit()
    moved = lambda a, b, i: not torch.equal(a[i], b[i])
    assert not moved(before, snaps[0], 0) and not moved(before, snaps[0], 2) and moved(before, snaps[0], 4)
    assert not moved(snaps[0], snaps[1], 0) and moved(snaps[0], snaps[1], 2)
    assert moved(snaps[1], snaps[2], 0)
    assert len(opt.param_groups) == 3


def test_interpolation_mode_reports_max_error():
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 2))
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = data()
    history = Trainer(model, F.mse_loss, opt, (x, y), plan=plan(epochs=2), interpolation=True, progress=False).fit()
    assert opt.param_groups[0]["weight_decay"] == 0.0 and model[1].p == 0.0
    with torch.no_grad():
        ref = (model.eval()(x) - y).abs().max().item()
    assert history[-1]["max_error"] == pytest.approx(ref, rel=1e-6)


def test_restore_best_loads_the_best_weights(tmp_path):
    model, opt = setup()
    kept = {}

    class Keep(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            kept[metrics["step"]] = copy.deepcopy(model.state_dict())

    t = Trainer(model, F.mse_loss, opt, data(), data(40, seed=3), checkpoint_dir=tmp_path, plan=plan(),
                callbacks=[Keep()], progress=False, keep_last=1, keep_best=1)
    t.fit()
    step = t.restore_best()
    assert step == t.best["step"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[step][k]), k


def test_trainer_bad_input():
    model, opt = setup()
    with pytest.raises(ValueError, match="needs plan"):
        Trainer(model, F.mse_loss, opt, [(torch.randn(2, 5), torch.randn(2, 2))])
    with pytest.raises(ValueError, match="different numbers of rows"):
        Trainer(model, F.mse_loss, opt, (torch.randn(30, 5), torch.randn(29, 2)), batch_size=8)
    with pytest.raises(ValueError, match="fewer than one (global )?batch"):
        Trainer(model, F.mse_loss, opt, (torch.randn(3, 5), torch.randn(3, 2)), batch_size=8)
    with pytest.raises(ValueError, match="scalar"):
        Trainer(model, lambda out, y: (out - y) ** 2, opt, data(), plan=plan(epochs=1), progress=False).fit()
    with pytest.raises(ValueError, match="plan's batch_size 16 .* differs"):
        Trainer(model, F.mse_loss, opt, data(), plan=plan(), batch_size=8)
