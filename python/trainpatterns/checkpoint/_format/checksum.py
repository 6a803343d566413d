"""CRC-32 checksums of checkpoint files, computed on a helper thread while the file's bytes move.

Every file of a checkpoint is checksummed as it is written and verified as it is read. The CRC
(zlib's polynomial) comes from ``isal`` (ISA-L) or ``zlib_ng`` when one is installed
(``pip install trainpatterns[checkpoint]``: 3-4x faster than zlib here, which matters on restore),
else from ``zlib``; all give the same value and release the GIL, so one helper thread hashes a chunk
while the writing (or reading) thread moves the next.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import zlib
from typing import Optional

__all__ = ["crc32", "Crc32"]


def _pick_crc32():
    for module, attr in (("isal.isal_zlib", "crc32"), ("zlib_ng.zlib_ng", "crc32")):
        try:
            return getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            continue
    return zlib.crc32


crc32 = _pick_crc32()  # crc32(buffer, value=0) -> int, same results as zlib.crc32


class _HashThread:
    """One daemon thread that runs CRC-32 jobs in submission order. Our own rather than a
    ThreadPoolExecutor, because executors refuse work once interpreter shutdown has begun, and the
    exit handler still has to finish a pending checkpoint."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="trainpatterns-crc", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            buf, prev, fut = self._jobs.get()
            try:
                fut.set_result(crc32(buf, 0 if prev is None else prev.result()))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the value
                fut.set_exception(e)

    def submit(self, buf, prev: Optional[concurrent.futures.Future]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((buf, prev, fut))
        return fut


_hasher: Optional[_HashThread] = None
_hasher_lock = threading.Lock()


def _hash_thread() -> _HashThread:
    global _hasher
    with _hasher_lock:
        if _hasher is None:
            _hasher = _HashThread()
        return _hasher


def _reset_hasher_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts its own hasher when needed."""
    global _hasher, _hasher_lock
    _hasher, _hasher_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_hasher_after_fork)


class Crc32:
    """CRC-32 of a byte stream fed in order, computed on a helper thread (one worker, so chunks are
    hashed in the order given). Buffers must stay unchanged until :meth:`value` returns."""

    def __init__(self) -> None:
        self._last: Optional[concurrent.futures.Future] = None

    def update(self, buf) -> None:
        self._last = _hash_thread().submit(buf, self._last)

    def value(self) -> int:
        return 0 if self._last is None else self._last.result()
