"""Starting the ranks of a small gloo job as subprocesses, for the tests that need real processes:
a free port on 127.0.0.1, torchrun's variables per rank, and every process gone afterwards (killed
if still running at the timeout), so that a broken test fails instead of hanging."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import trainpatterns as tp

PYTHON_DIR = str(Path(tp.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv: Sequence[str], world: int, timeout_s: float, cwd: Optional[str] = None,
              torchrun_env: bool = True) -> list:
    """Run ``python *argv`` once per rank, all at once; return [(returncode, stdout, stderr)] by rank
    (returncode None: killed after ``timeout_s``). With ``torchrun_env`` each process gets RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; argv may contain "{rank}" and "{port}"."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")]))
        if torchrun_env:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        args = [a.format(rank=rank, port=port) for a in argv]
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout_s)
                results.append((p.returncode, out, err))
            except subprocess.TimeoutExpired:
                results.append((None, "", "killed after the timeout"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results
