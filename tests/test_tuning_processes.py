"""Multi-process tests of trainpatterns.tuning: a study killed with SIGKILL resumes with no trial lost
or duplicated, two processes share one study (random and grid), n_jobs worker processes (and how an
exception in one stops them all), and `trainpatterns tune` killed mid-trial resumes that trial from
its checkpoint.

Workers are separate Python processes running a small script on one SQLite file; every wait has a
deadline, and leftover processes are killed, so a broken claim protocol fails the test, never hangs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import trainpatterns
from trainpatterns.tuning import RandomSampler, TrialState, create_study, load_study

# Where the imported trainpatterns lives (the source tree's python/ or site-packages): the worker
# processes must import the same build, compiled _C included.
PYTHON_DIR = str(Path(trainpatterns.__file__).resolve().parents[1])

WORKER = r'''
import os, sys, time
sys.path.insert(0, {python_dir!r})
from trainpatterns.tuning import create_study, GridSampler, RandomSampler

db, name, total, log, kind, sleep, gate = sys.argv[1:8]

def objective(trial):
    x = trial.suggest_float("x", 0.0, 1.0)
    n = trial.suggest_int("n", 0, 100)
    trial.set_user_attr("pid", os.getpid())
    with open(log, "a") as f:
        f.write(f"start {{trial.number}} {{trial.attempt}} {{os.getpid()}}\n")
    time.sleep(float(sleep))
    return x + n

if __name__ == "__main__":
    sampler = RandomSampler(seed=5) if kind == "random" else GridSampler({{"x": [0.0, 0.5, 1.0], "n": [1, 2, 3, 4]}})
    study = create_study(storage=db, study_name=name, sampler=sampler, load_if_exists=True)
    if gate != "-":
        open(gate + "." + str(os.getpid()), "w").close()
        deadline = time.time() + 120
        while not os.path.exists(gate) and time.time() < deadline:
            time.sleep(0.02)
    study.optimize(objective, total_trials=int(total))
'''


def _reference_params(n: int) -> list[dict]:
    """What an uninterrupted single process draws for trials 0..n-1 (same seed, same objective)."""
    s = create_study(sampler=RandomSampler(seed=5))
    s.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) + t.suggest_int("n", 0, 100), n_trials=n)
    return [t.params for t in s.trials]


class _Workers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.script = tmp / "worker.py"
        self.script.write_text(WORKER.format(python_dir=PYTHON_DIR))
        self.log = tmp / "log.txt"
        self.procs: list = []

    def start(self, db: Path, name: str, total: int, kind: str = "random", sleep: float = 0.2,
              gate: str = "-") -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, str(self.script), str(db), name, str(total), str(self.log), kind,
                              str(sleep), gate])
        self.procs.append(p)
        return p

    def starts(self) -> list[tuple[int, int, int]]:
        if not self.log.exists():
            return []
        return [tuple(int(v) for v in line.split()[1:]) for line in self.log.read_text().splitlines()
                if line.startswith("start ")]

    def wait_for(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.fixture
def workers(tmp_path):
    w = _Workers(tmp_path)
    yield w
    w.close()


@pytest.mark.timeout(240)
def test_sigkill_mid_study_resumes_without_losing_or_duplicating(workers, tmp_path):
    db, total = tmp_path / "kill.db", 8
    killed = []
    for target in (2, 5):  # kill while trial #target-1 is running, twice
        p = workers.start(db, "k", total, sleep=0.3)
        workers.wait_for(lambda: len(workers.starts()) >= target, 120, f"{target} trial starts")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        running = load_study(study_name="k", storage=db).get_trials([TrialState.RUNNING])
        assert len(running) == 1  # left RUNNING by the dead process
        killed.append((running[0].number, running[0].params))
    p = workers.start(db, "k", total, sleep=0.0)
    assert p.wait(timeout=180) == 0
    trials = load_study(study_name="k", storage=db).trials
    assert [t.number for t in trials] == list(range(total))
    assert all(t.state is TrialState.COMPLETE for t in trials)
    ref = _reference_params(total)
    assert [t.params for t in trials] == ref  # same draws as one uninterrupted process
    for number, params in killed:
        t = trials[number]
        assert t.params == params and t.attempts == 2
        assert "died" in t.system_attrs["interruptions"][0]
    # Each trial started exactly once, except the killed ones, which started twice (attempts 1, 2).
    runs = {}
    for number, attempt, _ in workers.starts():
        runs.setdefault(number, []).append(attempt)
    killed_numbers = {n for n, _ in killed}
    assert runs == {n: ([1, 2] if n in killed_numbers else [1]) for n in range(total)}


def _run_two(workers, db, name, total, kind):
    gate = str(workers.tmp / f"go-{name}")
    procs = [workers.start(db, name, total, kind=kind, sleep=0.15, gate=gate) for _ in range(2)]
    workers.wait_for(lambda: len([f for f in os.listdir(workers.tmp) if f.startswith(f"go-{name}.")]) == 2,
                     120, "both workers ready")
    Path(gate).touch()
    for p in procs:
        assert p.wait(timeout=180) == 0
    return {p.pid for p in procs}, load_study(study_name=name, storage=db).trials


@pytest.mark.timeout(300)
def test_two_processes_share_a_study(workers, tmp_path):
    db = tmp_path / "shared.db"
    pids, trials = _run_two(workers, db, "r", 10, "random")
    assert [t.number for t in trials] == list(range(10))
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == pids  # both took part
    assert [t.params for t in trials] == _reference_params(10)
    # A grid shared by two processes: every point exactly once (claimed inside the write lock).
    pids, trials = _run_two(workers, db, "g", 100, "grid")
    points = sorted((t.params["x"], t.params["n"]) for t in trials)
    assert points == sorted((x, n) for x in (0.0, 0.5, 1.0) for n in (1, 2, 3, 4))
    assert {t.user_attrs["pid"] for t in trials} == pids


def pid_objective(trial) -> float:
    """Top-level (picklable) objective for n_jobs worker processes."""
    trial.set_user_attr("pid", os.getpid())
    time.sleep(0.1)
    return trial.suggest_float("x", -1.0, 1.0) ** 2


@pytest.mark.timeout(240)
def test_n_jobs_worker_processes(tmp_path):
    s = create_study(storage=tmp_path / "jobs.db", study_name="j", sampler=RandomSampler(seed=2))
    s.optimize(pid_objective, n_trials=6, n_jobs=2)
    trials = s.trials
    assert [t.number for t in trials] == list(range(6))  # n_trials counts this call over all workers
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert os.getpid() not in {t.user_attrs["pid"] for t in trials}


class FlakyDisk(Exception):
    """A picklable exception of this module (the parent unpickles it by reference)."""


class Unpicklable(Exception):
    """Its __init__ takes two arguments but Exception pickles only the message: unpickling fails."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} ({code})")


