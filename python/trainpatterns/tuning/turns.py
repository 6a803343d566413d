"""One proposal at a time among a study's workers, for samplers that read the RUNNING trials'
proposals (``serial_proposals``, the GP).

Such a sampler steers away from where the running trials are. Workers that claim trials at the
same moment (every worker, when the trials take about equally long) would otherwise each propose
before any of the others' proposals is stored, see no pending trial, and propose the same point.
So a worker claims, proposes and stores the proposal in its turn: threads of one process take a
``threading.Lock``, processes an ``flock`` on ``<database>-propose.lock`` beside the study's SQLite
file (one lock per file: studies sharing a file also take turns). The operating system releases
the ``flock`` of a process that dies, so a crashed worker never blocks the others; a worker waits
at most ``wait_s`` for its turn, then proposes without it (logged). Without ``fcntl`` (Windows),
only the threads take turns.
"""
from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

__all__ = ["proposal_turn"]

_log = logging.getLogger("trainpatterns.tuning")


@contextmanager
def proposal_turn(lock: threading.Lock, database: Optional[str], wait_s: float) -> Iterator[None]:
    """Hold ``lock`` and, for a file ``database``, the ``flock`` of ``<database>-propose.lock``."""
    deadline = time.monotonic() + wait_s
    if not lock.acquire(timeout=wait_s):
        _log.warning("waited %.0f s for another thread's proposal; proposing without it", wait_s)
        yield
        return
    try:
        if database is None or fcntl is None:
            yield
            return
        path = f"{database}-propose.lock"
        try:
            f = open(path, "a")
        except OSError as e:
            _log.warning("cannot open %s (%s); proposing without taking turns with other processes", path, e)
            yield
            return
        with f:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        _log.warning("waited %.0f s for another process's proposal; proposing without it", wait_s)
                        break
                    time.sleep(0.005)
            yield  # closing the file releases the flock
    finally:
        lock.release()
