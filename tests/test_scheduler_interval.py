"""Trainer(scheduler_interval="step"|"epoch") and metric-driven schedulers against a plain torch loop:
the LR every optimizer step uses equals the one a plain loop stepping the same scheduler gives
(after every step, or once per virtual epoch; a ReduceLROnPlateau once per virtual epoch with
val_loss whatever the interval), across a resume, and under strategy="pipeline" on 2 ranks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns import Callback, Trainer, VirtualEpochs

sys.path.insert(0, str(Path(__file__).parent))
from _ranks import run_ranks  # noqa: E402

WORKER = str(Path(__file__).with_name("_scheduler_pipeline_worker.py"))
ROWS, BATCH = 64, 16
lrs = torch.optim.lr_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCHEDULERS = {
    "step": lambda o, total, epochs: lrs.StepLR(o, step_size=2, gamma=0.5),
    "exponential": lambda o, total, epochs: lrs.ExponentialLR(o, gamma=0.7),
    "cosine": lambda o, total, epochs: lrs.CosineAnnealingLR(o, T_max=total),
    "lambda": lambda o, total, epochs: lrs.LambdaLR(o, lambda i: 1.0 / (1 + i)),
    "onecycle": lambda o, total, epochs: lrs.OneCycleLR(o, max_lr=0.5, total_steps=total + epochs),
    "plateau": lambda o, total, epochs: lrs.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def data(seed: int, n: int, sign: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, sign * torch.sin(x[:, :1])


class Stop(Callback):
    """Ends fit() after virtual epoch ``index`` (its checkpoint is saved): an interrupted run."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        if epoch == self.index:
            trainer.stop_training = True


def train(kind: str, interval: str, epochs: int, steps_per_epoch: int, directory=None, callbacks=(), used=None):
    """(the LR each optimizer step used, the records) of a Trainer run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    total = epochs * steps_per_epoch
    plan = VirtualEpochs(ROWS, BATCH, stop_point=total * BATCH / ROWS, num_checkpoints=epochs)
    used = [] if used is None else used
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    # validation targets of the opposite sign: the better the fit, the worse val_loss (the plateau acts)
    trainer = Trainer(model, torch.nn.functional.mse_loss, opt, data(0, ROWS), data(1, 32, -1.0),
                      checkpoint_dir=directory, plan=plan, scheduler=SCHEDULERS[kind](opt, total, epochs),
                      scheduler_interval=interval, progress=False, num_threads=1, async_save=False,
                      callbacks=list(callbacks))
    return used, trainer.fit()


def plain_loop(kind: str, interval: str, epochs: int, steps_per_epoch: int, monitored: list, lr: float = 0.2) -> list:
    """The LR each step uses when a plain loop steps the same scheduler: after every optimizer step,
    or at each epoch's end (a plateau scheduler: at each epoch's end with that epoch's figure)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.5)
    sched = SCHEDULERS[kind](opt, epochs * steps_per_epoch, epochs)
    used = []
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            if interval == "step" and kind != "plateau":
                sched.step()
        if kind == "plateau":
            sched.step(monitored[epoch])
        elif interval == "epoch":
            sched.step()
    return used


@settings(max_examples=24, deadline=None)
@given(st.sampled_from(sorted(SCHEDULERS)), st.sampled_from(["step", "epoch"]), st.integers(1, 5), st.integers(1, 4))
def test_the_lr_sequence_equals_a_plain_loops(kind, interval, epochs, steps_per_epoch):
    used, history = train(kind, interval, epochs, steps_per_epoch)
    assert len(used) == epochs * steps_per_epoch and len(history) == epochs
    assert used == plain_loop(kind, interval, epochs, steps_per_epoch, [r["val_loss"] for r in history])


def test_a_plateau_scheduler_gets_val_loss_once_per_virtual_epoch():
    used, history = train("plateau", "step", 5, 3)
    assert used == plain_loop("plateau", "step", 5, 3, [r["val_loss"] for r in history])
    assert len(set(used)) >= 3  # the plateau acted
    assert used != plain_loop("plateau", "step", 5, 3, [r["train_loss"] for r in history])  # fed val_loss
    assert [r["lr"] for r in history] == used[::3]  # the LR each virtual epoch trained with


@pytest.mark.parametrize("kind,interval", [("step", "epoch"), ("plateau", "step"), ("onecycle", "step")])
def test_a_resumed_run_continues_the_lr_sequence(tmp_path, kind, interval):
    used, history = train(kind, interval, 4, 3)
    resumed: list = []
    train(kind, interval, 4, 3, tmp_path / "run", [Stop(1)], used=resumed)
    assert len(resumed) == 6
    _, rest = train(kind, interval, 4, 3, tmp_path / "run", used=resumed)
    assert resumed == used
    assert [r["lr"] for r in rest] == [r["lr"] for r in history]


def test_bad_scheduler_interval_is_a_clear_error():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="scheduler_interval must be 'step'.*or 'epoch'.*got 'batch'"):
        Trainer(model, torch.nn.functional.mse_loss, None, data(0, ROWS), scheduler_interval="batch")
    with pytest.raises(ValueError, match="strategy='async'.*no scheduler_interval"):
        Trainer(model, torch.nn.functional.mse_loss, None, data(0, ROWS), strategy="async", scheduler_interval="epoch")


@pytest.mark.timeout(240)
def test_pipeline_stages_step_their_schedulers_as_one_process_would(tmp_path):
    res = run_ranks([WORKER, str(tmp_path)], world=2, timeout_s=200)
    assert [r[0] for r in res] == [0, 0], res
    for case in ("plateau", "epoch"):
        ranks = [json.loads((tmp_path / f"{case}{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["history"] == ranks[1]["history"]  # every stage decides on the same record
        if case == "plateau":  # the worker's ReduceLROnPlateau is SCHEDULERS["plateau"]
            want = plain_loop("plateau", "step", 4, 2, [r["val_loss"] for r in ranks[0]["history"]], lr=5e-2)
            assert len(set(want)) > 1  # the plateau acted
        else:  # StepLR(step_size=1, gamma=0.5) once per virtual epoch
            want = [5e-2 * 0.5 ** e for e in range(4) for _ in range(2)]
        for r in ranks:
            assert r["used"] == want, (case, r["used"], want)
