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

from _ranks import run_ranks

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def snapshot(directory):
    return {os.path.relpath(os.path.join(r, f), directory): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(directory) for f in fs}


SMALL = ["--steps", "40", "--samples", "256", "--batch-size", "32", "--checkpoints", "4", "--hidden", "16",
         "--no-progress"]


def test_train_default_task_resume_and_plot(tmp_path, capsys):
    d = str(tmp_path / "run")
    rc, out, err = run(capsys, "train", *SMALL, "--run-dir", d)
    assert rc == 0, err
    assert "interpolation mode" in out
    epochs = [ln for ln in out.splitlines() if ln.startswith("epoch")]
    assert len(epochs) == 5 and "step      0" in epochs[0] and "max err" in epochs[-1]
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
    assert "resumed" in out and "at step 40" in out
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
    assert "4-class classification" in out and "val loss" in out
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


def test_resume_errors(tmp_path, capsys):
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
