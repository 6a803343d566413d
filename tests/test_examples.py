"""Every script under examples/ runs to the end against the installed package, with small sizes,
in a temporary working directory (so nothing is left in the repository)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _ranks import run_ranks

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Small sizes per example; an example not named here runs with no arguments.
ARGS = {
    "checkpoint_resume.py": ["--dir", "ckpt"],
    "fused_optimizer.py": ["--steps", "40"],
    "sync_data_parallel.py": ["--steps", "20"],
    "trainer.py": ["run"],
    "trainer_classifier.py": ["--run-dir", "run", "--rows", "512"],
    "tune_builtin.py": ["--trials", "3", "--steps", "60", "--db", "study.db"],
}


def run_example(name: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *ARGS.get(name, []), *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_every_example_is_covered():
    assert set(ARGS) <= {p.name for p in EXAMPLES.glob("*.py")}, "ARGS names an example that does not exist"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(name, tmp_path):
    res = run_example(name, tmp_path)
    assert res.returncode == 0, f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    assert res.stdout.strip(), f"{name} printed nothing"


def test_checkpoint_example_resumes_and_grows_the_data(tmp_path):
    first = run_example("checkpoint_resume.py", tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "fresh start" in first.stdout, first.stdout[-2000:]
    again = run_example("checkpoint_resume.py", tmp_path, "--more-data")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed at step" in again.stdout, again.stdout[-2000:]


def test_sync_example_on_two_ranks(tmp_path):
    results = run_ranks([str(EXAMPLES / "sync_data_parallel.py"), *ARGS["sync_data_parallel.py"]], world=2,
                        timeout_s=180, cwd=str(tmp_path))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-4000:]}"
    assert "parameters identical on all 2 ranks: True" in results[0][1], results[0][1][-2000:]


def test_classifier_example_resumes_after_a_kill_and_runs_on_two_ranks(tmp_path):
    single = run_example("trainer_classifier.py", tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    assert "(killed)" in single.stdout and "resumed from step" in single.stdout, single.stdout[-2000:]
    assert "val_acc" in single.stdout and "test: loss" in single.stdout
    results = run_ranks([str(EXAMPLES / "trainer_classifier.py"), "--run-dir", "two", "--rows", "512"], world=2,
                        timeout_s=180, cwd=str(tmp_path))
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-4000:]}"
    assert "joined the torchrun job as rank 0 of 2" in results[0][1] and "(rank 0 of 2)" in results[0][1]
    assert results[1][1] == "", "rank 1 printed"
