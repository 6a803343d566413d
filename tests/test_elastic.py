"""Elastic training: under ``torchrun --max-restarts`` a rank is SIGKILLed at a random step, twice,
in two different incarnations; torchrun restarts the group, the Trainer resumes from the newest good
checkpoint, and the finished run's weights and metrics.jsonl equal, bitwise, those of a 2-rank run
that was never killed. The worker is tests/_elastic_worker.py; the kill steps come from a seed this
test picks (set TP_ELASTIC_SEED to replay one)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from _elastic_worker import CHECKPOINTS, STEPS  # noqa: E402
from _ranks import PYTHON_DIR  # noqa: E402

WORKER = Path(__file__).with_name("_elastic_worker.py")
CLI_WRAPPER = Path(__file__).with_name("_elastic_cli.py")
TIMEOUT_S = 150
TIME_FIELDS = ("time_s", "samples_per_s", "elapsed_s")


def launch(tmp_path: Path, name: str, kills: str, cli_args: Optional[list] = None) -> tuple[subprocess.Popen, Path]:
    """torchrun with two gloo ranks of the worker (or, with ``cli_args``, of ``trainpatterns train``),
    in its own session so that the test can kill the whole tree at the timeout."""
    out = tmp_path / name
    out.mkdir()
    script = [str(WORKER), str(out / "run"), str(out), kills] if cli_args is None else \
        [str(CLI_WRAPPER), str(out), kills, "--", "--run-dir", str(out / "run"), *cli_args]
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE: init_from_env keeps each incarnation's keys apart in
    # torchrun's shared store, which outlives a restart.
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "--max-restarts", "3", *script]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, out


def finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str]:
    try:
        log, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return -1, f"killed after {TIMEOUT_S} s\n{log}"
    return proc.returncode, log


def records(path: Path) -> list:
    text = path.read_text()
    assert text.endswith("\n")
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_FIELDS} for line in text.splitlines()]


def starts(out: Path) -> dict:
    """{incarnation: {rank: the step it started training from}}."""
    found: dict = {}
    for line in (out / "starts.txt").read_text().splitlines():
        incarnation, rank, step = map(int, line.split())
        found.setdefault(incarnation, {})[rank] = step
    return found


def test_killed_ranks_resume_bitwise_under_torchrun(tmp_path):
    seed = int(os.environ.get("TP_ELASTIC_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    first, second = sorted(rng.sample(range(2, STEPS), 2))  # the second kill comes after the first resume
    kills = f"0:{rng.randrange(2)}:{first},1:{rng.randrange(2)}:{second}"
    what = f"seed {seed}: kills (incarnation:rank:step) {kills}"

    deadline = time.monotonic() + TIMEOUT_S
    ref_proc, ref = launch(tmp_path, "reference", "-")
    run_proc, run = launch(tmp_path, "killed", kills)
    ref_rc, ref_log = finish(ref_proc, deadline)
    run_rc, run_log = finish(run_proc, deadline)
    assert ref_rc == 0, ref_log[-3000:]
    assert run_rc == 0, f"{what}\n{run_log[-3000:]}"

    assert starts(ref) == {0: {0: 0, 1: 0}}
    began = starts(run)
    assert sorted(began) == [0, 1, 2], f"{what}: incarnations {began}"
    for incarnation, kill_step in ((1, first), (2, second)):
        (step,) = set(began[incarnation].values())  # every rank resumes from the same checkpoint
        assert step <= kill_step and step % (STEPS // CHECKPOINTS) == 0, \
            f"{what}: incarnation {incarnation} began at {step}"

    want, got = load_file(ref / "final.safetensors"), load_file(run / "final.safetensors")
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), f"{what}: {name} differs"
    assert records(run / "run" / "metrics.jsonl") == records(ref / "run" / "metrics.jsonl"), what


def test_cli_train_continues_its_run_under_torchrun_restarts(tmp_path):
    """`trainpatterns train --run-dir R` under --max-restarts: a restarted group continues R."""
    seed = int(os.environ.get("TP_ELASTIC_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    args = ["--steps", "60", "--samples", "512", "--batch-size", "32", "--hidden", "32", "--checkpoints", "6",
            "--no-progress"]
    # From step 22 on, the checkpoint of step 10 has committed (a save waits for the one before it),
    # so the restarted group always has one to continue from.
    kills = f"0:{rng.randrange(2)}:{rng.randrange(22, 60)}"
    deadline = time.monotonic() + TIMEOUT_S
    ref_proc, ref = launch(tmp_path, "reference", "-", args)
    run_proc, run = launch(tmp_path, "killed", kills, args)
    ref_rc, ref_log = finish(ref_proc, deadline)
    run_rc, run_log = finish(run_proc, deadline)
    assert ref_rc == 0, ref_log[-3000:]
    assert run_rc == 0, f"seed {seed}, kills {kills}\n{run_log[-3000:]}"
    assert "resumed" in run_log and "resumed" not in ref_log, run_log[-3000:]
    assert sorted(starts(run)) == [0, 1], f"seed {seed}, kills {kills}: {starts(run)}"
    want, got = load_file(ref / "final.safetensors"), load_file(run / "final.safetensors")
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), f"seed {seed}, kills {kills}: {name} differs"
    assert records(run / "run" / "metrics.jsonl") == records(ref / "run" / "metrics.jsonl")


def test_cli_train_under_max_restarts_needs_a_run_dir(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_RESTART_COUNT="0")
    res = subprocess.run([sys.executable, "-m", "trainpatterns", "train", "--steps", "10"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--run-dir" in res.stderr and "Traceback" not in res.stderr