def raising_objective(trial) -> float:
    """Top-level objective for n_jobs worker processes: trial 1 raises, the others take 0.2 s."""
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.number == 1:
        if trial.study.study_name == "unpicklable":
            raise Unpicklable("bad sector", 7)
        raise FlakyDisk("disk gone in trial 1")
    time.sleep(0.2)
    return x


@pytest.mark.timeout(240)
def test_an_uncaught_exception_in_a_worker_process_stops_the_study(tmp_path):
    # catch=() (the default): the failing trial is stored FAILED, the other worker finishes its trial
    # and starts no other, and optimize raises the worker's exception, with its traceback as cause.
    from trainpatterns.tuning.workers import WorkerTraceback

    s = create_study(storage=tmp_path / "stop.db", study_name="stop", sampler=RandomSampler(seed=2))
    with pytest.raises(FlakyDisk, match="disk gone in trial 1") as e:
        s.optimize(raising_objective, n_trials=40, n_jobs=2)
    assert isinstance(e.value.__cause__, WorkerTraceback)
    assert "Traceback" in str(e.value.__cause__) and "raising_objective" in str(e.value.__cause__)
    trials = s.trials
    assert len(trials) < 8, len(trials)
    assert [t.number for t in trials if t.state is TrialState.FAILED] == [1]
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.FAILED}
    assert trials[1].fail_reason == "FlakyDisk: disk gone in trial 1"
    # With the type in catch the study goes on to its budget, as with one worker.
    s.optimize(raising_objective, n_trials=4, n_jobs=2, catch=(FlakyDisk,))
    assert len(s.trials) == len(trials) + 4
    # An exception whose class wants other arguments than a message arrives as a RuntimeError naming
    # it, with the worker's traceback as cause.
    u = create_study(storage=tmp_path / "stop.db", study_name="unpicklable", sampler=RandomSampler(seed=2))
    with pytest.raises(RuntimeError, match=r"a worker process raised .*Unpicklable: bad sector \(7\)") as e:
        u.optimize(raising_objective, n_trials=40, n_jobs=2)
    assert isinstance(e.value.__cause__, WorkerTraceback) and "Unpicklable" in str(e.value.__cause__)
    assert len(u.trials) < 8 and u.trials[1].state is TrialState.FAILED


@pytest.mark.timeout(240)
def test_tune_cli_killed_mid_trial_resumes_the_trial_from_its_checkpoint(tmp_path):
    # `trainpatterns tune` killed (SIGKILL) after trial 0 saved a checkpoint: the rerun retries
    # trial 0 from that checkpoint, and its reports equal those of an uninterrupted run.
    from trainpatterns.checkpoint import CheckpointManager
    from trainpatterns.tuning.cli import PendulumObjective

    steps, samples = 1000, 256
    argv = [sys.executable, "-m", "trainpatterns", "tune", "--trials", "1", "--steps", str(steps), "--samples",
            str(samples), "--sampler", "random", "--pruner", "none", "--storage", "tune.db", "--study-name", "k"]
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    trial_dir = tmp_path / "tune_artifacts" / "k" / "trial_00000"
    p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(trial_dir.glob("step_*")):
            assert p.poll() is None and time.time() < deadline, "no checkpoint before the end or the deadline"
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    saved = [i.step for i in CheckpointManager(trial_dir, async_save=False).list() if i.valid]
    assert saved and max(saved) < steps, saved
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    (t,) = load_study(study_name="k", storage=tmp_path / "tune.db").trials
    assert t.state is TrialState.COMPLETE and t.attempts == 2
    threads = torch.get_num_threads()
    try:
        ref = create_study(sampler=RandomSampler(seed=0))
        ref.optimize(PendulumObjective(steps=steps, samples=samples, seed=0), n_trials=1)
    finally:
        torch.set_num_threads(threads)
    (r,) = ref.trials
    assert t.params == r.params and t.value == r.value
    # Reports made before the kill, and after the resume (from the newest checkpoint), as uninterrupted.
    assert t.intermediate_values == {k: v for k, v in r.intermediate_values.items() if k in t.intermediate_values}
    assert steps in t.intermediate_values
