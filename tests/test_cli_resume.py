"""`trainpatterns train --resume` without --run-dir: the newest run of the same task under runs/
(the built-in task's, or --data's), said by name; other runs untouched; a clear error when there
is none. Each test runs in its own working directory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns import _cli_runs
from trainpatterns.pendulum import DEFAULTS, Job

from _cli_run import run, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = ["--steps", "20", "--samples", "128", "--batch-size", "32", "--checkpoints", "2", "--hidden", "8",
         "--no-progress", "--no-interpolation"]




def steps(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def blobs(path) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    np.savez(path, x=x, y=(x[:, :1] * 2).astype(np.float32))
    return str(path)


def test_resume_continues_the_newest_run_of_the_same_task(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = blobs(tmp_path / "blobs.npz")
    for name, extra in (("pendulum-20240101-120000", []), ("pendulum-20240102-090000", []),
                        ("blobs-20240103-000000", ["--data", data])):
        rc, _, err = run(capsys, "train", *SMALL, *extra, "--run-dir", os.path.join("runs", name))
        assert rc == 0, err
    older, newer, other = (os.path.join("runs", n) for n in sorted(os.listdir("runs"), key=lambda n: n[-15:]))
    assert (older, newer, other) == ("runs/pendulum-20240101-120000", "runs/pendulum-20240102-090000",
                                     "runs/blobs-20240103-000000")
    before = {d: snapshot(d) for d in (older, other)}

    # the newest run is another task's: the built-in task's newest is picked, and said
    rc, out, err = run(capsys, "train", "--resume", "--steps", "30", "--no-progress")
    assert rc == 0, err
    assert out.splitlines()[0] == f"resuming the newest pendulum run: {newer}"
    assert "resumed from step 20 (" in out
    assert steps(newer) == [10, 20, 30]
    assert {d: snapshot(d) for d in (older, other)} == before

    # --data names the task
    rc, out, err = run(capsys, "train", "--resume", "--data", data, "--steps", "40", "--no-progress")
    assert rc == 0, err
    assert out.splitlines()[0] == f"resuming the newest blobs run: {other}"
    assert steps(other) == [10, 20, 30, 40] and steps(older) == [10, 20]


def test_resume_with_no_run_of_the_task_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "train", "--resume", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no pendulum run to continue under runs/" in err and "--run-dir" in err
    assert not os.path.exists("runs")

    os.makedirs("runs/blobs-20240103-000000")  # another task's run, and a directory that holds no run
    with open("runs/blobs-20240103-000000/config.json", "w") as f:
        json.dump(dict(DEFAULTS, data=str(tmp_path / "blobs.npz")), f)
    os.makedirs("runs/pendulum-20240104-000000")
    before = snapshot("runs")
    rc, out, err = run(capsys, "train", "--resume", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no pendulum run" in err and "it holds runs of blobs" in err
    assert snapshot("runs") == before


def test_resume_of_a_run_without_a_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/pendulum-20240104-000000")
    with open("runs/pendulum-20240104-000000/config.json", "w") as f:
        json.dump(dict(DEFAULTS, samples=128, steps=20, batch_size=32, hidden=8, checkpoints=2), f)
    rc, out, err = run(capsys, "train", "--resume", "--no-progress")
    assert rc == 2 and "runs/pendulum-20240104-000000 holds no usable checkpoint" in err
    assert out.splitlines() == ["resuming the newest pendulum run: runs/pendulum-20240104-000000"]


def test_the_task_name_is_the_jobs(tmp_path):
    data = blobs(tmp_path / "my.data.npz")
    assert _cli_runs.task_name(data) == Job(dict(DEFAULTS, data=data)).name == "my.data"
    assert _cli_runs.task_name(None) == Job(dict(DEFAULTS, samples=8)).name == "pendulum"


stamps = st.builds(lambda d, t: f"2024{d:04d}-{t:06d}", st.integers(101, 1231), st.integers(0, 235959))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["pendulum", "blobs", "my-task", "pendulum-x"]), stamps,
                          st.sampled_from(["config", "none", "other-data"])), max_size=8),
       st.sampled_from([None, "blobs.npz", "my-task.npz"]))
def test_newest_run_picks_the_latest_start_of_the_task(tmp_path_factory, runs, data):
    """Any mix of run directories: those of the task named by ``data`` holding a config.json made
    from the same data compete, and the latest start time wins; no other directory is ever picked."""
    root = tmp_path_factory.mktemp("runs")
    task = "pendulum" if data is None else data[:-4]
    same = None if data is None else os.path.abspath(data)
    eligible = []
    for name, stamp, kind in runs:
        path = root / f"{name}-{stamp}"
        path.mkdir(exist_ok=True)
        if kind != "none":
            (path / "config.json").write_text(json.dumps(dict(DEFAULTS, data=same if kind == "config" else "/x.npz")))
    for name, stamp, kind in runs:  # the last write of a directory decides
        path = root / f"{name}-{stamp}"
        config = path / "config.json"
        mine = config.exists() and json.loads(config.read_text())["data"] == same
        if name == task and mine and (stamp, path) not in eligible:
            eligible.append((stamp, path))
    found, problem = _cli_runs.newest_run(data, root=str(root))
    if eligible:
        assert problem is None and found == str(max(eligible)[1])
    else:
        assert found is None and f"no {task} run to continue" in problem
