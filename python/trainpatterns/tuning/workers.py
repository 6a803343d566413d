"""The workers of ``Study.optimize(n_jobs=...)``: threads in this process, or spawned processes that
share the study's SQLite file; and how one worker's exception stops them all.

With ``catch=()`` (the default, as in Optuna) an exception from the objective ends the study: its
trial is recorded FAILED, every worker finishes the trial it is running and starts no other, and
``optimize`` raises the exception in the caller. From a worker process it arrives as plain data
(its class's module and name, its message and the worker's traceback, in JSON: the library never
reads a pickle) and is raised again as the same class with that message when the class is a
builtin or already imported and takes one message argument, else as a RuntimeError naming it; the
worker's traceback is its ``__cause__``. Workers only need ``study._worker_loop(objective, run)``,
which keeps this module free of the study's own.
"""
from __future__ import annotations

import builtins
import json
import multiprocessing as mp
import sys
import threading
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional

__all__ = ["Run", "new_stop_event", "run_threads", "run_processes"]


class Run:
    """The budget and options of one ``optimize`` call, shared by its workers. ``stop`` is set by
    the first worker that raises; the others then start no new trial."""

    def __init__(self, *, run_id: str, n_trials: Optional[int], total_trials: Optional[int],
                 deadline: Optional[float], catch: tuple, callbacks: list, max_retries: int, stop: Any) -> None:
        self.run_id, self.n_trials, self.total_trials = run_id, n_trials, total_trials
        self.deadline, self.catch, self.callbacks, self.max_retries = deadline, catch, callbacks, max_retries
        self.stop = stop


def new_stop_event(processes: bool) -> Any:
    """An event the workers share: a multiprocessing one (it travels to spawned processes as an
    argument of the process) or a plain threading one."""
    return mp.get_context("spawn").Event() if processes else threading.Event()


def run_threads(study: Any, objective: Callable, run: Run, n_jobs: int) -> None:
    errors: list = []

    def main() -> None:
        try:
            study._worker_loop(objective, run)
        except BaseException as e:  # re-raised below, in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=main, daemon=True) for _ in range(n_jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process (set as that exception's cause)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def _process_main(study: Any, objective: Callable, run: Run, conn: Connection) -> None:
    try:
        study._worker_loop(objective, run)
    except BaseException as e:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        conn.send_bytes(json.dumps({"module": type(e).__module__, "name": type(e).__qualname__,
                                    "message": str(e), "traceback": tb}).encode())
        raise
    finally:
        conn.close()


def _rebuilt(error: dict) -> BaseException:
    """The worker's exception in this process: its class (a builtin, or one of a module this process
    has imported; nothing is imported for it) with its message, else a RuntimeError naming it."""
    owner = builtins if error["module"] == "builtins" else sys.modules.get(error["module"])
    cls: Any = owner
    for part in error["name"].split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            return cls(error["message"])
        except Exception:  # noqa: BLE001 - a class whose __init__ wants other arguments
            pass
    return RuntimeError(f"a worker process raised {error['module']}.{error['name']}: {error['message']}")


def run_processes(study: Any, objective: Callable, run: Run, n_jobs: int) -> None:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(n_jobs)]
    procs = [ctx.Process(target=_process_main, args=(study, objective, run, w), daemon=False) for _, w in pipes]
    readers = [r for r, _ in pipes]
    errors: list = []

    def receive(r: Connection) -> bool:
        try:
            errors.append(json.loads(r.recv_bytes()))
            return True
        except EOFError:
            readers.remove(r)
            return False

    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()  # the children hold their ends: a reader sees EOF once its child is gone
        alive = {p.sentinel for p in procs}
        while alive:  # read while waiting, so a child never blocks on a full pipe
            for ready in wait(list(alive) + readers):
                if ready in alive:
                    alive.discard(ready)
                else:
                    receive(ready)
        for r in list(readers):
            while r.poll() and receive(r):
                pass
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
        raise
    finally:
        for r, _ in pipes:
            r.close()
    if errors:
        raise _rebuilt(errors[0]) from WorkerTraceback(errors[0]["traceback"])
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n_jobs} worker processes exited with errors (exit codes {bad}); "
                           "see their output above")
