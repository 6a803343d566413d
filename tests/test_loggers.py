"""Loggers as callbacks (CSVLogger, TensorBoardLogger) against metrics.jsonl, element by element, a
resumed run's logs without duplicates, `trainpatterns train --logger`, the missing-extra errors,
and the library's messages through `logging` (no bare print in the package)."""
from __future__ import annotations

import ast
import csv
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainpatterns
from trainpatterns import Callback, Trainer, VirtualEpochs, cli
from trainpatterns.loggers import CSVLogger, TensorBoardLogger

PACKAGE_DIR = Path(trainpatterns.__file__).resolve().parent
PYTHON_DIR = str(PACKAGE_DIR.parent)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="needs the tensorboard package (the test extra installs it)")


def records_of(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def csv_rows(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_csv_equals(rows: list, records: list) -> None:
    """Every cell is the record's value as it was written (floats round-trip exactly)."""
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert set(record) <= set(row), (row, record)
        for key, cell in row.items():
            if key not in record:
                assert cell == "", (key, row)
                continue
            want = record[key]
            got = (cell == "True") if isinstance(want, bool) else type(want)(cell)
            assert got == want and (not isinstance(want, bool) or cell in ("True", "False")), (key, cell, want)


def scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_scalars_equal(found: dict, records: list) -> None:
    """One scalar per numeric key and record, at the record's step, equal to it in float32."""
    keys = [k for k in records[0] if k != "step" and not isinstance(records[0][k], bool)]
    assert sorted(found) == sorted(keys)
    for k in keys:
        assert found[k] == [(r["step"], float(np.float32(r[k]))) for r in records], k


class FailAt(Callback):
    """Raises at the end of virtual epoch ``index``, after the loggers listed before it wrote its
    record and before its checkpoint: what a run killed there leaves behind."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        if epoch == self.index:
            raise RuntimeError("killed")


def make_trainer(directory, callbacks, epochs=4):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g)
    y = torch.sin(x[:, :2])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = VirtualEpochs(96, 16, stop_point=epochs / 2, num_checkpoints=epochs)
    return Trainer(model, torch.nn.functional.mse_loss, opt, (x, y), (x[:40], y[:40] + 0.1),
                   checkpoint_dir=str(directory), plan=plan, callbacks=callbacks, progress=False,
                   metrics={"mae": lambda o, t: (o - t).abs().mean()}, num_threads=1, async_save=False,
                   scheduler=torch.optim.lr_scheduler.StepLR(opt, 2, 0.5))


def test_csv_logger_rows_equal_the_metrics_records(tmp_path):
    history = make_trainer(tmp_path / "run", [CSVLogger(tmp_path / "run")]).fit()
    records = records_of(tmp_path / "run" / "metrics.jsonl")
    assert records == history and len(records) == 4
    rows = csv_rows(tmp_path / "run" / "metrics.csv")
    assert list(rows[0]) == list(records[0])  # the record's keys, in order, are the columns
    assert_csv_equals(rows, records)


def test_csv_logger_takes_a_file_path(tmp_path):
    make_trainer(tmp_path / "run", [CSVLogger(tmp_path / "logs" / "mine.csv")], epochs=2).fit()
    assert_csv_equals(csv_rows(tmp_path / "logs" / "mine.csv"), records_of(tmp_path / "run" / "metrics.jsonl"))


@needs_tensorboard
def test_a_resumed_run_continues_the_csv_and_the_events_without_duplicates(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):  # epoch 3's rows are written, its checkpoint is not
        make_trainer(run, [CSVLogger(), TensorBoardLogger(), FailAt(2)]).fit()
    assert len(csv_rows(run / "metrics.csv")) == 3 and len(scalars(run)["train_loss"]) == 3
    make_trainer(run, [CSVLogger(), TensorBoardLogger()]).fit()
    records = records_of(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert_csv_equals(csv_rows(run / "metrics.csv"), records)
    assert_scalars_equal(scalars(run), records)
    uninterrupted = make_trainer(tmp_path / "ref", []).fit()
    assert [r["val_loss"] for r in records] == [r["val_loss"] for r in uninterrupted]


@needs_tensorboard
def test_tensorboard_logger_scalars_equal_the_metrics_records(tmp_path):
    make_trainer(tmp_path / "run", [TensorBoardLogger(tmp_path / "tb")]).fit()
    records = records_of(tmp_path / "run" / "metrics.jsonl")
    found = scalars(tmp_path / "tb")
    assert {"train_loss", "val_loss", "mae", "lr", "epoch"} <= set(found)
    assert_scalars_equal(found, records)


@needs_tensorboard
def test_a_fresh_run_hides_events_an_earlier_run_left(tmp_path):
    make_trainer(tmp_path / "run", [TensorBoardLogger(tmp_path / "tb")], epochs=4).fit()
    make_trainer(tmp_path / "other", [TensorBoardLogger(tmp_path / "tb")], epochs=2).fit()
    assert_scalars_equal(scalars(tmp_path / "tb"), records_of(tmp_path / "other" / "metrics.jsonl"))


@needs_tensorboard
def test_only_rank_0_writes(tmp_path):
    for logger in (CSVLogger(tmp_path / "a.csv"), TensorBoardLogger(tmp_path / "tb")):
        trainer = SimpleNamespace(rank=1, history=[], checkpoint_dir=None)
        logger.on_fit_start(trainer)
        logger.on_epoch_start(trainer, 0)
        logger.on_epoch_end(trainer, 0, {"epoch": 1, "step": 5, "train_loss": 1.0})
        logger.on_fit_end(trainer)
    assert not os.listdir(tmp_path)


def test_a_logger_without_a_path_needs_a_checkpoint_dir():
    trainer = SimpleNamespace(rank=0, history=[], checkpoint_dir=None)
    with pytest.raises(ValueError, match="CSVLogger\\(\\) without a path needs a Trainer with checkpoint_dir"):
        CSVLogger().on_epoch_start(trainer, 0)


record_values = st.one_of(st.floats(allow_nan=False, width=64), st.integers(-10**6, 10**6), st.booleans())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["train_loss", "val_loss", "acc", "lr", "best"]), record_values),
                min_size=1, max_size=6), st.integers(0, 6), st.data())
def test_csv_logger_holds_any_records_and_resumes_from_any_history(tmp_path_factory, extras, restored, data):
    """Records whose keys come and go (a key seen late widens the file), resumed after any number of
    restored records over a file that holds more (a killed run's): the file reads back as
    history + the new records."""
    records = [dict({"epoch": i + 1, "step": 10 * (i + 1)}, **e) for i, e in enumerate(extras)]
    restored = min(restored, len(records))
    path = tmp_path_factory.mktemp("csv") / "m.csv"
    first = CSVLogger(path)
    trainer = SimpleNamespace(rank=0, history=[], checkpoint_dir=None)
    first.on_fit_start(trainer)
    for i, r in enumerate(records):
        first.on_epoch_start(trainer, i)
        first.on_epoch_end(trainer, i, r)
    assert_csv_equals(csv_rows(path), records)
    again = [dict(r, lr=data.draw(st.floats(0, 1), label="new lr")) for r in records[restored:]]
    second = CSVLogger(path)
    trainer.history = records[:restored]
    second.on_fit_start(trainer)
    for i, r in enumerate(again, restored):
        second.on_epoch_start(trainer, i)
        second.on_epoch_end(trainer, i, r)
    second.on_fit_end(trainer)
    assert_csv_equals(csv_rows(path), records[:restored] + again)


def test_tensorboard_logger_without_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'trainpatterns\[tensorboard\]'"):
        TensorBoardLogger("x")


# ----- the command line --------------------------------------------------------------------------

SMALL = ["--steps", "40", "--samples", "256", "--batch-size", "32", "--checkpoints", "4", "--hidden", "16",
         "--no-progress", "--no-interpolation"]


@needs_tensorboard
def test_train_logger_writes_a_csv_and_events_in_the_run_dir_and_a_resume_keeps_them(tmp_path, capsys):
    d = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--run-dir", str(d), "--logger", "csv", "--logger", "tensorboard"]) == 0
    records = records_of(d / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert_csv_equals(csv_rows(d / "metrics.csv"), records)
    assert_scalars_equal(scalars(d), records)  # tensorboard --logdir RUN_DIR
    assert cli.main(["train", "--resume", "--run-dir", str(d), "--steps", "60", "--no-progress"]) == 0
    records = records_of(d / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert_csv_equals(csv_rows(d / "metrics.csv"), records)
    assert_scalars_equal(scalars(d), records)
    capsys.readouterr()


def test_train_logger_tensorboard_without_tensorboard_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "block"
    (blocker / "tensorboard").mkdir(parents=True)
    (blocker / "tensorboard" / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), PYTHON_DIR]))
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "train", *SMALL, "--run-dir", str(run),
                          "--logger", "tensorboard"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2, res.stderr
    assert "trainpatterns[tensorboard]" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not run.exists()


# ----- messages through logging ------------------------------------------------------------------

def test_the_trainers_lines_go_to_logging_when_it_shows_them_even_with_the_bar(tmp_path, caplog, capsys,
                                                                             monkeypatch):
    package_logger = logging.getLogger("trainpatterns")  # as a script sets it up, not as the CLI does
    monkeypatch.setattr(package_logger, "handlers", [])
    monkeypatch.setattr(package_logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="trainpatterns"):
        make_trainer(tmp_path / "run", [], epochs=2).fit()
        trainer = make_trainer(tmp_path / "run", [], epochs=4)
        trainer.progress = True
        trainer.say.console = True
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "trainpatterns.train"]
    assert any(line.startswith("resumed from step 6 (") for line in lines)
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2", "3/4", "4/4"]
    assert "epoch 3/4" not in capsys.readouterr().out  # logged, not printed as well


def test_without_logging_set_up_the_bar_still_shows_the_lines(tmp_path, capsys):
    trainer = make_trainer(tmp_path / "run", [], epochs=2)
    trainer.say.console = True
    logging.getLogger("trainpatterns.train").setLevel(logging.WARNING)
    try:
        trainer.fit()
    finally:
        logging.getLogger("trainpatterns.train").setLevel(logging.NOTSET)
    assert [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")] == ["1/2", "2/2"]


ALLOWED_PRINTS = {"cli.py", "tuning/cli.py", "__main__.py"}  # the command line's own output


def test_no_bare_print_in_the_library():
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        if rel in ALLOWED_PRINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{rel}:{node.lineno}")
    assert not found, f"print() in the library (use a logging.getLogger('trainpatterns.*') logger): {found}"


def test_the_loggers_are_public_names():
    from trainpatterns import loggers

    assert trainpatterns.CSVLogger is loggers.CSVLogger and trainpatterns.TensorBoardLogger is loggers.TensorBoardLogger
    assert {"CSVLogger", "TensorBoardLogger"} <= set(trainpatterns.__all__)
