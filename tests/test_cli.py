"""The command line: train (default task, --data, --resume), overfit-check, plot, and bad input
(one-line error, exit code 2, nothing written or overwritten)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trainpatterns import cli

from _cli_run import run, snapshot
from _ranks import run_ranks

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py




SMALL = ["--steps", "40", "--samples", "256", "--batch-size", "32", "--checkpoints", "4", "--hidden", "16",
         "--no-progress"]


def test_train_default_task_resume_and_plot(tmp_path, capsys):
    d = str(tmp_path / "run")
    rc, out, err = run(capsys, "train", *SMALL, "--run-dir", d)
    assert rc == 0, err
    assert "interpolation mode" in out
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert len(epochs) == 5 and "step 0 " in epochs[0] and "max_error" in epochs[-1]
    lines = [json.loads(s) for s in open(os.path.join(d, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [10, 20, 30, 40]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert json.load(open(os.path.join(d, "config.json")))["hidden"] == 16

    # the same directory again without --resume: refused, nothing touched
    before = snapshot(d)
    rc, out, err = run(capsys, "train", *SMALL, "--run-dir", d)
    assert rc == 2 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert snapshot(d) == before

    # a different model into this run: refused, nothing touched
    rc, out, err = run(capsys, "train", "--resume", "--run-dir", d, "--hidden", "24", "--no-progress")
    assert rc == 2 and "does not fit" in err and len(err.strip().splitlines()) == 1
    assert snapshot(d) == before

    # --resume with a larger budget continues from the last checkpoint (settings from config.json)
    rc, out, err = run(capsys, "train", "--resume", "--run-dir", d, "--steps", "60", "--no-progress")
    assert rc == 0, err
    assert "resumed from step 40 (" in out and "rescaled the restored CosineAnnealingLR" in out
    lines = [json.loads(s) for s in open(os.path.join(d, "metrics.jsonl"))]
    assert [m["step"] for m in lines] == [10, 20, 30, 40, 50, 60]

    pytest.importorskip("matplotlib")
    rc, out, err = run(capsys, "plot", d)
    assert rc == 0, err
    with open(os.path.join(d, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_on_npz_classification(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3, 2)).astype(np.float32)
    y = (x[:, 0, 0] + x[:, 1, 1] > 0).astype(np.int64) + 2 * (x[:, 2, 0] > 0)
    path = tmp_path / "blobs.npz"
    np.savez(path, x=x, y=y)
    d = str(tmp_path / "run")
    rc, out, err = run(capsys, "train", "--data", str(path), "--steps", "60", "--batch-size", "32",
                       "--checkpoints", "3", "--no-progress", "--run-dir", d)
    assert rc == 0, err
    assert "4-class classification" in out and "val_loss" in out
    lines = [json.loads(s) for s in open(os.path.join(d, "metrics.jsonl"))]
    assert lines[-1]["val_loss"] < np.log(4)


def bad_npz(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif kind == "keys":
        np.savez(path, a=np.zeros((4, 2)), b=np.zeros(4))
    elif kind == "rows":
        np.savez(path, x=np.zeros((10, 2), np.float32), y=np.zeros((9, 1), np.float32))
    elif kind == "nan":
        x = np.zeros((10, 2), np.float32)
        x[3, 1] = np.nan
        np.savez(path, x=x, y=np.zeros((10, 1), np.float32))
    elif kind == "objects":
        np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    elif kind == "val":
        np.savez(path, x=np.zeros((10, 2), np.float32), y=np.zeros((10, 1), np.float32),
                 x_val=np.zeros((5, 3), np.float32), y_val=np.zeros((5, 1), np.float32))
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "not found"), ("garbage", "not a readable .npz"), ("keys", "needs 'x' and 'y'"),
    ("rows", "10 rows but y has 9"), ("nan", "NaN"), ("objects", "not a readable .npz"), ("val", "x_val/y_val"),
])
def test_bad_data_is_a_one_line_error(tmp_path, capsys, kind, message):
    path = str(tmp_path / "nope.npz") if kind == "missing" else bad_npz(tmp_path, kind)
    d = tmp_path / "run"
    rc, out, err = run(capsys, "train", "--data", path, "--run-dir", str(d), "--no-progress")
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not d.exists()


def test_resume_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: --resume alone has nothing to continue
    rc, _, err = run(capsys, "train", "--resume")
    assert rc == 2 and "--run-dir" in err
    rc, _, err = run(capsys, "train", "--resume", "--run-dir", str(tmp_path))
    assert rc == 2 and "no config.json" in err


def test_overfit_check_command(capsys):
    rc, out, _ = run(capsys, "overfit-check", "--samples", "64", "--batch-size", "64", "--steps", "300",
                     "--lr", "1e-2", "--hidden", "64")
    assert rc == 0 and "PASS" in out
    rc, out, _ = run(capsys, "overfit-check", "--samples", "256", "--batch-size", "256", "--steps", "30",
                     "--hidden", "1")
    assert rc == 1 and "FAIL" in out


def test_plot_errors(tmp_path, capsys):
    rc, _, err = run(capsys, "plot", str(tmp_path / "nothing"))
    assert rc == 2 and "not found" in err
    rc, _, err = run(capsys, "plot", str(tmp_path))
    assert rc == 2 and "metrics.jsonl" in err


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 5, "train_loss": 1.0}) + "\n")
    blocker = tmp_path / "block"
    (blocker / "matplotlib").mkdir(parents=True)
    (blocker / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), PYTHON_DIR]))
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "plot", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    assert "trainpatterns[plot]" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_train_under_torchrun_trains_one_run_on_two_ranks(tmp_path):
    # `torchrun --nproc-per-node 2 -m trainpatterns train`: the ranks join over gloo, agree on rank 0's
    # default run directory (cwd/runs/<task>-<time>), train SyncDataParallel on their shards, rank 0
    # alone prints and writes config.json, and the checkpoints are the job's (one run, all valid).
    from trainpatterns.checkpoint import CheckpointManager

    res = run_ranks(["-m", "trainpatterns", "train", *SMALL], world=2, timeout_s=150, cwd=str(tmp_path))
    assert [r[0] for r in res] == [0, 0], res
    outs = [(r[1], r[2]) for r in res]
    (out0, _), (out1, _) = outs
    assert "on 2 ranks (SyncDataParallel over gloo" in out0 and "done in" in out0
    assert out1 == "", "rank 1 printed"
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1, runs  # both ranks used rank 0's directory
    run_dir = tmp_path / "runs" / runs[0]
    assert json.load(open(run_dir / "config.json"))["steps"] == 40
    assert [json.loads(ln)["step"] for ln in open(run_dir / "metrics.jsonl")] == [10, 20, 30, 40]
    assert len([ln for ln in out0.splitlines() if ln.startswith("epoch")]) == 5
    infos = CheckpointManager(run_dir).list(verify=True)
    assert all(i.valid for i in infos) and infos[-1].step == 40, infos
    assert json.load(open(os.path.join(infos[-1].path, "manifest.json")))["world_size"] == 2


# ----- bad input in a subprocess: exit 2, one line on stderr, no traceback -----------------------------

def cli_subprocess(cwd, *argv):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    return subprocess.run([sys.executable, "-m", "trainpatterns", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


# Runs many `trainpatterns` command lines in one process (the start-up of torch costs more than a
# case): each as `python -m trainpatterns` would, stderr captured, an escaping exception printed as
# the interpreter prints it.
CASES_WORKER = r'''
import contextlib, io, json, os, sys, traceback
from trainpatterns.cli import main
out = []
for cwd, argv in json.load(sys.stdin):
    os.chdir(cwd)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            traceback.print_exc()
            rc = 1
    out.append([rc, err.getvalue()])
print(json.dumps(out))
'''


def cli_cases(cases):
    """[(returncode, stderr)] of each (cwd, argv) in ``cases``, all run in one subprocess."""
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    res = subprocess.run([sys.executable, "-c", CASES_WORKER], input=json.dumps([[str(c), a] for c, a in cases]),
                         capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr
    return [tuple(r) for r in json.loads(res.stdout.splitlines()[-1])]


def assert_one_line_error(rc, err, command, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainpatterns {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_class_labels_far_beyond_the_data_are_a_one_line_error(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    y[5] = 10**9  # one label would make a billion-output layer
    np.savez(tmp_path / "far.npz", x=x, y=y)
    res = cli_subprocess(tmp_path, "train", "--data", "far.npz", "--steps", "5", "--no-progress", "--run-dir", "run")
    assert_one_line_error(res.returncode, res.stderr, "train", "1000000000", "distinct labels")
    assert not (tmp_path / "run").exists()
    # Sparse labels in a small label space, and dense labels, still train.
    y_val = rng.integers(0, 3, 16)
    np.savez(tmp_path / "val.npz", x=x, y=y, x_val=x[:16], y_val=y_val.astype(np.float32))
    y[5] = 999
    np.savez(tmp_path / "sparse.npz", x=x, y=y)
    np.savez(tmp_path / "negval.npz", x=x, y=np.abs(y) % 3, x_val=x[:16], y_val=-y_val - 1)
    cases = [(tmp_path, ["train", "--data", f, "--steps", "4", "--checkpoints", "1", "--hidden", "4",
                         "--no-progress", "--run-dir", f"run-{f}"]) for f in ("sparse.npz", "val.npz", "negval.npz")]
    (rc_sparse, err_sparse), (rc_val, err_val), (rc_neg, err_neg) = cli_cases(cases)
    assert rc_sparse == 0, err_sparse
    assert json.loads(open(tmp_path / "run-sparse.npz" / "metrics.jsonl").readline())["step"] == 4
    assert_one_line_error(rc_val, err_val, "train", "y_val has dtype float32")
    assert_one_line_error(rc_neg, err_neg, "train", "must be >= 0")


def _saved_run(tmp_path, name, **wrong):
    d = tmp_path / name
    d.mkdir()
    config = dict(cli.DEFAULTS, samples=64, steps=8, batch_size=16, hidden=4, checkpoints=2)
    config.update(wrong)
    (d / "config.json").write_text(json.dumps(config))
    return name


WRONG_TYPES = [("steps", "many"), ("lr", "fast"), ("hidden", 1.5), ("samples", True), ("interpolation", "yes"),
               ("data", 5), ("seed", None)]


def test_resume_with_a_mistyped_config_is_a_one_line_error(tmp_path):
    runs = [_saved_run(tmp_path, f"run-{key}", **{key: value}) for key, value in WRONG_TYPES]
    before = snapshot(tmp_path)
    res = cli_subprocess(tmp_path, "train", "--resume", "--run-dir", runs[0], "--no-progress")
    assert_one_line_error(res.returncode, res.stderr, "train", "config.json", "'steps'", '"many"')
    results = cli_cases([(tmp_path, ["train", "--resume", "--run-dir", d, "--no-progress"]) for d in runs[1:]])
    for (key, value), (rc, err) in zip(WRONG_TYPES[1:], results):
        assert_one_line_error(rc, err, "train", "config.json", repr(key), json.dumps(value))
    assert snapshot(tmp_path) == before


def test_resume_with_a_config_that_is_not_an_object_or_out_of_range(tmp_path):
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    cases = [(tmp_path, ["train", "--resume", "--run-dir", "list", "--no-progress"]),
             (tmp_path, ["train", "--resume", "--run-dir", _saved_run(tmp_path, "seed", seed=2**64),
                         "--no-progress"]),
             (tmp_path, ["train", "--resume", "--run-dir", _saved_run(tmp_path, "zero", steps=0), "--no-progress"])]
    (rc1, err1), (rc2, err2), (rc3, err3) = cli_cases(cases)
    assert_one_line_error(rc1, err1, "train", "not a run configuration")
    assert_one_line_error(rc2, err2, "train", "--seed must be in")
    assert_one_line_error(rc3, err3, "train", "--steps must be >= 1")


def test_tune_storage_that_is_not_sqlite_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.txt"
    junk.write_text("these are notes, not a database\n" * 100)
    res = cli_subprocess(tmp_path, "tune", "--storage", "junk.txt", "--trials", "1", "--steps", "5")
    assert_one_line_error(res.returncode, res.stderr, "tune", "junk.txt", "not a database")
    assert junk.read_text() == "these are notes, not a database\n" * 100
    assert sorted(os.listdir(tmp_path)) == ["junk.txt"]
    (tmp_path / "adir").mkdir()
    ((rc, err),) = cli_cases([(tmp_path, ["tune", "--storage", "adir", "--trials", "1", "--steps", "5"])])
    assert_one_line_error(rc, err, "tune", "adir", "SQLite")
    assert os.listdir(tmp_path / "adir") == []


def test_tune_zero_budgets_are_one_line_errors(tmp_path):
    res = cli_subprocess(tmp_path, "tune", "--steps", "0", "--trials", "1")
    assert_one_line_error(res.returncode, res.stderr, "tune", "--steps must be >= 1, got 0")
    flags = [("tune", "--samples"), ("tune", "--trials"), ("tune", "--jobs"), ("train", "--steps"),
             ("train", "--samples")]
    results = cli_cases([(tmp_path, [cmd, flag, "0", "--storage" if cmd == "tune" else "--run-dir", "x"])
                         for cmd, flag in flags] + [(tmp_path, ["tune", "--seed", "-1", "--storage", "x"])])
    for (cmd, flag), (rc, err) in zip(flags, results):
        assert_one_line_error(rc, err, cmd, f"{flag} must be >= 1, got 0")
    assert_one_line_error(*results[-1], "tune", "--seed must be in [0, 2**63 - 1), got -1")
    assert os.listdir(tmp_path) == []  # no storage, no run directory


def test_tune_malformed_storage_url_is_rejected_creating_nothing(tmp_path):
    res = cli_subprocess(tmp_path, "tune", "--storage", "sqlite:/x", "--trials", "1", "--steps", "2")
    assert_one_line_error(res.returncode, res.stderr, "tune", "'sqlite:/x'", "sqlite:///")
    # "sqlite://" (last) is SQLAlchemy's spelling of an in-memory database: accepted, nothing written.
    urls = ["sqlite:x.db", "sqlite:///", "postgresql://h/db", "mysql:db", "sqlite://"]
    results = cli_cases([(tmp_path, ["tune", "--storage", url, "--trials", "1", "--steps", "2", "--samples", "16"])
                         for url in urls])
    for url, (rc, err) in zip(urls[:-1], results):
        assert_one_line_error(rc, err, "tune", repr(url))
    assert results[-1][0] == 0, results[-1][1]
    assert os.listdir(tmp_path) == []


def test_tune_accepts_sqlite_urls_and_plain_paths(tmp_path):
    cases = [(tmp_path, ["tune", "--storage", storage, "--trials", "1", "--steps", "2", "--samples", "16",
                         "--study-name", "s"]) for storage in ("sqlite:///rel.db", f"sqlite:///{tmp_path}/abs.db",
                                                               "plain.db", "./odd:name.db")]
    for rc, err in cli_cases(cases):
        assert rc == 0, err
    assert {"rel.db", "abs.db", "plain.db", "odd:name.db"} <= set(os.listdir(tmp_path))


# ----- metrics.jsonl: a torn last line is skipped, a torn line before it is an error -------------------

def _metrics_dir(tmp_path, tail):
    records = [{"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "val_loss": 2.0 / e} for e in (1, 2, 3)]
    d = tmp_path / "run"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)
    return d, records


@pytest.mark.parametrize("tail", [b'{"epoch": 4, "step": 40, "train_lo', b'{"epoch": 4, "note": "\xc3',
                                  b"\0\0\0\0\0\0", b'{"epoch": 4, "st\n'])
def test_plot_skips_a_torn_last_line(tmp_path, capsys, tail):
    d, records = _metrics_dir(tmp_path, tail)
    assert cli._read_metrics(str(d)) == records
    assert "incomplete last line 4" in capsys.readouterr().err


def test_plot_names_a_torn_line_before_the_last(tmp_path, capsys):
    d, _ = _metrics_dir(tmp_path, b'{"epoch": 4, "st' + b'{"epoch": 5, "step": 50, "train_loss": 0.2}\n'
                        + b'{"epoch": 6, "step": 60, "train_loss": 0.1}\n')
    with pytest.raises(cli.UsageError, match=r"metrics.jsonl line 4 is not a metrics record"):
        cli._read_metrics(str(d))
    (d / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, "train_loss": "low"}\n'
                                     '{"epoch": 3, "train_loss": 0.5}\n')
    with pytest.raises(cli.UsageError, match=r"line 2 is not a metrics record"):
        cli._read_metrics(str(d))
    pytest.importorskip("matplotlib")
    d2, _ = _metrics_dir(tmp_path / "p", b'{"epoch": 4, "st')
    rc, out, err = run(capsys, "plot", str(d2))
    assert rc == 0 and (d2 / "loss.png").read_bytes()[:4] == b"\x89PNG" and "incomplete last line" in err


@pytest.mark.timeout(180)
def test_train_with_parameter_servers_under_torchrun(tmp_path):
    # `torchrun --nproc-per-node 3 -m trainpatterns train --strategy async`: rank 0 serves, ranks 1 and 2
    # train; the first worker prints the epochs and writes metrics.jsonl; the server checkpoints.
    run_dir = tmp_path / "a"
    argv = ["-m", "trainpatterns", "train", *SMALL, "--strategy", "async", "--run-dir", str(run_dir)]
    res = run_ranks(argv, world=3, timeout_s=150, cwd=str(tmp_path))
    assert [r[0] for r in res] == [0, 0, 0], res
    assert "with parameter servers" in res[0][1]
    assert "async: 40 updates applied" in res[1][1] and "done in" in res[1][1]
    assert res[2][1] == "", "the second worker printed"
    assert json.load(open(run_dir / "config.json"))["steps"] == 40
    assert os.listdir(run_dir / "servers" / "server_0")
    assert [json.loads(line)["epoch"] for line in open(run_dir / "metrics.jsonl")]


def test_async_strategy_outside_torchrun_is_a_one_line_error(tmp_path):
    res = cli_subprocess(tmp_path, "train", "--strategy", "async", "--run-dir", str(tmp_path / "a"))
    assert_one_line_error(res.returncode, res.stderr, "train", "--strategy async runs under torchrun")


def test_plot_draws_max_error_against_training_time():
    # The second panel: max error over elapsed training time (elapsed_s; a running sum of time_s for
    # records without it), on a log scale.
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainpatterns.cli import _plot_max_error_against_time

    rows = [{"epoch": 1, "train_loss": 1.0, "max_error": 0.5, "time_s": 2.0},
            {"epoch": 2, "train_loss": 0.5, "max_error": 0.1, "time_s": 3.0},
            {"epoch": 3, "train_loss": 0.2, "max_error": 1e-3, "time_s": 9.0, "elapsed_s": 20.0}]
    fig, ax = plt.subplots()
    try:
        _plot_max_error_against_time(ax, rows)
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [2.0, 5.0, 20.0]
        assert list(line.get_ydata()) == [0.5, 0.1, 1e-3]
        assert ax.get_yscale() == "log" and "time" in ax.get_xlabel()
    finally:
        plt.close(fig)


@pytest.mark.timeout(200)
def test_pipeline_strategy_trains_the_built_in_job_in_stages(tmp_path):
    # `torchrun --nproc-per-node 2 -m trainpatterns train --strategy pipeline`: the MLP's layers in two
    # stages (1F1B), interpolation mode off; one story on both ranks, the loss falls.
    run_dir = tmp_path / "pp"
    argv = ["-m", "trainpatterns", "train", *SMALL, "--strategy", "pipeline", "--run-dir", str(run_dir)]
    res = run_ranks(argv, world=2, timeout_s=170, cwd=str(tmp_path))
    assert [r[0] for r in res] == [0, 0], res
    assert "in 2 pipeline stages (PipelineParallel, 1F1B, 4 micro-batches" in res[0][1] and "done in" in res[0][1]
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"] and "max_error" not in records[-1]
    assert json.load(open(run_dir / "config.json"))["interpolation"] is False


def test_pipeline_strategy_refuses_what_it_cannot_run(tmp_path):
    res = cli_subprocess(tmp_path, "train", "--strategy", "pipeline", "--interpolation")
    assert_one_line_error(res.returncode, res.stderr, "train", "cannot run interpolation mode")
    res = cli_subprocess(tmp_path, "train", "--strategy", "pipeline")
    assert_one_line_error(res.returncode, res.stderr, "train", "runs under torchrun with at least 2 processes")
