"""Helper threads of the checkpoint code: one that hashes in the background, a few that share a copy.

Two jobs need threads. A write hashes each chunk on a helper while the writing thread moves the
next (:func:`hash_worker`, a :class:`Worker` that runs its jobs in submission order). A snapshot
copy and a restore's read are cut into chunks of ``CHUNK`` bytes that a few threads take in turn
(:func:`run_split`), so the caller waits once for all of them, and a thread that gets little CPU
takes few chunks. Torch's own copy splits every tensor over its intra-op threads and waits for all
of them at every tensor; when another process holds a core (a data loader, another rank, other
jobs on a shared machine), each of those waits lasts a scheduler slice, and a snapshot of a few
dozen tensors stalls 2-5x longer than the same bytes copied by one thread.

Our own daemon threads rather than a ThreadPoolExecutor, because executors refuse work once
interpreter shutdown has begun, and the exit handler still has to finish a pending checkpoint.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

__all__ = ["Worker", "hash_worker", "run_split", "split_ranges", "chunks", "plain_bytes", "copy_tensors"]

T = TypeVar("T")
MAX_SPLIT = 4  # threads a copy or read is split over: memory bandwidth is shared beyond a few
CHUNK = 4 << 20  # bytes per piece of work: a hand-off costs far less, a late thread holds up little


class Worker:
    """One daemon thread that runs jobs in submission order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the value
                fut.set_exception(e)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        return fut


_hasher: Optional[Worker] = None
_splitters: list[Worker] = []
_lock = threading.Lock()


def hash_worker() -> Worker:
    """The thread that hashes a write's chunks (its jobs wait only for earlier jobs of its own)."""
    global _hasher
    with _lock:
        if _hasher is None:
            _hasher = Worker("trainpatterns-crc")
        return _hasher


def _splitter(i: int) -> Worker:
    with _lock:
        while len(_splitters) <= i:
            _splitters.append(Worker(f"trainpatterns-split-{len(_splitters) + 1}"))
        return _splitters[i]


def _reset_after_fork() -> None:
    """A forked child has none of the parent's threads: it starts its own when needed."""
    global _hasher, _splitters, _lock
    _hasher, _splitters, _lock = None, [], threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def run_split(work: Sequence[Callable[[], T]]) -> list[T]:
    """Run every item of ``work`` on this thread and a few helpers (as many as torch may use: the
    caller's ``torch.set_num_threads`` holds for us too; at most MAX_SPLIT, at most one per item),
    each thread taking the next item not yet started; their results in order. Returns only when
    every started item has ended (one may still use a buffer or descriptor the caller frees on
    error), then raises the first error, if any; after an error no new item starts."""
    results: list = [None] * len(work)
    items = iter(range(len(work)))
    lock = threading.Lock()
    errors: list = []

    def drain() -> None:
        while not errors:
            with lock:
                i = next(items, None)
            if i is None:
                return
            try:
                results[i] = work[i]()
            except BaseException as e:  # noqa: BLE001 - raised by the caller, once every thread is done
                errors.append(e)

    helpers = max(1, min(MAX_SPLIT, torch.get_num_threads(), len(work))) - 1
    futures = [_splitter(k).submit(drain) for k in range(helpers)]
    try:
        drain()
    except BaseException as e:  # noqa: BLE001 - an interrupt: kept, raised once the helpers are done
        errors.append(e)
    for fut in futures:
        while True:  # an interrupt of this wait is kept, and the wait goes on until the helper is done
            try:
                fut.result()
                break
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                if fut.done():
                    break
    if errors:
        raise errors[0]
    return results


def split_ranges(sizes: Sequence[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of buffers of ``sizes`` bytes into ``parts`` contiguous shares of
    nearly equal bytes: for each share, its pieces as (buffer index, start, end)."""
    total = sum(sizes)
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    cuts = [total * (k + 1) // parts for k in range(parts)]
    k, pos = 0, 0
    for i, n in enumerate(sizes):
        start = 0
        while start < n:
            while pos >= cuts[k]:
                k += 1
            end = min(n, start + cuts[k] - pos)
            shares[k].append((i, start, end))
            pos += end - start
            start = end
    return shares


def chunks(sizes: Sequence[int]) -> list[list[tuple[int, int, int]]]:
    """The concatenation of buffers of ``sizes`` bytes cut into pieces of about ``CHUNK`` bytes
    (:func:`split_ranges`), at least one."""
    return split_ranges(sizes, max(1, -(-sum(sizes) // CHUNK)))


def plain_bytes(t: torch.Tensor) -> bool:
    """Whether ``t``'s bytes are its values: a dense, contiguous CPU tensor of the base class, with no
    lazy conjugate or negation (those :func:`copy_tensors` can copy byte for byte)."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous()
            and not t.is_conj() and not t.is_neg())


def copy_tensors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy every (destination, source) pair of :func:`plain_bytes` tensors of one dtype and shape,
    byte for byte, in :func:`chunks` shared by a few threads (``np.copyto`` releases the GIL)."""
    views = [(d.reshape(-1).view(torch.uint8).numpy(), s.reshape(-1).view(torch.uint8).numpy())
             for d, s in pairs if d.numel()]

    def copy(chunk: list) -> None:
        for i, a, b in chunk:
            np.copyto(views[i][0][a:b], views[i][1][a:b])

    run_split([lambda c=c: copy(c) for c in chunks([len(d) for d, _ in views])])
